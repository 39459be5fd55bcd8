"""Zero-shot tasks (spec §8): lm-eval's official task definitions reading the local data copies."""

from __future__ import annotations

import pytest
from tiny_models import byte_tokenizer, tiny_byte_lm

from neuqi.errors import ConfigError
from neuqi.eval import AVERAGE_METRIC, ZERO_SHOT_TASKS, evaluate_tasks, zero_shot
from neuqi.eval.zero_shot import zero_shot_task_dir


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUQI_CACHE", str(tmp_path / "cache"))


def test_local_configs_keep_official_prompts(data_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(zero_shot_task_dir(ZERO_SHOT_TASKS, data_dir)), include_defaults=False)
    tasks = manager.load(list(ZERO_SHOT_TASKS))["tasks"]
    sizes = {name: len(list(task.eval_docs)) for name, task in tasks.items()}
    assert sizes == {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 1000, "piqa": 1838, "winogrande": 1267}
    doc = next(iter(tasks["piqa"].eval_docs))
    assert tasks["piqa"].doc_to_text(doc).startswith("Question: How do I ready a guinea pig cage")
    assert tasks["piqa"].doc_to_target(doc) == 0 and len(tasks["piqa"].doc_to_choice(doc)) == 2
    doc = next(iter(tasks["hellaswag"].eval_docs))  # official preprocessing: "label: ctx_a Ctx_b"
    assert tasks["hellaswag"].doc_to_text(doc).startswith("Pole vault: ") and " A few women" in doc["query"]
    doc = next(iter(tasks["winogrande"].eval_docs))  # partial evaluation: choices are the prefixes
    assert tasks["winogrande"].doc_to_choice(doc)[0].endswith("so Sarah")
    assert tasks["winogrande"].doc_to_target(doc) == "always got the easier cases."
    for name, task in tasks.items():
        metrics = {m["metric"] for m in task.config.metric_list}
        assert metrics == ({"acc"} if name == "winogrande" else {"acc", "acc_norm"})


def test_zero_shot_runs_on_tiny_model(data_dir):
    out = zero_shot(tiny_byte_lm(), byte_tokenizer(), ["arc_easy", "piqa", "winogrande"], limit=2, batch_size=4)
    for task in ("arc_easy", "piqa", "winogrande"):
        assert out[task]["n"] == 2 and 0.0 <= out[task]["acc"] <= 1.0
    assert "acc_norm" in out["arc_easy"] and "acc_norm" not in out["winogrande"]
    expected = (out["arc_easy"]["acc"] + out["piqa"]["acc"] + out["winogrande"]["acc"]) / 3
    assert out["average"]["value"] == pytest.approx(expected)
    assert out["average"]["metric"] == {t: AVERAGE_METRIC[t] for t in ("arc_easy", "piqa", "winogrande")}


def test_evaluate_tasks_reports_hellaswag_sample_note(data_dir):
    out = evaluate_tasks(tiny_byte_lm(), byte_tokenizer(), "hellaswag", limit=2, progress=False)
    assert set(out["metrics"]) == {"hellaswag_acc", "hellaswag_acc_norm", "zero_shot_avg"}
    assert any("1000-row" in n for n in out["notes"])


def test_unknown_zero_shot_task():
    with pytest.raises(ConfigError, match="unknown zero-shot task"):
        zero_shot(tiny_byte_lm(), byte_tokenizer(), ["mmlu"])
