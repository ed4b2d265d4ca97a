"""k schedules: which gradient method to use at each training step.

A schedule is a small frozen object; `schedule.method_at(step, total_steps)` (or
`schedule(step)`) gives the `Method` for a step. `KController` (highwaybp.control)
applies it to every chain and RNN of a model during training.

    Constant(Highway(k=3))                                  "highway:k=3" (or "constant:...")
    Steps({0: Highway(k=1), 1000: Highway(k=3), 4000: Exact()})
                                    "steps:0=highway:k=1,1000=highway:k=3,4000=exact"
    Linear(0, 4, steps=2000)                                "linear:0,4,2000"
    Finish(Linear(0, 4, 2000), exact_last=200)              "finish:200:linear:0,4,2000"
    Adaptive(target_cosine=0.99, probe_every=100, k_max=8)
                                    "adaptive:target=0.99,every=100,k_max=8"
    Auto()  (what KController(model) uses)                  "auto" ("auto:target=0.99,...")

`schedule_from_string(text)` parses each form and `schedule.to_string()` writes it back
(a round trip gives an equal schedule). `Adaptive` is the one stateful schedule: its
current k lives in the controller (`AdaptiveState`), not in the frozen spec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from highwaybp.core.methods import (
    Exact,
    Highway,
    Method,
    check_method,
    method_from_string,
)

__all__ = [
    "Adaptive",
    "AdaptiveState",
    "Auto",
    "AutoState",
    "Constant",
    "Finish",
    "Linear",
    "Schedule",
    "Steps",
    "method_to_string",
    "schedule_from_string",
]

GRAMMAR = (
    "write a k schedule as one of: a method ('exact', 'highway:k=3', 'fixedpoint:k=2', "
    "'highway:tol=1e-3,max_k=20'), 'constant:<method>', "
    "'steps:0=highway:k=1,1000=highway:k=3,4000=exact', 'linear:K_START,K_END,STEPS', "
    "'finish:N:<schedule>' (exact for the last N steps), or "
    "'adaptive:target=0.99,every=100,k_min=0,k_max=8' (options: target, every, k_min, "
    "k_max, k_start, rise, window), or 'auto' (the recommended controller; options: "
    "target, every, anderson, budget, break_even)"
)


def method_to_string(method: Method) -> str:
    """The text `method_from_string` reads back to an equal method ("highway:k=3")."""
    return check_method(method).to_string()


def _int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _cosine_target(who: str, value: object) -> float:
    """A probe's target cosine: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{who}: target_cosine must be in (0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Schedule:
    """Base class: maps a training step (0-based) to a gradient method."""

    #: True when the schedule measures the gradient (needs `loss_fn`) and keeps state.
    stateful = False

    def method_at(self, step: int, total_steps: int | None = None) -> Method:
        raise NotImplementedError

    def __call__(self, step: int, total_steps: int | None = None) -> Method:
        return self.method_at(step, total_steps)

    def to_string(self) -> str:
        raise NotImplementedError

    @classmethod
    def from_string(cls, text: str) -> Schedule:
        schedule = schedule_from_string(text)
        if not isinstance(schedule, cls):
            raise ValueError(f"{text!r} is a {type(schedule).__name__}, not a {cls.__name__}")
        return schedule


@dataclass(frozen=True)
class Constant(Schedule):
    """The same method at every step (what `method=` alone does)."""

    method: Method

    def __post_init__(self) -> None:
        check_method(self.method)

    def method_at(self, step: int, total_steps: int | None = None) -> Method:
        return self.method

    def to_string(self) -> str:
        return method_to_string(self.method)


@dataclass(frozen=True, init=False)
class Steps(Schedule):
    """Piecewise-constant: `Steps({0: Highway(k=1), 1000: Highway(k=3), 4000: Exact()})`
    uses each method from its step on. The first milestone must be step 0."""

    milestones: tuple[tuple[int, Method], ...]

    def __init__(self, milestones: Mapping[int, Method] | tuple) -> None:
        items = sorted(dict(milestones).items())
        if not items or items[0][0] != 0:
            raise ValueError(
                "Steps needs a method from step 0 on, e.g. Steps({0: Highway(k=1), "
                f"1000: Exact()}}); got milestones at {[s for s, _ in items]}"
            )
        for step, method in items:
            _int("Steps: a milestone step", step)
            check_method(method)
        object.__setattr__(self, "milestones", tuple(items))

    def method_at(self, step: int, total_steps: int | None = None) -> Method:
        _int("step", step)
        current = self.milestones[0][1]
        for start, method in self.milestones:
            if step < start:
                break
            current = method
        return current

    def to_string(self) -> str:
        return "steps:" + ",".join(f"{s}={method_to_string(m)}" for s, m in self.milestones)


