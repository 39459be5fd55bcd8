"""The one check of an output path, run before any work so that a bad ``--out`` fails in a second, not after an
hour of quantization."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """``out`` as a Path if a directory can be written there, else CheckpointError with the reason.

    Refused: an existing non-directory; a non-empty directory without ``overwrite``; the current directory or one
    of its ancestors (replacing it would pull the ground from under the run); a path below a file; a parent that
    is not writable.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise CheckpointError(f"output {out} is the current directory or one of its parents; choose a new directory")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot create {out}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot create {out}: {parent} is not writable")
    return out
