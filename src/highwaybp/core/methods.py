"""Gradient methods: what a chain's backward computes. Each is a small frozen config object.

- `Exact()`: ordinary backprop (autograd through the layers).
- `Highway(k)`: Highway-BP with k iterations; `Highway(tol=..., max_k=...)` is adaptive.
- `FixedPoint(k)`: the Jacobi fixed-point iteration baseline (Highway-BP with K = 0).

A method says how it runs through class attributes that every engine reads (the chain, the
RNN engines, CellRNN, the model adapters): `exact` (run plain autograd / exact BPTT) or an
iteration that `keeps_residual` (scan with K: Highway) or not (K = 0: FixedPoint), bounded
by `iteration_bound`, `adaptive` with a `fallback` or not. No engine tests a method's class.
`METHODS` is the one registry of names: `register_method` adds one, `method_from_string`
("highway:k=3") and `Method.to_string` read and write the text form the CLI uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, TypeVar

_FALLBACKS = ("exact", "best", "last")


def _check_anderson(name: str, m: object) -> int:
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"{name}: anderson must be an int (0: plain, >= 2: window), got {m!r}")
    if m == 1 or m < 0:
        raise ValueError(
            f"{name}: anderson={m}: the window must be >= 2 iterates (a window of 1 is the plain "
            "iteration: pass anderson=0)"
        )
    return m


def _check_k(name: str, k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: k must be an int >= 0, got {k!r} ({type(k).__name__})")
    if k < 0:
        raise ValueError(f"{name}: k must be >= 0 (k = 0 keeps only the residual paths), got {k}")
    return k


@dataclass(frozen=True)
class Method:
    """Base class of gradient methods: how the backward runs, read by every engine.

    Class attributes:
        exact: the backward is exact backprop (autograd through the layers, exact BPTT).
        keeps_residual: for an iterative method, whether the scan carries the residual
            path K (Highway-BP) or K = 0 (the fixed-point iteration).
        option_types: the text options `method_from_string` accepts, with their types.
    Properties: `iteration_bound` (iterations at most), `adaptive` (stops on a tolerance
    and may apply `fallback`).
    """

    exact: ClassVar[bool] = False
    keeps_residual: ClassVar[bool] = True
    option_types: ClassVar[dict[str, type]] = {}
    registry_name: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return self.registry_name or type(self).__name__.lower()

    @property
    def adaptive(self) -> bool:
        return False

    @property
    def fallback(self) -> Optional[str]:
        return None

    @property
    def anderson(self) -> int:
        """Anderson window m (0: the plain iteration); see `core.anderson`."""
        return 0

    @property
    def iteration_bound(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not iterate")

    def to_string(self) -> str:
        """The text `method_from_string` reads back to an equal method ("highway:k=3")."""
        opts = [f"{f}={getattr(self, f)!r}" if isinstance(getattr(self, f), float)
                else f"{f}={getattr(self, f)}"
                for f in self.option_types
                if getattr(self, f, None) is not None
                and not (f == "anderson" and not self.anderson)]  # plain: the old text
        return self.name + (":" + ",".join(opts) if opts else "")


M = TypeVar("M", bound=type[Method])
METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a method under `name` for `method_from_string`."""

    def add(cls: M) -> M:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"a method is already registered as {name!r}: {METHODS[name]}")
        cls.registry_name = name
        METHODS[name] = cls
        return cls

    return add


@register_method("exact")
@dataclass(frozen=True)
class Exact(Method):
    """Exact backpropagation: the chain runs its layers under autograd."""

    def __repr__(self) -> str:
        return "Exact()"

    exact: ClassVar[bool] = True


