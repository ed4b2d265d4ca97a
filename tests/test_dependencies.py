"""The declared dependency ranges: one owner (highwaybp._compat), pyproject.toml agrees, the
installed versions lie inside, and constraints/{lowest,newest}.txt pin the tested ends."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from highwaybp import _compat

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _declared() -> dict[str, Requirement]:
    """Every requirement pyproject.toml declares (highway-bp's own extras left out)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    requirements = [Requirement(line) for line in lines]
    return {r.name: r for r in requirements if r.name != project["name"]}


def test_pyproject_declares_the_ranges_of_compat():
    declared = _declared()
    assert sorted(declared) == sorted(_compat.TESTED_RANGES), (
        "pyproject.toml and highwaybp._compat.TESTED_RANGES must name the same dependencies"
    )
    for name, requirement in declared.items():
        expected = SpecifierSet(_compat.declared_specifier(name))
        assert requirement.specifier == expected, (
            f"pyproject.toml declares {requirement}, highwaybp._compat tests "
            f"{name}{expected}: change both together"
        )


@pytest.mark.parametrize("name", sorted(_compat.TESTED_RANGES))
def test_installed_version_is_in_the_tested_range(name):
    """Drift fails here first: a dependency pip resolved outside what this release tests."""
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is not installed: pip install torch==2.13.0 -e '.[test]'")
    if name in _compat.SELF_CHECKED and _compat.newer_than_tested(name, version):
        # Declared without an upper bound: checked at run time (its tests run that check).
        assert SpecifierSet(_compat.declared_specifier(name)).contains(version)
        return
    assert _compat.in_range(name, version), (
        f"{name} {version} is installed, but highway-bp is tested with "
        f"{name}{_compat.specifier(name)}: install a version in the range, or test the new "
        f"one (constraints/newest.txt) and move the bound in highwaybp._compat and "
        f"pyproject.toml together"
    )


@pytest.mark.parametrize("name", sorted(_compat.TESTED_RANGES))
def test_compat_range_agrees_with_pip(name):
    """`_compat.in_range` (no packaging at run time) says what pip's specifier says."""
    low, high = _compat.TESTED_RANGES[name]
    spec = SpecifierSet(_compat.specifier(name))
    candidates = {"0.0.1", "99.0"}
    for bound in [low] + ([high] if high else []):
        v = Version(bound)
        major, minor = v.release[0], v.release[1] if len(v.release) > 1 else 0
        patch = v.release[2] if len(v.release) > 2 else 0
        candidates |= {
            bound,
            f"{major}.{minor}.{patch}",
            f"{major}.{minor}.{patch + 1}",
            f"{major}.{minor + 1}.0",
            f"{major}.{max(minor - 1, 0)}.9",
            f"{major}.{minor}.{patch}.post1",
            f"{major + 1}.0.0",
            f"{max(major - 1, 0)}.99.0",
        }
    for version in sorted(candidates, key=Version):
        assert _compat.in_range(name, version) == spec.contains(version), (name, version)
    # Local builds (CUDA/CPU wheels of torch) are judged as their release.
    assert _compat.in_range(name, f"{low}+cu128") == spec.contains(low)


def test_compat_release_parsing():
    assert _compat.release("2.13.0+cpu") == (2, 13, 0)
    assert _compat.release("5.25.0.dev0") == (5, 25, 0)
    assert _compat.in_range("transformers", "5.24.0")
    assert not _compat.in_range("transformers", "5.25.0.dev0")  # a pre-release of 5.25
    assert not _compat.in_range("torch", "2.16.0a0+git1234")
    assert _compat.in_range("torch", "2.15.0+cu132")
    assert _compat.in_range("torch", "2.13.1+cu128")
    with pytest.raises(ValueError, match="version number"):
        _compat.release("unknown")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{path.name}: pin exact versions, got {line}"
            pins[requirement.name] = spec.version
    return pins


@pytest.mark.parametrize("which", ["lowest", "newest"])
def test_constraints_pin_every_dependency_in_range(which):
    pins = _pins(ROOT / "constraints" / f"{which}.txt")
    # torch is pinned by the install command itself (torch==2.13.0).
    assert sorted(pins) == sorted(set(_compat.TESTED_RANGES) - {"torch"})
    for name, version in pins.items():
        assert SpecifierSet(_compat.declared_specifier(name)).contains(version), (
            f"{which}.txt pins {name}=={version}, outside {_compat.declared_specifier(name)}"
        )
    if which == "lowest":  # the lower bounds are the versions tested, not guesses
        for name, version in pins.items():
            low = _compat.TESTED_RANGES[name][0]
            assert Version(version).release[: len(Version(low).release)] == Version(
                low
            ).release, f"lowest.txt pins {name}=={version}, the declared lower bound is {low}"


def test_newer_than_tested():
    assert _compat.newer_than_tested("transformers", "5.25.0")
    assert _compat.newer_than_tested("transformers", "5.25.0.dev0")
    assert _compat.newer_than_tested("transformers", "6.0")
    assert not _compat.newer_than_tested("transformers", "5.24.9")
    assert not _compat.newer_than_tested("transformers", "4.39.0")  # older, not newer
    assert not _compat.newer_than_tested("numpy", "99.0")  # no upper bound


def test_declared_specifier_drops_the_bound_only_of_self_checked_dependencies():
    assert _compat.declared_specifier("transformers") == (
        ">=" + _compat.TESTED_RANGES["transformers"][0]
    )
    assert _compat.declared_specifier("torch") == _compat.specifier("torch")
    assert _compat.declared_specifier("ruff") == _compat.specifier("ruff")


def test_torch_range_spans_the_tested_releases():
    """Issue 21: the suite passes on the declared floor, 2.14 and the newest release 2.15
    (docs/dependencies.md has the runs); the range is declared from the floor up to 2.15."""
    low = _compat.TESTED_RANGES["torch"][0]
    for version in (low, "2.13.0", "2.14.1", "2.15.0"):
        assert _compat.in_range("torch", version), version
    assert not _compat.in_range("torch", "2.16.0")
    assert low in (ROOT / "docs" / "dependencies.md").read_text()


@pytest.mark.parametrize("installed", ["2.16.0", "1.13.1"])
def test_untested_torch_is_refused(installed, monkeypatch):
    """The import-time check of highwaybp/__init__.py, run on a pretended torch outside."""
    real = _compat.installed_version
    monkeypatch.setattr(
        _compat, "installed_version", lambda n: installed if n == "torch" else real(n)
    )
    monkeypatch.delenv(_compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(_compat.UntestedVersionError, match=f"torch {installed} is installed"):
        _compat.require_tested("torch", "highway-bp")
    monkeypatch.setenv(_compat.ALLOW_UNTESTED_ENV, "1")
    monkeypatch.setattr(_compat, "_warned", set())
    with pytest.warns(RuntimeWarning, match=_compat.specifier("torch")):
        _compat.require_tested("torch", "highway-bp")
    monkeypatch.setenv(_compat.ALLOW_UNTESTED_ENV, "0")  # "0" is not an opt-in
    with pytest.raises(_compat.UntestedVersionError):
        _compat.require_tested("torch", "highway-bp")
