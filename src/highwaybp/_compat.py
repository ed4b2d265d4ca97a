"""The tested dependency ranges of highway-bp, and the checks that refuse anything outside them.

One owner: `TESTED_RANGES` is the single source of the ranges. `pyproject.toml` declares the
same ranges for pip (tests/test_dependencies.py fails if the two differ, and if an installed
dependency lies outside them); nothing here reads `pyproject.toml`, which an installed copy of
the package does not carry.

A range is (lowest tested version, first untested version or None). The lowest version is
the one `constraints/lowest.txt` pins and CI-style runs test; an upper bound is set where a new
release is known to change what the code relies on:

- torch: the whole suite passes from the lowest bound to the newest release (see
  docs/dependencies.md for the runs). The engine relies on autograd and `torch.func`
  behaviour, so a minor version outside the range is refused at import (`require_tested`).
  Features that older releases in the range lack (some `torch.distributed.pipelining`
  schedules) are detected where they are used, and their tests and bench arms skipped with
  the reason (`highwaybp.distributed.baselines.missing_schedule`).
- transformers: `from_huggingface` replaces a model's block loop, so it depends on how the
  model calls its blocks (argument names, the KV cache, tuple or tensor returns), which
  changes between minor releases (5.24 renamed the cache argument `past_key_values` to
  `cache`). Tested: the lowest (4.40.0) and 5.24.0. It is in `SELF_CHECKED`: a newer
  release is not refused outright but checked on each model at adaptation (the adapted
  block loop against the original on a probe batch, see `highwaybp.models.huggingface`),
  so pip declares no upper bound for it.
- ruff: a newer minor release adds lint rules, which makes the style test fail; releases
  before 0.9 do not know the rule UP045 that pyproject.toml ignores (ruff refuses the file).
- scikit-learn >= 1.6: `highwaybp.train.data.load_digits` reaches `sklearn.datasets` as an
  attribute of `sklearn`, which only 1.6+ loads on first use (1.2-1.5: AttributeError).
- tqdm (the harness's progress bar, `highwaybp.train.loop.Progress`; optional: without it
  there is no bar): 4.66.0 and 4.70.1 pass tests/train/test_loop.py.
- numpy, mnist1d, matplotlib, scikit-learn, tqdm, hypothesis, pytest: only their stable public API
  is used; the newest release on the day passes the suite, so no upper bound.

Outside a range, `require_tested` raises `UntestedVersionError`, unless the environment sets
`HIGHWAYBP_ALLOW_UNTESTED=1`: then it warns once and goes on (to try a new release, run the
test suite with it set).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import warnings

ALLOW_UNTESTED_ENV = "HIGHWAYBP_ALLOW_UNTESTED"

# distribution name -> (lowest tested version, first untested version or None)
TESTED_RANGES: dict[str, tuple[str, str | None]] = {
    "torch": ("2.5", "2.16"),
    "numpy": ("1.23.5", None),
    "transformers": ("4.40", "5.25"),
    "mnist1d": ("0.0.2", None),
    "matplotlib": ("3.6.2", None),
    "scikit-learn": ("1.6", None),
    "tqdm": ("4.66", None),
    "pytest": ("7.2", None),
    "hypothesis": ("6.0", None),
    "ruff": ("0.9", "0.18"),
}

# Dependencies whose releases newer than the tested range are accepted after a run-time
# self-check of what highway-bp relies on (not refused by version): pyproject.toml declares
# only their lower bound (`declared_specifier`).
SELF_CHECKED: frozenset[str] = frozenset({"transformers"})

_warned: set[str] = set()


class UntestedVersionError(RuntimeError):
    """An installed dependency lies outside the range highway-bp is tested with."""


class UntestedVersionWarning(RuntimeWarning):
    """A dependency newer than the tested range is used after its self-check passed."""


def specifier(name: str) -> str:
    """The pip version specifier of `name`'s tested range, e.g. ">=4.40,<5.25"."""
    low, high = TESTED_RANGES[name]
    return f">={low}" + (f",<{high}" if high is not None else "")


def declared_specifier(name: str) -> str:
    """The specifier pyproject.toml declares for `name`: the tested range, without its upper
    bound for a dependency in `SELF_CHECKED` (a newer release is checked at run time)."""
    if name in SELF_CHECKED:
        return f">={TESTED_RANGES[name][0]}"
    return specifier(name)


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0).

    Local labels (+cpu, +cu128) and pre/dev/post suffixes are dropped: a build of a release is
    judged as that release.
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read the version number in {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _padded(parts: tuple[int, ...], width: int) -> tuple[int, ...]:
    return parts + (0,) * (width - len(parts))


def in_range(name: str, version: str) -> bool:
    """Whether `version` of `name` lies inside its tested range (lower inclusive)."""
    low, high = TESTED_RANGES[name]
    bounds = [release(low)] + ([release(high)] if high is not None else [])
    width = max(len(release(version)), *(len(b) for b in bounds))
    v = _padded(release(version), width)
    if v < _padded(release(low), width):
        return False
    return high is None or v < _padded(release(high), width)


def newer_than_tested(name: str, version: str) -> bool:
    """Whether `version` of `name` is at or above the first untested release (False when the
    range has no upper bound)."""
    high = TESTED_RANGES[name][1]
    if high is None:
        return False
    width = max(len(release(version)), len(release(high)))
    return _padded(release(version), width) >= _padded(release(high), width)


def installed_version(name: str) -> str:
    """The installed version of distribution `name` (its metadata; else `module.__version__`).

    The metadata, not `transformers.__version__`: transformers swaps its module object in
    `sys.modules` when a model is first built.
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # e.g. a source tree on sys.path
        return str(importlib.import_module(name).__version__)


def require_tested(name: str, what: str) -> None:
    """Refuse the installed version of dependency `name` if it is outside the tested range.

    Args:
        name: the distribution name, a key of `TESTED_RANGES`.
        what: the highway-bp feature that needs it, for the message.

    Raises `UntestedVersionError` naming the installed version, the tested range and what to
    do; with `HIGHWAYBP_ALLOW_UNTESTED=1` in the environment it warns (once per dependency)
    instead.
    """
    version = installed_version(name)
    if in_range(name, version):
        return
    message = (
        f"{what} is tested with {name}{specifier(name)}, but {name} {version} is installed. "
        f"An untested {name} can change what highway-bp relies on and give wrong results "
        f"without an error, so it is refused. Install a tested version "
        f"(pip install '{name}{specifier(name)}'), or set {ALLOW_UNTESTED_ENV}=1 to run it "
        f"anyway with a warning (then run highway-bp's test suite to check it)."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0"):
        if name not in _warned:
            _warned.add(name)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    raise UntestedVersionError(message)