@dataclass(frozen=True)
class Linear(Schedule):
    """Highway(k) with k rising (or falling) linearly from `k_start` at step 0 to `k_end`
    at step `steps`, rounded to the nearest int, then held: k(t) = round(k_start +
    (k_end - k_start) * min(t, steps) / steps)."""

    k_start: int
    k_end: int
    steps: int

    def __post_init__(self) -> None:
        _int("Linear: k_start", self.k_start)
        _int("Linear: k_end", self.k_end)
        _int("Linear: steps", self.steps, minimum=1)

    def k_at(self, step: int) -> int:
        _int("step", step)
        fraction = min(step, self.steps) / self.steps
        # floor(x + 0.5): half-way rounds up on the way (no banker's rounding)
        return math.floor(self.k_start + (self.k_end - self.k_start) * fraction + 0.5)

    def method_at(self, step: int, total_steps: int | None = None) -> Method:
        return Highway(k=self.k_at(step))

    def to_string(self) -> str:
        return f"linear:{self.k_start},{self.k_end},{self.steps}"


@dataclass(frozen=True)
class Finish(Schedule):
    """`schedule`, then exact backprop for the last `exact_last` steps of the run (the
    reviewers' "finish with backprop"). Needs the run's length: pass `total_steps` to
    `method_at` (KController(..., total_steps=N) does)."""

    schedule: Schedule
    exact_last: int

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule) or self.schedule.stateful:
            raise TypeError(
                "Finish wraps a stateless schedule (Constant, Steps, Linear or Finish), "
                f"got {self.schedule!r}"
            )
        _int("Finish: exact_last", self.exact_last)

    def method_at(self, step: int, total_steps: int | None = None) -> Method:
        if total_steps is None:
            raise ValueError(
                "Finish needs the run's length to know when its last steps start: "
                "KController(model, schedule, total_steps=N) or method_at(step, total_steps=N)"
            )
        if step >= total_steps - self.exact_last:
            return Exact()
        return self.schedule.method_at(step, total_steps)

    def to_string(self) -> str:
        return f"finish:{self.exact_last}:{self.schedule.to_string()}"


@dataclass(frozen=True)
class Adaptive(Schedule):
    """Measure the gradient's fidelity during training and keep k as small as it allows.

    Every `probe_every` steps (from step 0 on) the controller computes, on that step's
    batch, the exact parameter gradient once and the Highway(k) gradient for candidate
    k, and keeps the smallest k whose cosine to the exact gradient is >= `target_cosine`:
    from the current k it tries k - 1, k - 2, ... while they meet the target, or k + 1,
    k + 2, ... up to `k_max` until one does. When none does (the truncated path sum can
    move away from the gradient as k grows, see docs/schedules.md) it uses Exact()
    until a later probe finds a k that meets the target again.

    Between probes it watches the relative step of the last iteration in the chains'
    diagnostics (free: every Highway backward computes it). When the median over the
    last `window` steps exceeds `rise` times its value at the last probe, the estimate
    stopped converging as it did, and k is raised by one (at most `k_max`) at once.

    Args:
        target_cosine: in (0, 1], the fidelity a k must reach.
        probe_every: steps between probes (>= 1).
        k_min, k_max: the range of k (k_max None: 8; every probed k costs k + 1 sweeps).
        k_start: k before the first probe (default k_min).
        rise: the step-norm factor that triggers an early raise (> 1; inf: never).
        window: steps whose median step norm is compared (>= 1).
    """

    target_cosine: float = 0.99
    probe_every: int = 100
    k_min: int = 0
    k_max: int | None = None
    k_start: int | None = None
    rise: float = 2.0
    window: int = 5

    stateful = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_cosine", _cosine_target("Adaptive", self.target_cosine))
        _int("Adaptive: probe_every", self.probe_every, minimum=1)
        _int("Adaptive: k_min", self.k_min)
        if self.k_max is None:
            object.__setattr__(self, "k_max", max(8, self.k_min))
        _int("Adaptive: k_max", self.k_max)
        if self.k_max < self.k_min:
            raise ValueError(f"Adaptive: k_max ({self.k_max}) < k_min ({self.k_min})")
        if self.k_start is not None:
            _int("Adaptive: k_start", self.k_start)
            if not self.k_min <= self.k_start <= self.k_max:
                raise ValueError(
                    f"Adaptive: k_start must be in k_min..k_max = {self.k_min}..{self.k_max}"
                )
        if (
            isinstance(self.rise, bool)
            or not isinstance(self.rise, (int, float))
            or not (self.rise > 1)
        ):
            raise ValueError(f"Adaptive: rise must be a number > 1 (inf: off), got {self.rise!r}")
        object.__setattr__(self, "rise", float(self.rise))
        _int("Adaptive: window", self.window, minimum=1)

    def initial_state(self) -> AdaptiveState:
        return AdaptiveState(k=self.k_min if self.k_start is None else self.k_start)

    def method_at(self, step: int, total_steps: int | None = None) -> Method:
        raise TypeError(
            "Adaptive chooses k from measurements, so it has no fixed step -> method map; "
            "apply it with highwaybp.KController(model, schedule) and call ctl.step(step, "
            "loss_fn=...)"
        )

    def to_string(self) -> str:
        parts = [f"target={self.target_cosine!r}", f"every={self.probe_every}",
                 f"k_min={self.k_min}", f"k_max={self.k_max}"]  # fmt: skip
        if self.k_start is not None:
            parts.append(f"k_start={self.k_start}")
        parts += [f"rise={self.rise!r}", f"window={self.window}"]
        return "adaptive:" + ",".join(parts)


