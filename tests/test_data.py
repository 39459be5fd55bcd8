import gzip
import json

import pytest
import torch

from neuqi.errors import DataError
from neuqi.pipeline import data


class CharTokenizer:
    """One token per character: enough to test window sampling without a real tokenizer."""

    def __call__(self, text):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_windows_are_seeded_and_inside_documents():
    docs = ["a" * 50, "b" * 10, "c" * 64]  # the 10-char doc is shorter than the window
    tok = CharTokenizer()
    x = data.sample_windows(docs, tok, nsamples=20, seqlen=32, seed=0)
    assert x.shape == (20, 32) and x.dtype == torch.long
    assert torch.equal(x, data.sample_windows(docs, tok, nsamples=20, seqlen=32, seed=0))
    assert not torch.equal(x, data.sample_windows(docs, tok, nsamples=20, seqlen=32, seed=1))
    for row in x:  # every window comes from a single long-enough document
        assert len(set(row.tolist())) == 1 and row[0].item() in (ord("a"), ord("c"))


def test_document_exactly_one_window_long():
    x = data.sample_windows(["z" * 16], CharTokenizer(), nsamples=3, seqlen=16, seed=0)
    assert x.shape == (3, 16)


def test_short_documents_are_concatenated():
    docs = ["abc", "defg", "hi"] * 5
    x = data.sample_windows(docs, CharTokenizer(), nsamples=4, seqlen=20, seed=0)
    assert x.shape == (4, 20)
    assert any(len(set(r.tolist())) > 5 for r in x)  # windows span several documents
    with pytest.raises(DataError, match="fewer than one window"):
        data.sample_windows(["ab"], CharTokenizer(), nsamples=1, seqlen=100)


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        json.dump([{"text": "three"}], f)
    assert data.read_documents(tmp_path) == ["plain text", "one", "two", "three"]
    with pytest.raises(DataError, match="not found"):
        data.read_documents(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"nottext": 1}\n')
    with pytest.raises(DataError, match="'text' field"):
        data.read_documents(tmp_path / "bad.jsonl")


def test_wikitext2_matches_published_hash(data_dir):
    import hashlib

    rows = data.wikitext2_rows(data_dir / "wikitext-2-raw-v1" / "wiki.test.raw")
    assert len(rows) == 4358 and rows.count("") == 1467
    text = data.load_text("wikitext2")
    assert hashlib.sha256(text.encode()).hexdigest().startswith("696cca6b65a171b0")


def test_local_c4(data_dir):
    assert len(data.load_documents("c4", "train")) == 1041
    assert len(data.load_documents("c4", "validation")) == 1025


def test_stdlib_fallback_corpus():
    docs = data.load_documents("stdlib-docs")
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000


def test_hub_failure_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NEUQI_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="NEUQI_DATA_DIR"):
        data.load_documents("c4", "validation")


@pytest.mark.parametrize("name, content, match", [
    ("calib.bin", bytes(range(256)), "binary file"),
    ("latin1.txt", "café".encode("latin-1"), "not UTF-8 text"),
    ("rows.jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8 text"),
    ("rows.json.gz", b"not gzip", "BadGzipFile"),
])
def test_unreadable_text_files_are_data_errors(tmp_path, name, content, match):
    """Issue 12, defect 9: these raised UnicodeDecodeError / BadGzipFile tracebacks."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        data.read_documents(tmp_path / name)


def test_text_files_read_as_text_mode_did(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\rthree\n\xef\xbb\xbfbom")
    assert data.read_documents(tmp_path / "a.txt") == [(tmp_path / "a.txt").read_text(encoding="utf-8")]
