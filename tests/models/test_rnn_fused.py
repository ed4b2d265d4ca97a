"""forward="fused" (torch's kernel, gates recomputed in the backward) and scan="log" (every
sweep over all T at once, log-depth time scans) against torch autograd and against the loop
path, and the dispatch counts that make them GPU-shaped."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import highwaybp as hbp
from highwaybp.models.rnn import GRU, LSTM, fused
from highwaybp.models.rnn import function as rnn_function

T, B, IN, H = 5, 2, 3, 4
PAIRS = {"gru": (GRU, nn.GRU), "lstm": (LSTM, nn.LSTM)}
pytestmark = pytest.mark.filterwarnings("ignore:dropout option adds dropout")
PATHS = [(f, s) for f in ("loop", "fused") for s in ("sequential", "log")]
# the GRU with K_t = diag(J_t) ("diagonal" split) runs every path too
CELLS = ["gru", "gru-diagonal", "lstm"]


def _split(cell: str) -> tuple[str, dict]:
    """"gru-diagonal" -> ("gru", {"split": "diagonal"})."""
    name, _, split = cell.partition("-")
    return name, ({"split": split} if split else {})


def _model(cell, layers, dtype, dropout=0.0, batch_first=False, bias=True, **kw):
    ours, theirs = PAIRS[cell]
    ref = theirs(IN, H, num_layers=layers, dropout=dropout, batch_first=batch_first, bias=bias)
    ref = ref.to(dtype)
    m = ours(IN, H, num_layers=layers, dropout=dropout, batch_first=batch_first, bias=bias, **kw)
    m = m.to(dtype)
    m.load_state_dict(ref.state_dict())
    return m, ref


def _data(cell, layers, dtype, batch_first, with_h0, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, IN) if batch_first else (T, B, IN)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_(True)
    weights = torch.randn((*shape[:-1], H), generator=g, dtype=dtype)
    if not with_h0:
        return x, None, [x], weights
    h0 = torch.randn(layers, B, H, generator=g, dtype=dtype).requires_grad_(True)
    if cell == "gru":
        return x, h0, [x, h0], weights
    c0 = torch.randn(layers, B, H, generator=g, dtype=dtype).requires_grad_(True)
    return x, (h0, c0), [x, h0, c0], weights


def _grads(cell, module, x, hx, extra, weights, seed=0):
    torch.manual_seed(seed)  # the same dropout masks for every module
    y, state = module(x, hx)
    h_n = state if cell == "gru" else state[0]
    loss = (y * weights).sum() + (h_n**2).sum()
    if cell == "lstm":
        loss = loss + 0.5 * (state[1] ** 2).sum()
    return torch.autograd.grad(loss, [*module.parameters(), *extra])


EXACT_METHODS = [  # every one is exact at k >= T
    hbp.Exact(),
    hbp.Highway(k=T),
    hbp.Highway(k=T + 3),
    hbp.FixedPoint(k=T),
    hbp.Highway(tol=1e-300, max_k=T),  # adaptive, runs to T: stops "exact_after_L"
]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(("forward", "scan"), PATHS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_every_path_is_torch_autograd_at_k_equal_T(
    cell, forward, scan, layers, dropout, batch_first, with_h0
):
    """float64: each forward path x scan, exact methods (Exact, Highway k = T and k > T,
    FixedPoint k = T, adaptive to T) equal torch.nn's autograd to 1e-10, in training mode
    (the same dropout masks under the same seed)."""
    dtype = torch.float64
    cell, split = _split(cell)
    m, ref = _model(cell, layers, dtype, dropout, batch_first, forward=forward, scan=scan,
                    **split)
    x, hx, extra, weights = _data(cell, layers, dtype, batch_first, with_h0, seed=layers)
    want = _grads(cell, ref, x, hx, extra, weights)
    for method in EXACT_METHODS:
        m.method = method
        got = _grads(cell, m, x, hx, extra, weights)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
        assert m.last_diagnostics.method == repr(method)


INEXACT_METHODS = [
    hbp.Highway(k=0),
    hbp.Highway(k=1),
    hbp.Highway(k=3),
    hbp.FixedPoint(k=2),
    hbp.Highway(tol=1e-2, max_k=T),
]
TOL = {torch.float64: dict(rtol=1e-11, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("variant", ["plain", "dropout_batch_first_h0", "no_bias"])
def test_fused_and_log_paths_equal_the_loop_at_every_k(cell, dtype, layers, variant):
    """Every (forward, scan) path's gradient equals the loop + sequential path's (the CPU
    default) at truncations that are not exact, to rounding, with the same diagnostics."""
    cell, split = _split(cell)
    opts = {
        "plain": dict(),
        "dropout_batch_first_h0": dict(dropout=0.3, batch_first=True),
        "no_bias": dict(bias=False),
    }[variant] | split
    with_h0 = variant == "dropout_batch_first_h0"
    x, hx, extra, weights = _data(cell, layers, dtype, opts.get("batch_first", False), with_h0,
                                  seed=7)  # fmt: skip
    base, _ = _model(cell, layers, dtype, forward="loop", scan="sequential", **opts)
    for method in INEXACT_METHODS:
        base.method = method
        want = _grads(cell, base, x, hx, extra, weights)
        want_diag = [(d.iterations, d.stop_reason) for d in base.layer_diagnostics]
        for forward, scan in PATHS[1:]:
            m, _ = _model(cell, layers, dtype, forward=forward, scan=scan, method=method, **opts)
            m.load_state_dict(base.state_dict())
            got = _grads(cell, m, x, hx, extra, weights)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **TOL[dtype])
            assert [(d.iterations, d.stop_reason) for d in m.layer_diagnostics] == want_diag
    # the truncation is not exact here: the comparison above is not exact-vs-exact
    exact, _ = _model(cell, layers, dtype, **opts)
    exact.load_state_dict(base.state_dict())
    base.method = hbp.Highway(k=1)
    assert not torch.allclose(_grads(cell, exact, x, hx, extra, weights)[1],
                              _grads(cell, base, x, hx, extra, weights)[1])  # fmt: skip


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fused_forward_and_no_grad_outputs_equal_the_loop(cell):
    """Outputs and final states, with and without grad, equal the loop's and torch.nn's."""
    m, ref = _model(cell, 2, torch.float64, forward="fused", method=hbp.Highway(k=1))
    loop, _ = _model(cell, 2, torch.float64, forward="loop", method=hbp.Highway(k=1))
    loop.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, IN, dtype=torch.float64)
    leaves = torch.utils._pytree.tree_leaves
    want = leaves(ref(x))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for module in (m, loop):
                for a, b in zip(leaves(module(x)), want):
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("name", ["bias_ih_l0", "bias_hh_l0", "weight_ih_l0"])
def test_fused_backward_refuses_parameters_changed_in_place(cell, name):
    """The fused path's backward recomputes the gates from every parameter (biases and
    W_ih too, even when x needs no gradient): an in-place change after the forward is an
    error that names the parameter, not a gradient of a mix of two models."""
    m, _ = _model(cell, 1, torch.float64, forward="fused", method=hbp.Highway(k=1))
    x = torch.randn(T, B, IN, dtype=torch.float64)  # no grad: W_ih is read for the gates only
    y = m(x)[0]
    with torch.no_grad():
        getattr(m, name).add_(1.0)
    with pytest.raises(RuntimeError, match=name.rsplit("_l", 1)[0]):
        y.sum().backward()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fused_backward_refuses_h0_changed_in_place(cell):
    m, _ = _model(cell, 1, torch.float64, forward="fused", method=hbp.Highway(k=1))
    x = torch.randn(T, B, IN, dtype=torch.float64)
    h0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)
    hx = h0.clone() if cell == "gru" else (h0.clone(), h0.clone())
    y = m(x, hx)[0]
    with torch.no_grad():
        (hx if cell == "gru" else hx[0]).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fused_exact_is_torch_autograd_and_reference_iterate_agrees(cell):
    """Exact() on the fused path is autograd through torch's kernel (not our Function); the
    other methods run our Function, and iterate="reference" gives the fast loop's result."""
    m, _ = _model(cell, 1, torch.float64, forward="fused", scan="log", method=hbp.Exact())
    x, hx, extra, weights = _data(cell, 1, torch.float64, False, True, seed=3)
    assert "_LayerFunction" not in type(m(x, hx)[0].grad_fn).__name__
    m.method = hbp.Highway(k=2)
    assert "_LayerFunction" in type(m(x, hx)[0].grad_fn).__name__
    fast = _grads(cell, m, x, hx, extra, weights)
    m.iterate = "reference"
    for g, w in zip(_grads(cell, m, x, hx, extra, weights), fast):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)


