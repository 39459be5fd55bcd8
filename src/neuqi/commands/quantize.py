"""`neuqi quantize`: calibrate, quantize layer by layer, save a packed checkpoint plus
``neuqi_summary.json``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

SUMMARY_NAME = "neuqi_summary.json"
# Without MODEL: the demo model with a calibration budget that finishes in about 5 minutes on a 2-core CPU.
DEMO = {"bits": 3, "group_size": 64, "nsamples": 16, "seqlen": 512}
# With MODEL: the paper's defaults.
PAPER = {"bits": 3, "group_size": 128, "nsamples": 128, "seqlen": 2048}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a causal LM with NeUQI parameters and GPTQ/LDLQ rounding",
        description="Quantize the decoder linears of a causal LM layer by layer and save a packed "
        "checkpoint. Without MODEL: the offline demo model SmolLM2-135M-Instruct, 3 bits, group 64, NeUQI + "
        f"LDLQ, calibrated on {DEMO['nsamples']} x {DEMO['seqlen']} tokens of C4 (about 5 minutes on a "
        f"2-core CPU). With MODEL: group {PAPER['group_size']}, {PAPER['nsamples']} x {PAPER['seqlen']} "
        "calibration tokens (the paper's defaults).",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, local directory or .gguf file (default: the demo model 'smollm2')",
    )
    p.add_argument("--bits", type=int, default=3, help="bits per weight, 2..8 (default 3)")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="input columns per (scale, zero-point), -1 per row (default 64 demo, 128 otherwise)",
    )
    p.add_argument("--method", default="ldlq", help="rounding: rtn | gptq | ldlq (default ldlq)")
    p.add_argument("--init", default="neuqi", help="initializer: minmax | neuqi_int | neuqi (default neuqi)")
    p.add_argument(
        "--search",
        choices=("coarse_to_fine", "full"),
        default=None,
        help="scale candidates of neuqi / neuqi_int: coarse_to_fine (96) or full (2048) "
        "(default: coarse_to_fine for neuqi, full for neuqi_int, as in the paper)",
    )
    p.add_argument(
        "--param-fit",
        default="static",
        help="static: fit (s, Z) on the original W (paper); dynamic: when the solver reaches the group",
    )
    p.add_argument("--no-act-order", dest="act_order", action="store_false", help="keep the column order")
    p.add_argument("--damping", type=float, default=0.01, help="λ = damping·mean(diag H) (default 0.01)")
    p.add_argument("--block-size", type=int, default=128, help="solver block size (default 128)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward (default 4)")
    p.add_argument(
        "--calib",
        default=None,
        help="calibration text: c4 | wikitext2 | PATH (default: C4, else Python's bundled docs)",
    )
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 16 demo, 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512 demo, 2048)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="bf16", help="dtype of the model and its forward passes (default bf16)")
    p.add_argument(
        "--out", default=None, help="output directory (default runs/<model>-w<bits>g<group>-<init>-<method>)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument(
        "--format",
        choices=("packed", "fake"),
        default="packed",
        help="packed: neuqi checkpoint (default); fake: plain HF model holding the fake-quantized weights",
    )
    p.add_argument(
        "--eval-ppl",
        type=int,
        default=0,
        metavar="N",
        help="after quantizing, WikiText-2 perplexity on the first N windows of 2048 tokens",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="recompute the attention/MLP in every calibration pass instead of keeping their activations "
        "(same result, slower)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _model_tag(model: str | None) -> str:
    if model is None or model == "smollm2":
        return "smollm2"
    name = Path(model).name if Path(model).exists() else model.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".gguf")) or "model"


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def _settings(args: argparse.Namespace):
    """Validate every option before anything is loaded; returns (config, nsamples, seqlen, device, out)."""
    from ..pipeline import QuantConfig
    from ..pipeline.data import NAMED_SOURCES
    from ..pipeline.models import parse_dtype

    defaults = DEMO if args.model in (None, "smollm2") else PAPER
    config = QuantConfig(
        bits=args.bits,
        group_size=args.group_size if args.group_size is not None else defaults["group_size"],
        method=args.method,
        init=args.init,
        act_order=args.act_order,
        damping=args.damping,
        block_size=args.block_size,
        param_fit=args.param_fit,
        batch_size=args.batch_size,
        init_options={} if args.search is None or args.init == "minmax" else {"search": args.search},
    )
    nsamples = args.nsamples if args.nsamples is not None else defaults["nsamples"]
    seqlen = args.seqlen if args.seqlen is not None else defaults["seqlen"]
    if nsamples < 1 or seqlen < 2:
        raise ConfigError(f"--nsamples must be >= 1 and --seqlen >= 2, got {nsamples} and {seqlen}")
    if args.eval_ppl < 0:
        raise ConfigError("--eval-ppl must be >= 0")
    if args.calib is not None and args.calib not in NAMED_SOURCES and not Path(args.calib).exists():
        raise DataError(
            f"calibration source {args.calib!r} is neither {list(NAMED_SOURCES)} nor an existing path"
        )
    parse_dtype(args.dtype)
    device = _device(args.device)
    out = Path(args.out or Path("runs") / f"{_model_tag(args.model)}-{config.short_name()}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CheckpointError(
            f"output directory {out} exists and is not empty; pass --overwrite to replace it"
        )
    return config, nsamples, seqlen, device, out


def _save(model, tokenizer, out: Path, summary: dict[str, Any], fmt: str, qparams, overwrite: bool) -> None:
    from ..formats.checkpoint import atomic_output_dir, save_quantized

    with atomic_output_dir(out, overwrite) as tmp:
        if fmt == "packed":
            from ..formats.packed import pack_model

            pack_model(model, qparams)
            extra = {k: v for k, v in summary["config"].items() if k not in ("bits", "group_size")}
            save_quantized(model, tmp, tokenizer, quant_config={"pipeline": extra}, overwrite=True)
        else:
            model.config.__dict__.pop("quantization_config", None)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))


def run(args: argparse.Namespace) -> int:
    if args.model in (None, "smollm2"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo needs nothing from the network
    config, nsamples, seqlen, device, out = _settings(args)

    from ..pipeline import quantize_model
    from ..pipeline.data import calibration_tokens
    from ..pipeline.models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    t_load = time.perf_counter() - t0
    tokens, origin = calibration_tokens(args.calib, tokenizer, nsamples, seqlen, args.seed)
    log.info(
        "calibrating on %d x %d tokens of %s; %s on %s", nsamples, seqlen, origin, config.short_name(), device
    )
    summary = quantize_model(model, tokens, config, device=device, progress=not args.quiet,
                             replay_activations=not args.low_memory)
    qparams = summary.pop("qparams")
    summary["model"] = {"source": args.model or "smollm2", "class": summary["model"], "dtype": args.dtype}
    summary["calibration"].update(origin=origin, seed=args.seed)
    summary["timings"]["load_s"] = round(t_load, 3)
    if args.eval_ppl:
        from ..eval import perplexity

        summary["eval"] = perplexity(
            model,
            tokenizer,
            "wikitext2",
            seqlen=2048,
            max_windows=args.eval_ppl,
            device=device,
            progress=not args.quiet,
        )
        log.info("wikitext2 perplexity (%d windows): %.3f", args.eval_ppl, summary["eval"]["ppl"])
    t_save = time.perf_counter()
    summary["timings"]["wall_s"] = round(t_save - t0, 3)
    _save(model, tokenizer, out, summary, args.format, qparams, args.overwrite)
    totals = summary["totals"]
    print(
        f"quantized {totals['linears']} linears of {summary['model']['source']} ({config.short_name()}): "
        f"total loss {totals['loss']:.4g}; saved to {out} in {time.perf_counter() - t0:.0f} s"
    )
    return 0
