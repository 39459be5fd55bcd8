"""Text data: evaluation corpora, calibration windows, and where they come from (spec §5).

Named sources are ``wikitext2`` and ``c4``. Each is read from local files when a data directory is found
(``$NEUQI_DATA_DIR``, else ``../shared/data`` next to the working directory or the source tree) and through the hub
``datasets`` library otherwise. Any other name is a path: a text file, a ``.jsonl``/``.json``/``.json.gz`` file with a
``text`` field, or a directory of those. ``stdlib-docs`` is the English help text shipped with Python
(``pydoc_data.topics``), the corpus of last resort when nothing else is reachable.
``distillation_windows`` samples windows from documents that share no run of ``NGRAM`` tokens with the calibration
windows (spec §10.12).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError

log = logging.getLogger(__name__)

NAMED_SOURCES = ("wikitext2", "c4", "stdlib-docs")


def find_data_dir() -> Path | None:
    """The local data directory: ``$NEUQI_DATA_DIR``, else the first ``shared/data`` found beside cwd or this repo."""
    env = os.environ.get("NEUQI_DATA_DIR")
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *Path.cwd().parents[:2], *here.parents[1:4]):
        candidate = base / ".." / "shared" / "data"
        if candidate.is_dir():
            return candidate.resolve()
    return None


# ----------------------------------------------------------------------------------------------------------- files
def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path`` (gunzipped for ``.gz``); DataError for binary, non-UTF-8 or broken gzip files."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if b"\0" in raw:
        raise DataError(f"{path} is a binary file (it holds NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode open()


def _read_json_records(path: Path) -> list[str]:
    text = read_text_file(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return [r["text"] for r in json.loads(text)]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a JSON array of objects with a 'text' field ({exc})") from exc
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({exc})") from exc
    return docs


def read_documents(path: str | Path) -> list[str]:
    """Documents from a text file (one document), a JSON-lines/JSON(.gz) file with ``text`` fields, or a directory of
    those (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: directory holds no data files")
        return [doc for f in files for doc in read_documents(f)]
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return _read_json_records(path)
    return [read_text_file(path)]


def wikitext2_rows(raw_file: str | Path) -> list[str]:
    """Rebuild the HF ``wikitext-2-raw-v1`` rows from a ``wiki.*.raw`` file (see shared/data/README.md)."""
    lines = read_text_file(Path(raw_file)).split("\n")[:-1]
    return [line + "\n" if line.strip() else "" for line in lines]


def _hub(name: str, split: str) -> list[str]:
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
        shard = "train/c4-train.00000-of-01024.json.gz" if split == "train" else (
            "validation/c4-validation.00000-of-00008.json.gz")
        ds = load_dataset("allenai/c4", data_files={split: f"en/{shard}"}, split=split)
        return list(ds["text"])
    except Exception as exc:  # offline, datasets missing, hub error: say which and how to fix
        raise DataError(
            f"cannot load {name} ({split}) from the hub ({exc.__class__.__name__}: {exc}); "
            "set NEUQI_DATA_DIR to a local copy (see ../shared/data) or pass a file path"
        ) from exc


def load_documents(source: str, split: str = "test") -> list[str]:
    """Documents of a named source (``wikitext2``: rows; ``c4``: documents) or of a path.

    ``split`` is ``train`` (calibration) or ``test``/``validation`` (evaluation; C4 has no test split and uses
    validation, as GPTQ does)."""
    if source == "stdlib-docs":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if source not in ("wikitext2", "c4"):
        return read_documents(source)
    local = find_data_dir()
    if local is not None:
        if source == "wikitext2":
            raw = local / "wikitext-2-raw-v1" / ("wiki.valid.raw" if split == "validation" else "wiki.test.raw")
            if split == "train":
                log.warning("no local WikiText-2 train split; using the validation split for calibration")
                raw = raw.with_name("wiki.valid.raw")
            if raw.is_file():
                return wikitext2_rows(raw)
        else:
            sub = "train" if split == "train" else "validation"
            files = sorted((local / "c4" / sub).glob("*.text.jsonl"))
            if files:
                return read_documents(files[0])
        log.info("%s (%s) not found under %s; trying the hub", source, split, local)
    return _hub(source, split)


def load_text(source: str, split: str = "test") -> str:
    """One evaluation string: WikiText-2 rows joined with "\\n\\n" (GPTQ), C4 documents joined with " " (GPTQ's
    ``c4_new``: the first 1100 validation documents), anything else joined with "\\n\\n"."""
    docs = load_documents(source, split)
    if source == "c4":
        return " ".join(docs[:1100])
    return "\n\n".join(docs)


# ------------------------------------------------------------------------------------------------- calibration
def sample_windows(
    documents: Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``nsamples`` random token windows of length ``seqlen``, LongTensor (nsamples, seqlen). Deterministic in ``seed``.

    As GPTQ: pick a random document; if it has at least ``seqlen`` tokens, take a window at a random start
    (ends inclusive, so a document of exactly ``seqlen`` tokens works). Documents shorter than the window are never
    used alone: if no document is long enough, all documents are concatenated (joined with "\\n\\n") and windows are
    drawn from that stream.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise DataError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    docs = [d for d in documents if d and d.strip()]
    if not docs:
        raise DataError("no non-empty documents to sample calibration windows from")
    rng = random.Random(seed)
    lengths: dict[int, torch.Tensor] = {}
    long_docs: set[int] = set()
    short: set[int] = set()
    windows = []
    while len(windows) < nsamples and len(short) < len(docs):
        i = rng.randint(0, len(docs) - 1)
        if i in short:
            continue
        if i not in lengths:
            lengths[i] = torch.tensor(tokenizer(docs[i])["input_ids"], dtype=torch.long)
        ids = lengths[i]
        if ids.numel() < seqlen:
            short.add(i)
            lengths.pop(i)
            continue
        long_docs.add(i)
        start = rng.randint(0, ids.numel() - seqlen)
        windows.append(ids[start : start + seqlen])
    if len(windows) < nsamples:
        stream = torch.tensor(tokenizer("\n\n".join(docs))["input_ids"], dtype=torch.long)
        if stream.numel() < seqlen:
            raise DataError(f"the calibration text has {stream.numel()} tokens, fewer than one window ({seqlen})")
        log.info("calibration documents are shorter than %d tokens; sampling from their concatenation", seqlen)
        while len(windows) < nsamples:
            start = rng.randint(0, stream.numel() - seqlen)
            windows.append(stream[start : start + seqlen])
    return torch.stack(windows)


def calibration_tokens(
    source: str | None, tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """Calibration windows (nsamples, seqlen) and a description of where they came from.

    ``source`` is ``c4`` (train shard), ``wikitext2`` (train split), a path, or ``None``: C4 if reachable (locally or
    on the hub), else the English documentation shipped with Python."""
    if source is None:
        try:
            docs = load_documents("c4", "train")
            origin = "c4"
        except DataError as exc:
            log.warning("no C4 data reachable (%s); calibrating on Python's bundled documentation text", exc)
            docs, origin = load_documents("stdlib-docs"), "stdlib-docs"
    else:
        docs, origin = load_documents(source, "train"), source
    return sample_windows(docs, tokenizer, nsamples, seqlen, seed), origin


# ------------------------------------------------------------------------------ windows that avoid the calibration
NGRAM = 16  # two windows "overlap" when they share a run of this many tokens


def ngrams(ids: torch.Tensor, n: int = NGRAM) -> set[bytes]:
    """Every run of ``n`` consecutive tokens in each row of ``ids`` ((L,) or (rows, L)), as hashable bytes."""
    ids = ids.reshape(-1, ids.shape[-1]).to(torch.int64)
    if ids.shape[-1] < n:
        return set()
    runs = np.ascontiguousarray(ids.unfold(-1, n, 1).reshape(-1, n).numpy())  # (rows·(L−n+1), n)
    return set(runs.view(np.dtype((np.void, 8 * n))).ravel().tolist())


def overlapping_windows(windows: torch.Tensor, reference: torch.Tensor, n: int = NGRAM) -> int:
    """How many rows of ``windows`` (m, T) share a run of ``n`` tokens with any row of ``reference``."""
    ref = ngrams(reference, n)
    return sum(not ref.isdisjoint(ngrams(w, n)) for w in windows)


def disjoint_documents(documents: list[str], tokenizer, exclude: torch.Tensor, n: int = NGRAM) -> list[str]:
    """The documents that share no run of ``n`` tokens with any window of ``exclude`` (m, T)."""
    ref = ngrams(exclude, n)
    ids = tokenizer(list(documents), verbose=False)["input_ids"]
    return [d for d, t in zip(documents, ids) if ref.isdisjoint(ngrams(torch.tensor(t, dtype=torch.long), n))]


def distillation_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int,
                         calibration: dict[str, Any] | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(nsamples, seqlen) windows of ``source`` avoiding the recorded ``calibration`` windows, and a report.

    ``calibration``: ``{"origin", "windows", "seqlen", "seed"}`` from the checkpoint summary, or None (no
    exclusion possible).
    """
    docs = load_documents(source, "train")
    info: dict[str, Any] = {"source": source, "windows": nsamples, "seqlen": seqlen, "seed": seed,
                            "documents": len(docs), "ngram": NGRAM}
    calib = None
    if calibration is None:
        log.warning("the checkpoint records no calibration windows: distillation windows may repeat them")
        info["calibration_overlap"] = "unknown (no calibration record)"
    elif calibration.get("origin") != source:
        info["calibration_overlap"] = f"none possible (calibrated on {calibration.get('origin')!r})"
    else:
        calib = sample_windows(docs, tokenizer, int(calibration["windows"]), int(calibration["seqlen"]),
                               int(calibration.get("seed", 0)))
        docs = disjoint_documents(docs, tokenizer, calib)
        info["excluded_documents"] = info["documents"] - len(docs)
        if not docs:
            raise DataError(f"every {source} document overlaps the calibration windows; pass another --calib "
                            "or --allow-calibration-overlap")
    tokens = sample_windows(docs, tokenizer, nsamples, seqlen, seed)
    if calib is not None:
        info["calibration_overlap"] = overlapping_windows(tokens, calib)
    return tokens, info
