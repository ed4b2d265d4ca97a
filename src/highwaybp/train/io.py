"""Atomic result files and resumable checkpoints for every training command.

A result or checkpoint is written to a temporary file in the same folder and then
renamed over the target, so a run killed mid-write never leaves a truncated file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: str | os.PathLike, write: Any, mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none yet (a fresh run)."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
