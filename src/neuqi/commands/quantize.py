"""`neuqi quantize`: calibrate, quantize layer by layer, save a packed checkpoint plus ``neuqi_summary.json``.

The options of ``QuantConfig`` and ``CalibrationConfig`` are generated from their fields (``commands.options``);
the ones declared here are about I/O: the model, device and dtype, the output, evaluation and logging.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import jsonio
from ..errors import ConfigError, DataError
from ..pipeline.config import CalibrationConfig, QuantConfig
from ..pipeline.distributed import launched
from ..pipeline.stream import StreamConfig
from .options import DeprecatedAlias, add_config_options, config_kwargs

log = logging.getLogger(__name__)

SUMMARY_NAME = "neuqi_summary.json"
# Without MODEL: the demo model with a calibration budget that finishes in about 5 minutes on a 2-core CPU.
DEMO = {"bits": 3, "group_size": 64, "nsamples": 16, "seqlen": 512}
# With MODEL: the paper's defaults.
PAPER = {"bits": 3, "group_size": 128, "nsamples": 128, "seqlen": 2048}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a causal LM with NeUQI parameters and GPTQ/LDLQ rounding",
        description="Quantize the decoder linears of a causal LM layer by layer and save a packed checkpoint. "
        f"Without MODEL: the offline demo model SmolLM2-135M-Instruct, W{DEMO['bits']} g{DEMO['group_size']}, NeUQI "
        f"+ LDLQ, calibrated on {DEMO['nsamples']} x {DEMO['seqlen']} C4 tokens (about 5 minutes on a 2-core CPU). "
        f"With MODEL: group {PAPER['group_size']}, {PAPER['nsamples']} x {PAPER['seqlen']} calibration tokens (the "
        "paper's defaults).")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local directory or .gguf file (default: the demo model 'smollm2')")
    quant = add_config_options(p, QuantConfig, "quantization", {"group_size": "64 for the demo model, else 128"})
    quant.add_argument("--method", dest="solver", action=DeprecatedAlias, new="--solver", help=argparse.SUPPRESS)
    quant.add_argument("--search", choices=("coarse_to_fine", "full"), default=None,
                   help="scale candidates of neuqi / neuqi_int: coarse_to_fine (96) or full (2048) (default: "
                   "coarse_to_fine for neuqi, full for neuqi_int, as in the paper)")
    add_config_options(p, CalibrationConfig, "calibration", {"nsamples": "16 for the demo model, else 128",
                                                        "seqlen": "512 for the demo model, else 2048"})
    io = p.add_argument_group("run options")
    io.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available, else cpu)")
    io.add_argument("--dtype", default="bf16", help="dtype of the model and its forward passes (default bf16)")
    io.add_argument("--out", default=None,
                    help="output directory (default runs/<model>-w<bits>g<group>-<init>-<solver>)")
    io.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    io.add_argument("--format", choices=("packed", "fake"), default="packed",
                    help="packed: neuqi checkpoint (default); fake: plain HF model holding the fake-quantized weights")
    io.add_argument("--eval-ppl", type=int, default=0, metavar="N",
                    help="WikiText-2 perplexity of the FP and the quantized model on the first N windows of 2048")
    io.add_argument("--low-memory", action="store_true", help="recompute the attention/MLP in every calibration "
                    "pass instead of keeping their activations (same result, slower)")
    io.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_options(p, StreamConfig, "streaming, resume and torchrun (neuqi.pipeline.stream)")
    p.set_defaults(func=run)


@dataclass
class _Settings:
    config: QuantConfig
    calibration: CalibrationConfig
    device: torch.device
    out: Path


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


def _settings(args: argparse.Namespace) -> _Settings:
    """Validate every option, the output path included, before anything is loaded."""
    from ..formats.output import check_output_dir
    from ..pipeline.data import NAMED_SOURCES
    from ..pipeline.models import parse_dtype

    defaults = DEMO if args.model in (None, "smollm2") else PAPER
    kwargs = config_kwargs(QuantConfig, args, {k: defaults[k] for k in ("bits", "group_size")})
    if args.search is not None and kwargs.get("init", "neuqi") != "minmax":
        kwargs["init_options"] = {"search": args.search}
    config = QuantConfig(**kwargs)
    calibration = CalibrationConfig(**config_kwargs(CalibrationConfig, args,
                                                    {k: defaults[k] for k in ("nsamples", "seqlen")}))
    if args.eval_ppl < 0:
        raise ConfigError("--eval-ppl must be >= 0")
    source = calibration.source
    if source is not None and source not in NAMED_SOURCES and not Path(source).exists():
        raise DataError(f"calibration source {source!r} is neither {list(NAMED_SOURCES)} nor an existing path")
    parse_dtype(args.dtype)
    out = check_output_dir(args.out or Path("runs") / f"{_model_tag(args.model)}-{config.short_name()}",
                           args.overwrite)
    return _Settings(config, calibration, _device(args.device), out)


def _save(model, tokenizer, out: Path, result, fmt: str, overwrite: bool) -> None:
    from ..formats.checkpoint import atomic_output_dir, save_quantized
    from ..formats.packed import pack_model

    with atomic_output_dir(out, overwrite) as tmp:
        if fmt == "packed":
            pack_model(model, result.qparams)
            extra = {k: v for k, v in result.config.to_dict().items() if k not in ("bits", "group_size")}
            save_quantized(model, tmp, tokenizer, quant_config={"pipeline": extra}, overwrite=True)
        else:
            model.config.__dict__.pop("quantization_config", None)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_NAME).write_text(jsonio.dumps(result.to_dict(), indent=1))


def _wikitext2(model, tokenizer, windows: int, device: torch.device, quiet: bool) -> dict:
    from ..eval import perplexity

    return perplexity(model, tokenizer, "wikitext2", seqlen=2048, max_windows=windows, device=device,
                      progress=not quiet)


def _fp16_bytes(model: torch.nn.Module) -> int:
    """Size of the model's parameters stored in 16 bits (tied ones once), the FP baseline a user would download."""
    return 2 * sum(p.numel() for p in model.parameters())


