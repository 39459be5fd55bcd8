"""Side by side with mlx-lm's own quantizers on the demo model (SmolLM2-135M-Instruct), scored by our evaluator.

Rows at W{2,3,4} g64 (decoder linears only; embeddings and the tied head stay FP in every row, so every row has
the same bits per weight in the quantized linears: k + 32/64 with 16-bit scales and biases):

* ``mlx-rtn``: ``mlx_lm.convert(quantize=True, q_bits=k, q_group_size=64, dtype="bfloat16")`` (affine min-max,
  bf16 scales and biases, as its users run it), restricted to the decoder linears by ``quant_predicate``;
* ``ours``: a neuqi checkpoint (NeUQI + LDLQ, ``--ours w3=DIR,...``) written with ``export_mlx`` (fp16 scales and
  biases).
Every row's weights are read back from the MLX files the tool wrote (safetensors: uint32 codes, scales, biases),
dequantized exactly in fp32 as w = scale·q + bias, put into the FP model, and scored with
``neuqi.eval.perplexity`` (WikiText-2 and C4, the first ``--windows`` windows of 2048, forward in ``--dtype``).

* ``mlx-gptq`` (``--rows ...,gptq``): ``mlx_lm.quant.gptq.gptq_quantize`` called on our calibration windows
  (``--nsamples`` × ``--seqlen`` C4, the ids compare.py uses) instead of its downloaded text, on the FP model in fp32
  (its Hessians accumulate in the model's dtype); it supports 2, 4 and 8 bits only (no 3-bit row);
* ``mlx-awq`` (``--rows ...,awq``): ``mlx_lm.quant.awq.awq_quantize`` on the same windows. AWQ folds its scales into
  the RMSNorm weights and the previous linear, so its rows are scored with every decoder tensor it wrote (norms
  included), not only the quantized linears; it quantizes the embedding too (``embed_bits``), which we do not
  score (our FP embedding and tied head are kept in every row).

MLX's CPU backend is slow on this machine (an fp32 512 × 576 × 1536 matmul ran at 5.7 GFLOP/s, its 4-bit quantized
matmul at 2.0), so the calibrated rows take long: ``--nsamples``/``--seqlen`` say what they got. DWQ (training through
MLX) is not run. ``--reuse`` adds our rows that benchmarks/compare.py measured in memory (same evaluator, same
windows), labelled as such.

    python benchmarks/mlx_compare.py --bits 2,3,4 --ours w3=/tmp/ours-w3g64

Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuqi.eval import perplexity
from neuqi.formats.checkpoint import load
from neuqi.formats.exports import export_mlx
from neuqi.formats.packing import unpack
from neuqi.pipeline import data, models

COMPARE_DIR = Path("benchmarks/results/compare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ours", default="", help="comma list of wK=CHECKPOINT_DIR (neuqi checkpoints to export)")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help=f"add our in-memory rows from {COMPARE_DIR} (NeUQI + LDLQ, + distill)")
    p.add_argument("--model", default="smollm2", help="model to quantize (demo model by default)")
    p.add_argument("--rows", default="rtn", help="mlx-lm rows: comma list of rtn, gptq, awq")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (gptq, awq)")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length (gptq, awq)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", default="wikitext2,c4")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="benchmarks/results/mlx_compare.json")
    return p.parse_args(argv)


def read_mlx_decoder_tensors(mlx_dir: Path) -> dict[str, torch.Tensor]:
    """{parameter name: tensor fp32} of the unquantized decoder-layer tensors (norm weights, biases) in an MLX
    model directory: what AWQ rescaled."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(mlx_dir.glob("model*.safetensors")):
        tensors.update(load_file(f))
    quantized = {k.removesuffix(".scales") for k in tensors if k.endswith(".scales")}
    return {k: t.float() for k, t in tensors.items() if k.startswith("model.layers.")
            and k.rsplit(".", 1)[0] not in quantized}


