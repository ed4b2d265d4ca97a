"""The Highway-BP iteration (Theorem 2), independent of how VJPs and scans are computed.

States are indexed i = 0..L (h_0 is the chain input). A "state sequence" is either one
tensor stacked along dim 0 ([L+1, *S], all states the same shape) or a list of L+1 tensors.

    w^0     = scan(g)                    w_i^0 = g_i + w_{i+1}^0 K_{i+1}
    w^{j+1} = w^0 + scan(block_vjp(w^j))  block_vjp(w)_i = w_{i+1} J_{i+1}, and 0 at i = L

FixedPoint is the same loop with K = 0 (scan = identity, block_vjp = the full layer VJP).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor

from highwaybp.core.anderson import AndersonMixer, MixStep
from highwaybp.core.methods import FixedPoint, Highway
from highwaybp.core.states import (
    States,
    add_states,
    add_states_,
    clone_states,
    states_diff_norm,
    states_norm,
)

StopReason = Literal["", "fixed_k", "exact_after_L", "tol", "growth", "max_k", "exact"]
FallbackName = Literal["exact", "best", "last"]


@dataclass
class Diagnostics:
    """What the last backward did. Keys:

    - method: repr of the method used.
    - iterations: iterations run (k actually used; at most min(k, L): the estimate is exact
      after L iterations, so more would not change it).
    - step_norms: list of `iterations` floats, ||w^{j} - w^{j-1}|| / ||w^{j}|| over all
      states, j = 1..iterations, when the backward computed them: always for an adaptive
      method (its stop test reads them), otherwise only when asked for
      (`ResidualChain(record_step_norms=True)`, or the same attribute on the chain), since
      they cost a full pass over two estimates per iteration. Empty otherwise.
    - stop_reason: "fixed_k", "exact_after_L", "tol", "growth", "max_k" or "exact".
      With Anderson mixing they are the relative residuals ||F(x) - x|| / ||F(x)|| of the
      iterate each iteration started from (always computed: the mix needs them); for the
      plain iteration that residual is exactly the relative step.
    - stop_reason: "fixed_k", "exact_after_L", "tol", "growth", "max_k" or "exact".
    - converged: adaptive only, whether the step fell under tol (None for fixed k).
    - fallback: adaptive only, the fallback applied ("exact", "best", "last") or None.
    - anderson: the window the iteration mixed with (0: plain steps; also a fixed k >= L,
      which runs plain steps to be exact).
    - mixed: with anderson, one bool per iteration: whether its iterate is a mix (False: a
      plain step: the first iteration, a restart or a refused mix).
    - restarts: with anderson, how many times the window was cut to its newest pair
      (ill-conditioned Gram matrix, or a refused mix); safeguarded: how many of those were
      mixes refused because their residual exceeded the plain step's.
    """

    method: str
    iterations: int = 0
    step_norms: list[float] = field(default_factory=list)
    stop_reason: StopReason = ""
    converged: Optional[bool] = None
    fallback: Optional[FallbackName] = None
    anderson: int = 0
    mixed: list[bool] = field(default_factory=list)
    restarts: int = 0
    safeguarded: int = 0


class StopRule:
    """The one owner of when the iteration stops and what it returns (fixed k, tol, growth,
    exact after L, fallback), used by `highway_iterate` and by the RNN engines' fast loop.

        rule = StopRule(method, num_layers, record_steps=False)
        for j in rule.iterations():
            ... w_new = next estimate
            step = ||w_new - w|| / ||w_new|| if rule.needs_step_norms else None
            if rule.record(j, step):     # True: keep w_new as the best estimate so far
                best = w_new
            if rule.should_stop(j, step):
                break
        diag = rule.finish()             # stop reason, converged, fallback (or None)

    `needs_step_norms` is the one answer to "must this backward compute the relative
    steps?": True for an adaptive method (tol, growth and the "best" fallback read them) or
    when the caller asked to record them (`record_steps=True`: diagnostics, a controller
    watching them, a fidelity report); otherwise the loop skips that pass, `step` is None
    and `Diagnostics.step_norms` stays empty.

    Rules: at most min(bound, L) iterations (w^L is exact, more would not change it); an
    adaptive method stops when the step falls under `tol` or grows; reaching L counts as
    exact before those tests (a step that grows at j = L must not make "best" return an
    earlier, truncated estimate); an adaptive method that did not converge applies its
    `fallback` (`diag.fallback`: the caller computes it: exact backward, best or last).

    Anderson mixing (`mixes`: a window >= 2 and an adaptive method or a fixed k < L; a fixed
    k >= L runs plain steps, which are exact at L): the step is the relative residual (always
    computed), there is no growth rule, and "exact after L" holds only when the mixer's
    exactness frontier says so (`should_stop(..., exact=mixer.is_exact)`).
    """

    def __init__(
        self, method: Highway | FixedPoint, num_layers: int, record_steps: bool = False
    ) -> None:
        self.method = method
        self.num_layers = num_layers
        self.adaptive = method.adaptive
        self.mixes = method.anderson >= 2 and (
            self.adaptive or method.iteration_bound < num_layers)
        self.needs_step_norms = self.adaptive or bool(record_steps) or self.mixes
        self.keep_best = self.adaptive and method.fallback == "best"
        self.bound = method.iteration_bound
        self.diag = Diagnostics(method=repr(method),
                                anderson=method.anderson if self.mixes else 0)
        self._best_step = math.inf
        self._stop: StopReason = "fixed_k"

    def iterations(self) -> range:
        return range(1, min(self.bound, self.num_layers) + 1)

    def record(self, j: int, step: float | None = None) -> bool:
        """Note iteration j (and its relative step when `needs_step_norms`); True if its
        estimate is the best so far (only tracked when the "best" fallback may need it)."""
        self.diag.iterations = j
        if not self.needs_step_norms:
            return False
        if step is None:
            raise ValueError("StopRule.record: this rule needs the step norm of every iteration")
        self.diag.step_norms.append(step)
        if self.keep_best and step <= self._best_step:
            self._best_step = step
            return True
        return False

    def record_mix(self, mix: MixStep) -> None:
        """Note what the Anderson mixer did at this iteration (diagnostics only)."""
        self.diag.mixed.append(mix.mixed)
        self.diag.restarts += int(mix.restarted)
        self.diag.safeguarded += int(mix.safeguarded)

    def should_stop(self, j: int, step: float | None = None, exact: bool | None = None) -> bool:
        """Whether to stop after iteration j. `exact`: with Anderson mixing, whether the
        estimate is provably exact (the mixer's frontier); plain iterations are after L."""
        if self.mixes:
            reached_exact = bool(exact)
        else:
            reached_exact = j >= self.num_layers and (self.adaptive or self.bound > self.num_layers)
        if reached_exact:
            self._stop = "exact_after_L"  # w^L is exact, whatever its step looked like
            return True
        if self.adaptive:
            assert step is not None  # adaptive rules need step norms (needs_step_norms)
            if step < self.method.tol:
                self._stop = "tol"
                return True
            if not self.mixes and j >= 2 and step > self.diag.step_norms[-2]:
                self._stop = "growth"
                return True
        return False

    def finish(self) -> Diagnostics:
        """The diagnostics; `diag.fallback` is the fallback the caller must apply, or None."""
        diag = self.diag
        if self.adaptive and self._stop == "fixed_k":
            self._stop = "max_k"  # every allowed iteration ran without meeting tol
        diag.stop_reason = self._stop
        if self.adaptive:
            diag.converged = self._stop in ("tol", "exact_after_L")
            if not diag.converged:
                diag.fallback = self.method.fallback
        return diag


def last_nonfinite(a: States) -> Optional[int]:
    """Highest state index holding NaN/Inf, or None. The reverse scan carries a NaN from
    where it appears down to h_0, so the highest index is where it came in."""
    rows = a.unbind(0) if isinstance(a, Tensor) else a
    for i in range(len(rows) - 1, -1, -1):
        if not bool(torch.isfinite(rows[i]).all()):
            return i
    return None


def raise_if_nonfinite(w: States, iteration: int, what: str = "Highway-BP estimate") -> None:
    index = last_nonfinite(w)
    if index is None:
        return
    num_layers = (w.shape[0] if isinstance(w, Tensor) else len(w)) - 1
    if index == num_layers:
        where = f"the chain output h_{index} (the incoming gradient)"
    else:
        where = f"h_{index}, the input of layer {index + 1} (its VJP or the loss on h_{index})"
    raise FloatingPointError(
        f"{what} is NaN/Inf at iteration {iteration}, entering at {where}. The gradient flowing "
        "into the chain or through a block is not finite: check the loss and learning rate, "
        "try method=Exact() to see whether backprop itself is finite, or use a smaller k."
    )


def _relative_step(new: States, old: States) -> tuple[float, float]:
    norm = states_norm(new)
    diff = states_diff_norm(new, old)
    return (0.0 if diff == 0.0 else diff / max(norm, 1e-300)), norm


def highway_iterate(
    g: States,
    block_vjp: Callable[[States], States],
    scan: Callable[[States], States],
    method: Highway | FixedPoint,
    num_layers: int,
    exact_backward: Callable[[States], States] | None = None,
    inplace: bool = False,
    record_steps: bool = False,
    loss_rows: Sequence[int] | None = None,
    layerwise_sweep: Callable[[list, dict], list] | None = None,
    always_sweep: bool = False,
) -> tuple[States, Diagnostics]:
    """Run the iteration for `method` and return (w, diagnostics).

    Args:
        g: dLoss/dh_i for i = 0..L (zeros where a state has no loss of its own).
        block_vjp: w -> v with v_i = w_{i+1} @ J_{i+1} for i < L and v_L = 0 (FixedPoint:
            the full layer VJP w_{i+1} @ df_{i+1}/dh_i).
        scan: x -> y with y_L = x_L, y_i = x_i + y_{i+1} @ K_{i+1} (FixedPoint: identity).
        num_layers: L; the estimate is exact after L iterations, so at most L are run.
        exact_backward: g -> exact gradients (sequential), used by the adaptive fallback.
        inplace: the caller hands over `g` (a list of states, which is emptied) and fresh
            outputs of `block_vjp` and `scan`, which the iteration may then overwrite, so
            that only two or three estimates are alive at once (see below). g_L alone is
            only read (the caller may pass a tensor it does not own there). In the sparse
            form `block_vjp` may receive w[0] = None (it never reads w_0).
        record_steps: compute the relative step of every iteration into
            `diag.step_norms` even for a fixed k (adaptive methods always do; see
            `StopRule.needs_step_norms`).
        loss_rows: the indices i where g_i may be nonzero (None: anywhere). With `inplace`
            and losses on at most half the states, each iteration is computed as
            w^{j+1} = scan(g + v^j) (the scan is linear): g added on those rows only, the
            scan run in place on v^j; w^0 is then not kept beside the estimates (2 alive
            instead of 3 for k >= 2) and the L-row addition of w^0 disappears. Otherwise
            w^{j+1} = w^0 + scan(v^j). The two forms agree to rounding.
        layerwise_sweep: (w, {i: g_i}) -> scan(g + block_vjp(w)) computed from the top
            layer down, setting w[i + 1] to None once its VJP is taken (so fewer than two
            estimates are alive). It computes every iteration of the first form (with
            `inplace`). The old rows are kept (a copy of the list is passed) when the step
            norms or the "best" fallback need the previous estimate.
        always_sweep: use the first form with `layerwise_sweep` whatever `loss_rows` says
            (otherwise only when the losses sit on at most half the states).

    NaN/Inf: w^0 is checked, then each iteration through its step norm when computed,
    otherwise once on the returned estimate.

    A method with `anderson=m` (and an adaptive form or a fixed k < L) runs
    `mixed_iterate`: the same F evaluations, mixed (`core.anderson`).
    """
    rule = StopRule(method, num_layers, record_steps)
    if inplace and isinstance(g, list):
        # Handed over: the caller's list is emptied so that its reference does not keep
        # w^0 (g's storage after the in-place scan) alive to the end of the iteration.
        g, handed = list(g), g
        handed.clear()
    g_for_fallback = None
    if rule.adaptive and method.fallback == "exact":
        g_for_fallback = clone_states(g) if inplace else g
    if rule.mixes:
        return mixed_iterate(g, block_vjp, scan, rule, g_for_fallback, exact_backward,
                             inplace, loss_rows, layerwise_sweep)
    sparse = inplace and not isinstance(g, Tensor) and (
        (always_sweep and layerwise_sweep is not None)
        or (loss_rows is not None and 2 * len(loss_rows) <= len(g)))
    if loss_rows is None:
        loss_rows = range(len(g))
    g_rows: dict[int, Tensor] = {}
    if sparse:
        # The scan overwrites g with w^0 in place; the last row is left as it is (y_L = x_L)
        # and w^0 is never written afterwards, so that row is shared, the others copied.
        last = len(g) - 1
        g_rows = {i: g[i] if i == last else g[i].clone() for i in loss_rows}
    w0 = scan(g)
    del g  # with inplace, w0 may be g's storage; nothing else needs g
    raise_if_nonfinite(w0, 0)
    w = best_w = w0
    if sparse:
        del w0  # not needed by the iterations: freed as soon as w^1 replaces it
    # The previous estimate is read after the next one is formed only by the step norm and
    # the "best" fallback; otherwise the sparse forms release it while forming the next.
    keep_old = rule.needs_step_norms or rule.keep_best
    for j in rule.iterations():
        if sparse and layerwise_sweep is not None:
            w_new = layerwise_sweep(list(w) if keep_old else w, g_rows)
        elif sparse:
            if not keep_old:
                w[0] = None  # no VJP reads w_0: one state-sized tensor less during the VJPs
            v = block_vjp(w)
            for i, g_i in g_rows.items():
                v[i].add_(g_i)
            w_new = scan(v)
            del v
        else:
            u = scan(block_vjp(w))
            w_new = add_states_(u, w0) if inplace else add_states(w0, u)
            del u
        step = None
        if rule.needs_step_norms:
            step, norm = _relative_step(w_new, w)
            if not (math.isfinite(step) and math.isfinite(norm)):
                raise_if_nonfinite(w_new, j)
        w = w_new
        del w_new
        if rule.record(j, step) or not rule.keep_best:
            best_w = w  # (without the "best" fallback: an older estimate can be freed)
        if rule.should_stop(j, step):
            break
    diag = rule.finish()
    if not rule.needs_step_norms:
        check_finite(w, diag.iterations)
    if diag.fallback is not None:
        w = _apply_fallback(diag.fallback, g_for_fallback, w, best_w, exact_backward)
    return w, diag


def mixed_iterate(
    g: States,
    block_vjp: Callable[[States], States],
    scan: Callable[[States], States],
    rule: StopRule,
    g_for_fallback: States | None = None,
    exact_backward: Callable[[States], States] | None = None,
    inplace: bool = False,
    loss_rows: Sequence[int] | None = None,
    layerwise_sweep: Callable[[list, dict], list] | None = None,
) -> tuple[States, Diagnostics]:
    """The iteration with Anderson mixing: x_0 = w^0, then per iteration one evaluation
    f = F(x) = w^0 + scan(block_vjp(x)) (with `layerwise_sweep`: scan(g + block_vjp(x)), the
    same value, computed layer by layer) and `AndersonMixer.step`. Arguments as
    `highway_iterate`'s, after it has taken `g` over; `g_for_fallback`: the losses the
    "exact" fallback needs (None otherwise); `rule.mixes` must hold. Memory: w^0, the
    mixer's 2m window states and its iterate, and one F value being formed."""
    g_rows: dict[int, Tensor] | None = None
    if layerwise_sweep is not None and isinstance(g, list):
        rows = range(len(g)) if loss_rows is None else loss_rows
        g_rows = {i: g[i].clone() for i in rows}  # the scan may overwrite g in place
    w0 = scan(g)
    del g
    raise_if_nonfinite(w0, 0)
    # The generic path forms a fresh F value each iteration, so the mixer keeps no spares.
    mixer = AndersonMixer(rule.method.anderson, w0, rule.num_layers, reuse_buffers=False)
    x: States = w0
    best_w = None
    for j in rule.iterations():
        if g_rows is not None:
            f = layerwise_sweep(list(x), g_rows)  # a copy: x is read again by the mixer
        else:
            u = scan(block_vjp(x))
            f = add_states_(u, w0) if inplace else add_states(w0, u)
            del u
        x, mix = mixer.step(x, f)
        if not (math.isfinite(mix.relative) and math.isfinite(mix.residual)):
            raise_if_nonfinite(x, j)
            raise_if_nonfinite(f, j)
        if rule.record(j, mix.relative):
            # "best": F of the iterate whose relative residual was smallest (for the plain
            # iteration, F(w^{j-1}) = w^j: the estimate whose step was smallest).
            best_w = clone_states(f)
        del f
        rule.record_mix(mix)
        if rule.should_stop(j, mix.relative, exact=mixer.is_exact):
            break
    diag = rule.finish()
    check_finite(x, diag.iterations)
    if diag.fallback is not None:
        best = best_w if best_w is not None else x
        x = _apply_fallback(diag.fallback, g_for_fallback, x, best, exact_backward)
    return x, diag


def check_finite(w: States, iteration: int) -> None:
    """`raise_if_nonfinite`, in one reduction and one sync when everything is finite."""
    rows = [w] if isinstance(w, Tensor) else w
    sums = [r.sum() for r in rows if r.numel()]
    if not sums:
        return
    total = torch.stack([s.to(sums[0].device) for s in sums]).sum()
    if not math.isfinite(float(total)):  # NaN/Inf somewhere (or an overflow): find where
        raise_if_nonfinite(w, iteration)


def _apply_fallback(
    fallback: str,
    g: States | None,
    last: States,
    best: States,
    exact_backward: Callable[[States], States] | None,
) -> States:
    if fallback == "best":
        return best
    if fallback == "last":
        return last
    if exact_backward is None or g is None:
        raise RuntimeError("fallback='exact' needs an exact backward for this model")
    return exact_backward(g)
