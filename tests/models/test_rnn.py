"""highwaybp GRU/LSTM against torch.nn.GRU/LSTM: forward equality, exact gradients at k = T,
convergence in k at init, the generic CellRNN, method switching, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.models.rnn import GRU, LSTM, CellRNN, Engine, GRUCellRef, LSTMCellRef

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
    for method, iterations, stop in (
        (hbp.Highway(k=T), T, "fixed_k"),
        (hbp.Exact(), 0, "exact"),
        (hbp.FixedPoint(k=T), T, "fixed_k"),
    ):
        m.method = method
        got = _grads(_loss(cell, m, x, hx, weights, per_step), m, extra)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-9)
        # every layer reports this backward's method (not a stale one), layer 0 last
        for diag in m.layer_diagnostics:
            assert (diag.method, diag.iterations, diag.stop_reason) == (
                repr(method),
                iterations,
                stop,
            )
        assert m.last_diagnostics is m.layer_diagnostics[0]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("chunk_bytes", [1, 1000])
def test_chunked_sweeps_are_exact_at_k_equal_T(cell, chunk_bytes, monkeypatch):
    """Backward sweeps over chunks of 1 and of a few time steps (not the whole sequence)."""
    monkeypatch.setattr(Engine, "chunk_bytes", chunk_bytes)
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


CELL_METHODS = [
    hbp.Highway(k=0),
    hbp.Highway(k=1),
    hbp.Highway(k=2),
    hbp.FixedPoint(k=2),
    hbp.Highway(tol=1e-3, max_k=T),
    hbp.Highway(tol=1e-12, max_k=2, fallback="best"),
    hbp.Highway(tol=1e-12, max_k=2, fallback="last"),
    hbp.Highway(tol=1e-12, max_k=2, fallback="exact"),
    hbp.Highway(k=2, anderson=2),
    hbp.Highway(k=4, anderson=3),
    hbp.FixedPoint(k=3, anderson=3),
    hbp.Highway(tol=1e-9, max_k=T, anderson=3),
    hbp.Highway(tol=1e-12, max_k=4, anderson=2, fallback="best"),
    hbp.Highway(tol=1e-12, max_k=4, anderson=3, fallback="exact"),
]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("iterate", ["fast", "reference"])
@pytest.mark.parametrize("chunk_bytes", [None, 1, 200])
def test_cell_rnn_reference_equals_fast_engine_at_every_k(cell, iterate, chunk_bytes, monkeypatch):
    """The generic autograd path (batched cell VJP + core scan + highway_iterate on a
    reference cell) and the GRU/LSTM engines give the same truncated gradient at every k < T,
    with losses on every output, on h_n and (LSTM) on c_n; with the whole sequence in one
    chunk, chunks of 1 step and of a few steps."""
    if chunk_bytes is not None:
        monkeypatch.setattr(Engine, "chunk_bytes", chunk_bytes)
    torch.manual_seed(4)
    lstm = cell == "lstm"
    ref_cell = (LSTMCellRef if lstm else GRUCellRef)(IN, H).double()
    ref = CellRNN(ref_cell, record_step_norms=True)
    fast = (LSTM if lstm else GRU)(IN, H, iterate=iterate, record_step_norms=True).double()
    fast.load_state_dict({f"{k}_l0": v for k, v in ref_cell.state_dict().items()})
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    w_y, w_h, w_c = torch.randn(T, B, H, dtype=torch.float64), *torch.randn(2, B, H).double()
    leaves = [x, h0, *([c0] if lstm else [])]

    def fast_loss(method):
        hx = (h0[None], c0[None]) if lstm else h0[None]
        y, state = fast(x, hx, method=method)
        h_n, c_n = state if lstm else (state, None)
        loss = (y * w_y).sum() + (h_n[0] * w_h).sum()
        return loss + (c_n[0] * w_c).sum() if lstm else loss

    def ref_loss(method):
        states = ref(x, torch.cat([c0, h0], -1) if lstm else h0, method=method)
        y = states[..., H:] if lstm else states
        loss = (y * w_y).sum() + (y[-1] * w_h).sum()
        return loss + (states[-1, :, :H] * w_c).sum() if lstm else loss

    for method in CELL_METHODS:
        got = torch.autograd.grad(fast_loss(method), [*leaves, *fast.parameters()])
        want = torch.autograd.grad(ref_loss(method), [*leaves, *ref_cell.parameters()])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        d_fast, d_ref = fast.last_diagnostics, ref.last_diagnostics
        assert d_fast.iterations == d_ref.iterations
        assert d_fast.stop_reason == d_ref.stop_reason
        assert d_fast.fallback == d_ref.fallback
        assert d_fast.step_norms == pytest.approx(d_ref.step_norms, rel=1e-9)
    exact = torch.autograd.grad(fast_loss(hbp.Exact()), [*leaves, *fast.parameters()])
    k1 = torch.autograd.grad(fast_loss(hbp.Highway(k=1)), [*leaves, *fast.parameters()])
    assert not torch.allclose(k1[-3], exact[-3])  # k = 1 < T - 1 is truncated: not exact


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_core_and_fast_iteration_modes_agree(cell):
    torch.manual_seed(5)
    m, _ = _pair(cell, 2, method=hbp.Highway(tol=1e-4, max_k=T, fallback="best"))
    x = torch.randn(T, B, IN, dtype=torch.float64)
    results = []
    for mode in ("fast", "reference"):
        m.iterate = mode
        results.append(torch.autograd.grad(m(x)[0].square().sum(), list(m.parameters())))
        assert m.layer_diagnostics[0].method.startswith("Highway(tol")
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("iterate", ["fast", "reference"])
def test_adaptive_reaching_T_is_exact_even_if_the_last_step_grew(cell, iterate):
    """Highway(tol, max_k >= T, fallback="best"): w^T is exact, so reaching j = T must stop
    with "exact_after_L" and the exact gradient, even when the step grew at j = T (large
    weights, T = 2: the step norms are not monotone). Fails on eab6026 (before this fix)
    with iterate="fast" (GRU seed 2, LSTM seed 7 here): the growth test ran first and the
    "best" fallback returned w^1, a truncated gradient (GRU error ~1), while the core
    returned w^T.
    Found by the property test test_rnn_properties.py."""
    seq_len, hidden = 2, 2
    ours, theirs = PAIRS[cell]
    for seed in range(50):
        torch.manual_seed(seed)
        ref = theirs(1, hidden).double()
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(4)
        method = hbp.Highway(tol=1e-300, max_k=seq_len, fallback="best")
        m = ours(1, hidden, method=method, iterate=iterate).double()
        m.load_state_dict(ref.state_dict())
        x = torch.randn(seq_len, 1, 1, dtype=torch.float64)
        h0 = torch.randn(1, 1, hidden, dtype=torch.float64, requires_grad=True)
        hx = h0 if cell == "gru" else (h0, torch.zeros_like(h0))
        weights = torch.randn(seq_len, 1, hidden, dtype=torch.float64)
        got = torch.autograd.grad((m(x, hx)[0] * weights).sum(), [h0, *m.parameters()])
        want = torch.autograd.grad((ref(x, hx)[0] * weights).sum(), [h0, *ref.parameters()])
        assert m.last_diagnostics.stop_reason == "exact_after_L", seed
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_residual_stack_matches_explicit_autograd_model(dropout):
    """residual=True against single-layer torch.nn.GRUs with the residual add and (training)
    F.dropout after it, under the same seed: the masks, drawn in the same order, are the
    same."""
    torch.manual_seed(6)
    m = GRU(IN, H, num_layers=3, residual=True, dropout=dropout, method=hbp.Highway(k=T))
    m = m.double()
    layers = [nn.GRU(IN if i == 0 else H, H).double() for i in range(3)]
    for i, layer in enumerate(layers):
        layer.load_state_dict(
            {k: getattr(m, f"{k[:-3]}_l{i}").detach() for k in layer.state_dict()}
        )
    x = torch.randn(T, B, IN, dtype=torch.float64)
    torch.manual_seed(60)
    inp = x
    for i, layer in enumerate(layers):
        out = layer(inp)[0]
        inp = out + inp if i > 0 else out
        if i < 2:
            inp = nn.functional.dropout(inp, dropout, training=True)
    torch.manual_seed(60)
    y, _ = m(x)
    torch.testing.assert_close(y, inp, rtol=0, atol=1e-12)
    want = torch.autograd.grad(
        inp.square().sum(), [p for layer in layers for p in layer.parameters()]
    )
    got = torch.autograd.grad(y.square().sum(), list(m.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_between_layers_is_torch_nn_dropout(cell, dtype):
    """Training: under the same seed torch.nn.GRU/LSTM and ours draw the same dropout masks
    (F.dropout on the output of every layer but the last, in layer order), so outputs, h_n/c_n
    (taken before the dropout) and gradients equal torch.nn's; eval: no dropout, as torch.nn.
    Checked by mutating rnn.py: removing the dropout, applying it to the last layer too or
    to layer 0 only, keeping it in eval, or taking h_n after it each fail this test (the
    test it replaces, eab6026, compared the model with itself in eval and only checked
    finiteness in training: removing the dropout passed)."""
    torch.manual_seed(7)
    layers, p = 3, 0.5
    m, ref = _pair(cell, layers, dtype=dtype, method=hbp.Highway(k=T))
    m.dropout = ref.dropout = p
    x, hx, extra = _inputs(cell, layers, False, dtype=dtype)
    atol = 1e-9 if dtype == torch.float64 else 1e-6
    outs = {}
    for mode in ("train", "eval"):
        m.train(mode == "train")
        ref.train(mode == "train")
        torch.manual_seed(70)
        y_ref, s_ref = ref(x, hx)
        torch.manual_seed(70)
        y, s = m(x, hx)
        outs[mode] = y.detach()
        torch.testing.assert_close(y, y_ref, rtol=0, atol=atol)
        leaves, leaves_ref = (
            torch.utils._pytree.tree_leaves(s),
            torch.utils._pytree.tree_leaves(s_ref),
        )
        for a, b in zip(leaves, leaves_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
        if dtype != torch.float64:
            continue
        weights = torch.randn_like(y)
        for method in (hbp.Highway(k=T), hbp.Exact(), hbp.FixedPoint(k=T)):
            m.method = method
            torch.manual_seed(71)
            want = _grads(_loss(cell, ref, x, hx, weights, True), ref, extra)
            torch.manual_seed(71)
            got = _grads(_loss(cell, m, x, hx, weights, True), m, extra)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-9)
    # the masks did something: half the units of layers 0 and 1 are dropped in training
    assert not torch.allclose(outs["train"], outs["eval"])


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


def test_iterate_core_is_a_deprecated_alias_of_reference():
    with pytest.warns(FutureWarning, match="iterate='reference'"):
        rnn = GRU(3, 4, iterate="core")
    assert rnn.iterate == "reference"
    with pytest.raises(ValueError, match="iterate must be one of"):
        GRU(3, 4, iterate="bogus")
