"""Text data: evaluation corpora, calibration windows, and where they come from (spec §5).

Named sources are ``wikitext2`` and ``c4``. Each is read from local files when a data directory is found
(``$NEUQI_DATA_DIR``, else ``../shared/data`` next to the working directory or the source tree) and through the hub
``datasets`` library otherwise. Any other name is a path: a text file, a ``.jsonl``/``.json``/``.json.gz`` file with a
``text`` field, or a directory of those. ``stdlib-docs`` is the English help text shipped with Python
(``pydoc_data.topics``), the corpus of last resort when nothing else is reachable.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

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
def _read_json_records(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
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
    return [path.read_text(encoding="utf-8")]


def wikitext2_rows(raw_file: str | Path) -> list[str]:
    """Rebuild the HF ``wikitext-2-raw-v1`` rows from a ``wiki.*.raw`` file (see shared/data/README.md)."""
    lines = Path(raw_file).read_text(encoding="utf-8").split("\n")[:-1]
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