@register_method("highway")
@dataclass(frozen=True, init=False)
class Highway(Method):
    """Highway backpropagation (Fagnou et al., ICLR 2025).

    Fixed: `Highway(k=3)` runs k iterations; the estimate holds every gradient path that
    crosses at most k blocks and is exact for k >= L (chain length).

    Adaptive: `Highway(tol=1e-3, max_k=20)` iterates until the relative step
    ||w^{j+1} - w^j|| / ||w^{j+1}|| falls under `tol`. The truncated path sum can grow before
    it converges on a trained model, so the adaptive method also stops when the step grows
    (step_j > step_{j-1}) or `max_k` is reached without converging, and then uses `fallback`:
    "exact" (default; sequential exact backprop, so the gradient is never silently poor),
    "best" (the estimate whose step was smallest) or "last" (the latest estimate).

    Accelerated: `Highway(k=3, anderson=5)` spends the same k sweeps (one F evaluation
    each) but mixes the last m = 5 iterates by Anderson acceleration (`core.anderson`), which
    converges where the plain partial sums grow. Adaptive with a window
    (`Highway(tol=1e-3, max_k=20, anderson=5)`) stops when the relative residual
    ||F(x) - x|| / ||F(x)|| falls under tol (no growth rule: a mixed residual need not fall
    monotonically); for the plain iteration that residual is the relative step above. A
    fixed k >= L runs plain steps: they are exact backprop at L, a mix is not.
    """

    k: Optional[int] = None
    tol: Optional[float] = None
    max_k: Optional[int] = None
    fallback: Optional[str] = None  # type: ignore[assignment]
    anderson: int = 0  # type: ignore[assignment]

    option_types: ClassVar[dict[str, type]] = {"k": int, "tol": float, "max_k": int,
                                               "fallback": str, "anderson": int}

    def __init__(
        self,
        k: Optional[int] = None,
        *,
        tol: Optional[float] = None,
        max_k: Optional[int] = None,
        fallback: Optional[str] = None,
        anderson: int = 0,
    ) -> None:
        if tol is None:
            if max_k is not None or fallback is not None:
                raise ValueError(
                    "Highway: max_k and fallback are for the adaptive form; pass tol=... too"
                )
            k = _check_k("Highway", 3 if k is None else k)
        else:
            if k is not None:
                raise ValueError("Highway: pass either k (fixed) or tol and max_k (adaptive)")
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
                raise ValueError(f"Highway: tol must be a positive number, got {tol!r}")
            if not math.isfinite(tol):
                raise ValueError("Highway: tol must be finite")
            if max_k is None:
                raise ValueError(
                    "Highway: the adaptive form needs a bound, e.g. Highway(tol=1e-3, max_k=20)"
                )
            max_k = _check_k("Highway(max_k)", max_k)
            fallback = "exact" if fallback is None else fallback
        if fallback is not None and fallback not in _FALLBACKS:
            raise ValueError(f"Highway: fallback must be one of {_FALLBACKS}, got {fallback!r}")
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "tol", None if tol is None else float(tol))
        object.__setattr__(self, "max_k", max_k)
        object.__setattr__(self, "fallback", fallback)
        object.__setattr__(self, "anderson", _check_anderson("Highway", anderson))

    @property
    def adaptive(self) -> bool:
        return self.tol is not None

    @property
    def iteration_bound(self) -> int:
        return self.max_k if self.adaptive else self.k

    def __repr__(self) -> str:
        mix = f", anderson={self.anderson}" if self.anderson else ""
        if self.adaptive:
            return (f"Highway(tol={self.tol:g}, max_k={self.max_k}, fallback={self.fallback!r}"
                    f"{mix})")
        return f"Highway(k={self.k}{mix})"


@register_method("fixedpoint")
@dataclass(frozen=True, init=False)
class FixedPoint(Method):
    """Fixed-point (Jacobi) iteration (Wang & Ragni 2021): Highway-BP with K = 0.

    w_i^{j+1} = dloss_i/dh_i + w_{i+1}^j @ df_{i+1}/dh_i. Without per-layer losses it only
    backpropagates through the last k layers. `anderson=m` mixes the last m iterates
    (`core.anderson`), as for `Highway`.
    """

    k: int = 3
    anderson: int = 0  # type: ignore[assignment]

    keeps_residual: ClassVar[bool] = False
    option_types: ClassVar[dict[str, type]] = {"k": int, "anderson": int}

    def __init__(self, k: int = 3, *, anderson: int = 0) -> None:
        object.__setattr__(self, "k", _check_k("FixedPoint", k))
        object.__setattr__(self, "anderson", _check_anderson("FixedPoint", anderson))

    @property
    def iteration_bound(self) -> int:
        return self.k

    def __repr__(self) -> str:
        mix = f", anderson={self.anderson}" if self.anderson else ""
        return f"FixedPoint(k={self.k}{mix})"


# The autograd Functions whose backward runs a gradient method (a chain's, an RNN layer's):
# a parameter whose gradient flows through one of them may differ between methods
# (`core.fidelity.changed_parameters` reads this).
METHOD_FUNCTIONS: set[type] = set()


def register_method_function(cls: type) -> type:
    """Class decorator: mark an autograd.Function whose backward runs a gradient method."""
    METHOD_FUNCTIONS.add(cls)
    return cls


def check_method(method: object) -> Method:
    """`method` if it is a highwaybp method, else a TypeError that lists the choices."""
    if not isinstance(method, Method):
        raise TypeError(
            f"method must be highwaybp.Exact(), Highway(k), Highway(tol=, max_k=) or "
            f"FixedPoint(k) (each with an optional anderson=m), got {method!r}"
        )
    return method


def method_from_string(text: str) -> Method:
    """Parse "exact", "highway:k=3", "highway:k=3,anderson=5", "highway:tol=1e-3,max_k=20",
    "fixedpoint:k=2", or any method in `METHODS` ("name:option=value,...").

    A bare number after the name is k: "highway:3". An option given twice, an option the
    method does not take, or a value of the wrong type is a ValueError.
    """
    name, _, arg_text = text.strip().lower().partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    cls = METHODS[name]
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in arg_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            key, value = "k", key
        key, value = key.strip(), value.strip()
        if key not in cls.option_types:
            takes = ", ".join(cls.option_types) or "no options"
            raise ValueError(f"method {name!r} takes {takes}; got option {key!r} in {text!r}")
        if key in kwargs:
            raise ValueError(f"option {key!r} given twice in method {text!r}")
        kind = cls.option_types[key]
        try:
            kwargs[key] = kind(value)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise ValueError(
                f"option {key!r} in method {text!r} must be {what}, got {value!r}"
            ) from None
    return cls(**kwargs)
