"""`KController`: apply a k schedule to every chain and RNN of a model during training.

    ctl = hbp.KController(model, hbp.schedules.Linear(0, 4, steps=2000), total_steps=2000)
    for step, (x, y) in enumerate(loader):
        ctl.step(step, loss_fn=lambda: F.cross_entropy(model(x), y))  # sets the method
        loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
    ctl.history  # one entry per step (see `KController.history`)

Cost unit, "VJP sweeps" (forward-equivalents of work): one sweep is one vector-Jacobian
product through every layer of the model's chains, either with respect to the layers'
inputs (an "input sweep") or to their parameters (a "parameter sweep"); each costs about
one forward of those layers. Per training step (the forward, the same for every method, is
not counted):

- Highway(k), FixedPoint(k): i + 1 sweeps, i the iterations the backward ran (k, or fewer
  when k exceeds the chain length; adaptive Highway(tol=): what it used) plus the one
  parameter sweep; + 1 when an adaptive Highway fell back to exact (its exact input sweep).
- Exact(): 2 sweeps (one sequential backward = an input sweep and a parameter sweep). This
  is work, not latency: Highway's sweeps run all layers at once, exact backprop's run them
  one after the other (the paper's Eq. 13), so on one device exact is the cheapest in work
  beyond k = 1, and the case for small k is latency on a layer-parallel machine.
- A model with several chains/RNN layers: the mean over them, weighted by their number of
  layers (an adapted model's by the layers of the chain it runs: 2 per GPT-2/BERT block,
  1 per ResNet block; an RNN layer counts as one unit; a model mixing RNNs and
  ResidualChains weights each RNN layer like one ResidualChain layer).
- Probes (Adaptive): each gradient a probe computes costs 1 forward sweep + its backward
  sweeps as above; these are reported separately (`probe_sweeps`) and in `total_sweeps`.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from highwaybp.core.adapter import ChainAdapter
from highwaybp.core.chain import ResidualChain
from highwaybp.core.fidelity import (
    chains_in,
    changed_parameters,
    compare_gradients,
    set_step_norm_recording,
    use_method,
)
from highwaybp.core.iteration import Diagnostics
from highwaybp.core.methods import Exact, Highway, Method
from highwaybp.core.replay import buffers_restored
from highwaybp.models.rnn import GRU, LSTM
from highwaybp.schedules import (
    Adaptive,
    AdaptiveState,
    Auto,
    AutoState,
    Schedule,
    schedule_from_string,
)

EXACT_SWEEPS = 2.0

# The cost model of one device: per unit kind, the largest k at which a Highway(k) training
# step is still no slower than our exact backprop's. Each is the line time(k) = a + b k
# fitted through the committed 2-thread CPU benches (tests/test_auto.py recomputes them
# from these files, so they cannot drift):
# - GRU: results/rnn/bench_gru_{pixel_T1024,long_T4096,char_T256}_2threads.json give
#   1.69 / 2.05 / 1.55 -> 1 (the smallest: every GRU setting pays at k <= 1);
# - LSTM: results/rnn/bench_lstm_char_T256_2threads.json gives 0.99 -> 0;
# - a ResidualChain in one process: results/deep/bench_{mlp,transformer,resnet}.json measure
#   Highway(k=0) at 0.52-0.65x exact autograd's step: no k pays (-1), Highway-BP pays on deep
#   stacks only across devices (a layer-parallel pipeline: pass its break-even k).
# Any other unit (an adapter's chain, a user's cell): -1, no evidence that any k pays.
ONE_DEVICE_BREAK_EVEN: dict[str, int] = {"GRU": 1, "LSTM": 0, "ResidualChain": -1}


def break_even_k(model: nn.Module) -> int:
    """The largest k at which Highway(k) pays for every chain/RNN in `model` on one device
    (`ONE_DEVICE_BREAK_EVEN`; -1: none does). Measured on a 2-core CPU; on other hardware
    (a GPU, a layer-parallel pipeline) pass `Auto(break_even_k=...)` from its own bench or
    cost model (`highwaybp bench gpu`, `highwaybp.distributed.costmodel`)."""
    kinds = []
    for unit in chains_in(model):
        if isinstance(unit, GRU):
            kinds.append("GRU")
        elif isinstance(unit, LSTM):
            kinds.append("LSTM")
        else:
            kinds.append("ResidualChain")
    return min(ONE_DEVICE_BREAK_EVEN[k] for k in kinds)


def sweeps_of(diag: Diagnostics) -> float:
    """VJP sweeps (see the module docstring) of the backward that `diag` describes."""
    if diag.stop_reason == "exact":
        return EXACT_SWEEPS
    extra = 1.0 if diag.fallback == "exact" else 0.0
    return diag.iterations + 1.0 + extra


class KController:
    """Sets the gradient method of every chain/RNN in `model` at each step from `schedule`.

    Args:
        model: a module holding `ResidualChain`s and/or highwaybp GRU/LSTM (anything with
            a `method` attribute that `highwaybp.use_method` switches).
        schedule: a `highwaybp.schedules` schedule, or its text ("linear:0,4,2000").
        total_steps: the run's length (needed by `Finish`).
        probe_seed: the RNG seed of a probe's gradient evaluations (same dropout masks for
            the exact and the Highway gradient); the caller's RNG stream is left untouched.

    Call `step(step, loss_fn)` before each training step's forward. `loss_fn()` -> scalar
    loss on that step's batch; it is called only when the schedule probes (Adaptive), with
    the model's buffers (BatchNorm statistics) restored afterwards.

    An Adaptive schedule (finite `rise`) watches the last iteration's relative step between
    probes, so the controller turns on `record_step_norms` in every chain that has it.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule | str | None = None,
        *,
        total_steps: int | None = None,
        probe_seed: int = 0,
    ) -> None:
        if schedule is None:
            schedule = Auto()
        if isinstance(schedule, str):
            schedule = schedule_from_string(schedule)
        if not isinstance(schedule, Schedule):
            raise TypeError(f"KController needs a highwaybp.schedules schedule, got {schedule!r}")
        self.model = model
        self.schedule = schedule
        self.total_steps = total_steps
        self.probe_seed = probe_seed
        if not chains_in(model):
            raise ValueError(
                "KController: the model holds no ResidualChain or highwaybp GRU/LSTM (nothing "
                "to control); build it with highwaybp modules"
            )
        self.state: AdaptiveState | None = (
            schedule.initial_state() if isinstance(schedule, Adaptive) else None
        )
        self.auto: AutoState | None = AutoState() if isinstance(schedule, Auto) else None
        self.break_even: int | None = None
        if isinstance(schedule, Auto):
            self.break_even = (break_even_k(model) if schedule.break_even_k is None
                               else schedule.break_even_k)
            devices = {p.device.type for p in model.parameters()}
            if schedule.break_even_k is None and devices - {"cpu"}:
                warnings.warn(
                    f"KController(Auto): the break-even k ({self.break_even}) comes from "
                    f"benches on a CPU, but the model is on {sorted(devices - {'cpu'})}; pass "
                    "Auto(break_even_k=...) measured there (highwaybp bench gpu)",
                    stacklevel=2)
        self._history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self.method: Method | None = None

    # ---- the per-step call ----------------------------------------------------------
    def step(self, step: int, loss_fn: Callable[[], Tensor] | None = None) -> Method:
        """Choose and set the method for training step `step`; returns it.

        Closes the previous step's history entry from the chains' diagnostics, probes when
        the schedule asks (calls `loss_fn`), then sets every chain's `method`.
        """
        self._close_pending()
        if self._history and step <= self._history[-1]["step"]:
            raise ValueError(
                f"KController.step({step}) after step {self._history[-1]['step']}: steps must "
                "increase (to restart, build a new controller or load_state_dict)"
            )
        entry: dict[str, Any] = {"step": step, "probe_sweeps": 0.0, "cosine": None}
        if isinstance(self.schedule, Adaptive):
            method = self._adaptive_step(step, loss_fn, entry)
        elif isinstance(self.schedule, Auto):
            method = self._auto_step(step, loss_fn, entry)
        else:
            method = self.schedule.method_at(step, self.total_steps)
        for chain in chains_in(self.model):
            chain.method = method
            _clear_diagnostics(chain)
        if isinstance(self.schedule, Adaptive) and math.isfinite(self.schedule.rise):
            set_step_norm_recording(self.model, True)  # `_watch` reads them
        self.method = method
        entry["method"] = repr(method)
        self._pending = entry
        return method

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per step: {"step", "method" (repr), "iterations" (per chain/RNN layer, what the
        backward ran), "sweeps" (the training backward's), "probe_sweeps", "cosine" (the
        probed cosine of the chosen method to exact, or None), "probed" ({k: cosine} of
        every k a probe measured, on probe steps)}. The current step's entry appears once
        its backward has run."""
        self._close_pending(only_if_ran=True)
        return list(self._history)

    def total_sweeps(self) -> float:
        """Training-backward plus probe sweeps over the history so far."""
        return sum((h["sweeps"] or 0.0) + h["probe_sweeps"] for h in self.history)

    def summary(self) -> dict[str, Any]:
        """{"schedule", "steps", "train_sweeps", "probe_sweeps", "probes", "probe_share"
        (probe sweeps / training sweeps), "methods" ({repr: steps})} over the history."""
        hist = self.history
        train = sum(h["sweeps"] or 0.0 for h in hist)
        probe = sum(h["probe_sweeps"] for h in hist)
        methods: dict[str, int] = {}
        for h in hist:
            methods[h["method"]] = methods.get(h["method"], 0) + 1
        return {"schedule": self.schedule.to_string(), "steps": len(hist),
                "train_sweeps": train, "probe_sweeps": probe,
                "probes": sum(1 for h in hist if h.get("probed")),
                "probe_share": probe / train if train else None, "methods": methods}

    # ---- resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Schedule text, history and Adaptive's state: `load_state_dict` resumes the same
        sequence of methods (with the same model, data and steps)."""
        self._close_pending(only_if_ran=True)
        state = None
        if self.state is not None:
            state = {"k": self.state.k, "exact": self.state.exact,
                     "reference_step": self.state.reference_step,
                     "recent_steps": list(self.state.recent_steps)}  # fmt: skip
        return {
            "schedule": self.schedule.to_string(),
            "total_steps": self.total_steps,
            "history": [dict(h) for h in self._history],
            "pending": None if self._pending is None else dict(self._pending),
            "adaptive": state,
            "auto": None if self.auto is None else dict(vars(self.auto)),
            "break_even": self.break_even,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if _resume_text(state["schedule"]) != _resume_text(self.schedule.to_string()):
            raise ValueError(
                f"KController.load_state_dict: saved schedule {state['schedule']!r} differs "
                f"from this controller's {self.schedule.to_string()!r}; build the controller "
                "with the saved schedule to resume"
            )
        if state.get("auto") is not None and state.get("break_even") != self.break_even:
            raise ValueError(
                f"KController.load_state_dict: saved break-even k {state.get('break_even')} "
                f"differs from this controller's {self.break_even} (another model or "
                f"hardware); build it with Auto(break_even_k={state.get('break_even')}) to "
                "resume as saved")
        if state.get("total_steps") != self.total_steps:
            raise ValueError(
                f"KController.load_state_dict: saved total_steps {state.get('total_steps')} "
                f"differs from {self.total_steps}"
            )
        self._history = [dict(h) for h in state["history"]]
        self._pending = None if state["pending"] is None else dict(state["pending"])
        if self._pending is not None and self._pending.get("iterations") is None:
            # saved between a step() and its backward: the step is replayed after resume
            self._pending = None
        if self._pending is not None:
            self._history.append(self._pending)
            self._pending = None
        if state["adaptive"] is not None:
            self.state = AdaptiveState(**state["adaptive"])
        if state.get("auto") is not None:
            self.auto = AutoState(**state["auto"])

    # ---- history bookkeeping --------------------------------------------------------
    def _close_pending(self, only_if_ran: bool = False) -> None:
        entry = self._pending
        if entry is None or "iterations" in entry:
            return
        units = _units(self.model)
        diags = [d for d, _ in units]
        ran = [d for d in diags if d is not None]
        if only_if_ran and (not ran or len(ran) < len(diags)):
            return
        entry["iterations"] = [None if d is None else d.iterations for d in diags]
        weight = sum(w for d, w in units if d is not None)
        entry["sweeps"] = (
            sum(sweeps_of(d) * w for d, w in units if d is not None) / weight if weight else 0.0
        )
        self._history.append(entry)
        self._pending = None
        if self.state is not None:
            self._watch(ran)

    # ---- Adaptive -------------------------------------------------------------------
    def _watch(self, diags: list[Diagnostics]) -> None:
        """Between probes: raise k when the last iteration's step stops shrinking."""
        sched, st = self.schedule, self.state
        assert isinstance(sched, Adaptive) and st is not None
        last = [d.step_norms[-1] for d in diags if d.step_norms]
        if st.exact or not last:
            return
        st.recent_steps = ([*st.recent_steps, max(last)])[-sched.window :]
        if len(st.recent_steps) < sched.window:
            return
        median = statistics.median(st.recent_steps)
        if st.reference_step is None:
            st.reference_step = median
        elif median > sched.rise * st.reference_step and st.k < sched.k_max:
            st.k += 1
            st.reference_step, st.recent_steps = None, []
            self._history[-1]["raised_to"] = st.k

    def _adaptive_step(
        self, step: int, loss_fn: Callable[[], Tensor] | None, entry: dict[str, Any]
    ) -> Method:
        sched, st = self.schedule, self.state
        assert isinstance(sched, Adaptive) and st is not None
        if step % sched.probe_every != 0:
            return st.method()
        if loss_fn is None:
            raise ValueError(
                f"Adaptive probes at step {step} (every {sched.probe_every}): pass "
                "ctl.step(step, loss_fn=lambda: <the loss on this step's batch>)"
            )
        probe = _Probe(self.model, loss_fn, self.probe_seed)
        target = sched.target_cosine
        start = sched.k_max if st.exact else st.k
        chosen: int | None = None
        if probe.cosine(start) >= target:
            chosen = start
            for k in range(start - 1, sched.k_min - 1, -1):
                if probe.cosine(k) < target:
                    break
                chosen = k
        else:
            for k in range(start + 1, sched.k_max + 1):
                if probe.cosine(k) >= target:
                    chosen = k
                    break
        st.exact = chosen is None
        if chosen is not None:
            st.k = chosen
        st.reference_step, st.recent_steps = None, []
        entry["probe_sweeps"] = probe.sweeps
        entry["probed"] = dict(sorted(probe.cosines.items()))
        entry["cosine"] = 1.0 if st.exact else probe.cosines[st.k]
        return st.method()


    # ---- Auto -----------------------------------------------------------------------
    def _auto_step(
        self, step: int, loss_fn: Callable[[], Tensor] | None, entry: dict[str, Any]
    ) -> Method:
        """Probe when due and within budget (see `Auto`), bisect k over 0..break-even."""
        sched, st = self.schedule, self.auto
        assert isinstance(sched, Auto) and st is not None and self.break_even is not None
        if self.break_even < 0:
            return Exact()  # no k pays on this hardware: never probe
        due = st.last_probe is None or step - st.last_probe >= sched.probe_every
        if due and st.last_probe is not None:
            # The next probe runs only if, even at its largest cost, the probes stay within
            # the budget of the training sweeps so far.
            train = sum(h["sweeps"] or 0.0 for h in self._history)
            spent = sum(h["probe_sweeps"] for h in self._history)
            due = spent + _probe_cost_bound(self.break_even) <= sched.budget * train
        if not due:
            return sched.method_for(st.k)
        if loss_fn is None:
            raise ValueError(
                f"Auto probes at step {step}: pass ctl.step(step, loss_fn=lambda: <the loss "
                "on this step's batch>)")
        probe = _Probe(self.model, loss_fn, self.probe_seed, anderson=sched.anderson,
                       changed_only=True)
        target, hi = sched.target_cosine, self.break_even
        if probe.cosine(hi) < target:
            st.k = None
        else:
            lo = 0
            while lo < hi:  # the smallest k meeting the target (cosine ~ monotone in k)
                mid = (lo + hi) // 2
                if probe.cosine(mid) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            st.k = hi
        st.last_probe, st.last_probe_cost = step, probe.sweeps
        entry["probe_sweeps"] = probe.sweeps
        entry["probed"] = dict(sorted(probe.cosines.items()))
        entry["cosine"] = 1.0 if st.k is None else probe.cosines[st.k]
        return sched.method_for(st.k)


def _resume_text(schedule_text: str) -> str:
    """The schedule text a resume must match: Auto's break-even k is compared as the value
    the controller resolved (saved beside it), whether given or taken from the cost model."""
    schedule = schedule_from_string(schedule_text)
    if isinstance(schedule, Auto):
        return replace(schedule, break_even_k=None).to_string()
    return schedule_text


def _probe_cost_bound(break_even: int) -> float:
    """The most VJP sweeps an Auto probe can cost: the exact gradient (a forward and 2
    sweeps) and at most 1 + ceil(log2(break_even + 1)) candidates, each a forward and at
    most break_even + 1 sweeps."""
    candidates = 1 + math.ceil(math.log2(break_even + 1))
    return 1.0 + EXACT_SWEEPS + candidates * (break_even + 2.0)


class _Probe:
    """One exact gradient on the step's batch, and Highway(k) gradients compared with it
    (over every parameter, or with `changed_only` over those whose gradient the method
    changes: `core.fidelity.changed_parameters`)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[], Tensor], seed: int,
                 anderson: int = 0, changed_only: bool = False) -> None:
        self.model, self.loss_fn, self.seed = model, loss_fn, seed
        self.anderson, self.changed_only = anderson, changed_only
        self.cosines: dict[int, float] = {}
        self.sweeps = 0.0
        self.changed: list[bool] | None = None
        self.exact = self._grad(Exact())

    def cosine(self, k: int) -> float:
        if k not in self.cosines:
            grad = self._grad(Highway(k=k, anderson=self.anderson))
            exact = self.exact
            if self.changed_only and self.changed is not None:
                grad = [g for g, c in zip(grad, self.changed) if c]
                exact = [g for g, c in zip(exact, self.changed) if c]
            self.cosines[k] = compare_gradients(grad, exact)["cosine"] if exact else 1.0
        return self.cosines[k]

    def _grad(self, method: Method) -> list[Tensor]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), buffers_restored(self.model):
            torch.manual_seed(self.seed)
            with use_method(self.model, method):
                for chain in chains_in(self.model):
                    _clear_diagnostics(chain)
                loss = self.loss_fn()
                if self.changed_only and self.changed is None and not method.exact:
                    self.changed = changed_parameters(loss, params)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                units = _units(self.model)
        weight = sum(w for d, w in units if d is not None)
        backward = sum(sweeps_of(d) * w for d, w in units if d is not None) / max(weight, 1)
        self.sweeps += 1.0 + backward  # the probe's own forward + its backward
        for chain in chains_in(self.model):
            _clear_diagnostics(chain)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _units(model: nn.Module) -> list[tuple[Diagnostics | None, int]]:
    """(diagnostics, weight) of every chain and RNN layer: weight = layers of the unit."""
    units: list[tuple[Diagnostics | None, int]] = []
    for chain in chains_in(model):
        layer_diags = getattr(chain, "layer_diagnostics", None)
        if isinstance(chain, ResidualChain):
            units.append((chain.last_diagnostics, len(chain)))
        elif isinstance(chain, ChainAdapter):  # from_huggingface / from_torchvision
            units.append((chain.last_diagnostics, chain.num_chain_layers))
        elif isinstance(layer_diags, list):
            units.extend((d, 1) for d in layer_diags)
        else:
            units.append((getattr(chain, "last_diagnostics", None), 1))
    return units


def _clear_diagnostics(chain: nn.Module) -> None:
    if hasattr(chain, "last_diagnostics"):
        chain.last_diagnostics = None
    layer_diags = getattr(chain, "layer_diagnostics", None)
    if isinstance(layer_diags, list):
        chain.layer_diagnostics = [None] * len(layer_diags)