def read_mlx_linears(mlx_dir: Path) -> dict[str, torch.Tensor]:
    """{module name: w (out, in) fp32} for every affine-quantized linear in an MLX model directory, w = s·q + b
    computed in fp32 (s·q is exact; one rounding) from the stored uint32 codes, scales and biases."""
    from safetensors.torch import load_file

    config = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(mlx_dir.glob("model*.safetensors")):
        tensors.update(load_file(f))
    weights = {}
    for key in [k for k in tensors if k.endswith(".scales") and k.startswith("model.layers.")]:
        name = key.removesuffix(".scales")
        spec = config.get(name) if isinstance(config.get(name), dict) else config
        bits, group = spec["bits"], spec["group_size"]
        scales, biases = tensors[key].float(), tensors[f"{name}.biases"].float()  # (out, G)
        packed = tensors[f"{name}.weight"].contiguous().view(torch.uint8)  # the uint32 words' little-endian bytes
        in_features = scales.shape[1] * group
        q = unpack(packed, bits, in_features).float().view(scales.shape[0], -1, group)
        weights[name] = (scales.unsqueeze(-1) * q + biases.unsqueeze(-1)).view(scales.shape[0], in_features)
    return weights


def score(fp: nn.Module, tokenizer, weights: dict[str, torch.Tensor], args: argparse.Namespace,
          others: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Perplexities of ``fp`` with its decoder linears' weights replaced by ``weights`` and the parameters
    ``others`` (e.g. AWQ's rescaled norms) replaced too."""
    model = copy.deepcopy(fp)
    for name, w in weights.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or linear.weight.shape != w.shape:
            raise ValueError(f"{name}: MLX weight {tuple(w.shape)} does not fit {linear}")
        with torch.no_grad():
            linear.weight.copy_(w)
    params = dict(model.named_parameters())
    for name, t in (others or {}).items():
        if name not in params or params[name].shape != t.shape:
            raise ValueError(f"{name}: MLX tensor {tuple(t.shape)} has no place in the model")
        with torch.no_grad():
            params[name].copy_(t)
    model.to(getattr(torch, args.dtype))
    return {f"{ds}_ppl": perplexity(model, tokenizer, ds, max_windows=args.windows, progress=False)["ppl"]
            for ds in args.datasets.split(",")}


def decoder_linear(path: str, module: Any) -> bool:
    import mlx.nn as mnn

    return isinstance(module, mnn.Linear) and path.startswith("model.layers.")


def mlx_rtn_row(fp_dir: Path, bits: int, args: argparse.Namespace, tmp: Path) -> Path:
    from mlx_lm import convert

    out = tmp / f"mlx-rtn-w{bits}"
    convert(str(fp_dir), str(out), quantize=True, q_bits=bits, q_group_size=args.group_size, dtype="bfloat16",
            quant_predicate=decoder_linear)
    return out


def mlx_gptq_row(fp_dir: Path, bits: int, args: argparse.Namespace, tmp: Path, calib: torch.Tensor) -> Path:
    """mlx-lm's GPTQ at W``bits`` g``group_size`` on ``calib`` (n, seqlen) token ids; the embedding gets its
    fallback (8-bit, not scored)."""
    import mlx.core as mx
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import load as mlx_load
    from mlx_lm.utils import save as mlx_save

    model, tokenizer, config = mlx_load(str(fp_dir), lazy=True, return_config=True)
    data = mx.array(calib.numpy().astype("int32"))
    model, config["quantization"] = gptq_quantize(model, data, bits, args.group_size, 8, args.group_size,
                                                  batch_size=1)
    out = tmp / f"mlx-gptq-w{bits}"
    mlx_save(str(out), str(fp_dir), model, tokenizer, config)
    return out


def mlx_awq_row(fp_dir: Path, bits: int, args: argparse.Namespace, tmp: Path, calib: torch.Tensor) -> Path:
    """mlx-lm's AWQ (scale search + clipping, n_grid 20) at W``bits`` g``group_size`` on ``calib``."""
    import mlx.core as mx
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config
    from mlx_lm.utils import load as mlx_load
    from mlx_lm.utils import save as mlx_save

    model, tokenizer, config = mlx_load(str(fp_dir), lazy=True, return_config=True)
    awq_quantize(model, mx.array(calib.numpy().astype("int32")), AWQ_MODEL_CONFIGS[config["model_type"]],
                 group_size=args.group_size, bits=bits, embed_group_size=args.group_size, embed_bits=8)
    out = tmp / f"mlx-awq-w{bits}"
    mlx_save(str(out), str(fp_dir), model, tokenizer, update_config(model, config))
    return out


def reused_rows(bits: int, group: int) -> list[dict[str, Any]]:
    rows = []
    for method, label in (("neuqi", "ours: NeUQI + LDLQ (compare.py, in memory)"),
                          ("distill", "ours: NeUQI + LDLQ + distill (compare.py, in memory)")):
        f = COMPARE_DIR / f"smollm2-w{bits}g{group}-{method}.json"
        if f.is_file():
            d = json.loads(f.read_text())
            rows.append({"row": label, "bits": bits, "group_size": group, "source": str(f),
                         "metrics": d["metrics"], "bits_per_weight": d["bits_per_weight"]})
    return rows


def linear_formats(mlx_dir: Path) -> set[tuple[int, int]]:
    """{(bits, group_size)} of the quantized decoder linears in an MLX model directory."""
    quant = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    specs = {k: v for k, v in quant.items() if isinstance(v, dict) and k.startswith("model.layers.")}
    return {(v["bits"], v["group_size"]) for v in specs.values()} or {(quant["bits"], quant["group_size"])}


ROW_LABELS = {"rtn": "mlx-lm RTN (convert -q)", "gptq": "mlx-lm GPTQ (gptq_quantize)",
              "awq": "mlx-lm AWQ (awq_quantize)"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fp, tokenizer = models.load_model(args.model, dtype="float32")
    ours = dict(item.split("=", 1) for item in args.ours.split(",") if item)
    kinds = [r for r in args.rows.split(",") if r]
    calib = None
    if {"gptq", "awq"} & set(kinds):
        calib, origin = data.calibration_tokens("c4", tokenizer, args.nsamples, args.seqlen, args.seed)
        print(f"calibration: {tuple(calib.shape)} from {origin}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fp_dir = tmp / "fp"
        fp.save_pretrained(fp_dir)
        tokenizer.save_pretrained(fp_dir)
        for bits in (int(b) for b in args.bits.split(",")):
            todo: dict[str, Any] = {ROW_LABELS[k]: k for k in kinds if not (k == "gptq" and bits not in (2, 4, 8))}
            if f"w{bits}" in ours:
                todo["ours: NeUQI + LDLQ (export_mlx, fp16 scales/biases)"] = Path(ours[f"w{bits}"])
            for label, what in todo.items():
                t0 = time.perf_counter()
                if isinstance(what, Path):
                    mlx_dir = tmp / f"ours-w{bits}"
                    export_mlx(load(what), mlx_dir, scale_dtype="float16")
                elif what == "rtn":
                    mlx_dir = mlx_rtn_row(fp_dir, bits, args, tmp)
                else:
                    mlx_dir = {"gptq": mlx_gptq_row, "awq": mlx_awq_row}[what](fp_dir, bits, args, tmp, calib)
                made_s = time.perf_counter() - t0
                if linear_formats(mlx_dir) != {(bits, args.group_size)}:
                    raise ValueError(f"{label}: {mlx_dir} holds {linear_formats(mlx_dir)}, not W{bits} "
                                     f"g{args.group_size}")
                weights = read_mlx_linears(mlx_dir)
                others = read_mlx_decoder_tensors(mlx_dir) if what == "awq" else None
                metrics = score(fp, tokenizer, weights, args, others)
                n = sum(w.numel() for w in weights.values())
                rows.append({"row": label, "bits": bits, "group_size": args.group_size, "linears": len(weights),
                             "bits_per_weight": bits + 32 / args.group_size, "quantized_weights": n,
                             "calibration": None if what == "rtn" or isinstance(what, Path) else
                             f"{args.nsamples} x {args.seqlen} C4 (seed {args.seed})",
                             "metrics": metrics, "quantize_s": round(made_s, 1),
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(rows[-1], flush=True)
            if args.reuse:
                rows += reused_rows(bits, args.group_size)
    names = [f"{ds}_ppl" for ds in args.datasets.split(",")]
    print(f"\n{'row':<58} {'bits':>4} " + " ".join(f"{n:>14}" for n in names))
    for r in rows:
        values = " ".join(f"{r['metrics'].get(n, float('nan')):>14.2f}" for n in names)
        print(f"{r['row']:<58} {r['bits']:>4} {values}")
    out = {"conditions": {"windows": args.windows, "seqlen": 2048, "dtype": args.dtype, "datasets": args.datasets,
                          "group_size": args.group_size}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
