"""Atomic output directories: build under a hidden temporary name, rename into place at the end.

``atomic_output_dir(out)`` yields ``<parent>/.<name>.tmp-<host>-<pid>-<random>``; on success the directory replaces
``out`` (an old ``out`` is first moved to ``.<name>.old-<host>-<pid>-<random>/old`` and deleted after). On an
exception, Ctrl-C (SIGINT) or SIGTERM (what ``timeout`` and job schedulers send) the temporary directory is removed
and ``out`` is left as it was; SIGTERM then takes its usual course (the process ends with it).

A run killed outright (SIGKILL, power loss) cannot clean up. Its directories carry the owner's host and pid, so the
next run into the same place recognises those of a dead process on this host and removes them (restoring an old
``out`` that had been moved aside but not yet replaced).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError

log = logging.getLogger(__name__)


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _prefix(out: Path, kind: str) -> str:
    """``.<name>.<kind>-<host>-<pid>-``: the owner of a temporary directory, readable from its name."""
    return f".{out.name}.{kind}-{_host_tag()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _dead_owner(path: Path, out: Path, kind: str) -> bool:
    """Whether ``path`` is a ``kind`` directory of ``out`` made on this host by a process that no longer runs."""
    head = f".{out.name}.{kind}-"
    parts = path.name[len(head):].split("-")
    if not path.name.startswith(head) or len(parts) < 3 or parts[0] != _host_tag() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories that dead runs left next to ``out``; returns what was removed.

    An ``old`` directory whose ``out`` is missing holds the previous output, moved aside just before the dead run
    would have renamed its result into place: it is moved back instead of deleted.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    for kind in ("tmp", "old"):
        for path in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            if not path.is_dir() or not _dead_owner(path, out, kind):
                continue
            if kind == "old" and (path / "old").is_dir() and not out.exists():
                (path / "old").rename(out)
                log.warning("restored %s from %s, left by a run that died while replacing it", out, path)
            log.info("removing %s, left by a run that no longer exists", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class _Terminated(BaseException):
    """Raised by the temporary SIGTERM handler so that cleanup code runs (like KeyboardInterrupt for SIGINT)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(signum)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises an exception, so ``except``/``finally`` clauses run; on the way out the
    previous handler is restored and the signal re-sent to this process (by default it then ends).

    No-op off the main thread (Python only handles signals there) and where SIGTERM is ignored or handled in C.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None or previous == signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)  # the default action ends the process here; a handler runs
        raise CheckpointError("interrupted by SIGTERM; nothing was written") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _chmod_default(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out`` (an existing ``out`` is set aside first, then deleted)."""
    for f in tmp.iterdir():
        if f.is_file():
            _chmod_default(f, 0o666)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
        out.rename(trash / "old")
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out_dir``; on success it replaces ``out_dir`` by renames.

    An existing non-empty ``out_dir`` is refused (CheckpointError) unless ``overwrite``. On error, Ctrl-C or SIGTERM
    the temporary directory is removed and ``out_dir`` is left untouched. Leftovers of dead runs are removed first.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    with sigterm_raises():
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent))
        try:
            _chmod_default(tmp, 0o777)  # mkdtemp creates 0700
            yield tmp
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
