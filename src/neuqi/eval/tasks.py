"""Run a list of evaluation tasks (perplexity data sets and zero-shot tasks) and collect flat metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .perplexity import PPL_TASKS, fits_on_device, model_device, perplexity
from .zero_shot import TASK_ALIASES, ZERO_SHOT_TASKS, zero_shot

log = logging.getLogger(__name__)


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"wikitext2,arc_easy"`` or a list → task names, aliases (ppl, zeroshot, all) expanded, duplicates dropped.

    Besides the named tasks, an existing file or directory is a perplexity data set. Raises ConfigError otherwise."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    tasks: list[str] = []
    for item in items:
        expanded = TASK_ALIASES.get(item, (item,))
        for task in expanded:
            if task not in PPL_TASKS + ZERO_SHOT_TASKS and not Path(task).exists():
                raise ConfigError(f"unknown task {task!r}; choose from {', '.join(PPL_TASKS + ZERO_SHOT_TASKS)}, "
                                  f"an alias ({', '.join(TASK_ALIASES)}), or a path to a text/JSON-lines file")
            if task not in tasks:
                tasks.append(task)
    if not tasks:
        raise ConfigError("no tasks given")
    return tasks


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: str | Sequence[str],
    seqlen: int = 2048,
    max_windows: int | None = None,
    limit: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Run perplexity and zero-shot tasks; returns ``{"metrics": {flat name: value}, "details": {task: ...},
    "notes": [...]}`` with metric names ``<dataset>_ppl``, ``<task>_acc``, ``<task>_acc_norm``, ``zero_shot_avg``
    (the schema read by :mod:`neuqi.report`). ``batch_size`` is for zero-shot; perplexity uses one window a step."""
    tasks = parse_tasks(tasks)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    notes: list[str] = []
    for task in (t for t in tasks if t not in ZERO_SHOT_TASKS):
        res = perplexity(model, tokenizer, task, seqlen=seqlen, max_windows=max_windows, device=device,
                         progress=progress)
        metrics[f"{res['dataset']}_ppl"] = res["ppl"]
        details[res["dataset"]] = res
    zs_tasks = [t for t in tasks if t in ZERO_SHOT_TASKS]
    if zs_tasks:
        if device is not None and not fits_on_device(model, device):
            log.warning("the model does not fit on %s: zero-shot tasks run where it is (%s)", device,
                        model_device(model))
            device = None
        zs = zero_shot(model, tokenizer, zs_tasks, limit=limit, batch_size=batch_size, device=device)
        for task in zs_tasks:
            metrics |= {f"{task}_{m}": zs[task][m] for m in ("acc", "acc_norm") if m in zs[task]}
            details[task] = zs[task]
        metrics["zero_shot_avg"] = zs["average"]["value"]
        details["zero_shot_avg"] = zs["average"]
        details["zero_shot_seconds"] = zs["seconds"]
        notes += zs["notes"]
        if limit is not None:
            notes.append(f"zero-shot tasks limited to the first {limit} examples each")
    return {"metrics": metrics, "details": details, "notes": notes}
