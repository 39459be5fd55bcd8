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

mlx-lm's GPTQ, AWQ and DWQ need calibration forwards (and, for DWQ, training) through MLX, whose CPU backend runs
SmolLM2 at under 1 GFLOP/s on this machine (measured: 200 s for one 512-token fp32 forward): with our 32 × 2048 C4
windows that is hours per row, so those rows are not run here (see the README). ``--reuse`` adds our rows that
benchmarks/compare.py measured in memory (same evaluator, same windows), labelled as such.

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
from neuqi.pipeline import models

COMPARE_DIR = Path("benchmarks/results/compare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ours", default="", help="comma list of wK=CHECKPOINT_DIR (neuqi checkpoints to export)")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help=f"add our in-memory rows from {COMPARE_DIR} (NeUQI + LDLQ, + distill)")
    p.add_argument("--datasets", default="wikitext2,c4")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="benchmarks/results/mlx_compare.json")
    return p.parse_args(argv)


def read_mlx_linears(mlx_dir: Path) -> dict[str, torch.Tensor]:
    """{module name: w (out, in) fp32} for every affine-quantized linear in an MLX model directory, w = s·q + b
    computed in fp32 (s·q is exact; one rounding) from the stored uint32 codes, scales and biases."""
    from safetensors.torch import load_file

    config = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(mlx_dir.glob("model*.safetensors")):
        tensors.update(load_file(f))
    weights = {}
    for key in [k for k in tensors if k.endswith(".scales")]:
        name = key.removesuffix(".scales")
        spec = config.get(name) if isinstance(config.get(name), dict) else config
        bits, group = spec["bits"], spec["group_size"]
        scales, biases = tensors[key].float(), tensors[f"{name}.biases"].float()  # (out, G)
        packed = tensors[f"{name}.weight"].contiguous().view(torch.uint8)  # the uint32 words' little-endian bytes
        in_features = scales.shape[1] * group
        q = unpack(packed, bits, in_features).float().view(scales.shape[0], -1, group)
        weights[name] = (scales.unsqueeze(-1) * q + biases.unsqueeze(-1)).view(scales.shape[0], in_features)
    return weights


def score(fp: nn.Module, tokenizer, weights: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    model = copy.deepcopy(fp)
    for name, w in weights.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or linear.weight.shape != w.shape:
            raise ValueError(f"{name}: MLX weight {tuple(w.shape)} does not fit {linear}")
        with torch.no_grad():
            linear.weight.copy_(w)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fp, tokenizer = models.load_model("smollm2", dtype="float32")
    ours = dict(item.split("=", 1) for item in args.ours.split(",") if item)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fp_dir = tmp / "fp"
        fp.save_pretrained(fp_dir)
        tokenizer.save_pretrained(fp_dir)
        for bits in (int(b) for b in args.bits.split(",")):
            dirs = {"mlx-lm RTN (convert -q)": None}
            if f"w{bits}" in ours:
                dirs["ours: NeUQI + LDLQ (export_mlx, fp16 scales/biases)"] = Path(ours[f"w{bits}"])
            for label, ckpt in dirs.items():
                t0 = time.perf_counter()
                if ckpt is None:
                    mlx_dir = mlx_rtn_row(fp_dir, bits, args, tmp)
                else:
                    mlx_dir = tmp / f"ours-w{bits}"
                    export_mlx(load(ckpt), mlx_dir, scale_dtype="float16")
                weights = read_mlx_linears(mlx_dir)
                quant = json.loads((mlx_dir / "config.json").read_text())["quantization"]
                if (quant["bits"], quant["group_size"]) != (bits, args.group_size):
                    raise ValueError(f"{label}: {mlx_dir} holds W{quant['bits']} g{quant['group_size']}, "
                                     f"not W{bits} g{args.group_size}")
                metrics = score(fp, tokenizer, weights, args)
                n = sum(w.numel() for w in weights.values())
                rows.append({"row": label, "bits": bits, "group_size": args.group_size, "linears": len(weights),
                             "bits_per_weight": bits + 32 / args.group_size, "quantized_weights": n,
                             "metrics": metrics, "seconds": round(time.perf_counter() - t0, 1)})
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
