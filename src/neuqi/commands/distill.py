"""`neuqi distill CHECKPOINT`: lightweight distillation of a packed checkpoint's scales and zero-points (§6).

Windows never repeat the calibration data (spec §10.12: the reference's distillation windows *are* its
calibration windows). When the checkpoint's ``neuqi_summary.json`` records its calibration (origin, windows,
seqlen, seed) and the distillation text is the same source, those windows are re-drawn exactly as
``neuqi quantize`` drew them, and every document sharing any run of ``NGRAM`` tokens with them is removed
before the distillation windows are sampled. The saved summary reports the remaining overlap, measured the
same way (0 by construction). Without that record the windows come from the whole source, with a warning.

Output directory (written atomically): the packed checkpoint, ``neuqi_summary.json`` (the quantization summary
carried over, plus a ``distillation`` section), ``distill_history.json`` (per-step loss, lr, grad norm,
seconds) and ``distill_loss.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import jsonio
from ..errors import CheckpointError, ConfigError, DataError
from ..pipeline.data import distillation_windows

log = logging.getLogger(__name__)

SUMMARY_NAME = "neuqi_summary.json"  # as written by `neuqi quantize`
HISTORY_NAME = "distill_history.json"
PLOT_NAME = "distill_loss.png"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distill a packed checkpoint: train its scales and zero-points against the original model",
        description="Lightweight distillation (NeUQI §6): the integer codes stay frozen; every group's scale "
        "and zero-point trains (fp32 master copies) so the quantized model's final hidden states (mse) or "
        "next-token distributions (kl) match the teacher's on C4 windows that avoid the calibration data.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="neuqi checkpoint directory (neuqi quantize)")
    p.add_argument("--teacher", default=None,
                   help="original model (default: the model named in the checkpoint summary, else smollm2)")
    p.add_argument("--loss", default="mse", choices=("mse", "kl"),
                   help="mse: final hidden states (reference, default); kl: KL(teacher||student) on logits")
    p.add_argument("--nsamples", type=int, default=256, help="distillation windows (default 256)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate (default 3e-4)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the windows (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per optimizer step (default 1)")
    p.add_argument("--calib", default="c4", help="distillation text: c4 | wikitext2 | PATH (default c4)")
    p.add_argument("--seed", type=int, default=0, help="window sampling and shuffling seed (default 0)")
    p.add_argument("--allow-calibration-overlap", action="store_true",
                   help="do not exclude the calibration documents (the reference's behaviour)")
    p.add_argument("--train-norms", action="store_true", help="also train norm weights (the reference did)")
    p.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype (default auto: bf16 where native, else fp32); masters are fp32")
    p.add_argument("--dtype", default=None,
                   help="dtype of the student's unquantized tensors and of the teacher (default: as stored)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer in backward (large models on one GPU)")
    p.add_argument("--no-teacher-cache", action="store_true",
                   help="run the teacher every step instead of caching its outputs on the CPU")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] | ... (default: the accelerator, else cpu)")
    p.add_argument("--out", default=None, help="output directory (default CHECKPOINT-distill-LOSS)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--eval-ppl", type=int, default=0, metavar="N",
                   help="WikiText-2 perplexity before and after, on the first N windows of 2048 tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ run
def read_summary(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``neuqi_summary.json`` ({} if there is none or it is unreadable)."""
    path = Path(checkpoint) / SUMMARY_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


def _config(args: argparse.Namespace):
    """Validate every option before anything is loaded; returns the DistillConfig."""
    from ..distill import DistillConfig
    from ..pipeline.data import NAMED_SOURCES

    if args.eval_ppl < 0:
        raise ConfigError("--eval-ppl must be >= 0")
    if args.calib not in NAMED_SOURCES and not Path(args.calib).exists():
        raise DataError(f"--calib {args.calib!r} is not one of {list(NAMED_SOURCES)} nor an existing path")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {args.device!r}: {exc}") from None
    return DistillConfig(
        loss=args.loss, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, nsamples=args.nsamples,
        seqlen=args.seqlen, seed=args.seed, train_norms=args.train_norms, compute_dtype=args.compute_dtype,
        gradient_checkpointing=args.gradient_checkpointing, cache_teacher=not args.no_teacher_cache,
        avoid_calibration_overlap=not args.allow_calibration_overlap,
    )


def _check_pair(student, teacher) -> None:
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        a, b = getattr(student.config, key, None), getattr(teacher.config, key, None)
        if a != b:
            raise ConfigError(f"the teacher does not match the checkpoint: {key} {b} vs {a}; pass the "
                              "original model with --teacher")


