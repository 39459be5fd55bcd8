"""Result JSON files: their schema, writing them, and turning many of them into a markdown table and a plot.

Result schema ``neuqi-result/1`` (one evaluated model per file; every key but ``metrics`` may be missing or null)::

    {
      "schema": "neuqi-result/1",
      "model": "smollm2",                 # what was evaluated, as given on the command line (or the base model id)
      "method": "ldlq",                   # quantization method/solver; "fp" (or missing bits) = full precision
      "init": "neuqi",                    # parameter initialization: "minmax" | "grid" | "neuqi" | ...
      "bits": 3, "group_size": 128,       # group_size -1, 0 or null = channel-wise
      "bits_per_weight": 3.25,            # storage of the quantized linears incl. scales and zero-points
      "quant_seconds": 812.4,             # wall time of quantization (if known)
      "metrics": {                        # flat; accuracies are fractions in [0, 1]
        "wikitext2_ppl": 21.3, "c4_ppl": 27.9,
        "arc_easy_acc": 0.52, "arc_easy_acc_norm": 0.47, "arc_challenge_acc": ..., "arc_challenge_acc_norm": ...,
        "hellaswag_acc": ..., "hellaswag_acc_norm": ..., "piqa_acc": ..., "piqa_acc_norm": ...,
        "winogrande_acc": ..., "zero_shot_avg": 0.45   # average metric per task: neuqi.evaluate.AVERAGE_METRIC
      },
      "details": {...}, "notes": [...],   # per-task raw results and caveats (neuqi.evaluate.evaluate_tasks)
      "settings": {"tasks": [...], "seqlen": 2048, "max_windows": null, "limit": null, "dtype": "bfloat16",
                   "device": "cpu", "batch_size": 8},
      "eval_seconds": 95.1, "machine": {...}, "created": "2025-01-01T12:00:00+00:00", "neuqi_version": "0.1.0"
    }
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import jsonio
from ..errors import DataError

log = logging.getLogger(__name__)

SCHEMA = "neuqi-result/1"
_HEAD_KEYS = ("method", "init", "bits", "group_size", "bits_per_weight", "quant_seconds")
FP_METHODS = ("fp", "fp16", "bf16", "fp32", "none", "baseline")
# (metric key, column title); zero-shot columns show the metric that enters the average
_PPL_COLUMNS = (("wikitext2_ppl", "Wiki2 PPL"), ("c4_ppl", "C4 PPL"))
_ZS_COLUMNS = (("arc_easy", "ARC-e"), ("arc_challenge", "ARC-c"), ("hellaswag", "HellaS."), ("piqa", "PIQA"),
               ("winogrande", "Wino."))


# ---------------------------------------------------------------------------------------------------- writing
def machine_info() -> dict[str, Any]:
    """Python, torch and hardware facts for a result file."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if torch.accelerator.is_available():
        acc = torch.accelerator.current_accelerator()
        info["accelerator"] = str(acc)
        if acc is not None and acc.type == "cuda":
            info["accelerator_name"] = torch.cuda.get_device_name(acc)
    return info


