"""Crash-safe checkpoint files: a reader sees either the previous complete file or the new one, never half.

:func:`save_checkpoint` writes ``torch.save(state)`` to a temporary file in the same directory,
flushes and fsyncs it, renames it over the target with ``os.replace`` (atomic on POSIX and Windows)
and fsyncs the directory so the rename itself survives a power cut. :func:`load_checkpoint` returns
``None`` when there is no checkpoint yet and raises :class:`CheckpointError` for an unreadable one.
Used by the expert server (one file per expert) and reusable by trainers.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, not a torch file, wrong content)."""


def checkpoint_path(directory: str | os.PathLike, name: str, suffix: str = ".pt") -> Path:
    """``directory/<name><suffix>`` with any character outside ``[A-Za-z0-9_.-]`` replaced by ``_``."""
    if not name:
        raise ValueError("checkpoint name must be non-empty")
    return Path(directory) / (_UNSAFE.sub("_", name) + suffix)


def save_checkpoint(path: str | os.PathLike, state: Any) -> Path:
    """Atomically write ``state`` (anything ``torch.save`` accepts) to ``path``; returns the path.

    Steps: (1) create the parent directory; (2) ``torch.save`` into a temporary file next to ``path``;
    (3) flush + fsync it; (4) ``os.replace`` it over ``path``; (5) fsync the directory; (6) delete temporary
    files of ``path`` left by saves that were killed midway. If any step fails the temporary file is removed
    and the old checkpoint (if any) is left untouched. One writer per ``path`` at a time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    _fsync_directory(path.parent)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:  # left by an earlier save that was killed midway (one writer per path, so none is in flight)
            stale.unlink()
        except OSError:
            pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any | None:
    """The state saved at ``path``, or ``None`` if there is no file; :class:`CheckpointError` if unreadable.

    Only plain data and tensors are loaded (``weights_only=True``): a checkpoint cannot run code.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def _fsync_directory(directory: Path) -> None:
    """Persist a rename; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
