"""The paper's comparison on the demo model (SmolLM2-135M-Instruct), one command.

Rows: FP, RTN (Min-Max, round to nearest), GPTQ (Min-Max + LDLQ), NeUQI_int + LDLQ, NeUQI + LDLQ,
NeUQI + LDLQ + distill (2 and 3 bits), and HQQ (the real ``hqq`` library: float zero-points, no calibration data).
Settings: W4 g64, W3 g64, W2 g64, W3 channel-wise, W2 channel-wise. Every quantized row uses the same calibration
windows (C4 train from ../shared/data, seed 0) and is evaluated on WikiText-2 and C4 perplexity (GPTQ convention,
the first ``--windows`` windows of 2048) and, with ``--zero-shot``, on the five lm-eval tasks.

One result JSON per row goes to ``--out`` (schema: ``neuqi.report``); at the end ``neuqi report`` renders them to
``compare.md`` and ``compare.png`` there. Rows whose JSON exists are skipped (``--redo`` to recompute).

    python benchmarks/compare.py                        # everything, 32 x 2048 calibration, 40 eval windows
    python benchmarks/compare.py --settings w3g64 --methods gptq,neuqi --windows 10
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuqi import eval as evaluate
from neuqi.eval import report
from neuqi.formats.packed import pack_model, quantized_linears, set_weight_cache
from neuqi.pipeline import QuantConfig, data, models, quantize_model

log = logging.getLogger("compare")

SETTINGS = {"w4g64": (4, 64), "w3g64": (3, 64), "w2g64": (2, 64), "w3c": (3, -1), "w2c": (2, -1)}
# row -> (solver, initializer, initializer options); "fp", "hqq" and "distill" are handled apart.
# NeUQI_int searches NeUQI's 96 coarse-to-fine candidate scales instead of the paper's 2048: within 0.3 % of the full
# grid's loss on SmolLM2 and 10-14x cheaper (benchmarks/int_search.py), so the whole table fits on a CPU (see README).
QUANT_ROWS = {"rtn": ("rtn", "minmax", {}), "gptq": ("ldlq", "minmax", {}),
              "neuqi_int": ("ldlq", "neuqi_int", {"search": "coarse_to_fine"}), "neuqi": ("ldlq", "neuqi", {})}
ROWS = ("fp", *QUANT_ROWS, "distill", "hqq")
LABELS = {"fp": "FP", "rtn": "RTN", "gptq": "GPTQ (Min-Max + LDLQ)", "neuqi_int": "NeUQI_int + LDLQ",
          "neuqi": "NeUQI + LDLQ", "distill": "NeUQI + LDLQ + distill", "hqq": "HQQ"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model to quantize (default: the offline demo model)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {list(SETTINGS)}")
    p.add_argument("--methods", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (paper: 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    p.add_argument("--calib", default="c4", help="calibration source: c4 | wikitext2 | PATH")
    p.add_argument("--windows", type=int, default=40, help="perplexity windows of 2048 per data set")
    p.add_argument("--datasets", default="wikitext2,c4", help="perplexity data sets")
    p.add_argument("--zero-shot", action="store_true", help="also run the five lm-eval tasks")
    p.add_argument("--limit", type=int, default=None, help="lm-eval examples per task")
    p.add_argument("--distill-samples", type=int, default=64, help="distillation windows")
    p.add_argument("--distill-seqlen", type=int, default=512, help="distillation window length")
    p.add_argument("--distill-loss", default="mse", choices=("mse", "kl"))
    p.add_argument("--dtype", default="bfloat16", help="forward dtype for calibration and evaluation")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--out", default="benchmarks/results/compare", help="directory for the result JSON files")
    p.add_argument("--redo", action="store_true", help="recompute rows whose JSON already exists")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the report, plot and tables from the JSON files in --out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, valid, value in (("settings", SETTINGS, args.settings), ("methods", ROWS, args.methods)):
        bad = [v for v in value.split(",") if v not in valid]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {list(valid)}")
    return args


def bits_per_weight(bits: int, group_size: int, in_features: int) -> float:
    """Codes plus one fp16 scale and one fp16 zero-point per group."""
    g = in_features if group_size == -1 else group_size
    return bits + 32 / g


def model_bits_per_weight(model: nn.Module, bits: int, group_size: int) -> float:
    """Average over the quantized linears, weighted by their size (channel-wise groups differ per width)."""
    total = weights = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            n = module.weight.numel()
            total += n * bits_per_weight(bits, group_size, module.in_features)
            weights += n
    return total / weights


def hqq_quantize_(model: nn.Module, bits: int, group_size: int) -> float:
    """Replace every decoder linear's weight by its HQQ fake-quantized version (``hqq`` library, axis=1, i.e. groups
    along the input dimension like ours; channel-wise = one group per row). Returns the seconds spent."""
    from hqq.core.quantize import Quantizer

    start = time.perf_counter()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            w = module.weight.data
            g = w.shape[1] if group_size == -1 else group_size
            w_q, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=g, axis=1, optimize=True,
                                           bitpack=False, device=str(w.device))
            meta["compute_dtype"] = torch.float32
            # HQQ keeps scale and zero in the compute dtype (fp16 on GPUs); round them the same way as ours
            meta["scale"], meta["zero"] = meta["scale"].half().float(), meta["zero"].half().float()
            module.weight.data = Quantizer.dequantize(w_q, meta).reshape(w.shape).to(w.dtype)
    return time.perf_counter() - start


def evaluate_model(model: nn.Module, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    tasks = [t for t in args.datasets.split(",") if t]
    if args.zero_shot:
        tasks += list(evaluate.ZERO_SHOT_TASKS)
    return evaluate.evaluate_tasks(model, tokenizer, tasks, max_windows=args.windows, limit=args.limit,
                                   device=args.device)


def distill_windows(tokenizer, calib: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Distillation windows from C4 documents that share no text with the calibration windows."""
    from neuqi.commands.distill import disjoint_documents

    docs = disjoint_documents(data.load_documents(args.calib, "train"), tokenizer, calib)
    return data.sample_windows(docs, tokenizer, args.distill_samples, args.distill_seqlen, seed=args.seed + 1)


