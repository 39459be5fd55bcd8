"""Byte-reproducible safetensors files.

``safetensors`` writes the tensors in a fixed order (by dtype alignment, then name) but the ``__metadata__`` entries
in the order of a Rust hash map, which changes from one process to the next: two identical runs gave different
``model.safetensors`` bytes. ``save_safetensors`` writes the file with ``safetensors`` and then rewrites its JSON
header in place with the metadata keys sorted (same length, so the tensor data is untouched).

File layout (safetensors): 8-byte little-endian header length n, n bytes of JSON header padded with spaces, data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_META = "__metadata__"


def _sorted_header(header: bytes) -> bytes:
    """The same header with the ``__metadata__`` keys sorted, space-padded to the original length."""
    parsed = json.loads(header)
    if _META in parsed:
        parsed[_META] = dict(sorted(parsed[_META].items()))
    text = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > len(header):  # cannot happen for a reordering; keep the file as written rather than break it
        return header
    return text + b" " * (len(header) - len(text))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """``safetensors.torch.save_file`` with a deterministic header: equal inputs give equal bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(tensors, path, metadata=metadata)
    with path.open("r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
        fixed = _sorted_header(header)
        if fixed != header:
            f.seek(8)
            f.write(fixed)
    return path
