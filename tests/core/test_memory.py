"""Highway-BP's memory over exact backprop, counted deterministically (`TensorMemory`).

The paper (Appendix D) puts Highway-BP at about two more state-sized tensors per layer than
backprop: w^0 and the estimate. Measured here as (peak tensor bytes of a training step -
exact's) / (state bytes x L). Before the cuts (6b9be67) the loop backend held ~4 at k = 1:
a zeros buffer per layer allocated before each iteration's VJPs, and the re-run's outputs
(copies of the next layers' saved inputs) on top of w^0 and the new estimate. On 5ed12c9 it
held 2 + O(1/L): all of w^0 beside the growing estimate through one autograd call for all
VJPs, plus a copy of the incoming dLoss/dh_L, the last layer's re-run output and w^0_0
(which no VJP reads). Now the sweep takes the VJPs in two calls, top half first, and
releases the old rows of the top half before the bottom half's: about 1.5.
"""

from __future__ import annotations

import pytest
import torch

import highwaybp as hbp
from highwaybp.bench.deep import LAYERWISE, build_stack, extra_tensors_per_layer
from highwaybp.bench.tensor_memory import TensorMemory, onednn_aliases_unfollowed
from highwaybp.core.methods import Highway
from tests.core.helpers import grads_of, make_block, make_layer, max_rel_diff

STACKS = {  # model: (depth, width, batch, seq, image)
    "mlp": (16, 64, 128, 8, 6),
    "transformer": (16, 32, 4, 16, 6),
    "resnet": (16, 8, 8, 8, 8),
}
# Extra state tensors per layer at k = 1 with the default chain (loop backend, sequential
# scan) at these sizes, as counted now; 2.06, 2.12 and 1.95 on 5ed12c9. The peak holds all of
# w^0 with the top half of the new estimate (or the bottom half of w^0 with all of the
# estimate), plus one layer's VJP temporaries, against exact backprop's own peak (in the
# loss's or the top layer's backward, with its own temporaries).
REACHED_K1 = {"mlp": 1.4375, "transformer": 1.4991, "resnet": 1.3291}


@pytest.mark.parametrize("model", sorted(STACKS))
def test_loop_backend_holds_at_most_two_extra_states_per_layer_at_k1(model):
    stack = build_stack(model, *STACKS[model])
    extra = extra_tensors_per_layer(stack, Highway(k=1), "loop")
    depth = STACKS[model][0]
    # the paper's bound: w^0 and the new estimate, nothing else state-sized per layer
    assert extra <= 2.0, extra
    # and what this commit reaches: one more state-sized tensor kept through the VJPs
    # (1/L = 0.0625 per layer here; a copy of dLoss/dh_L, a re-run output, a row of the
    # old estimate not released) breaks it
    assert extra <= REACHED_K1[model] + 0.5 / depth, extra
    # not less than the algorithm needs: w^0 alive beside half of the new estimate (with
    # one estimate alive, as with layerwise_sweeps, this is 0.9-1.13; w^0 alone: 0.9-0.94)
    assert extra >= 1.25, extra


def test_k0_holds_one_extra_state_per_layer():
    stack = build_stack("mlp", *STACKS["mlp"])
    extra = extra_tensors_per_layer(stack, Highway(k=0), "loop")
    assert 0.8 <= extra <= 1.0, extra  # w^0 only (2.0 on 6b9be67, 1.06 on 5ed12c9)


def test_tensor_memory_counts_allocations_frees_and_views():
    with TensorMemory() as mem:
        a = torch.empty(1000, dtype=torch.float64)  # 8000 bytes
        view = a[:10]  # no new storage
        b = a * 2  # 8000 more
        assert mem.live_bytes == 16000
        del b
        torch.zeros(1)  # the next op sees the free
        assert mem.live_bytes == 8000 + 4
    assert mem.peak_bytes == 16000
    del view


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
def test_tensor_memory_counts_an_onednn_allocation_once_while_any_alias_lives():
    # oneDNN's opaque tensors have no storage; a detach is an alias of the same buffer
    dense, before = torch.randn(256, 256), torch.randn(64, 64).to_mkldnn()
    reason = onednn_aliases_unfollowed()
    if reason is not None:  # an older torch in the declared range: refused, not miscounted
        with TensorMemory(), pytest.raises(RuntimeError, match="alias of a oneDNN tensor"):
            dense.to_mkldnn().detach()
        pytest.skip(reason)
    with TensorMemory() as mem:
        a = dense.to_mkldnn()  # 256 KiB
        b = a.detach()
        c = b.detach()
        before.detach()  # an alias of a tensor from before the block: not counted
        assert mem.live_bytes == 256 * 256 * 4
        del a, b
        torch.zeros(1)  # the next op sees the frees
        assert mem.live_bytes == 256 * 256 * 4 + 4  # c still holds the buffer
        del c
        torch.zeros(1)
        assert mem.live_bytes == 4  # only the new zeros(1): the oneDNN buffer is freed
    assert mem.peak_bytes == 256 * 256 * 4 + 4


