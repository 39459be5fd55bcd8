"""Lazy reading of a floating-point Hugging Face checkpoint directory, a few tensors at a time.

Safetensors weights (``model.safetensors`` or shards with ``model.safetensors.index.json``) are read through
``safe_open``, one file mapping at a time, so memory holds only the tensors asked for. Checkpoints with only
pickle ``.bin`` weights are refused unless ``allow_pickle`` (they are then opened with
``torch.load(mmap=True, weights_only=True)``, which reads lazily too).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..formats import sharded

_PICKLE_INDEX = "pytorch_model.bin.index.json"


class CheckpointSource:
    """The tensors of the checkpoint directory ``path``: ``shapes`` {name: shape} from the file headers (checked
    against the index when sharded), ``read(names)`` {name: tensor} as stored."""

    def __init__(self, path: str | Path, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a checkpoint directory")
        self.pickle = False
        index = self.path / sharded.INDEX_NAME
        if index.is_file():
            weight_map = sharded.read_index(index)
            headers = sharded.check_shards(self.path, weight_map)
        elif (self.path / sharded.WEIGHTS_NAME).is_file():
            headers, _ = sharded.read_header(self.path / sharded.WEIGHTS_NAME)
            weight_map = dict.fromkeys(headers, sharded.WEIGHTS_NAME)
        else:
            headers, weight_map = self._open_pickle(allow_pickle)
        self.file_of = weight_map
        self.shapes = {k: tuple(h["shape"]) for k, h in headers.items()}

    def _open_pickle(self, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, str]]:
        bins = sorted(p.name for p in self.path.glob("*.bin"))
        if not bins:
            raise CheckpointError(f"{self.path} holds no weights: no model.safetensors, "
                                  f"{sharded.INDEX_NAME} or .bin files")
        if not allow_pickle:
            raise CheckpointError(
                f"{self.path} has only pickle weights ({', '.join(bins[:3])}); streaming reads safetensors. "
                "Convert it (load and save_pretrained(safe_serialization=True)), or opt in with --allow-pickle "
                "(CLI) / allow_pickle=True if you trust the files")
        self.pickle = True
        if (self.path / _PICKLE_INDEX).is_file():
            weight_map = sharded.read_index(self.path / _PICKLE_INDEX)
        else:
            weight_map = {k: bins[0] for k in self._load_pickle(bins[0])}
        headers = {}
        for name in sorted(set(weight_map.values())):
            if not (self.path / name).is_file():
                raise CheckpointError(f"{self.path}: shard {name} named by the index is missing")
            for key, t in self._load_pickle(name).items():
                headers[key] = {"shape": list(t.shape)}
        return headers, weight_map

    def _load_pickle(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return torch.load(self.path / name, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # unpickling errors are of many types
            raise CheckpointError(f"{self.path / name} cannot be read: {exc}") from exc

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """{name: tensor} (CPU, stored dtype), one file open at a time."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.file_of:
                raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
            by_file.setdefault(self.file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            if self.pickle:
                state = self._load_pickle(file)
                out.update({k: state[k].clone() for k in keys})
                continue
            try:
                with safe_open(self.path / file, framework="pt", device="cpu") as f:
                    out.update({k: f.get_tensor(k) for k in keys})
            except CheckpointError:
                raise
            except Exception as exc:  # SafetensorError / OSError for a file changed or cut since it was checked
                raise CheckpointError(f"{self.path / file} cannot be read: {exc}") from exc
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the weights cheaply: the files with their sizes and the hash of the tensor layout."""
        files = {name: (self.path / name).stat().st_size for name in sorted(set(self.file_of.values()))}
        layout = hashlib.sha256(json.dumps(sorted(self.shapes.items())).encode()).hexdigest()
        return {"path": str(self.path.resolve()), "files": files, "layout_sha256": layout}