@dataclass
class AdaptiveState:
    """What `Adaptive` has learnt so far (kept by the controller, saved in its state_dict).

    - k: the current k; exact: True while no k <= k_max met the target at the last probe.
    - reference_step: the median last-iteration step norm just after the last probe
      (None until measured); recent_steps: the last `window` of them since.
    """

    k: int
    exact: bool = False
    reference_step: float | None = None
    recent_steps: list = field(default_factory=list)

    def method(self) -> Method:
        return Exact() if self.exact else Highway(k=self.k)


_ADAPTIVE_KEYS = {
    "target": ("target_cosine", float),
    "target_cosine": ("target_cosine", float),
    "every": ("probe_every", int),
    "probe_every": ("probe_every", int),
    "k_min": ("k_min", int),
    "k_max": ("k_max", int),
    "k_start": ("k_start", int),
    "rise": ("rise", float),
    "window": ("window", int),
}


def _parse_adaptive(args: str) -> Adaptive:
    kwargs: dict[str, object] = {}
    given: dict[str, str] = {}  # option -> the key that set it
    for item in filter(None, (s.strip() for s in args.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _ADAPTIVE_KEYS:
            raise ValueError(f"adaptive option {item!r} not understood; {GRAMMAR}")
        name, kind = _ADAPTIVE_KEYS[key]
        if name in kwargs:  # as method texts: a repeat is a typo, not "the last one wins"
            keys = key if given[name] == key else f"{given[name]}/{key}"
            raise ValueError(f"adaptive option {keys!r} given twice in {args!r}")
        given[name] = key
        kwargs[name] = kind(value)
    return Adaptive(**kwargs)


def _parse_steps(args: str) -> Steps:
    # Methods hold commas ("highway:tol=1e-3,max_k=20"): split only before "<int>=".
    items = [s for s in re.split(r",(?=\s*\d+\s*=)", args) if s.strip()]
    milestones: dict[int, Method] = {}
    for item in items:
        step, eq, method = item.partition("=")
        if not eq or not step.strip().isdigit():
            raise ValueError(f"steps item {item!r} is not STEP=METHOD; {GRAMMAR}")
        if int(step) in milestones:
            raise ValueError(f"steps: milestone {int(step)} given twice")
        milestones[int(step)] = method_from_string(method)
    return Steps(milestones)


def schedule_from_string(text: str) -> Schedule:
    """Parse a schedule written as in this module's docstring (the CLI's --k-schedule)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty k schedule; {GRAMMAR}")
    text = text.strip()
    name, _, args = text.partition(":")
    name = name.strip().lower()
    try:
        if name == "constant":
            return Constant(method_from_string(args))
        if name == "steps":
            return _parse_steps(args)
        if name == "linear":
            parts = [p.strip() for p in args.split(",")]
            if len(parts) != 3:
                raise ValueError("linear takes three ints: K_START,K_END,STEPS")
            return Linear(*(int(p) for p in parts))
        if name == "finish":
            count, sep, inner = args.partition(":")
            if not sep:
                raise ValueError("finish takes N:<schedule>")
            return Finish(schedule_from_string(inner), int(count))
        if name == "adaptive":
            return _parse_adaptive(args)
        if name == "auto":
            return _parse_auto(args)
        return Constant(method_from_string(text))
    except (ValueError, TypeError) as err:
        if GRAMMAR in str(err):
            raise
        raise ValueError(f"cannot read k schedule {text!r}: {err}; {GRAMMAR}") from err


@dataclass(frozen=True)
class Auto(Schedule):
    """The recommended controller (`KController(model)`, text "auto"): Anderson-mixed
    Highway-BP at the smallest k that reaches `target_cosine`, never above the hardware's
    break-even k, exact backprop otherwise, with probes held to a budget.

    - Probes: on a probe step the controller computes the exact gradient once and
      Highway(k, anderson=`anderson`) gradients for candidate k, on that step's batch, and
      compares them over the parameters whose gradient the method changes (the chains'/RNNs'
      and those upstream of them; `core.fidelity.changed_parameters`), not the whole model.
    - Search: bisection over k = 0 .. break-even: the break-even k first (if it misses the
      target, Exact() until the next probe), then the smallest k meeting the target in
      about log2(break-even + 1) more gradients.
    - Budget: a probe runs at step 0; each later one (every `probe_every` steps) only if
      the probes' VJP sweeps so far plus the largest cost a probe can have stay within
      `budget` times the training sweeps so far (else it waits). So after any step the
      probes cost at most `budget` of training plus the first probe (at most
      3 + (1 + ceil(log2(b + 1))) (b + 2) sweeps for break-even b: 9 for a GRU), which a run
      amortises (300 steps of a GRU: 600 training sweeps, budget 150).
    - Break-even: the largest k at which Highway(k) is still faster than exact backprop on
      this hardware; `break_even_k=None` takes it from the controller's cost model
      (`highwaybp.control.break_even_k`); a negative value means no k pays: train exact and
      never probe.

    Args:
        target_cosine: in (0, 1]; probe_every: >= 1; anderson: the window (0: plain, >= 2);
        budget: > 0, probe sweeps over training sweeps; break_even_k: int or None.
    """

    target_cosine: float = 0.98
    probe_every: int = 50
    anderson: int = 5
    budget: float = 0.25
    break_even_k: int | None = None

    stateful = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_cosine", _cosine_target("Auto", self.target_cosine))
        _int("Auto: probe_every", self.probe_every, minimum=1)
        Highway(k=1, anderson=self.anderson)  # the window's own checks
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < math.inf:
            raise ValueError(f"Auto: budget must be a positive number, got {b!r}")
        object.__setattr__(self, "budget", float(b))
        if self.break_even_k is not None and (
                isinstance(self.break_even_k, bool) or not isinstance(self.break_even_k, int)):
            raise ValueError(f"Auto: break_even_k must be an int or None, got "
                             f"{self.break_even_k!r}")

    def method_at(self, step: int, total_steps: int | None = None) -> Method:
        raise TypeError(
            "Auto chooses k from measurements, so it has no fixed step -> method map; apply "
            "it with highwaybp.KController(model) and call ctl.step(step, loss_fn=...)"
        )

    def method_for(self, k: int | None) -> Method:
        """Highway(k, anderson) for a chosen k; Exact() for None."""
        return Exact() if k is None else Highway(k=k, anderson=self.anderson)

    def to_string(self) -> str:
        parts = []
        for key, name in _AUTO_KEYS.items():
            value = getattr(self, name)
            if value != getattr(_AUTO_DEFAULTS, name):
                parts.append(f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}")
        return "auto" + (":" + ",".join(parts) if parts else "")


_AUTO_KEYS = {"target": "target_cosine", "every": "probe_every", "anderson": "anderson",
              "budget": "budget", "break_even": "break_even_k"}
_AUTO_DEFAULTS = Auto()


@dataclass
class AutoState:
    """What `Auto` has learnt (kept by the controller, saved in its state_dict): the k in
    use (None: Exact()), the step and VJP-sweep cost of the last probe."""

    k: int | None = None
    last_probe: int | None = None
    last_probe_cost: float = 0.0


def _parse_auto(args: str) -> Auto:
    kwargs: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in args.split(","))):
        key, eq, value = (p.strip() for p in item.partition("="))
        if not eq or key not in _AUTO_KEYS:
            raise ValueError(f"auto option {item!r} not understood (options: "
                             f"{', '.join(_AUTO_KEYS)}); {GRAMMAR}")
        name = _AUTO_KEYS[key]
        if name in kwargs:
            raise ValueError(f"auto option {key!r} given twice in {args!r}")
        kind = float if name in ("target_cosine", "budget") else int
        kwargs[name] = kind(value)
    return Auto(**kwargs)
