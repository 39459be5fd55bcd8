"""`neuqi distill CHECKPOINT`: lightweight distillation of a packed checkpoint's scales, zero-points and norms (§6).

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
from ..distill.config import DistillConfig
from ..errors import CheckpointError, ConfigError, DataError
from ..formats.output import check_output_dir
from ..pipeline.data import distillation_windows
from .options import add_config_options, config_kwargs

log = logging.getLogger(__name__)

SUMMARY_NAME = "neuqi_summary.json"  # as written by `neuqi quantize`
HISTORY_NAME = "distill_history.json"
PLOT_NAME = "distill_loss.png"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distill a packed checkpoint: train its scales, zero-points and norms against the original model",
        description="Lightweight distillation (NeUQI §6): the integer codes stay frozen; every group's scale "
        "and zero-point and the norm weights train (fp32 master copies) so the quantized model's next-token "
        "distributions (kl, the default) or final hidden states (mse, the reference's) match the teacher's on C4 "
        "windows that avoid the calibration data.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="neuqi checkpoint directory (neuqi quantize)")
    add_config_options(p, DistillConfig, "distillation")
    p.add_argument("--allow-calibration-overlap", dest="avoid_calibration_overlap", action="store_const",
                   const=False, help=argparse.SUPPRESS)  # the old name of --no-avoid-calibration-overlap
    io = p.add_argument_group("run options")
    io.add_argument("--teacher", default=None,
                    help="original model (default: the model named in the checkpoint summary, else smollm2)")
    io.add_argument("--calib", default="c4", help="distillation text: c4 | wikitext2 | PATH (default c4)")
    io.add_argument("--dtype", default=None,
                    help="dtype of the student's unquantized tensors and of the teacher (default: as stored)")
    io.add_argument("--device", default=None, help="cpu | cuda[:N] | ... (default: the accelerator, else cpu)")
    io.add_argument("--out", default=None, help="output directory (default CHECKPOINT-distill-LOSS)")
    io.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    io.add_argument("--eval-ppl", type=int, default=0, metavar="N",
                    help="WikiText-2 perplexity before and after, on the first N windows of 2048 tokens")
    io.add_argument("--quiet", action="store_true", help="no progress bars")
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
    return DistillConfig(**config_kwargs(DistillConfig, args))


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


def _load_pair(args: argparse.Namespace, summary: dict[str, Any]):
    """(student, teacher, tokenizer, teacher source): the packed checkpoint and its FP original, checked to match."""
    from ..formats.checkpoint import load, load_tokenizer
    from ..pipeline.models import load_model, parse_dtype

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
    return student, teacher, tokenizer, teacher_src


def _perplexity(model, tokenizer, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from ..eval import perplexity
    from ..formats.packed import set_weight_cache

    set_weight_cache(model, True)  # dequantize each layer once, not once per window
    try:
        return perplexity(model, tokenizer, "wikitext2", seqlen=2048, max_windows=args.eval_ppl, device=device,
                          progress=not args.quiet)
    finally:
        set_weight_cache(model, False)


def _save(out: Path, args: argparse.Namespace, student, tokenizer, summary: dict[str, Any],
          history: dict[str, Any], quant_config: dict[str, Any]) -> None:
    from ..formats.checkpoint import atomic_output_dir, save_quantized

    with atomic_output_dir(out, args.overwrite) as tmp:
        save_quantized(student, tmp, tokenizer, quant_config=quant_config, overwrite=True)
        (tmp / SUMMARY_NAME).write_text(jsonio.dumps(summary, indent=1, default=str))
        (tmp / HISTORY_NAME).write_text(jsonio.dumps(history, indent=1))
        plot_history(history, tmp / PLOT_NAME)


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    from ..distill import distill
    from ..eval import default_device
    from ..formats.checkpoint import read_quantization_config

    device = torch.device(args.device) if args.device else default_device()
    out = check_output_dir(args.out or f"{str(args.checkpoint).rstrip('/')}-distill-{config.loss}", args.overwrite)
    t0 = time.perf_counter()
    qc = read_quantization_config(args.checkpoint)
    summary = read_summary(args.checkpoint)
    student, teacher, tokenizer, teacher_src = _load_pair(args, summary)
    calibration = summary.get("calibration") if config.avoid_calibration_overlap else None
    tokens, data = distillation_windows(tokenizer, args.calib, config.nsamples, config.seqlen, config.seed,
                                        calibration)
    if not config.avoid_calibration_overlap:
        data["calibration_overlap"] = "not checked (--no-avoid-calibration-overlap)"
    log.info("distilling %s from %s on %d x %d tokens of %s (calibration overlap: %s)", args.checkpoint,
             teacher_src, config.nsamples, config.seqlen, args.calib, data["calibration_overlap"])
    evals: dict[str, Any] = {"before": _perplexity(student, tokenizer, args, device)} if args.eval_ppl else {}
    history = distill(student, teacher, tokens, config, device=device, progress=not args.quiet).to_dict()
    del teacher
    if args.eval_ppl:
        evals["after"] = _perplexity(student, tokenizer, args, device)
    section = {"checkpoint": str(args.checkpoint), "teacher": teacher_src, "config": config.to_dict(),
               "data": data, "device": str(device), "compute_dtype": history["compute_dtype"],
               "trainable": history["trainable"], "steps": len(history["loss"]),
               "loss_first": history["loss"][0], "loss_last": history["loss"][-1],
               "teacher_s": history["teacher_seconds"], "train_s": history["total_seconds"],
               "wall_s": round(time.perf_counter() - t0, 3), "eval": evals}
    summary["distillation"] = section
    _save(out, args, student, tokenizer, summary, history,
          {**qc, "distillation": {"teacher": teacher_src, "loss": config.loss, "steps": section["steps"],
                                  "tokens": int(tokens.numel())}})
    msg = f"distilled {section['steps']} steps ({config.loss}) in {section['wall_s']:.0f} s; saved to {out}"
    if evals:
        msg += f"; wikitext2 ppl {evals['before']['ppl']:.3f} -> {evals['after']['ppl']:.3f}"
    print(msg)
    return 0