class _TanhKeepingOutput(torch.autograd.Function):
    """tanh whose backward reads its output from a ctx attribute (not save_for_backward)."""

    @staticmethod
    def forward(ctx, s):
        out = torch.tanh(s)
        ctx.out = out
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * (1 - ctx.out**2)


class _TanhResidual(hbp.ResidualMap):
    """r(x, z) = tanh(x + z): a map whose graph reads its output y in the backward."""

    kind = "diagonal"

    def combine(self, x, z):
        return _TanhKeepingOutput.apply(x + z)

    def k_context(self, x, z, y):
        return 1 - y**2

    def coefficient(self, ctx):
        return ctx


@pytest.mark.parametrize("residual", [_TanhResidual, hbp.ReLUResidual])
def test_sharing_the_rerun_output_keeps_graphs_that_read_it_exact(residual):
    """The re-run's output y is pointed at the next layer's saved input (same values); a
    graph that reads y in its backward (ReLU's saved result, a ctx attribute) must still
    see the right values: k = L equals exact backprop."""
    torch.manual_seed(0)
    chain = hbp.ResidualChain(
        [hbp.ResidualLayer(make_block(5), residual()) for _ in range(4)]).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=True)
    for method in (hbp.Highway(k=4), hbp.Highway(k=1), hbp.FixedPoint(k=4)):
        est = grads_of(chain, x, method, per_layer_loss=True)
        if method.iteration_bound >= 4:
            assert max_rel_diff(est, exact) < 1e-10
    reference = hbp.ResidualChain(chain.layers, vjp="loop", recompute=False)
    for method in (hbp.Highway(k=1), hbp.Highway(k=2)):
        a = grads_of(chain, x, method, per_layer_loss=True)
        b = grads_of(reference, x, method, per_layer_loss=True)  # no re-run, no sharing
        assert max_rel_diff(a, b) < 1e-12


def test_k2_holds_no_more_than_k1():
    """w^{j+1} = scan(g + v^j): w^0 is not kept beside the estimates (3.1 on 6b9be67)."""
    stack = build_stack("mlp", *STACKS["mlp"])
    extra = extra_tensors_per_layer(stack, Highway(k=2), "loop")
    assert 1.25 <= extra <= 1.5, extra  # 1.44 (2.12 on 5ed12c9)


@pytest.mark.parametrize("method", [hbp.Highway(k=1), hbp.Highway(k=3), hbp.FixedPoint(k=2),
                                    hbp.Highway(tol=1e-30, max_k=3, fallback="best"),
                                    hbp.Highway(tol=1e-30, max_k=3, fallback="last")])
def test_sparse_and_dense_loss_forms_agree(method):
    """A loss on h_L alone runs the sparse form (g added on its rows, w^0 not kept); the
    same loss through return_states=True runs the dense form (w^0 + scan(v)): equal to
    rounding, for every k and the adaptive fallbacks."""
    torch.manual_seed(0)
    kinds = ["identity", "gated", "relu", "scaled", "identity"]
    chain = hbp.ResidualChain([make_layer(k, 4) for k in kinds]).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = [x, *chain.parameters()]
    out = chain(x, method=method)
    sparse = torch.autograd.grad((out**3).sum(), params)
    states = chain(x, method=method, return_states=True)
    dense = torch.autograd.grad((states[-1] ** 3).sum(), params)
    assert max_rel_diff(sparse, dense) < 1e-12
    # losses on two states (h_2 and h_5 of 6): still sparse, h_2's row copied before the
    # in-place scan turns g into w^0
    h2, h5 = chain(x, method=method, return_states=(2, 5))
    sparse = torch.autograd.grad((h2.sin() + h5**3).sum(), params)
    states = chain(x, method=method, return_states=True)
    dense = torch.autograd.grad((states[1].sin() + states[4] ** 3).sum(), params)
    assert max_rel_diff(sparse, dense) < 1e-12


