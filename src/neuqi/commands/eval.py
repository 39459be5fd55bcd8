"""`neuqi eval TARGET --tasks ...`: perplexity and zero-shot accuracy of a model, written as a result JSON."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity (wikitext2, c4) and zero-shot accuracy (arc_easy, arc_challenge, hellaswag, piqa, winogrande)",
        description="Evaluate a model. TARGET: a neuqi checkpoint directory, a Hugging Face hub id or local "
        "directory, a .gguf file, or 'smollm2' (the offline demo model).",
    )
    p.add_argument("target", metavar="TARGET", nargs="?", default="smollm2", help="model (default: smollm2)")
    p.add_argument("--tasks", default="wikitext2", help="comma-separated: wikitext2, c4, arc_easy, arc_challenge, "
                   "hellaswag, piqa, winogrande, a path to a text/JSON-lines file (perplexity), or the aliases "
                   "ppl, zeroshot, all (default: wikitext2)")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens (default: 2048)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first N perplexity windows (default: all; C4 is capped at 256)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: only the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size (default: 8)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps, ... (default: the accelerator if there is one, else cpu). A model "
                   "that does not fit on the device is evaluated one decoder layer at a time (perplexity)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="compute dtype (default: bfloat16, for speed: bf16 matmuls are ~10x faster than fp32 on "
                   "recent CPUs and the perplexity matches fp32 to 4 digits on SmolLM2)")
    p.add_argument("--out", default=None, help="write the result JSON here (schema: neuqi.report)")
    p.add_argument("--method", default=None, help="method label to record (default: from the checkpoint, or 'fp')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _quant_fields(target: str, model) -> dict[str, Any]:
    """method (row label), init, solver, bits, group_size, bits_per_weight of a neuqi checkpoint, read from the
    ``QuantConfig`` that ``neuqi quantize`` records under ``quantization_config["pipeline"]``; ``{"method": "fp"}``
    for an unquantized model."""
    from ..formats.checkpoint import read_quantization_config, size_report
    from ..pipeline.config import QuantConfig
    from ..pipeline.models import is_neuqi_checkpoint

    if not is_neuqi_checkpoint(target):
        return {"method": "fp"}
    qc = read_quantization_config(target)
    fields: dict[str, Any] = {"method": "neuqi", "bits": qc.get("bits"), "group_size": qc.get("group_size")}
    if "pipeline" in qc:
        try:
            config = QuantConfig.from_dict({**qc["pipeline"], "bits": qc["bits"], "group_size": qc["group_size"]})
            fields.update(method=config.label(), init=config.init, solver=config.solver)
        except (ConfigError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable quantization settings (%s); labelled 'neuqi'", target, exc)
    try:
        fields["bits_per_weight"] = round(size_report(model).bits_per_weight, 4)
    except Exception as exc:  # the size report is informative only
        log.warning("could not compute bits per weight: %s", exc)
    return {k: v for k, v in fields.items() if v is not None}


def _print_table(metrics: dict[str, float]) -> None:
    width = max(map(len, metrics), default=0)
    for name, value in metrics.items():
        shown = f"{value:.4f}" if name.endswith("_ppl") else f"{100 * value:.2f} %"
        print(f"{name:<{width}}  {shown}")


def run(args: argparse.Namespace) -> int:
    from ..eval import default_device, evaluate_tasks, fits_on_device, parse_tasks
    from ..eval.report import new_result, write_result
    from ..pipeline.models import load_model

    tasks = parse_tasks(args.tasks)  # unknown tasks fail here, before the model loads
    device = args.device or str(default_device())
    start = time.perf_counter()
    model, tokenizer = load_model(args.target, dtype=args.dtype, device="cpu")
    if fits_on_device(model, device):
        model.to(device)  # else perplexity runs layer by layer on the device, zero-shot on the CPU
    load_seconds = time.perf_counter() - start
    out = evaluate_tasks(model, tokenizer, tasks, seqlen=args.seqlen, max_windows=args.max_windows, limit=args.limit,
                         device=device, batch_size=args.batch_size, progress=not args.no_progress)
    fields = _quant_fields(args.target, model)
    if args.method:
        fields["method"] = args.method
    settings = {"tasks": tasks, "seqlen": args.seqlen, "max_windows": args.max_windows, "limit": args.limit,
                "dtype": args.dtype, "device": device, "batch_size": args.batch_size}
    result = new_result(args.target, out["metrics"], **fields, settings=settings, details=out["details"],
                        notes=out["notes"], load_seconds=round(load_seconds, 3),
                        eval_seconds=round(time.perf_counter() - start - load_seconds, 3))
    print(f"{args.target}  ({args.dtype}, {device}, eval {result['eval_seconds']:.1f} s)")
    _print_table(out["metrics"])
    for note in out["notes"]:
        print(f"note: {note}")
    if args.out:
        print(f"wrote {write_result(Path(args.out), result)}")
    return 0
