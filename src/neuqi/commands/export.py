"""`neuqi export CHECKPOINT --format hqq|gguf-q4_1|fp16|gptq|mlx --out PATH`: convert a neuqi checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("neuqi.export")

FORMATS = ("hqq", "gguf-q4_1", "fp16", "gptq", "mlx")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="convert a neuqi checkpoint to HQQ, GGUF Q4_1, dequantized fp16, or (lossy) integer-zero GPTQ",
        description="hqq: lossless, loadable by hqq's AutoHQQHFModel.from_quantized. "
        "gguf-q4_1: llama.cpp file (bits <= 4, group size a multiple of 32; "
        "zero-point offset rounded to fp16). "
        "fp16: plain HF model with dequantized weights. "
        "gptq: LOSSY, zero-points rounded to integers for engines that need them; "
        "prints the added weight error per layer. "
        "mlx: mlx-lm model directory (bits 2-6, 8; group size 32/64/128), exact up to --mlx-scale-dtype.",
    )
    p.add_argument("checkpoint", type=Path, help="neuqi checkpoint directory (from `neuqi quantize`)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--out", required=True, type=Path, help="output directory (a .gguf file for gguf-q4_1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="fp16 format: dtype of the dequantized weights (default float16)",
    )
    p.add_argument(
        "--tokenizer-gguf",
        type=Path,
        default=None,
        help="gguf-q4_1: copy the vocabulary from this GGUF file (most faithful for llama.cpp)",
    )
    p.add_argument(
        "--tokenizer-pre",
        default="default",
        help="gguf-q4_1: llama.cpp pre-tokenizer name when converting an HF BPE tokenizer (e.g. smollm)",
    )
    p.add_argument(
        "--mlx-scale-dtype",
        default="float16",
        choices=("float16", "float32"),
        help="mlx format: dtype of scales and biases (float16: mlx-lm's size, bias -s*Z rounded, at most "
        "|Z|*2^-11 quantization steps; float32: bit-exact, 0.5 more bits per weight at group 64)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import CheckpointError
    from ..formats import exports as export
    from ..formats.checkpoint import load, load_tokenizer

    model = load(args.checkpoint)
    try:
        tokenizer = load_tokenizer(args.checkpoint)
    except CheckpointError:
        tokenizer = None
        log.warning("%s has no tokenizer; the export will not include one", args.checkpoint)

    if args.format == "hqq":
        export.export_hqq(model, args.out, tokenizer, overwrite=args.overwrite)
    elif args.format == "fp16":
        export.export_fp16(
            model, args.out, tokenizer, dtype=getattr(torch, args.dtype), overwrite=args.overwrite
        )
    elif args.format == "gguf-q4_1":
        err = export.export_gguf_q4_1(
            model,
            args.out,
            tokenizer=tokenizer,
            tokenizer_gguf=args.tokenizer_gguf,
            tokenizer_pre=args.tokenizer_pre,
            overwrite=args.overwrite,
        )
        print(f"max zero-offset rounding error: {err:.2e} quantization steps (m = -s*Z stored as fp16)")
    elif args.format == "mlx":
        export.export_mlx(
            model, args.out, tokenizer, scale_dtype=args.mlx_scale_dtype, overwrite=args.overwrite
        )
    else:
        losses = export.export_gptq(model, args.out, tokenizer, overwrite=args.overwrite)
        print("LOSSY integer-zero export: added weight error vs the neuqi weights")
        print(f"{'layer':<48} {'mse':>11} {'relative':>9}")
        for name, loss in losses.items():
            print(f"{name:<48} {loss.mse:>11.3e} {loss.relative:>9.2%}")
        total = export.total_loss(losses)
        print(f"{'total (numel-weighted)':<48} {total.mse:>11.3e} {total.relative:>9.2%}")
    size = (
        sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
        if args.out.is_dir()
        else args.out.stat().st_size
    )
    print(f"wrote {args.out} ({args.format}, {size / 2**20:.1f} MiB)")
    return 0
