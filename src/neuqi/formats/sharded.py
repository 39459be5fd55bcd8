"""Safetensors files handled without loading their tensors: header reading, byte-copy merging of per-layer files
into the checkpoint's shards, and the Hugging Face shard index.

A safetensors file is ``u64 little-endian header length n``, ``n`` bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`` (padded with spaces to a multiple of 8), then the tensor
bytes, contiguous, with offsets relative to the end of the header. One output shard is ``model.safetensors``
(what ``save_quantized`` writes); more are ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
= ``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_COPY_CHUNK = 64 << 20  # bytes per read when copying tensor data


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """({tensor name: {"dtype", "shape", "data_offsets"}}, byte offset of the data) of a safetensors file;
    CheckpointError if it is missing, truncated or not safetensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            size = path.stat().st_size
            if n < 2 or 8 + n > size:
                raise CheckpointError(f"{path} is not a safetensors file (bad header length; truncated?)")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} has a corrupt safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header needs {8 + n + end} bytes, the file has {size}")
    return header, 8 + n


def merge(sources: list[Path], out: Path, metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``out`` holding every tensor of the safetensors files ``sources`` (bytes copied, never decoded);
    returns the tensor names. Tensors are ordered by element size, then name (as safetensors does: each stays
    aligned to its element size)."""
    entries = []
    for src in sources:
        header, start = read_header(src)
        entries += [(name, info, src, start) for name, info in header.items()]
    entries.sort(key=lambda e: (-_ITEMSIZE.get(e[1]["dtype"], 1), e[0]))
    head: dict[str, Any] = {}
    offset = 0
    for name, info, _, _ in entries:
        if name in head:
            raise CheckpointError(f"tensor {name!r} is in more than one of the files merged into {out.name}")
        size = info["data_offsets"][1] - info["data_offsets"][0]
        head[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        head["__metadata__"] = metadata
    blob = json.dumps(head, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, info, src, start in entries:
            begin, end = info["data_offsets"]
            with open(src, "rb") as g:
                g.seek(start + begin)
                while begin < end:
                    chunk = g.read(min(_COPY_CHUNK, end - begin))
                    if not chunk:
                        raise CheckpointError(f"{src} ended early while copying its tensors")
                    f.write(chunk)
                    begin += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return [e[0] for e in entries]


def write_shards(sources: list[Path], out_dir: Path, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Merge ``sources`` (in order, whole files) into ``model.safetensors``, or into numbered shards of at most
    ``max_shard_bytes`` (a single larger file gets a shard of its own) plus the index; returns the files written."""
    groups: list[list[Path]] = [[]]
    size = 0
    for src in sources:
        n = src.stat().st_size
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(src)
        size += n
    if len(groups) == 1:
        merge(groups[0], out_dir / WEIGHTS_NAME, metadata)
        return [WEIGHTS_NAME]
    names = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map: dict[str, str] = {}
    total = 0
    for name, group in zip(names, groups):
        for tensor in merge(group, out_dir / name, metadata):
            weight_map[tensor] = name
        header, _ = read_header(out_dir / name)
        total += sum(i["data_offsets"][1] - i["data_offsets"][0] for i in header.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_NAME]


def read_index(path: Path) -> dict[str, str]:
    """{tensor name: shard file name} of a ``*.safetensors.index.json``; CheckpointError if unreadable."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable shard index: {exc}") from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: weight_map is not a mapping")
    return weight_map


def check_shards(directory: Path, weight_map: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Check that every shard named by ``weight_map`` exists and holds exactly the tensors the index gives it;
    returns {tensor name: header entry}. CheckpointError naming the shard otherwise."""
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(tensor)
    entries: dict[str, dict[str, Any]] = {}
    for shard, expected in sorted(by_shard.items()):
        if not (directory / shard).is_file():
            raise CheckpointError(f"{directory}: shard {shard} named by the index is missing")
        header, _ = read_header(directory / shard)
        if set(header) != expected:
            lacks, extra = sorted(expected - set(header)), sorted(set(header) - expected)
            raise CheckpointError(f"{directory / shard} does not match the index: it lacks {lacks[:3]} and holds "
                                  f"{extra[:3]} not indexed to it")
        entries.update(header)
    return entries