def _print_outcome(result, out: Path, fp_bytes: int, fmt: str) -> None:
    print(f"quantized {result.totals['linears']} linears of {result.model['source']} ({result.config.short_name()}), "
          f"summed layer loss {result.loss_text()}; saved to {out} in {result.timings['wall_s']:.0f} s")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    evals = result.extra.get("eval", {})
    rows = [("FP (16-bit)", evals.get("fp", {}).get("ppl"), fp_bytes),
            (f"{result.config.short_name()} ({fmt})", evals.get("quantized", {}).get("ppl"), size)]
    windows = evals.get("quantized", {}).get("windows")
    print(f"{'model':<34} {'WikiText-2 ppl' + (f' ({windows} win)' if windows else ''):>22} {'size':>10}")
    for name, ppl, nbytes in rows:
        shown = "-" if ppl is None else f"{ppl:.2f}"
        print(f"{name:<34} {shown:>22} {nbytes / 2**20:>7.1f} MiB")


def run(args: argparse.Namespace) -> int:
    if args.model in (None, "smollm2"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo needs nothing from the network
    s = _settings(args)
    stream = StreamConfig(**config_kwargs(StreamConfig, args))
    if stream.stream or stream.resume or launched():  # one layer at a time from disk; torchrun runs always stream
        if s.config.bpw is not None:
            raise ConfigError("--bpw plans over the whole model in memory; it does not combine with --stream, "
                              "--resume or torchrun")
        if s.config.target == "fp":
            raise ConfigError("--target fp keeps the FP model's activations beside the quantized ones; it does not "
                              "combine with --stream, --resume or torchrun")
        from .quantize_stream import run_stream

        return run_stream(args, s, stream)

    from ..pipeline import quantize_model
    from ..pipeline.data import calibration_tokens
    from ..pipeline.models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    t_load = time.perf_counter() - t0
    cal = s.calibration
    tokens, origin = calibration_tokens(cal.source, tokenizer, cal.nsamples, cal.seqlen, cal.seed)
    evals = {"fp": _wikitext2(model, tokenizer, args.eval_ppl, s.device, args.quiet)} if args.eval_ppl else {}
    fp_bytes = _fp16_bytes(model)
    log.info("calibrating on %d x %d tokens of %s; %s on %s", cal.nsamples, cal.seqlen, origin,
             s.config.short_name(), s.device)
    result = quantize_model(model, tokens, s.config, device=s.device, progress=not args.quiet,
                            replay_activations=not args.low_memory)
    result.model.update(source=args.model or "smollm2", dtype=args.dtype)
    result.calibration.update(origin=origin, seed=cal.seed)
    result.timings["load_s"] = round(t_load, 3)
    if args.eval_ppl:
        evals["quantized"] = _wikitext2(model, tokenizer, args.eval_ppl, s.device, args.quiet)
        result.extra["eval"] = evals
    result.timings["wall_s"] = round(time.perf_counter() - t0, 3)
    _save(model, tokenizer, s.out, result, args.format, args.overwrite)
    if result.config.plan:  # --bpw: the per-linear formats it chose
        from ..pipeline.sensitivity import plan_table

        print(plan_table(result.config.plan, {r.name: r.shape for r in result.records}))
    _print_outcome(result, s.out, fp_bytes, args.format)
    return 0