def test_auto_resolves_to_the_loop_on_cpu_and_fused_log_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert fused.resolve_paths("auto", "auto", cpu) == ("loop", "sequential")
    assert fused.resolve_paths("auto", "auto", cuda) == ("fused", "log")
    assert fused.resolve_paths("fused", "sequential", cuda) == ("fused", "sequential")
    assert fused.resolve_paths("loop", "log", cpu) == ("loop", "log")


def test_bad_forward_and_scan_arguments_and_repr():
    with pytest.raises(ValueError, match="forward must be one of"):
        GRU(IN, H, forward="cudnn")
    with pytest.raises(ValueError, match="scan must be one of"):
        LSTM(IN, H, scan="hillis_steele")
    assert "forward='fused', scan='log'" in repr(GRU(IN, H, forward="fused", scan="log"))
    assert "forward" not in repr(GRU(IN, H))


# ---- dispatch counts: the GPU-shaped path is O((k + 1) log T) ops --------------------------


class _Count(TorchDispatchMode):
    """Counts aten ops; a call of torch's fused RNN kernel counts as one (one cuDNN call on a
    GPU; on CPU torch's GRU is itself a loop of small ops, not what is measured here)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _count_fused_as_one(monkeypatch, counter_ref: list):
    original = rnn_function.fused_layer

    def counted(*args):
        counter_ref[0].n += 1
        with _disable_current_modes():
            return original(*args)

    monkeypatch.setattr(rnn_function, "fused_layer", counted)
    import highwaybp.models.rnn.modules as rnn_modules

    monkeypatch.setattr(rnn_modules, "fused_layer", counted)


def _counts(cell, forward, scan, k, seq_len, monkeypatch):
    torch.manual_seed(0)
    m = PAIRS[cell][0](2, 3, forward=forward, scan=scan, method=hbp.Highway(k=k)).double()
    x = torch.randn(seq_len, 2, 2, dtype=torch.float64, requires_grad=True)
    holder = [None]
    _count_fused_as_one(monkeypatch, holder)
    holder[0] = fwd = _Count()
    with fwd:
        y = m(x)[0]
        loss = y.square().sum()
    holder[0] = bwd = _Count()
    with bwd:
        loss.backward()
    return fwd.n, bwd.n


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("k", [1, 3])
def test_gpu_shaped_path_dispatches_log_depth_ops(cell, k, monkeypatch):
    """fused + log: the backward's op count at T = 4096 is at most 3x its count at T = 64
    and the forward's at most 1.5x (the loop + sequential path's grow ~T: checked below so
    that this counter can fail)."""
    f64, b64 = _counts(cell, "fused", "log", k, 64, monkeypatch)
    f4k, b4k = _counts(cell, "fused", "log", k, 4096, monkeypatch)
    assert b4k <= 3 * b64, (b64, b4k)
    assert f4k <= 1.5 * f64, (f64, f4k)
    lf64, lb64 = _counts(cell, "loop", "sequential", k, 64, monkeypatch)
    lf1k, lb1k = _counts(cell, "loop", "sequential", k, 1024, monkeypatch)
    assert lb1k > 3 * lb64 and lf1k > 1.5 * lf64, (lf64, lb64, lf1k, lb1k)