def run_row(row: str, setting: str, fp: nn.Module, tokenizer, calib: torch.Tensor, args: argparse.Namespace,
            cache: dict[str, nn.Module]) -> dict[str, Any]:
    bits, group_size = SETTINGS[setting]
    fields: dict[str, Any] = {"method": row, "label": LABELS[row], "bits": bits, "group_size": group_size,
                              "setting": setting}
    if row == "hqq":
        model = copy.deepcopy(fp)
        fields["quant_seconds"] = round(hqq_quantize_(model, bits, group_size), 1)
        fields["init"] = "hqq"
    elif row == "distill":
        from neuqi.distill import DistillConfig, distill

        model = cache.get(f"{setting}/neuqi")
        if model is None:
            raise RuntimeError("the distill row needs the neuqi row of the same setting in this run")
        model = copy.deepcopy(model)
        tokens = distill_windows(tokenizer, calib, args)
        config = DistillConfig(loss=args.distill_loss, nsamples=tokens.shape[0], seqlen=tokens.shape[1],
                               seed=args.seed)
        history = distill(model, fp, tokens, config, device=args.device)
        fields.update(init="neuqi", solver="ldlq", quant_seconds=round(history.total_seconds, 1),
                      distill={"loss": args.distill_loss, "windows": tokens.shape[0], "seqlen": tokens.shape[1],
                               "first_loss": history.loss[0], "last_loss": history.loss[-1]})
    else:
        solver, init, options = QUANT_ROWS[row]
        model = copy.deepcopy(fp)
        config = QuantConfig(bits=bits, group_size=group_size, method=solver, init=init, init_options=options)
        summary = quantize_model(model, calib, config, device=args.device)
        pack_model(model, summary["qparams"])
        set_weight_cache(model, True)  # dequantize once, not at every evaluation forward
        fields.update(init=init, init_options=options, solver=solver, quant_seconds=summary["timings"]["total_s"],
                      layer_loss=summary["totals"]["loss"], init_loss=summary["totals"]["init_loss"])
        if row == "neuqi" and "distill" in args.methods.split(","):
            cache[f"{setting}/neuqi"] = model
    fields["bits_per_weight"] = round(model_bits_per_weight(fp, bits, group_size), 4)
    if any(True for _ in quantized_linears(model)):
        fields["packed_linears"] = sum(1 for _ in quantized_linears(model))
    fields["metrics"], fields["eval_seconds"] = _timed_eval(model, tokenizer, args)
    return fields