def test_batched_backend_overhead_is_bounded():
    """The batched backend holds more (stacked parameters and inputs, the stacked
    cotangent, vmap's extra LayerNorm output, every layer's VJP temporaries at once):
    9.9 per layer for this MLP at k = 1, 11.91 on 6b9be67 (a zeros buffer per layer
    allocated before the VJP call; the stacked outputs kept beside the stacked inputs
    holding the same values, which at this size the vmapped re-run reproduces exactly);
    9.91 on 5ed12c9, 9.79 now (no copy of dLoss/dh_L, w^0_0 freed before the VJPs)."""
    stack = build_stack("mlp", *STACKS["mlp"])
    extra = extra_tensors_per_layer(stack, Highway(k=1), "batched")
    assert extra <= 10.0, extra


@pytest.mark.parametrize("model", sorted(STACKS))
def test_layerwise_sweeps_hold_about_one_extra_state_per_layer(model):
    stack = build_stack(model, *STACKS[model])
    for k in (1, 2):
        extra = extra_tensors_per_layer(stack, Highway(k=k), LAYERWISE)
        assert extra <= 1.3, (k, extra)  # 1.3-1.5 with the default two-call sweeps


METHODS = [hbp.Highway(k=1), hbp.Highway(k=3), hbp.FixedPoint(k=2), hbp.Highway(k=0),
           hbp.Highway(tol=1e-30, max_k=3, fallback="best"),
           hbp.Highway(tol=1e-30, max_k=3, fallback="last"),
           hbp.Highway(tol=1e-30, max_k=2, fallback="exact")]


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("per_layer_loss", [False, True])
def test_layerwise_sweeps_give_the_same_estimate(method, per_layer_loss):
    torch.manual_seed(0)
    kinds = ["identity", "gated", "relu", "scaled", "identity"]
    layers = [make_layer(k, 4) for k in kinds]
    chain = hbp.ResidualChain(layers).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    want = grads_of(chain, x, method, per_layer_loss)
    # releasing the old rows, or keeping them for the norms; re-run or recorded graphs
    for record, recompute in ((False, True), (True, True), (False, False)):
        layerwise = hbp.ResidualChain(layers, layerwise_sweeps=True, record_step_norms=record,
                                      recompute=recompute)
        got = grads_of(layerwise, x, method, per_layer_loss)
        assert max_rel_diff(got, want) < 1e-12
        assert layerwise.last_diagnostics.iterations == chain.last_diagnostics.iterations
        if record or method.adaptive:
            steps = layerwise.last_diagnostics.step_norms
            assert len(steps) == layerwise.last_diagnostics.iterations


def test_layerwise_sweeps_need_the_loop_backend():
    with pytest.raises(ValueError, match="vjp='loop'"):
        hbp.ResidualChain([make_layer("identity", 4)], vjp="batched", layerwise_sweeps=True)


def test_layerwise_sweeps_refuse_a_backend_or_scan_they_would_ignore():
    """layerwise_sweeps scans sequentially with per-layer VJPs: another scan or VJP backend
    would be silently ignored (found on 6b9be67 + chainmem), so both are refused, at
    construction and when the attributes change before a backward."""
    layers = [make_layer("identity", 5) for _ in range(3)]
    with pytest.raises(ValueError, match="cannot use scan='hillis_steele'"):
        hbp.ResidualChain(layers, scan="hillis_steele", layerwise_sweeps=True)
    with pytest.raises(ValueError, match="needs vjp='loop'"):
        hbp.ResidualChain(layers, vjp="batched", layerwise_sweeps=True)
    chain = hbp.ResidualChain(layers, method=Highway(k=1), layerwise_sweeps=True).double()
    chain.scan_name = "hillis_steele"
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="cannot use scan='hillis_steele'"):
        chain(x).sum().backward()


BORROWING = [  # (chain options, method): every form that reads the incoming dLoss/dh_L
    ({}, hbp.Highway(k=0)), ({}, hbp.Highway(k=1)), ({}, hbp.Highway(k=3)),
    ({}, hbp.FixedPoint(k=2)), ({}, hbp.Highway(k=9)),
    ({}, hbp.Highway(tol=1e-30, max_k=3, fallback="best")),
    ({}, hbp.Highway(tol=1e-30, max_k=2, fallback="exact")),
    ({"record_step_norms": True}, hbp.Highway(k=2)),
    ({"layerwise_sweeps": True}, hbp.Highway(k=2)),
    ({"layerwise_sweeps": True}, hbp.FixedPoint(k=2)),
    ({"scan": "hillis_steele"}, hbp.Highway(k=2)),
    ({"vjp": "batched"}, hbp.Highway(k=2)),
    ({"recompute": False}, hbp.Highway(k=2)),
]


