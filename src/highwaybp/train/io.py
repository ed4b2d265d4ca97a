"""The harness's rule for resuming a command into an output folder, and (re-exported from
`highwaybp.files`) the atomic files and checkpoints every training command writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from highwaybp.files import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "ConfigMismatchError",
    "atomic_write_json",
    "atomic_write_text",
    "check_resume_config",
    "config_diff",
    "current_umask",
    "load_checkpoint",
    "save_checkpoint",
    "save_figure",
]


class ConfigMismatchError(ValueError):
    """A resumable command was rerun into an output folder made with another configuration."""


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{key: (old value, new value)}` for every key whose value differs (or is missing)."""
    keys = list(old) + [k for k in new if k not in old]
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def check_resume_config(out: str | os.PathLike, config: dict[str, Any],
                        name: str = "config.json") -> None:
    """The one rule for resuming into `out`: the folder's `name` must hold `config` exactly.

    A fresh folder gets `config` written to it; a folder whose file holds the same
    configuration is resumed; any difference raises `ConfigMismatchError` listing each
    differing key with its old and new value, so that a rerun never mixes checkpoints or
    results of two configurations. `config` must be JSON-serialisable (it is compared after
    a JSON round trip, so tuples and lists compare equal).
    """
    path = Path(out) / name
    config = json.loads(json.dumps(config))
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigMismatchError(
                f"{path} is not a readable configuration ({err}); delete the folder "
                f"or choose another --out") from err
        diff = config_diff(old, config)
        if diff:
            lines = "\n".join(f"  {k}: {a!r} (in {path.name}) -> {b!r} (now)"
                              for k, (a, b) in diff.items())
            raise ConfigMismatchError(
                f"{path.parent} holds a run with another configuration:\n{lines}\n"
                f"Rerun with the same options to resume it, or choose another --out "
                f"(or delete {path.parent}) to start afresh.")
        return
    atomic_write_json(path, config)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure to `path` (PNG) atomically and close it: a reader, or a
    run killed while writing, never sees half a plot."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path