def plot_history(history: dict[str, Any], path: Path) -> bool:
    """Loss (log scale) and learning rate against the step, as a PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no %s (pip install 'neuqi[eval]')", path.name)
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    loss = np.asarray(history["loss"])
    steps = np.arange(1, len(loss) + 1)
    k = max(1, len(loss) // 16)  # running mean over k steps: per-window losses are noisy
    ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.4, label="per step")
    ax.plot(steps[k - 1 :], np.convolve(loss, np.ones(k) / k, "valid"), color="tab:blue", lw=1.6,
            label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="distillation loss", yscale="log")
    ax.legend(loc="upper right")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, history["lr"], color="tab:gray", lw=1, ls="--")
    lr_ax.set_ylabel("learning rate", color="tab:gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    from ..distill import distill
    from ..eval import default_device, perplexity
    from ..formats.checkpoint import atomic_output_dir, load, load_tokenizer, read_quantization_config, save_quantized
    from ..formats.packed import set_weight_cache
    from ..pipeline.models import load_model, parse_dtype

    device = torch.device(args.device) if args.device else default_device()
    out = Path(args.out or f"{str(args.checkpoint).rstrip('/')}-distill-{config.loss}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CheckpointError(f"output directory {out} exists and is not empty; pass --overwrite to replace")
    t0 = time.perf_counter()
    qc = read_quantization_config(args.checkpoint)
    summary = read_summary(args.checkpoint)
    teacher_src = args.teacher or (summary.get("model") or {}).get("source") or "smollm2"
    if teacher_src == "smollm2":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    student = load(args.checkpoint, device="cpu", dtype=parse_dtype(args.dtype))
    dtype = next(p.dtype for p in student.parameters() if p.is_floating_point())
    teacher, teacher_tokenizer = load_model(teacher_src, dtype=dtype, device="cpu")
    _check_pair(student, teacher)
    try:
        tokenizer = load_tokenizer(args.checkpoint)
    except CheckpointError:
        tokenizer = teacher_tokenizer
    calibration = summary.get("calibration") if config.avoid_calibration_overlap else None
    tokens, data = distillation_windows(tokenizer, args.calib, config.nsamples, config.seqlen, config.seed,
                                        calibration)
    if not config.avoid_calibration_overlap:
        data["calibration_overlap"] = "not checked (--allow-calibration-overlap)"
    log.info("distilling %s from %s on %d x %d tokens of %s (calibration overlap: %s)", args.checkpoint,
             teacher_src, config.nsamples, config.seqlen, args.calib, data["calibration_overlap"])

    def ppl() -> dict[str, Any]:
        set_weight_cache(student, True)  # dequantize each layer once, not once per window
        try:
            return perplexity(student, tokenizer, "wikitext2", seqlen=2048, max_windows=args.eval_ppl,
                              device=device, progress=not args.quiet)
        finally:
            set_weight_cache(student, False)

    evals: dict[str, Any] = {"before": ppl()} if args.eval_ppl else {}
    history = distill(student, teacher, tokens, config, device=device, progress=not args.quiet).to_dict()
    del teacher
    if args.eval_ppl:
        evals["after"] = ppl()
        log.info("wikitext2 ppl (%d windows): %.3f -> %.3f", args.eval_ppl, evals["before"]["ppl"],
                 evals["after"]["ppl"])
    section = {"checkpoint": str(args.checkpoint), "teacher": teacher_src, "config": config.to_dict(),
               "data": data, "device": str(device), "compute_dtype": history["compute_dtype"],
               "trainable": history["trainable"], "steps": len(history["loss"]),
               "loss_first": history["loss"][0], "loss_last": history["loss"][-1],
               "teacher_s": history["teacher_seconds"], "train_s": history["total_seconds"],
               "wall_s": round(time.perf_counter() - t0, 3), "eval": evals}
    summary["distillation"] = section
    quant_config = {**qc, "distillation": {"teacher": teacher_src, "loss": config.loss,
                                           "steps": section["steps"], "tokens": int(tokens.numel())}}
    with atomic_output_dir(out, args.overwrite) as tmp:
        save_quantized(student, tmp, tokenizer, quant_config=quant_config, overwrite=True)
        (tmp / SUMMARY_NAME).write_text(jsonio.dumps(summary, indent=1, default=str))
        (tmp / HISTORY_NAME).write_text(jsonio.dumps(history, indent=1))
        plot_history(history, tmp / PLOT_NAME)
    msg = f"distilled {section['steps']} steps ({config.loss}) in {section['wall_s']:.0f} s; saved to {out}"
    if evals:
        msg += f"; wikitext2 ppl {evals['before']['ppl']:.3f} -> {evals['after']['ppl']:.3f}"
    print(msg)
    return 0