def _timed_eval(model: nn.Module, tokenizer, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    result = evaluate_model(model, tokenizer, args)
    return result["metrics"], round(time.perf_counter() - start, 1)


SETTING_TITLES = {"w4g64": "W4 g64", "w3g64": "W3 g64", "w2g64": "W2 g64", "w3c": "W3 per-channel",
                  "w2c": "W2 per-channel"}


def _cell(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    return "–" if value is None else f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def pivot_tables(results: list[dict[str, Any]]) -> str:
    """Markdown: WikiText-2 / C4 perplexity per method (rows) and setting (columns), then quantization minutes."""
    settings = [s for s in SETTINGS if any(r.get("setting") == s for r in results)]
    by = {(r.get("method"), r.get("setting")): r for r in results}
    fp = by.get(("fp", None))
    bpw = {s: next(r["bits_per_weight"] for r in results if r.get("setting") == s) for s in settings}
    head = "| method | " + " | ".join(f"{SETTING_TITLES[s]} ({bpw[s]:.2f} bpw)" for s in settings) + " |"
    lines = ["WikiText-2 / C4 perplexity", "", head, "|---|" + "---:|" * len(settings)]
    if fp is not None:
        cell = f"{_cell(fp['metrics'], 'wikitext2_ppl')} / {_cell(fp['metrics'], 'c4_ppl')}"
        lines.append("| FP (16 bpw) | " + " | ".join(cell for _ in settings) + " |")
    for row in ROWS[1:]:
        cells = []
        for s in settings:
            r = by.get((row, s))
            if r is None:
                cells.append("not run")
                continue
            cell = f"{_cell(r['metrics'], 'wikitext2_ppl')} / {_cell(r['metrics'], 'c4_ppl')}"
            cells.append(f"**{cell}**" if row == "neuqi" else cell)
        if any(c != "not run" for c in cells):
            lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    lines += ["", "Quantization wall time, minutes", "", head, "|---|" + "---:|" * len(settings)]
    for row in ROWS[1:]:
        cells = [f"{by[(row, s)]['quant_seconds'] / 60:.1f}" if (row, s) in by else "–" for s in settings]
        if any(c != "–" for c in cells):
            lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("neuqi.pipeline").setLevel(logging.WARNING)  # one line per linear is too much here
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if args.report_only:
        write_tables(out, args.model)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fp, tokenizer = models.load_model(args.model, dtype=args.dtype)
    calib, origin = data.calibration_tokens(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed)
    common = {"calibration": {"source": origin, "windows": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
              "settings": {"windows": args.windows, "datasets": args.datasets, "dtype": args.dtype,
                           "zero_shot": args.zero_shot, "limit": args.limit}}
    model_name = args.model
    rows = [r for r in ROWS if r in args.methods.split(",")]
    plan = [("fp", "fp")] if "fp" in rows else []
    for setting in args.settings.split(","):
        bits = SETTINGS[setting][0]
        plan += [(r, setting) for r in rows if r != "fp" and not (r == "distill" and bits > 3)]
    cache: dict[str, nn.Module] = {}  # setting/neuqi -> packed NeUQI model, the distill row's student
    for i, (row, setting) in enumerate(plan, 1):
        path = out / f"{Path(model_name).name}-{setting}-{row}.json"
        needed_by_distill = row == "neuqi" and "distill" in rows and SETTINGS[setting][0] <= 3 and not (
            out / f"{Path(model_name).name}-{setting}-distill.json").exists()
        if path.exists() and not args.redo and not needed_by_distill:
            log.info("[%d/%d] %s %s: kept %s", i, len(plan), setting, row, path)
            continue
        log.info("[%d/%d] %s %s ...", i, len(plan), setting, row)
        t = time.perf_counter()
        if row == "fp":
            metrics, eval_s = _timed_eval(fp, tokenizer, args)
            fields = {"method": "fp", "label": "FP", "bits": 16, "bits_per_weight": 16.0, "metrics": metrics,
                      "eval_seconds": eval_s}
        else:
            fields = run_row(row, setting, fp, tokenizer, calib, args, cache)
        result = report.new_result(model_name, fields.pop("metrics"), **fields, **common)
        report.write_result(path, result)
        log.info("[%d/%d] %s %s: %s (%.0f s)", i, len(plan), setting, row,
                 json.dumps({k: round(v, 3) for k, v in result["metrics"].items()}), time.perf_counter() - t)
    wall = time.perf_counter() - started
    (out / "run_info.txt").write_text(f"wall_seconds {wall:.1f}\nargv {' '.join(sys.argv[1:])}\n"
                                      f"machine {json.dumps(report.machine_info())}\n")
    write_tables(out, model_name)
    print(f"\nwall time {wall / 60:.1f} min")
    return 0


def write_tables(out: Path, model_name: str) -> None:
    """``neuqi report`` output (report.md, plot) and the pivot ``tables.md`` from every row JSON in ``out``."""
    results = report.load_results(sorted(out.glob(f"{Path(model_name).name}-*.json")))
    paths = report.write_report(results, out, title=f"neuqi comparison on {model_name}")
    tables = pivot_tables(results)
    (out / "tables.md").write_text(tables)
    print(tables)
    print(f"report in {paths['markdown']}, tables in {out / 'tables.md'}")


if __name__ == "__main__":
    sys.exit(main())