@pytest.mark.parametrize("options, method", BORROWING, ids=lambda v: repr(v))
@pytest.mark.parametrize("returned", ["last", "tuple"])
def test_incoming_gradient_is_read_not_copied_nor_written(options, method, returned):
    """The backward borrows dLoss/dh_L as row L of g instead of copying it (one state-sized
    tensor less): no form of the iteration may write into it. A hook on h_L sees the
    tensor the chain receives; its values must be unchanged after the backward, and the
    gradients equal those of a loss whose incoming gradient nobody else holds."""
    torch.manual_seed(0)
    kinds = ["identity", "gated", "relu", "scaled", "identity"]
    layers = [make_layer(k, 4) for k in kinds]
    chain = hbp.ResidualChain(layers, **options).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = [x, *chain.parameters()]

    def loss_of(out):
        return (out**3).sum() if returned == "last" else (out[0].sin() + out[1] ** 3).sum()

    out = chain(x, method=method) if returned == "last" else chain(
        x, method=method, return_states=(2, 5))
    seen = []
    top = out if returned == "last" else out[1]
    top.register_hook(lambda grad: seen.append((grad, grad.clone())))
    got = torch.autograd.grad(loss_of(out), params)
    (grad, before), = seen
    assert torch.equal(grad, before)
    want = torch.autograd.grad(loss_of(chain(x, method=method) if returned == "last" else chain(
        x, method=method, return_states=(2, 5))), params)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_state_gradients_returns_no_alias_of_the_callers_gradient():
    torch.manual_seed(0)
    chain = hbp.ResidualChain([make_layer("identity", 4) for _ in range(3)]).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    grad_out = torch.randn(2, 4, dtype=torch.float64)
    for method in (hbp.Highway(k=1), hbp.Exact()):
        w = chain.state_gradients(x, grad_out, method)
        assert torch.equal(w[-1], grad_out)
        assert w[-1].untyped_storage().data_ptr() != grad_out.untyped_storage().data_ptr()


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sweeps_in_chunks_equal_one_call_and_scan_bit_for_bit(full, dtype):
    """The chain's sweep (`_ChainOps.layerwise_sweep`, any chunk of layers per autograd
    call) against the one-call form it replaces: v = block_vjp(w) (full: full_vjp), g added
    on its rows, the sequential scan. Equal bit for bit (torch.equal, float32 too): the
    default backward takes this path, and its gradients must not move."""
    from highwaybp.core.backends import LoopVJP
    from highwaybp.core.chain import _ChainOps

    torch.manual_seed(0)
    kinds = ["identity", "gated", "relu", "scaled", "identity", "relu", "gated"]
    chain = hbp.ResidualChain([make_layer(k, 6) for k in kinds]).to(dtype)
    h = torch.randn(5, 6, dtype=dtype)
    inputs = []
    with torch.no_grad():
        for layer in chain.layers:
            inputs.append(h)
            h = layer(h)
    backend = LoopVJP(chain.layers, inputs, [None] * len(inputs))
    ops = _ChainOps(chain, backend, uniform=True)
    num_layers = len(kinds)
    w = [torch.randn(5, 6, dtype=dtype) for _ in range(num_layers + 1)]
    g_rows = {num_layers: torch.randn(5, 6, dtype=dtype), 2: torch.randn(5, 6, dtype=dtype)}
    want = (ops.full_vjp if full else ops.block_vjp)(list(w))
    for i, g_i in g_rows.items():
        want[i].add_(g_i)
    if not full:
        want = ops.scan(want)
    for chunk in (1, 2, 3, num_layers - 1, num_layers):
        rows = list(w)
        got = ops.layerwise_sweep(rows, g_rows, full, chunk)
        assert all(row is None for row in rows), chunk  # the old rows are released
        assert all(torch.equal(a, b) for a, b in zip(got, want)), chunk


def test_tensor_memory_tells_what_is_alive_at_the_peak():
    def make_pair():
        a = torch.ones(1000, dtype=torch.float64)  # 8000 bytes, from this function
        return a, a * 2

    with TensorMemory(record_peak=True) as mem:
        a, b = make_pair()
        del a, b
        torch.zeros(10)  # after the peak: not in it
    rows = mem.peak_allocations
    assert sum(n * size for n, size, _, _ in rows) == mem.peak_bytes == 16000
    assert {(n, size, op) for n, size, op, _ in rows} == {
        (1, 8000, "aten.ones.default"), (1, 8000, "aten.mul.Tensor")}
    assert all(where.startswith("make_pair (test_memory.py:") for *_, where in rows)