def new_result(model: str, metrics: dict[str, float], **fields: Any) -> dict[str, Any]:
    """A result record in the schema above (``fields``: method, init, bits, settings, details, ...)."""
    from ..version import __version__

    head = {k: fields.pop(k) for k in _HEAD_KEYS if k in fields}
    details = {k: fields.pop(k) for k in ("details", "notes") if k in fields}
    return {"schema": SCHEMA, "model": model, **head, "metrics": metrics, **fields, "machine": machine_info(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "neuqi_version": __version__,
            **details}


def write_result(path: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Write ``result`` as JSON atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(jsonio.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------- reading
def load_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Result records from JSON files or directories of them; files without ``metrics`` are skipped with a warning."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"result file not found: {p}")
    results = []
    for f in files:
        try:
            record = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping %s: not JSON (%s)", f, exc)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            log.warning("skipping %s: no 'metrics' object", f)
            continue
        record.setdefault("_file", str(f))
        results.append(record)
    if not results:
        raise DataError("no result files with metrics among: " + ", ".join(map(str, files)) if files else
                        "no result files given")
    return results


def is_full_precision(r: dict[str, Any]) -> bool:
    method = str(r.get("method") or "fp").lower()
    return method in FP_METHODS or (r.get("bits") is None and r.get("bits_per_weight") is None)


def method_label(r: dict[str, Any]) -> str:
    if is_full_precision(r):
        return str(r.get("method") or "fp")
    method, init = r.get("method") or "?", r.get("init")
    return f"{method} / {init}" if init and init != method else str(method)


def group_label(group_size: Any) -> str:
    """"g64", "channel" (-1, 0 or null), or "mixed" (a per-linear plan under a bits-per-weight budget)."""
    if group_size == "mixed":
        return "mixed"
    return "channel" if group_size in (None, 0, -1) else f"g{group_size}"


# -------------------------------------------------------------------------------------------------- rendering
def _num(v: Any, kind: str) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if kind == "ppl":
        return f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"
    if kind == "pct":
        return f"{100 * v:.1f}"
    if kind == "time":
        return f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min"
    return f"{v:.3g}" if kind == "bpw" else str(v)


def _sort_key(r: dict[str, Any]) -> tuple:
    group = r.get("group_size")
    return (not is_full_precision(r), method_label(r), r.get("bits") or 99, group if isinstance(group, int) else 0)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per result (method × setting); columns only for values present in some result."""
    from .zero_shot import AVERAGE_METRIC

    cols: list[tuple[str, str, Any]] = [
        ("Method", "", method_label),
        ("Model", "", lambda r: r.get("model", "–")),
        ("Bits", "", lambda r: r.get("bits") if not is_full_precision(r) else "16"),
        ("Group", "", lambda r: group_label(r.get("group_size")) if not is_full_precision(r) else "–"),
        ("BPW", "bpw", lambda r: r.get("bits_per_weight")),
    ]
    ppl_keys = [k for k, _ in _PPL_COLUMNS] + sorted(
        {k for r in results for k in r["metrics"] if k.endswith("_ppl")} - {k for k, _ in _PPL_COLUMNS})
    titles = dict(_PPL_COLUMNS)
    cols += [(titles.get(k, k.removesuffix("_ppl") + " PPL"), "ppl", lambda r, k=k: r["metrics"].get(k))
             for k in ppl_keys]
    cols += [(f"{t} {AVERAGE_METRIC[task]}", "pct", lambda r, k=f"{task}_{AVERAGE_METRIC[task]}": r["metrics"].get(k))
             for task, t in _ZS_COLUMNS]
    cols += [("0-shot avg", "pct", lambda r: r["metrics"].get("zero_shot_avg")),
             ("Quant time", "time", lambda r: r.get("quant_seconds")),
             ("Eval time", "time", lambda r: r.get("eval_seconds"))]
    rows = sorted(results, key=_sort_key)
    cols = [c for c in cols if c[1] == "" or any(c[2](r) is not None for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |",
             "|" + "|".join("---" if c[1] == "" else "---:" for c in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c[2](r)) if c[1] == "" else _num(c[2](r), c[1]) for c in cols) + " |")
    return "\n".join(lines)


def accuracy_table(results: Sequence[dict[str, Any]]) -> str | None:
    """Markdown with both acc and acc_norm per zero-shot task (%), or None when no result has any."""
    keys = [f"{t}_{m}" for t, _ in _ZS_COLUMNS for m in ("acc", "acc_norm")]
    keys = [k for k in keys if any(k in r["metrics"] for r in results)]
    if not keys:
        return None
    lines = ["| Method | Bits | Group | " + " | ".join(keys) + " |", "|---|---|---|" + "---:|" * len(keys)]
    for r in sorted((r for r in results if any(k in r["metrics"] for k in keys)), key=_sort_key):
        fp = is_full_precision(r)
        lines.append(f"| {method_label(r)} | {'16' if fp else r.get('bits')} | "
                     f"{'–' if fp else group_label(r.get('group_size'))} | "
                     + " | ".join(_num(r["metrics"].get(k), "pct") for k in keys) + " |")
    return "\n".join(lines)


def plot_ppl_vs_bpw(results: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """PNG: perplexity (log y) against bits per weight, one line per method (and group size when it varies), one
    panel per perplexity data set; full-precision results are dashed horizontal lines. None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl_keys = [k for k, _ in _PPL_COLUMNS if any(k in r["metrics"] for r in results)]
    ppl_keys += sorted({k for r in results for k in r["metrics"] if k.endswith("_ppl")} - set(ppl_keys))
    quant = [r for r in results if not is_full_precision(r) and (r.get("bits_per_weight") or r.get("bits"))]
    if not ppl_keys or not quant:
        return None
    groups_per_method: dict[str, set] = {}
    for r in quant:
        groups_per_method.setdefault(method_label(r), set()).add(group_label(r.get("group_size")))
    fig, axes = plt.subplots(1, len(ppl_keys), figsize=(6.4 * len(ppl_keys), 4.8), squeeze=False)
    for ax, key in zip(axes[0], ppl_keys):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in quant:
            if key in r["metrics"]:
                label = method_label(r)
                if len(groups_per_method[label]) > 1:
                    label += f" ({group_label(r.get('group_size'))})"
                if not r.get("bits_per_weight"):
                    label += " [x = bits]"
                series.setdefault(label, []).append((r.get("bits_per_weight") or r["bits"], r["metrics"][key]))
        methods = sorted({label.split(" (")[0] for label in series})
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            # one colour per method, one line style per group family (solid groups, dotted channel, dashed mixed)
            style = ":" if "(channel)" in label else "--" if "(mixed)" in label else "-"
            ax.plot(xs, ys, marker="o", ls=style, color=f"C{methods.index(label.split(' (')[0]) % 10}", label=label)
        for i, r in enumerate(r for r in results if is_full_precision(r) and key in r["metrics"]):
            ax.axhline(r["metrics"][key], ls="--", color=f"C{7 + i % 3}", lw=1,
                       label=f"{method_label(r)} ({r['metrics'][key]:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight" if any(r.get("bits_per_weight") for r in quant) else "bits")
        ax.set_ylabel(f"{key.removesuffix('_ppl')} perplexity (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    models = sorted({str(r.get("model")) for r in results if r.get("model")})
    fig.suptitle("Perplexity vs bits per weight" + (f" — {', '.join(models)}" if models else ""))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: Sequence[dict[str, Any]], out_dir: str | os.PathLike, title: str = "neuqi results"
                 ) -> dict[str, Path | None]:
    """Write ``report.md`` (tables) and ``ppl_vs_bpw.png`` into ``out_dir``; returns their paths (png None if
    there was nothing to plot)."""
    from .zero_shot import AVERAGE_METRIC

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_ppl_vs_bpw(results, out / "ppl_vs_bpw.png")
    parts = [f"# {title}", "", markdown_table(results), ""]
    acc = accuracy_table(results)
    if acc:
        avg = ", ".join(f"{t} {m}" for t, m in AVERAGE_METRIC.items())
        parts += ["Zero-shot accuracies in %. Columns and the average use: " + avg + ".", "", acc, ""]
    notes = sorted({n for r in results for n in r.get("notes") or []})
    parts += [f"- {n}" for n in notes] + ([""] if notes else [])
    if png:
        parts += [f"![perplexity vs bits per weight]({png.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(parts), encoding="utf-8")
    return {"markdown": md, "plot": png}
