"""CUDA checks of neuqi's device paths, for a machine with a GPU (prints a table, writes JSON).

    PYTHONPATH=src python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Sections (each runs on its own; a failure is recorded, not raised):
1. ``quantize``: NeUQI + LDLQ W3 g32 of a tiny Llama on CUDA against the same run on the CPU (fp32 model): the
   summed layer loss and the share of equal codes (the two devices sum the Hessians in different orders, so a few
   rounding decisions may differ).
2. ``kernels``: every ``QuantLinear`` forward path (auto, int4, dequant, reference) on CUDA for 2/3/4 bits and
   groups 64/128 in bf16 and fp16, against the fp32 product with the dequantized weight.
3. ``layer_8b``: one Llama-3-8B-shaped decoder layer (hidden 4096, intermediate 14336, 32 heads, 8 kv heads) quantized
   with NeUQI + LDLQ at W3 g128 on 16 x 2048 random tokens; seconds per layer, extrapolated to 32 layers.
4. ``perplexity``: the full-model and the layer-by-layer perplexity paths on CUDA agree.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from neuqi.formats.packed import QuantLinear, pack_model, quantized_linears  # noqa: E402
from neuqi.pipeline import QuantConfig, quantize_model  # noqa: E402
from neuqi.quant import grid  # noqa: E402
from neuqi.quant.init import init_params  # noqa: E402


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> tf.LlamaForCausalLM:
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


def check_quantize(device: torch.device) -> dict:
    import copy

    model = _llama(128, 256, 2, 4, 2, 512)
    tokens = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(bits=3, group_size=32, solver="ldlq", init="neuqi")
    out = {}
    for dev in ("cpu", device):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        res = quantize_model(m.to(dev), tokens, config, device=dev, progress=False)
        out[str(dev)] = {"loss": res.totals["loss"], "seconds": round(time.perf_counter() - t, 2),
                         "codes": {n: grid.quantize(m.get_submodule(n).weight.float().cpu(), qp.scale, qp.zero_point,
                                                    3, 32) for n, qp in res.qparams.items()}}
    a, b = out["cpu"]["codes"], out[str(device)]["codes"]
    equal = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
    return {"loss_cpu": out["cpu"]["loss"], "loss_cuda": out[str(device)]["loss"], "equal_codes": round(equal, 5),
            "seconds_cuda": out[str(device)]["seconds"], "ok": equal > 0.99 and abs(
                out["cpu"]["loss"] / out[str(device)]["loss"] - 1) < 0.02}


def check_kernels(device: torch.device) -> dict:
    rows = {}
    for bits in (2, 3, 4):
        for g in (64, 128):
            torch.manual_seed(bits * g)
            linear = torch.nn.Linear(1024, 512, bias=True)
            scale, zero = init_params(linear.weight.detach(), bits=bits, group_size=g, method="minmax")
            layer = QuantLinear.from_float(linear, scale, zero, bits, g, exact=False).to(device)
            ref_w = layer.dequantized_weight().float()
            for dtype in (torch.bfloat16, torch.float16):
                for m in (1, 4, 64):
                    x = torch.randn(m, 1024, device=device).to(dtype)
                    want = x.float() @ ref_w.T + layer.bias.float()
                    for kernel in ("auto", "int4", "dequant", "reference"):
                        layer.kernel = kernel
                        got = layer(x).float()
                        err = float((got - want).abs().max() / want.abs().max())
                        key = f"w{bits}g{g}-{str(dtype)[6:]}-m{m}-{kernel}"
                        rows[key] = round(err, 6)
    worst = max(rows.values())
    return {"max_rel_err": worst, "ok": worst < 2e-2, "rows": rows}


def check_layer_8b(device: torch.device) -> dict:
    model = _llama(4096, 14336, 1, 32, 8, 1024).to(torch.bfloat16).to(device)
    tokens = torch.randint(0, 1024, (16, 2048), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(bits=3, group_size=128, solver="ldlq", init="neuqi")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    res = quantize_model(model, tokens, config, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    return {"seconds_per_layer": round(seconds, 1), "extrapolated_32_layers_min": round(32 * seconds / 60, 1),
            "peak_cuda_mb": res.memory.get("peak_cuda_mb"), "init_seconds": round(sum(
                r.init_seconds or 0 for r in res.records), 1), "ok": True}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def check_perplexity(device: torch.device) -> dict:
    from neuqi.eval.perplexity import _nll_full, _nll_layers

    model = _llama(128, 256, 2, 4, 2, 512).to(device)
    batches = [torch.randint(0, 512, (1, 256), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    bar = _NoBar()
    full = torch.stack(_nll_full(model, batches, device, bar)).mean()
    layers = torch.stack(_nll_layers(model, batches, device, bar)).mean()
    pack_model(model, quantize_model(model, batches[0].repeat(2, 1), QuantConfig(bits=4, group_size=32),
                                     device=device, progress=False).qparams)
    n_packed = sum(1 for _ in quantized_linears(model))
    return {"nll_full": float(full), "nll_layers": float(layers), "packed_linears": n_packed,
            "ok": abs(float(full) - float(layers)) < 1e-3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "transformers": tf.__version__, "python": platform.python_version(), "sections": {}}
    checks = {"quantize": check_quantize, "kernels": check_kernels, "perplexity": check_perplexity,
              "layer_8b": check_layer_8b}
    for name, fn in checks.items():
        if name in args.skip.split(","):
            continue
        t = time.perf_counter()
        try:
            section = fn(device)
        except Exception as exc:
            section = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        section["wall_s"] = round(time.perf_counter() - t, 1)
        result["sections"][name] = section
        shown = {k: v for k, v in section.items() if k not in ("rows", "trace")}
        print(f"{name:<11} {'ok' if section.get('ok') else 'FAILED'}  {shown}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(s.get("ok") for s in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
