"""Atomic files and checkpoints, for the library (the DDG runtime's per-rank checkpoints)
and for every training command of the harness.

A result or checkpoint is written to a temporary file in the same folder and then
renamed over the target, so a run killed mid-write never leaves a truncated file; it gets
the user's umask. An unreadable checkpoint raises `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), so that no
    other thread ever sees a temporary umask; elsewhere set-and-restore."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Any, mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; a result or checkpoint gets the permissions any
        # file the user creates gets (0666 minus the umask), as open() would give it.
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temp file + rename)."""
    return _atomic_write(path, lambda h: h.write(text), "w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """`torch.save(state)` to `path` atomically."""
    return _atomic_write(path, lambda h: torch.save(state, h), "wb")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (empty, truncated, not a checkpoint)."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none yet (a fresh run).

    Raises `CheckpointError` naming the file when it exists but cannot be read (an empty,
    truncated or foreign file): delete it to restart that run from the beginning.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as err:
        raise CheckpointError(_unreadable(path, f"{type(err).__name__}: {err}")) from err
    if not isinstance(state, dict):
        raise CheckpointError(_unreadable(path, f"it holds a {type(state).__name__}, "
                                                 "not a checkpoint dictionary"))
    return state


def _unreadable(path: Path, why: str) -> str:
    return (f"cannot read the checkpoint {path} ({why}); it is empty, truncated or not a "
            f"highwaybp checkpoint. Delete it to restart that run from the beginning (or "
            f"delete the whole output folder {path.parent} to start every run afresh).")
