"""`neuqi quantize --stream` (and every run under torchrun): quantize a checkpoint directory layer by layer from
disk (``neuqi.pipeline.stream``), optionally over several processes (``neuqi.pipeline.distributed``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError


def run_stream(args: argparse.Namespace, settings: Any, stream: Any) -> int:
    """Quantize ``args.model`` (a local directory or the demo model) with ``settings`` (config, calibration,
    device, out) and the ``StreamConfig``; rank 0 prints the outcome."""
    from transformers import AutoTokenizer

    from ..pipeline import distributed
    from ..pipeline.data import calibration_tokens
    from ..pipeline.models import resolve_model_path
    from ..pipeline.stream import quantize_checkpoint

    if args.eval_ppl or args.format != "packed":
        raise ConfigError("--stream (and torchrun) write a packed checkpoint and do not evaluate: drop --eval-ppl "
                          "and --format fake, and run `neuqi eval` on the output")
    path = Path(resolve_model_path(args.model))
    if not (path / "config.json").is_file():
        raise ModelError(f"--stream reads a local checkpoint directory with config.json; {args.model!r} is not one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: no loadable tokenizer for the calibration text: {exc}") from exc
    t0 = time.perf_counter()
    cal = settings.calibration
    tokens, origin = calibration_tokens(cal.source, tokenizer, cal.nsamples, cal.seqlen, cal.seed)
    dist = distributed.Dist.init(settings.device) if distributed.launched() else None
    try:
        result = quantize_checkpoint(
            path, tokens, settings.config, settings.out, stream, dtype=args.dtype,
            device=settings.device if dist is None else dist.device, tokenizer=tokenizer, overwrite=args.overwrite,
            progress=not args.quiet, replay_activations=not args.low_memory, dist=dist,
            info={"model": {"source": args.model or "smollm2"}, "calibration": {"origin": origin, "seed": cal.seed}})
    finally:
        if dist is not None:
            dist.close()
    if dist is None or dist.rank == 0:
        print(f"quantized {result.totals['linears']} linears of {result.model['source']} "
              f"({result.config.short_name()}) streaming on {result.world_size} process(es), summed layer loss "
              f"{result.loss_text()}; saved to {settings.out} in "
              f"{time.perf_counter() - t0:.0f} s (peak RSS {result.memory.get('peak_rss_mb', 0):.0f} MiB)")
    return 0
