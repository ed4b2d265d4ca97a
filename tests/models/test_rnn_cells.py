"""The GRU/LSTM engines (stored gates, batched VJPs, in-place scan, fast loop) against
autograd reference cells, the core scan and the core's highway_iterate (float64)."""

from __future__ import annotations

import pytest
import torch

import highwaybp as hbp
from highwaybp.core.scan import reverse_scan_sequential
from highwaybp.models.rnn import (
    BufferPool,
    GRUCellRef,
    GRUEngine,
    LSTMCellRef,
    LSTMEngine,
    fast_iterate,
    reference_iterate,
)

T, B, IN, H = 6, 3, 4, 5
DT = torch.float64


def _setup(cell: str, seed: int = 0, bias: bool = True, chunk: int | None = None):
    torch.manual_seed(seed)
    ref_cls = GRUCellRef if cell == "gru" else LSTMCellRef
    ref = ref_cls(IN, H, bias=bias).double()
    x = torch.randn(T, B, IN, dtype=DT)
    h0 = torch.randn(B, H, dtype=DT)
    c0 = torch.randn(B, H, dtype=DT)
    p = (
        ref.weight_ih.detach(),
        ref.weight_hh.detach(),
        None if ref.bias_ih is None else ref.bias_ih.detach(),
        None if ref.bias_hh is None else ref.bias_hh.detach(),
    )
    if cell == "gru":
        eng = GRUEngine(BufferPool(), x, h0, *p)
        s0 = h0
    else:
        eng = LSTMEngine(BufferPool(), x, h0, c0, *p)
        s0 = torch.cat([c0, h0], -1)
    if chunk is not None:  # several chunks of time steps (the default is one chunk at this size)
        eng.chunk = chunk
    return ref, eng, x, s0


def _ref_states(ref, x, s0):
    states = [s0]
    for x_t in x.unbind(0):
        states.append(ref(x_t, states[-1]))
    return torch.stack(states)


def _to_engine_layout(cell: str, s: torch.Tensor) -> torch.Tensor:
    """[T+1, B, S] reference states/adjoints -> the engine layout."""
    if cell == "gru":
        return s
    c, h = s.chunk(2, -1)
    return torch.stack([c, h])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bias", [True, False])
def test_engine_forward_matches_reference_cell(cell, bias):
    ref, eng, x, s0 = _setup(cell, bias=bias)
    out = eng.forward()
    states = out if cell == "gru" else out[0]
    want = _ref_states(ref, x, s0)
    want_h = want if cell == "gru" else want[..., H:]
    torch.testing.assert_close(states, want_h, rtol=0, atol=1e-12)
    if cell == "lstm":
        torch.testing.assert_close(out[1], want[-1, :, :H], rtol=0, atol=1e-12)


CHUNKS = [None, 1, 4]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_block_vjp_is_the_batched_cell_vjp_minus_k(cell, full, chunk):
    ref, eng, x, s0 = _setup(cell, chunk=chunk)
    eng.forward()
    eng.prepare()
    states = _ref_states(ref, x, s0).detach()
    S = states.shape[-1]
    hp = states[:-1].reshape(T * B, S).requires_grad_(True)
    xs = x.reshape(T * B, IN)
    out = ref(xs, hp)
    w_ref = torch.randn(T + 1, B, S, dtype=DT)
    (v,) = torch.autograd.grad(out, hp, w_ref[1:].reshape(T * B, S))
    v = v.reshape(T, B, S)
    if not full:
        v = v - ref.residual_gate(xs, hp).detach().reshape(T, B, S) * w_ref[1:]
    want = torch.cat([v, torch.zeros_like(v[:1])])
    got = eng.block_vjp(_to_engine_layout(cell, w_ref), eng.new_state(), full)
    torch.testing.assert_close(got, _to_engine_layout(cell, want), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_inplace_scan_matches_core_scan(cell):
    ref, eng, x, s0 = _setup(cell)
    eng.forward()
    states = _ref_states(ref, x, s0)
    S = states.shape[-1]
    a = ref.residual_gate(x.reshape(T * B, IN), states[:-1].reshape(T * B, S)).detach()
    coeff = torch.cat([a.reshape(T, B, S), torch.zeros(1, B, S, dtype=DT)])
    v = torch.randn(T + 1, B, S, dtype=DT)
    want = reverse_scan_sequential(v, coeff)
    got = eng.scan_(_to_engine_layout(cell, v).clone())
    torch.testing.assert_close(got, _to_engine_layout(cell, want), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_exact_backward_and_param_grads_match_autograd(cell, chunk):
    ref, eng, x, s0 = _setup(cell, chunk=chunk)
    x.requires_grad_(True)
    s0 = s0.clone().requires_grad_(True)
    states = _ref_states(ref, x, s0)
    gy = torch.randn(T, B, H, dtype=DT)
    h_part = states[1:] if cell == "gru" else states[1:, :, H:]
    loss = (h_part * gy).sum() + (states[-1] ** 2).sum()
    params = [ref.weight_ih, ref.weight_hh, ref.bias_ih, ref.bias_hh]
    want = torch.autograd.grad(loss, [x, s0, *params])
    with torch.no_grad():
        eng.forward()
        eng.prepare()
    g_last = 2 * states[-1].detach()
    gy = gy.clone()
    gy[-1] += g_last[:, -H:]
    eng.set_loss(gy, g_last[:, :H] if cell == "lstm" else None)
    w = eng.exact_backward(eng.new_state())
    dx, *dparams = eng.param_grads(w, need_x=True)
    ds0 = w[0] if cell == "gru" else torch.cat([w[0, 0], w[1, 0]], -1)
    for got, exp in zip([dx, ds0, *dparams], want):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-10)


def _iterate_both(cell: str, method, chunk=None):
    _, eng, _, _ = _setup(cell, seed=3, chunk=chunk)
    eng.forward()
    eng.prepare()
    eng.set_loss(torch.randn(T, B, H, dtype=DT), torch.randn(B, H, dtype=DT))
    w_fast, d_fast = fast_iterate(eng, method, record_steps=True)
    w_fast = w_fast.clone()
    w_core, d_core = reference_iterate(eng, method, record_steps=True)
    return w_fast, d_fast, w_core, d_core


METHODS = [
    hbp.Highway(k=0),
    hbp.Highway(k=2),
    hbp.Highway(k=T + 3),
    hbp.FixedPoint(k=2),
    hbp.Highway(tol=1e-3, max_k=T),
    hbp.Highway(tol=1e-12, max_k=2, fallback="best"),
    hbp.Highway(tol=1e-12, max_k=2, fallback="last"),
    hbp.Highway(tol=1e-12, max_k=2, fallback="exact"),
]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("chunk", [None, 4])
def test_fast_loop_equals_core_highway_iterate(cell, method, chunk):
    w_fast, d_fast, w_core, d_core = _iterate_both(cell, method, chunk)
    torch.testing.assert_close(w_fast, w_core, rtol=0, atol=1e-12)
    assert d_fast.iterations == d_core.iterations
    assert d_fast.stop_reason == d_core.stop_reason
    assert d_fast.converged == d_core.converged
    assert d_fast.fallback == d_core.fallback
    assert d_fast.step_norms == pytest.approx(d_core.step_norms, rel=1e-9)


def test_buffer_pool_reuses_returned_buffers():
    pool = BufferPool()
    like = torch.zeros(1)
    a = pool.take((4, 5), like)
    pool.give(a)
    assert pool.take((4, 5), like) is a
    assert pool.take((4, 5), like) is not a
    assert pool.take((4, 5), like.double()).dtype == torch.float64
