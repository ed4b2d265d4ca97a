"""Anderson-mixed Highway-BP in the GRU/LSTM engines (fast loop and iterate="reference")
against the dense reference of tests/core/test_anderson.py: per time step the explicit
Jacobian of the reference cell (torch.autograd.functional.jacobian on the flattened [B, S]
state), K_t = diag(the cell's declared residual gate), J_t = the rest. Compared: the
gradients of h0 (c0) (the adjoint of state 0) and of every input x_t (w_t times the explicit
Jacobian of the cell in x_t), so every row of the estimate is checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import highwaybp as hbp
from highwaybp.models.rnn import GRU, LSTM, GRUCellRef, LSTMCellRef
from tests.core.test_anderson import dense_anderson, dense_map, exact_dense

T, B, IN, H = 7, 2, 3, 4


def _setup(cell: str, seed: int = 0):
    torch.manual_seed(seed)
    lstm = cell == "lstm"
    ref = (LSTMCellRef if lstm else GRUCellRef)(IN, H).double()
    with torch.no_grad():  # larger recurrent weights: J carries enough for mixing to matter
        ref.weight_hh.mul_(3.0)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    h0 = torch.randn(B, H, dtype=torch.float64)
    c0 = torch.randn(B, H, dtype=torch.float64)
    w_y = torch.randn(T, B, H, dtype=torch.float64)
    return ref, x, h0, c0, w_y


def _dense(cell, ref, x, h0, c0, w_y, split="gate"):
    """(w0, F, [dx_t/d state rows]) on the state s = h (GRU) or [c, h] (LSTM), flattened.
    split="diagonal": K_t = the diagonal of the explicit Jacobian itself, clipped to [-1, 1]."""
    lstm = cell == "lstm"
    s = torch.cat([c0, h0], -1) if lstm else h0
    mats, x_jacs = [], []
    with torch.no_grad():
        for t in range(T):
            shape = s.shape
            full = jacobian(lambda v, t=t, sh=shape: ref(x[t], v.reshape(sh)).reshape(-1),
                            s.reshape(-1))
            if split == "diagonal":  # the Jacobian's own diagonal, clipped to [-1, 1]
                k = torch.diag(torch.diagonal(full).clamp(-1.0, 1.0))
            else:
                k = torch.diag(ref.residual_gate(x[t], s).reshape(-1))
            mats.append((k, full - k))
            x_jacs.append(jacobian(lambda u, sv=s: ref(u.reshape(B, IN), sv).reshape(-1),
                                   x[t].reshape(-1)))
            s = ref(x[t], s)
    # per-state losses: loss = sum(y * w_y), y = h part of each state
    zero = torch.zeros(s.numel(), dtype=torch.float64)
    g = [zero]
    for t in range(T):
        gt = torch.zeros(B, s.shape[-1], dtype=torch.float64)
        gt[:, -H:] = w_y[t]
        g.append(gt.reshape(-1))
    w0, F = dense_map(mats, g)
    return w0, F, x_jacs


def _module_grads(cell, ref, x, h0, c0, w_y, method, iterate, **kw):
    lstm = cell == "lstm"
    m = (LSTM if lstm else GRU)(IN, H, iterate=iterate, method=method, **kw).double()
    m.load_state_dict({f"{k}_l0": v for k, v in ref.state_dict().items()})
    xs = x.clone().requires_grad_(True)
    h = h0.clone()[None].requires_grad_(True)
    c = c0.clone()[None].requires_grad_(True)
    y, _ = m(xs, (h, c) if lstm else h)
    leaves = [xs, h, *([c] if lstm else [])]
    grads = torch.autograd.grad((y * w_y).sum(), leaves)
    state0 = torch.cat([grads[2][0], grads[1][0]], -1) if lstm else grads[1][0]
    return grads[0], state0.reshape(-1), m.last_diagnostics


def _rows_to_grads(w, x_jacs, lstm):
    """(dx [T, B, In], d state_0 flattened) from the dense adjoints w [T+1, B*S]."""
    dx = np.stack([w[t + 1] @ x_jacs[t].numpy() for t in range(T)]).reshape(T, B, IN)
    return dx, w[0]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("iterate", ["fast", "reference"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_rnn_mix_equals_the_dense_reference_at_every_k(cell, iterate, m):
    ref, x, h0, c0, w_y = _setup(cell, seed=3)
    w0, F, x_jacs = _dense(cell, ref, x, h0, c0, w_y)
    exact = exact_dense(w0, F, T)
    differs = 0
    for k in range(1, T + 2):
        dx, ds, diag = _module_grads(cell, ref, x, h0, c0, w_y,
                                     hbp.Highway(k=k, anderson=m), iterate)
        want = exact if k >= T else dense_anderson(w0, F, k, m)
        want_dx, want_ds = _rows_to_grads(want, x_jacs, cell == "lstm")
        np.testing.assert_allclose(ds.numpy(), want_ds, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(dx.numpy(), want_dx, rtol=1e-9, atol=1e-11)
        if k < T:
            assert diag.anderson == m and len(diag.mixed) == k
            plain_dx, _, _ = _module_grads(cell, ref, x, h0, c0, w_y, hbp.Highway(k=k), iterate)
            differs += not torch.allclose(plain_dx, dx, rtol=1e-6, atol=1e-9)
    assert differs >= 2  # mixing changed the estimate at several k


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_fixed_point_mix_equals_the_dense_reference(cell):
    ref, x, h0, c0, w_y = _setup(cell, seed=4)
    lstm = cell == "lstm"
    s = torch.cat([c0, h0], -1) if lstm else h0
    _, _, x_jacs = _dense(cell, ref, x, h0, c0, w_y)
    # FixedPoint: K = 0, J = the whole cell Jacobian (dense_map with keeps_residual=False)
    mats = []
    with torch.no_grad():
        for t in range(T):
            full = jacobian(lambda v, t=t, sh=s.shape: ref(x[t], v.reshape(sh)).reshape(-1),
                            s.reshape(-1))
            k = torch.diag(ref.residual_gate(x[t], s).reshape(-1))
            mats.append((k, full - k))
            s = ref(x[t], s)
    g = [torch.zeros(s.numel(), dtype=torch.float64)]
    for t in range(T):
        gt = torch.zeros(B, s.shape[-1], dtype=torch.float64)
        gt[:, -H:] = w_y[t]
        g.append(gt.reshape(-1))
    w0, F = dense_map(mats, g, keeps_residual=False)
    for k in (2, 3, 5):
        dx, ds, _ = _module_grads(cell, ref, x, h0, c0, w_y, hbp.FixedPoint(k=k, anderson=3),
                                  "fast")
        want_dx, want_ds = _rows_to_grads(dense_anderson(w0, F, k, 3), x_jacs, lstm)
        np.testing.assert_allclose(ds.numpy(), want_ds, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(dx.numpy(), want_dx, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_mix_float32_follows_float64(cell):
    """The same mixed estimate in float32 (cond limit and Tikhonov term from float32's eps)
    stays close to the float64 one."""
    ref, x, h0, c0, w_y = _setup(cell, seed=5)
    dx64, _, _ = _module_grads(cell, ref, x, h0, c0, w_y, hbp.Highway(k=3, anderson=3), "fast")
    lstm = cell == "lstm"
    m = (LSTM if lstm else GRU)(IN, H, method=hbp.Highway(k=3, anderson=3))
    m.load_state_dict({f"{k}_l0": v.float() for k, v in ref.state_dict().items()})
    xs = x.float().requires_grad_(True)
    y, _ = m(xs, (h0.float()[None], c0.float()[None]) if lstm else h0.float()[None])
    (dx32,) = torch.autograd.grad((y * w_y.float()).sum(), [xs])
    torch.testing.assert_close(dx32.double(), dx64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_window_memory_is_2m_states(cell):
    """Deterministic tensor count (TensorMemory): a window of m holds m values of F and m
    residuals, so a mixed step's peak is exactly 2m adjoint states above the plain one's
    (the engine writes each F into the oldest F's buffer once the window is full)."""
    from highwaybp.bench.tensor_memory import TensorMemory

    t, b, n_in, h = 64, 8, 16, 32
    torch.manual_seed(0)
    x = torch.randn(t, b, n_in, requires_grad=True)
    gy = torch.randn(t, b, h)
    state_bytes = (t + 1) * b * h * 4 * (2 if cell == "lstm" else 1)

    def peak(m):
        mod = (LSTM if cell == "lstm" else GRU)(n_in, h, method=hbp.Highway(k=7, anderson=m))
        for _ in range(2):  # warm-up, then the counted step on cleared pools
            for pool in getattr(mod, "_pools", []):
                pool.clear()
            with TensorMemory() as mem:
                y, _ = mod(x)
                y.backward(gy)
        return mem.peak_bytes

    plain = peak(0)
    for m in (2, 3, 5):
        assert peak(m) - plain == 2 * m * state_bytes


def _plain_dense(w0, F, k):
    w = w0
    for _ in range(k):
        w = F(w)
    return w


@pytest.mark.parametrize("iterate", ["fast", "reference"])
@pytest.mark.parametrize(("forward", "scan"), [("loop", "sequential"), ("fused", "log")])
@pytest.mark.parametrize("m", [0, 3])
def test_gru_diagonal_split_equals_the_dense_reference_at_every_k(iterate, forward, scan, m):
    """split="diagonal": K_t = diag of the explicit Jacobian (independent of the engine's
    coefficients and zeroed W_hh diagonals), plain (m = 0) and mixed, every k; and it is
    not the gate split's estimate."""
    ref, x, h0, c0, w_y = _setup("gru", seed=5)
    w0, F, x_jacs = _dense("gru", ref, x, h0, c0, w_y, split="diagonal")
    gate_w0, gate_F, _ = _dense("gru", ref, x, h0, c0, w_y)
    exact = exact_dense(w0, F, T)
    for k in range(1, T + 2):
        method = hbp.Highway(k=k, anderson=m)
        dx, ds, _ = _module_grads("gru", ref, x, h0, c0, w_y, method, iterate, split="diagonal",
                                  forward=forward, scan=scan)
        if k >= T:
            want = exact
        else:
            want = dense_anderson(w0, F, k, m) if m else _plain_dense(w0, F, k)
            gate = dense_anderson(gate_w0, gate_F, k, m) if m else _plain_dense(gate_w0, gate_F, k)
            assert not np.allclose(want, gate, rtol=1e-3, atol=1e-6)  # another estimate
        want_dx, want_ds = _rows_to_grads(want, x_jacs, False)
        np.testing.assert_allclose(ds.numpy(), want_ds, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(dx.numpy(), want_dx, rtol=1e-9, atol=1e-11)


def test_split_choices_are_checked_and_shown():
    assert "split='diagonal'" in repr(GRU(IN, H, split="diagonal"))
    assert "split" not in repr(GRU(IN, H))
    with pytest.raises(ValueError, match="split must be one of"):
        GRU(IN, H, split="jacobian")
    with pytest.raises(ValueError, match="GRU only"):
        LSTM(IN, H, split="diagonal")
    # an attribute set later is checked at the forward, on every path (the fused Exact() path
    # never builds an engine)
    for module, bad, match in ((GRU(IN, H, forward="fused"), "bogus", "split must be one of"),
                               (LSTM(IN, H, forward="fused"), "diagonal", "GRU only")):
        module.split = bad
        with pytest.raises(ValueError, match=match):
            module(torch.randn(T, B, IN))


def _clipping_gru(T_: int) -> tuple[GRU, torch.Tensor]:
    """A GRU whose step Jacobian has diagonal entries near +-3 (r ~ 1, z ~ 0, W_hn =
    3 [[1, 1], [-1, -1]]: nilpotent, its diagonal (3, -3)): an unclipped diagonal scan
    would grow like 3^T."""
    m = GRU(1, 2).double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.weight_ih_l0.fill_(0.1)
        m.bias_hh_l0[:2] = 6.0
        m.bias_hh_l0[2:4] = -6.0
        m.weight_hh_l0[4:] = 3.0 * torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    x = 0.1 * torch.randn(T_, 1, 1, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    return m, x


def test_diagonal_split_clips_k_so_the_scan_cannot_grow():
    """|K_t| <= 1, so Highway(k=0)'s estimate (the scan of the per-step losses alone) is
    bounded by the losses' sum: with loss = sum of outputs (g_t = 1) every entry of
    dL/dh0 is at most T in size. Unclipped it would be ~3^T; the dense reference with the
    clipped diagonal pins the value itself (and this model's diagonal is above 1)."""
    T_ = 30
    m, x = _clipping_gru(T_)
    ref = GRUCellRef(1, 2).double()
    ref.load_state_dict({k[:-3]: v for k, v in m.state_dict().items()})
    s, biggest = torch.zeros(1, 2, dtype=torch.float64), 0.0
    with torch.no_grad():
        for t in range(T_):
            full = jacobian(lambda v, t=t: ref(x[t], v.reshape(1, 2)).reshape(-1), s.reshape(-1))
            biggest = max(biggest, float(torch.diagonal(full).abs().max()))
            s = ref(x[t], s)
    assert biggest > 2.0  # the clip is exercised
    h0 = torch.zeros(1, 1, 2, dtype=torch.float64, requires_grad=True)
    for split in ("diagonal", "gate"):
        m.split, m.method = split, hbp.Highway(k=0)
        y, _ = m(x, h0)
        (grad,) = torch.autograd.grad(y.sum(), h0)
        assert grad.abs().max() <= T_
