"""argparse `type=` functions shared by every `highwaybp` command.

A bad value (`--steps 0`, `--threads -1`, `--methods bogus`, an `--out` that cannot be
written) is refused by argparse itself: a usage line and `error: ...` on stderr, exit
status 2, never a traceback from deep inside a run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from highwaybp.core.methods import method_from_string


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


MNIST1D_MIN_SAMPLES = 10  # mnist1d splits 80/20: fewer leave its test split empty (crash)


def mnist1d_size(text: str) -> int:
    """A number of MNIST-1D samples (train + test): at least `MNIST1D_MIN_SAMPLES`."""
    value = _int(text)
    if value < MNIST1D_MIN_SAMPLES:
        raise argparse.ArgumentTypeError(
            f"MNIST-1D needs at least {MNIST1D_MIN_SAMPLES} samples (80% train / 20% test), "
            f"got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def momentum_value(text: str) -> float:
    """An SGD momentum: a finite number in [0, 1) (at 1 or above the velocity, a sum of
    the gradients weighted by its powers, no longer decays: the run diverges)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def nonneg_int_list(text: str) -> list[int]:
    """'0,1,3' -> [0, 1, 3]: at least one integer, each >= 0."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def positive_int_list(text: str) -> list[int]:
    """'256,1024' -> [256, 1024]: at least one integer, each >= 1."""
    values = nonneg_int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def method_spec(text: str) -> str:
    """A gradient-method name such as 'exact', 'highway:k=3', 'fixedpoint:k=1' or
    'highway:tol=1e-3,max_k=8', checked by `method_from_string` (the string is kept)."""
    try:
        method_from_string(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def schedule_spec(text: str) -> str:
    """A k schedule such as 'linear:0,4,2000' or 'adaptive:target=0.99,every=100', checked
    by `highwaybp.schedules.schedule_from_string` (the string is kept)."""
    from highwaybp.schedules import schedule_from_string

    try:
        schedule_from_string(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def method_list(text: str) -> list[str]:
    """'exact,highway:k=0,fixedpoint:k=1' -> the names, each checked by `method_spec`.

    Only `k=` options fit in this comma-separated form (a ',' separates methods)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one method")
    return [method_spec(n) for n in names]


def _check_writable(path: Path, what: str) -> None:
    """Refuse `path` (a folder to create or use) unless it is, or can be made, writable."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(
            f"{what} {str(path)!r}: {str(probe)!r} is not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"{what} {str(path)!r}: {str(probe)!r} is not writable; choose another path")


def out_dir(text: str) -> str:
    """An output folder: existing and writable, or creatable under a writable folder."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"output folder {text!r} is an existing file; choose another path")
    _check_writable(path, "output folder")
    return text


def out_file(text: str) -> str:
    """An output file path ('' = none): its folder exists and is writable or can be made."""
    if text == "":
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"output file {text!r} is an existing folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"output file {text!r} is not writable")
    _check_writable(path.parent, "output file's folder")
    return text
