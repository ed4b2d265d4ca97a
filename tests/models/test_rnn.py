"""highwaybp GRU/LSTM against torch.nn.GRU/LSTM: forward equality, exact gradients at k = T,
convergence in k at init, the generic CellRNN, method switching, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.models.rnn import GRU, LSTM, CellRNN
from highwaybp.models.rnn_cells import GRUCellRef, _Engine

T, B, IN, H = 6, 3, 4, 5
PAIRS = {"gru": (GRU, nn.GRU), "lstm": (LSTM, nn.LSTM)}


def _pair(cell: str, layers: int = 1, batch_first: bool = False, dtype=torch.float64, **kw):
    ours, theirs = PAIRS[cell]
    ref = theirs(IN, H, num_layers=layers, batch_first=batch_first).to(dtype)
    m = ours(IN, H, num_layers=layers, batch_first=batch_first, **kw).to(dtype)
    m.load_state_dict(ref.state_dict())
    return m, ref


def _inputs(cell: str, layers: int, batch_first: bool, dtype=torch.float64):
    x = torch.randn((B, T, IN) if batch_first else (T, B, IN), dtype=dtype, requires_grad=True)
    h0 = torch.randn(layers, B, H, dtype=dtype, requires_grad=True)
    if cell == "gru":
        return x, h0, [x, h0]
    c0 = torch.randn(layers, B, H, dtype=dtype, requires_grad=True)
    return x, (h0, c0), [x, h0, c0]


def _loss(cell: str, module, x, hx, weights, per_step: bool):
    y, state = module(x, hx)
    h_n = state if cell == "gru" else state[0]
    if per_step:
        loss = (y * weights).sum() + (h_n**2).sum()
        if cell == "lstm":
            loss = loss + 0.5 * (state[1] ** 2).sum()
        return loss
    last = y[:, -1] if module.batch_first else y[-1]  # final-step loss only
    return (last * weights.reshape(-1, H)[: last.shape[0]]).sum()


def _grads(loss, module, extra):
    return torch.autograd.grad(loss, [*module.parameters(), *extra])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("per_step", [True, False])
def test_highway_at_k_equal_T_is_torch_autograd(cell, layers, batch_first, per_step):
    torch.manual_seed(layers + 10 * batch_first)
    m, ref = _pair(cell, layers, batch_first, method=hbp.Highway(k=T))
    x, hx, extra = _inputs(cell, layers, batch_first)
    weights = torch.randn((*x.shape[:-1], H), dtype=torch.float64)
    want = _grads(_loss(cell, ref, x, hx, weights, per_step), ref, extra)
    for method in (hbp.Highway(k=T), hbp.Exact(), hbp.FixedPoint(k=T)):
        m.method = method
        got = _grads(_loss(cell, m, x, hx, weights, per_step), m, extra)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-9)
    assert m.last_diagnostics is not None


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("chunk_bytes", [1, 1000])
def test_chunked_sweeps_are_exact_at_k_equal_T(cell, chunk_bytes, monkeypatch):
    """Backward sweeps over chunks of 1 and of a few time steps (not the whole sequence)."""
    monkeypatch.setattr(_Engine, "chunk_bytes", chunk_bytes)
    torch.manual_seed(11)
    m, ref = _pair(cell, 2)
    x, hx, extra = _inputs(cell, 2, False)
    weights = torch.randn(T, B, H, dtype=torch.float64)
    want = _grads(_loss(cell, ref, x, hx, weights, True), ref, extra)
    for method in (hbp.Highway(k=T), hbp.Exact(), hbp.FixedPoint(k=T)):
        m.method = method
        got = _grads(_loss(cell, m, x, hx, weights, True), m, extra)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_forward_equals_torch_float32(cell, batch_first):
    torch.manual_seed(1)
    m, ref = _pair(cell, 2, batch_first, dtype=torch.float32, method=hbp.Highway(k=1))
    x, hx, _ = _inputs(cell, 2, batch_first, dtype=torch.float32)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y, s = m(x, hx)
            y_ref, s_ref = ref(x, hx)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        for a, b in zip(torch.utils._pytree.tree_leaves(s), torch.utils._pytree.tree_leaves(s_ref)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_unbatched_and_no_bias_match_torch(cell):
    torch.manual_seed(2)
    ours, theirs = PAIRS[cell]
    ref = theirs(IN, H, num_layers=2, bias=False).double()
    m = ours(IN, H, num_layers=2, bias=False, method=hbp.Highway(k=T)).double()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(T, IN, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    y_ref, _ = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    got = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    want = torch.autograd.grad(y_ref.square().sum(), [x, *ref.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_decreases_with_k_at_init_and_k_T_minus_1_is_exact(cell, seed):
    torch.manual_seed(seed)
    t_len = 12
    m, _ = _pair(cell, 1)
    x = torch.randn(t_len, B, IN, dtype=torch.float64)
    weights = torch.randn(t_len, B, H, dtype=torch.float64)

    def loss_fn(model):
        return (model(x)[0] * weights).sum()

    methods = {k: hbp.Highway(k=k) for k in (0, 1, 2, 4, t_len - 1)}
    report = hbp.gradient_fidelity(m, loss_fn, methods)
    errors = [report[k]["rel_error"] for k in (0, 1, 2, 4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert report[t_len - 1]["rel_error"] < 1e-12
    assert report[t_len - 1]["iterations"] == [t_len - 1]


def test_cell_rnn_reference_equals_fast_gru():
    """The generic autograd path (batched cell VJP + core scan + highway_iterate) and the fast
    engine give the same truncated gradient at every k."""
    torch.manual_seed(4)
    cell = GRUCellRef(IN, H).double()
    ref = CellRNN(cell)
    fast = GRU(IN, H).double()
    fast.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(T, B, H, dtype=torch.float64)
    for method in (hbp.Highway(k=0), hbp.Highway(k=2), hbp.FixedPoint(k=2)):
        got = torch.autograd.grad(
            (fast(x, h0[None], method=method)[0] * weights).sum(), [x, h0, *fast.parameters()]
        )
        want = torch.autograd.grad(
            (ref(x, h0, method=method) * weights).sum(), [x, h0, *cell.parameters()]
        )
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        assert fast.last_diagnostics.iterations == ref.last_diagnostics.iterations


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_core_and_fast_iteration_modes_agree(cell):
    torch.manual_seed(5)
    m, _ = _pair(cell, 2, method=hbp.Highway(tol=1e-4, max_k=T, fallback="best"))
    x = torch.randn(T, B, IN, dtype=torch.float64)
    results = []
    for mode in ("fast", "core"):
        m.iterate = mode
        results.append(torch.autograd.grad(m(x)[0].square().sum(), list(m.parameters())))
        assert m.layer_diagnostics[0].method.startswith("Highway(tol")
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_residual_stack_matches_explicit_autograd_model():
    torch.manual_seed(6)
    m = GRU(IN, H, num_layers=3, residual=True, method=hbp.Highway(k=T)).double()
    layers = [nn.GRU(IN if i == 0 else H, H).double() for i in range(3)]
    for i, layer in enumerate(layers):
        layer.load_state_dict(
            {k: getattr(m, f"{k[:-3]}_l{i}").detach() for k in layer.state_dict()}
        )
    x = torch.randn(T, B, IN, dtype=torch.float64)
    inp = x
    for i, layer in enumerate(layers):
        out = layer(inp)[0]
        inp = out + inp if i > 0 else out
    y, _ = m(x)
    torch.testing.assert_close(y, inp, rtol=0, atol=1e-12)
    want = torch.autograd.grad(
        inp.square().sum(), [p for layer in layers for p in layer.parameters()]
    )
    got = torch.autograd.grad(y.square().sum(), list(m.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(7)
    m = GRU(IN, H, num_layers=2, dropout=0.5, method=hbp.Highway(k=1))
    x = torch.randn(T, B, IN)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    y = m(x)[0]
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_use_method_switches_the_rnn():
    m = LSTM(IN, H, method=hbp.Highway(k=1))
    with hbp.use_method(m, hbp.FixedPoint(k=2)):
        m(torch.randn(T, B, IN))[0].sum().backward()
        assert m.last_diagnostics.method == "FixedPoint(k=2)"
    assert m.method == hbp.Highway(k=1)


def test_grads_accumulate_and_pool_is_reused():
    torch.manual_seed(8)
    m = GRU(IN, H, method=hbp.Highway(k=2))
    x = torch.randn(T, B, IN)
    m(x)[0].sum().backward()
    first = m.weight_hh_l0.grad.clone()
    m(x)[0].sum().backward()
    torch.testing.assert_close(m.weight_hh_l0.grad, 2 * first)
    assert m._pools[0]._free  # buffers came back after the backward


# ---- bad input -------------------------------------------------------------------------


def test_wrong_rank_and_feature_size():
    m = GRU(IN, H)
    with pytest.raises(ValueError, match="3-D"):
        m(torch.randn(2, T, B, IN))
    with pytest.raises(ValueError, match="input_size=4"):
        m(torch.randn(T, B, IN + 1))
    with pytest.raises(TypeError, match="floating point"):
        m(torch.zeros(T, B, IN, dtype=torch.long))


def test_h0_wrong_shape():
    m = LSTM(IN, H, num_layers=2)
    x = torch.randn(T, B, IN)
    with pytest.raises(ValueError, match=r"h0 must have shape \(num_layers, batch, hidden_size\)"):
        m(x, (torch.zeros(1, B, H), torch.zeros(2, B, H)))
    with pytest.raises(ValueError, match="c0"):
        m(x, (torch.zeros(2, B, H), torch.zeros(2, B, H + 1)))
    with pytest.raises(TypeError, match="tuple"):
        m(x, torch.zeros(2, B, H))


def test_batch_first_mismatch_is_named():
    m = GRU(IN, H, batch_first=True)
    x_time_major = torch.randn(T, B, IN)  # the module expects [B, T, IN]
    with pytest.raises(ValueError, match="batch_first"):
        m(x_time_major, torch.zeros(1, B, H))


def test_packed_sequence_is_rejected():
    m = GRU(IN, H)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(T, B, IN), [T, T - 1, 2])
    with pytest.raises(TypeError, match="PackedSequence"):
        m(packed)


def test_custom_cell_without_residual_gate():
    class PlainCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(IN + H, H)

        def forward(self, x, h):
            return torch.tanh(self.lin(torch.cat([x, h], -1)))

    with pytest.raises(TypeError, match="residual gate"):
        CellRNN(PlainCell(), method=hbp.Highway(k=1))
    rnn = CellRNN(PlainCell(), method=hbp.FixedPoint(k=1))  # FixedPoint needs no K
    with pytest.raises(TypeError, match="residual_gate"):
        rnn(torch.randn(T, B, IN), torch.zeros(B, H), method=hbp.Highway(k=1))


def test_bad_constructor_arguments_and_methods():
    with pytest.raises(NotImplementedError, match="bidirectional"):
        GRU(IN, H, bidirectional=True)
    with pytest.raises(ValueError, match="hidden_size"):
        GRU(IN, 0)
    with pytest.raises(TypeError, match="method"):
        GRU(IN, H, method="highway")
    with pytest.raises(ValueError, match="iterate"):
        GRU(IN, H, iterate="parallel")


def test_second_backward_is_a_clear_error():
    m = GRU(IN, H, method=hbp.Highway(k=1))
    y = m(torch.randn(T, B, IN))[0].sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_nan_gradient_is_reported():
    m = GRU(IN, H, method=hbp.Highway(k=1))
    y = m(torch.randn(T, B, IN))[0]
    with pytest.raises(FloatingPointError, match=r"not finite|NaN"):
        (y * float("nan")).sum().backward()
