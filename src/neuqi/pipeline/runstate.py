"""The on-disk state of a streaming quantization run, so that a killed run resumes exactly where it stopped.

The partial directory ``.<out>.partial`` next to the output holds::

    state.json            {"version", "fingerprint": {config, calibration, source, dtype}, "layers_done": k,
                           "records": [LinearRecord dicts of layers < k], "layers_s": [...], "capture_s",
                           "stem_files": n once the stem files are written}
    stem/<n>.safetensors  the tensors outside the decoder layers, one per file, in the compute dtype
    layers/<i>.safetensors  the packed tensors of each finished layer
    acts/<i>/b<j>.pt      the hidden states entering layer i for global calibration batch j

Every file is written under a temporary name and renamed, ``state.json`` last: a layer counts as done only once
its tensors and its outputs are on disk, so a run killed at any instant resumes from a consistent state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1


def tokens_fingerprint(tokens: torch.Tensor) -> dict[str, Any]:
    """The calibration tokens' shape and the SHA-256 of their int64 bytes."""
    data = tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return {"shape": list(tokens.shape), "sha256": hashlib.sha256(data).hexdigest()}


def write_atomic(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then fsync and rename to ``path``: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            diff = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
            if diff:
                return diff
        return None
    return None if old == new else f"{where}: {old!r} then, {new!r} now"


class RunState:
    """The partial directory of the run writing ``out`` (see module docstring). Only the ``writer`` (rank 0)
    creates, checks and updates it; other ranks read it."""

    def __init__(self, out: Path, fingerprint: dict[str, Any]) -> None:
        self.dir = out.parent / f".{out.name}.partial"
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        self.state: dict[str, Any] = {}

    @property
    def file(self) -> Path:
        return self.dir / "state.json"

    def open(self, resume: bool, overwrite: bool) -> None:
        """Start a fresh state, or with ``resume`` load the existing one after checking it is this run's."""
        if self.file.is_file() and resume:
            state = json.loads(self.file.read_text())
            diff = _first_difference(state.get("fingerprint"), self.fingerprint)
            if diff or state.get("version") != STATE_VERSION:
                raise ConfigError(f"cannot resume {self.dir}: it was started with different settings ({diff}); "
                                  "run again with the same ones, or without --resume and with --overwrite")
            self.state = state
            log.info("resuming %s after layer %d", self.dir, state["layers_done"] - 1)
            return
        if self.dir.exists() and not resume and not overwrite:
            raise ConfigError(f"{self.dir} holds an interrupted run: pass --resume to continue it, or --overwrite to "
                              "start over")
        if resume:
            log.warning("nothing to resume at %s; starting from the first layer", self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "layers").mkdir(parents=True)
        (self.dir / "stem").mkdir()
        self.state = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "layers_done": 0, "records": [],
                      "layers_s": [], "capture_s": None}
        self.save()

    def load(self) -> None:
        self.state = json.loads(self.file.read_text())

    def save(self) -> None:
        write_atomic(self.file, lambda p: p.write_text(json.dumps(self.state, indent=1)))

    @property
    def layers_done(self) -> int:
        return self.state["layers_done"]

    def layer_file(self, i: int) -> Path:
        return self.dir / "layers" / f"{i:05d}.safetensors"

    def stem_file(self, n: int) -> Path:
        return self.dir / "stem" / f"{n:05d}.safetensors"

    def stem_files(self) -> list[Path]:
        """The files of the tensors outside the decoder layers (all written once ``state["stem_files"]`` is set)."""
        return [self.stem_file(n) for n in range(self.state["stem_files"])]

    def acts_dir(self, i: int) -> Path:
        return self.dir / "acts" / str(i)

    def mark_done(self, i: int, records: list[dict[str, Any]], seconds: float) -> None:
        """Record layer ``i`` as finished (its tensors and outputs must be on disk already)."""
        if self.layers_done != i:
            raise RuntimeError(f"layer {i} finished but the state expects layer {self.layers_done}")
        self.state["layers_done"] = i + 1
        self.state["records"] += records
        self.state["layers_s"].append(round(seconds, 3))
        self.save()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Activations(Sequence[torch.Tensor]):
    """The hidden states entering layer ``layer``, one (b, seqlen, hidden) tensor per calibration batch of this
    rank (global batch ids ``ids``), on ``device`` when read. ``mode``: "host" keeps them in CPU memory, "device"
    on ``device``, "disk" only in files. ``put(j, out)`` stores batch j's output (the next layer's input), in
    memory (replacing the input, which the layer no longer needs) and in ``acts/<layer + 1>/`` for resuming."""

    def __init__(self, state: RunState, ids: list[int], mode: str, device: torch.device, layer: int,
                 tensors: list[torch.Tensor] | None = None) -> None:
        self.state, self.ids, self.mode, self.device, self.layer = state, ids, mode, device, layer
        self._keep = None if mode == "disk" else torch.device("cpu") if mode == "host" else device
        self._mem: list[torch.Tensor] | None = None
        if self._keep is not None:
            self._mem = [t.to(self._keep) for t in tensors] if tensors is not None else [
                self._read(layer, j, self._keep) for j in range(len(ids))]
        elif tensors is not None:  # disk mode starting from captured inputs
            for j, t in enumerate(tensors):
                self._write(layer, j, t)

    def _path(self, layer: int, j: int) -> Path:
        return self.state.acts_dir(layer) / f"b{self.ids[j]}.pt"

    def _read(self, layer: int, j: int, device: torch.device) -> torch.Tensor:
        return torch.load(self._path(layer, j), map_location=device, weights_only=True)

    def _write(self, layer: int, j: int, t: torch.Tensor) -> None:
        path = self._path(layer, j)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda p: torch.save(t.detach().cpu().contiguous(), p))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int) -> torch.Tensor:  # type: ignore[override]
        if self._mem is None:
            return self._read(self.layer, j, self.device)
        return self._mem[j].to(self.device)

    def put(self, j: int, out: torch.Tensor) -> None:
        self._write(self.layer + 1, j, out)
        if self._mem is not None:
            self._mem[j] = out.to(self._keep)

    def advance(self) -> None:
        """The outputs become the inputs; the previous layer's files stay until ``drop(layer)``."""
        self.layer += 1

    def drop(self, layer: int) -> None:
        """Delete this rank's files of ``layer``."""
        for j in range(len(self.ids)):
            self._path(layer, j).unlink(missing_ok=True)
