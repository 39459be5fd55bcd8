"""Distillation recipes side by side on one quantized checkpoint: loss, trained tensors, zero-point form.

Every variant starts from the same saved student, distils it from the FP demo model on the windows ``compare.py``
uses (C4 train documents sharing no 16-token run with the 32 x 2048 calibration windows, 64 x 512 by default,
one epoch) and is evaluated like a ``compare.py`` row (WikiText-2 and C4, the first ``--windows`` windows of 2048).
A variant is a comma list of ``DistillConfig`` settings over the defaults, e.g. ``loss=mse,train_norms=False``;
``none`` evaluates the student as it is.

    neuqi quantize --bpw 2.5 --nsamples 32 --seqlen 2048 --calib c4 --out runs/smollm2-bpw2.5
    python benchmarks/distill_ablation.py runs/smollm2-bpw2.5 --variants "none;loss=mse,train_norms=False;loss=kl"

Prints a table and writes ``--out`` (JSON: one entry per variant, with the settings, losses and metrics).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the calibration windows, distillation windows and evaluator of the table)

from neuqi.commands.options import cli_fields  # noqa: E402
from neuqi.distill import DistillConfig, distill  # noqa: E402
from neuqi.eval import report  # noqa: E402
from neuqi.formats.checkpoint import load  # noqa: E402
from neuqi.formats.packed import set_weight_cache  # noqa: E402
from neuqi.pipeline import data, models  # noqa: E402


def parse_variant(text: str) -> dict[str, Any] | None:
    """``loss=kl,train_norms=False`` -> {"loss": "kl", "train_norms": False}, each value of its ``DistillConfig``
    field's type; ``none`` -> None (no distillation)."""
    if text.strip() == "none":
        return None
    kinds = {f.name: kind for f, kind in cli_fields(DistillConfig)}
    settings: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        kind = kinds.get(key, str)
        settings[key] = value == "True" if kind is bool else kind(value)
    DistillConfig(**settings)  # refuse a bad variant before any work
    return settings


def run(args: argparse.Namespace, variants: list[tuple[str, dict[str, Any] | None]]) -> list[dict[str, Any]]:
    cmp_args = compare.parse_args(["--windows", str(args.windows), "--distill-samples", str(args.distill_samples),
                                   "--distill-seqlen", str(args.distill_seqlen)])
    torch.manual_seed(cmp_args.seed)
    fp, tokenizer = models.load_model(cmp_args.model, dtype=cmp_args.dtype)
    calib, _ = data.calibration_tokens(cmp_args.calib, tokenizer, cmp_args.nsamples, cmp_args.seqlen, cmp_args.seed)
    tokens = compare.distill_windows(tokenizer, calib, cmp_args)
    rows = []
    for text, settings in variants:
        student = load(args.checkpoint, dtype=next(fp.parameters()).dtype)
        row: dict[str, Any] = {"variant": text, "settings": settings or {}}
        if settings is not None:
            config = DistillConfig(nsamples=tokens.shape[0], seqlen=tokens.shape[1], seed=cmp_args.seed, **settings)
            history = distill(student, fp, tokens, config, progress=False)
            row.update(config=config.to_dict(), seconds=history.total_seconds, first_loss=history.loss[0],
                       last_loss=history.loss[-1])
        set_weight_cache(student, True)
        t = time.perf_counter()
        row["metrics"] = compare.evaluate_model(student, tokenizer, cmp_args)["metrics"]
        row["eval_seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("variant", "metrics")}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a neuqi checkpoint of the demo model")
    p.add_argument("--variants", default="none;loss=mse,train_norms=False;loss=mse;loss=kl,train_norms=False;loss=kl",
                   help="';'-separated variants, each 'none' or a comma list of DistillConfig settings")
    p.add_argument("--windows", type=int, default=10, help="evaluation windows of 2048")
    p.add_argument("--distill-samples", type=int, default=64)
    p.add_argument("--distill-seqlen", type=int, default=512)
    p.add_argument("--out", default="benchmarks/results/distill_ablation.json")
    args = p.parse_args(argv)
    variants = [(text.strip(), parse_variant(text)) for text in args.variants.split(";")]
    rows = run(args, variants)
    print("\n| variant | WikiText-2 | C4 | seconds |\n|---|---:|---:|---:|")
    for r in rows:
        m = r["metrics"]
        print(f"| {r['variant']} | {m.get('wikitext2_ppl', float('nan')):.2f} | {m.get('c4_ppl', float('nan')):.2f} | "
              f"{r.get('seconds', 0):.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "machine": report.machine_info(), "rows": rows},
                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
