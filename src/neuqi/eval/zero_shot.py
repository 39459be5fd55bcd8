"""Zero-shot accuracy (spec §8) through ``lm_eval`` on the local data copies.

Each task is a generated YAML that ``include``s the installed official
task config (so prompts, choices, targets, preprocessing and metrics are lm-eval's own) and only swaps the data
source for the local copies in ``../shared/data`` (``dataset_path: json``). PIQA's labels live in a separate file and
are merged into a JSON-lines copy in the neuqi cache directory. Our HellaSwag copy is a 1000-row sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .perplexity import PPL_TASKS, model_device

log = logging.getLogger(__name__)

ZERO_SHOT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
# Metric that enters the zero-shot average (the usual PTQ-paper convention; spec §8 leaves it open). Both acc and
# acc_norm are always reported where lm-eval defines them (WinoGrande has only acc).
AVERAGE_METRIC = {"arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc",
                  "winogrande": "acc"}
TASK_ALIASES = {"ppl": PPL_TASKS, "zeroshot": ZERO_SHOT_TASKS, "all": PPL_TASKS + ZERO_SHOT_TASKS}
# task -> (official YAML under lm_eval/tasks, split it evaluates, local file under the data dir)
_LOCAL_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "test", "arc/ARC-Easy-test.jsonl"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", "arc/ARC-Challenge-test.jsonl"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "hellaswag/hellaswag_val_sample1000.jsonl"),
    "piqa": ("piqa/piqa.yaml", "validation", "piqa/valid.jsonl"),
    "winogrande": ("winogrande/default.yaml", "validation", "winogrande/dev.jsonl"),
}
ZERO_SHOT_NOTES = {"hellaswag": "HellaSwag is a 1000-row random sample of the 10,042-row validation set"}


def _write_if_changed(path: Path, text: str) -> Path:
    """Atomically write ``text`` unless the file already holds it (keeps mtimes, and so the datasets cache, stable)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{time.time_ns()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _piqa_with_labels(data_dir: Path, out_dir: Path) -> Path:
    """HF ``piqa`` rows ``{goal, sol1, sol2, label}``: valid.jsonl joined with valid-labels.lst."""
    import json

    rows = (data_dir / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    labels = (data_dir / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()
    if len(rows) != len(labels):
        raise DataError(f"{data_dir / 'piqa'}: {len(rows)} rows but {len(labels)} labels")
    lines = [json.dumps({**json.loads(r), "label": int(lab)}, ensure_ascii=False) for r, lab in zip(rows, labels)]
    return _write_if_changed(out_dir / "piqa_validation.jsonl", "\n".join(lines) + "\n")


def zero_shot_task_dir(tasks: Sequence[str], data_dir: Path | None = None) -> Path:
    """Write lm-eval task YAMLs for ``tasks`` that read the local data; returns their directory (for include_path)."""
    import lm_eval.tasks
    import yaml

    from ..pipeline.data import find_data_dir
    from ..pipeline.models import cache_dir

    data_dir = data_dir or find_data_dir()
    if data_dir is None:
        raise DataError("zero-shot tasks need the local data directory (../shared/data or $NEUQI_DATA_DIR)")
    official = Path(lm_eval.tasks.__file__).parent
    out = cache_dir() / "eval" / "lm_eval_tasks"
    for task in tasks:
        yaml_rel, split, data_rel = _LOCAL_TASKS[task]
        data = _piqa_with_labels(data_dir, out.parent) if task == "piqa" else data_dir / data_rel
        if not data.is_file():
            raise DataError(f"{task}: local data file not found: {data}")
        config = {
            "include": str(official / yaml_rel), "task": task, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data)}}, "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
        }
        _write_if_changed(out / f"{task}.yaml", yaml.safe_dump(config, sort_keys=False))
    return out


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str] = ZERO_SHOT_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy with lm-eval's own task definitions on the local data (model moved to ``device`` if given).

    Returns ``{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, n_total}, "average": {value, metric, tasks},
    "notes": [...], "seconds": s}``; accuracies are fractions in [0, 1]."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    unknown = [t for t in tasks if t not in _LOCAL_TASKS]
    if unknown:
        raise ConfigError(f"unknown zero-shot task(s) {unknown}; choose from {list(ZERO_SHOT_TASKS)}")
    start = time.perf_counter()
    manager = TaskManager(include_path=str(zero_shot_task_dir(tasks)), include_defaults=False)
    home = model_device(model)
    if device is not None:
        model.to(device)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=False,
                              bootstrap_iters=1000)
    finally:
        model.to(home)
    result: dict[str, Any] = {}
    for task in tasks:
        raw, counts = out["results"][task], out.get("n-samples", {}).get(task, {})
        entry = {m: raw[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in raw}
        entry |= {f"{m}_stderr": raw[f"{m}_stderr,none"] for m in entry if f"{m}_stderr,none" in raw}
        result[task] = entry | {"n": counts.get("effective"), "n_total": counts.get("original")}
    used = {t: AVERAGE_METRIC[t] for t in tasks}
    result["average"] = {"value": sum(result[t][m] for t, m in used.items()) / len(used), "metric": used,
                         "tasks": list(tasks)}
    result["notes"] = [ZERO_SHOT_NOTES[t] for t in tasks if t in ZERO_SHOT_NOTES]
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result
