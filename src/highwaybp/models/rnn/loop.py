"""The Highway-BP iteration on an RNN engine: the fast preallocated loop and the reference.

`fast_iterate` is `core.highway_iterate` specialised to an engine's buffers (same estimate,
same `StopRule`, same diagnostics); `reference_iterate` runs the generic core loop on the
same engine and is what the fast loop is tested against (`iterate="reference"`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from highwaybp.core.anderson import AndersonMixer
from highwaybp.core.iteration import Diagnostics, StopRule, highway_iterate, raise_if_nonfinite
from highwaybp.core.methods import FixedPoint, Highway
from highwaybp.models.rnn.engine import Engine


def fast_iterate(
    eng: Engine, method: Highway | FixedPoint, record_steps: bool = False
) -> tuple[Tensor, Diagnostics]:
    """`highway_iterate` specialised to an engine: same estimate and diagnostics, no allocations.

    Uses w^{j+1} = w^0 + scan(v^j) = scan(g + v^j) (the scan is linear) and two preallocated
    state buffers swapped each iteration; each iteration is one chunked sweep (gate adjoints,
    matmul, losses, scan and step norm per chunk of time steps while it is in cache).
    The per-layer losses g are the engine's (`set_loss`), added in place. The step norms
    are computed only when `rule.needs_step_norms` (adaptive method, or record_steps).
    NaN/Inf: checked by the step norms when computed, and once on the returned estimate.
    A method with `anderson=m` runs `_mixed_fast_iterate` (the same sweeps, mixed).
    """
    rule = StopRule(method, eng.T, record_steps=record_steps)
    if rule.mixes:
        return _mixed_fast_iterate(eng, rule)
    norms = rule.needs_step_norms
    full = not method.keeps_residual  # K = 0: the whole cell's VJP, no scan
    w = eng.init_loss_(eng.new_state())
    if not full:
        eng.scan_(w)
    best = eng.new_state().copy_(w) if rule.keep_best else None
    nxt = eng.new_state()
    for j in rule.iterations():
        measured = eng.sweep(w, nxt, full, with_loss=True, scan=not full, norms=norms)
        step = None
        if measured is not None:
            diff, norm = measured
            step = 0.0 if diff == 0.0 else diff / max(norm, 1e-300)
            if not (math.isfinite(step) and math.isfinite(norm)):
                _check_finite(eng, nxt, j)
        w, nxt = nxt, w
        if rule.record(j, step):
            best.copy_(w)
        if rule.should_stop(j, step):
            break
    diag = rule.finish()
    if diag.fallback == "exact":
        w = eng.exact_backward(nxt)
    elif diag.fallback == "best":
        w = best
    _check_finite(eng, w, diag.iterations)
    return w, diag


def _mixed_fast_iterate(eng: Engine, rule: StopRule) -> tuple[Tensor, Diagnostics]:
    """`core.iteration.mixed_iterate` on an engine's buffers: each iteration one sweep writes
    F(x) = scan(g + v(x)) into a pooled buffer of the Anderson window, which the mixer then
    combines (`core.anderson`); after the window fills nothing more is allocated. Memory:
    w^0, 2m window states and the mixer's iterate."""
    method = rule.method
    full = not method.keeps_residual  # K = 0: the whole cell's VJP, no scan
    x = eng.init_loss_(eng.new_state())
    if not full:
        eng.scan_(x)
    mixer = AndersonMixer(method.anderson, x, eng.T, new_state=eng.new_state)
    best = eng.new_state() if rule.keep_best else None
    for j in rule.iterations():
        f = mixer.f_buffer()
        eng.sweep(x, f, full, with_loss=True, scan=not full, norms=False)
        x, mix = mixer.step(x, f)
        if not (math.isfinite(mix.relative) and math.isfinite(mix.residual)):
            _check_finite(eng, f, j)
        if rule.record(j, mix.relative):
            best.copy_(f)  # F of the best-measured iterate, as core.iteration.mixed_iterate
        rule.record_mix(mix)
        if rule.should_stop(j, mix.relative, exact=mixer.is_exact):
            break
    diag = rule.finish()
    if diag.fallback == "exact":
        x = eng.exact_backward(mixer.f_buffer())
    elif diag.fallback == "best":
        x = best
    _check_finite(eng, x, diag.iterations)
    return x, diag


def _check_finite(eng: Engine, w: Tensor, iteration: int) -> None:
    # One reduction instead of isfinite (several passes and temporaries); a non-finite sum
    # (NaN/Inf somewhere, or an overflow) triggers the detailed check, which names the state.
    if not math.isfinite(float(w.sum())):
        raise_if_nonfinite(eng.layer_major(w), iteration)


def reference_iterate(
    eng: Engine, method: Highway | FixedPoint, record_steps: bool = False
) -> tuple[Tensor, Diagnostics]:
    """The same estimate through the core's generic `highway_iterate` (fresh tensors per step)."""
    full = not method.keeps_residual  # K = 0: the whole cell's VJP, no scan

    def fresh() -> Tensor:
        return torch.empty(eng.state_shape(), dtype=eng.x.dtype, device=eng.x.device)

    def block_vjp(w_lm: Tensor) -> Tensor:
        return eng.layer_major(eng.block_vjp(eng.from_layer_major(w_lm), fresh(), full))

    def scan(x_lm: Tensor) -> Tensor:
        return eng.layer_major(eng.scan_(eng.from_layer_major(x_lm).clone()))

    def exact(g_lm: Tensor) -> Tensor:  # g_lm is always the engine's own loss here
        return eng.layer_major(eng.exact_backward(fresh()))

    g_lm = eng.layer_major(eng.loss_state())
    if full:
        w, diag = highway_iterate(g_lm, block_vjp, lambda s: s, method, eng.T,
                                  record_steps=record_steps)
    else:
        w, diag = highway_iterate(g_lm, block_vjp, scan, method, eng.T, exact_backward=exact,
                                  record_steps=record_steps)
    return eng.from_layer_major(w), diag
