"""Perplexity (spec §5): GPTQ convention against a straightforward computation; layer-by-layer path == full path."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import byte_tokenizer, tiny_byte_lm

from neuqi.errors import ConfigError, DataError
from neuqi.eval import evaluate_tasks, parse_tasks, perplexity
from neuqi.pipeline.adapters import find_stack

SEQLEN = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    words = ["the", "quantized", "model", "reads", "a", "window", "of", "tokens", "and", "predicts", "next", "."]
    rng = torch.Generator().manual_seed(1)
    text = " ".join(words[i] for i in torch.randint(len(words), (90,), generator=rng).tolist())
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text)
    return str(path)


def straightforward_ppl(model, tokenizer, path: str, seqlen: int, max_windows: int | None = None) -> float:
    """Independent reference: HF's own loss (labels=) per window, averaged, exponentiated."""
    ids = torch.tensor(tokenizer(open(path).read())["input_ids"])
    n = ids.numel() // seqlen if max_windows is None else max_windows
    windows = [ids[i * seqlen : (i + 1) * seqlen][None] for i in range(n)]
    with torch.no_grad():
        losses = [model(input_ids=w, labels=w).loss for w in windows]
    return math.exp(torch.stack(losses).double().mean().item())


def test_perplexity_matches_straightforward(corpus):
    model, tok = tiny_byte_lm(), byte_tokenizer()
    res = perplexity(model, tok, corpus, seqlen=SEQLEN, progress=False)
    ref = straightforward_ppl(model, tok, corpus, SEQLEN)
    assert res["mode"] == "full" and res["windows"] == len(open(corpus).read()) // SEQLEN
    assert res["ppl"] == pytest.approx(ref, rel=1e-5)
    assert res["dataset"] == "corpus" and res["tokens"] == res["windows"] * SEQLEN


def test_max_windows(corpus):
    model, tok = tiny_byte_lm(), byte_tokenizer()
    res = perplexity(model, tok, corpus, seqlen=SEQLEN, max_windows=3, progress=False)
    assert res["windows"] == 3 and res["tokens"] == 3 * SEQLEN
    assert res["ppl"] == pytest.approx(straightforward_ppl(model, tok, corpus, SEQLEN, 3), rel=1e-5)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gemma2", "eager")])
def test_layer_path_equals_full_path(corpus, arch, attn):
    model, tok = tiny_byte_lm(arch, attn), byte_tokenizer()
    full = perplexity(model, tok, corpus, seqlen=SEQLEN, max_windows=5, mode="full", progress=False)
    layers = perplexity(model, tok, corpus, seqlen=SEQLEN, max_windows=5, mode="layers", batch_size=2, progress=False)
    assert layers["mode"] == "layers"
    assert layers["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    assert all("forward" not in m.__dict__ for m in find_stack(model).layers)  # capture undone
    assert full["ppl"] == pytest.approx(straightforward_ppl(model, tok, corpus, SEQLEN, 5), rel=1e-5)


def test_bf16_layer_path_close_to_full(corpus):
    model, tok = tiny_byte_lm().to(torch.bfloat16), byte_tokenizer()
    full = perplexity(model, tok, corpus, seqlen=SEQLEN, max_windows=4, mode="full", progress=False)
    layers = perplexity(model, tok, corpus, seqlen=SEQLEN, max_windows=4, mode="layers", progress=False)
    assert layers["ppl"] == pytest.approx(full["ppl"], rel=1e-3)


def test_bad_inputs_are_clear_errors(tmp_path, corpus):
    model, tok = tiny_byte_lm(), byte_tokenizer()
    with pytest.raises(DataError, match="not found"):
        perplexity(model, tok, str(tmp_path / "missing.txt"), seqlen=SEQLEN, progress=False)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, tok, str(tmp_path / "short.txt"), seqlen=SEQLEN, progress=False)
    with pytest.raises(ConfigError, match="mode"):
        perplexity(model, tok, corpus, seqlen=SEQLEN, mode="fast", progress=False)


def test_parse_tasks(corpus):
    assert parse_tasks("wikitext2, piqa,wikitext2") == ["wikitext2", "piqa"]
    assert parse_tasks("zeroshot") == ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande"]
    assert parse_tasks([corpus]) == [corpus]
    with pytest.raises(ConfigError, match="unknown task 'mmlu'"):
        parse_tasks("wikitext2,mmlu")


def test_evaluate_tasks_flat_metrics(corpus):
    model, tok = tiny_byte_lm(), byte_tokenizer()
    out = evaluate_tasks(model, tok, [corpus], seqlen=SEQLEN, max_windows=2, progress=False)
    assert set(out["metrics"]) == {"corpus_ppl"} and out["details"]["corpus"]["windows"] == 2


def test_cli_eval_unknown_task_fails_before_loading(capsys):
    from neuqi.cli import main

    assert main(["eval", "no-such-org/no-such-model", "--tasks", "wikitext2,mmlu"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err


def test_cli_eval_writes_result_json(tmp_path, corpus, capsys):
    import json

    from neuqi.cli import main

    tiny_byte_lm().save_pretrained(tmp_path / "tiny")
    byte_tokenizer().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "res" / "tiny.json"
    argv = ["eval", str(tmp_path / "tiny"), "--tasks", corpus, "--seqlen", str(SEQLEN), "--max-windows", "2",
            "--dtype", "float32", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == "neuqi-result/1" and result["method"] == "fp"
    assert set(result["metrics"]) == {"corpus_ppl"} and result["settings"]["max_windows"] == 2
    assert result["eval_seconds"] >= 0 and "corpus_ppl" in capsys.readouterr().out


def test_layer_path_on_packed_model(corpus):
    from tiny_models import packed_llama  # QuantLinear blocks: no nn.Linear inside the decoder layers

    model, tok = packed_llama(), byte_tokenizer()
    full = perplexity(model, tok, corpus, seqlen=SEQLEN, max_windows=3, mode="full", progress=False)
    layers = perplexity(model, tok, corpus, seqlen=SEQLEN, max_windows=3, mode="layers", progress=False)
    assert layers["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
