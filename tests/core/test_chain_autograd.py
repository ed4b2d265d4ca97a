"""The chain behaves like an autograd module: .grad accumulation, frozen parameters, input
gradients for what precedes it, dropout replay, BatchNorm state, shape-changing layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.models.mlp import ResidualMLP
from tests.core.helpers import grads_of, make_block, make_chain, max_rel_diff


def test_grad_accumulates_into_existing_grad_like_autograd():
    torch.manual_seed(0)
    chain = make_chain(["relu", "identity", "gated"], 5).double()
    x = torch.randn(2, 5, dtype=torch.float64)
    chain(x, method=hbp.Exact()).pow(2).sum().backward()
    once = [p.grad.clone() for p in chain.parameters()]
    chain(x, method=hbp.Highway(k=3)).pow(2).sum().backward()
    for p, g in zip(chain.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_get_no_grad_and_others_are_exact():
    torch.manual_seed(0)
    chain = make_chain(["identity", "relu", "identity"], 4).double()
    frozen = chain.layers[1].block[0].weight
    frozen.requires_grad_(False)
    x = torch.randn(3, 4, dtype=torch.float64)
    chain(x, method=hbp.Exact()).pow(2).sum().backward()
    exact = {n: p.grad.clone() for n, p in chain.named_parameters() if p.requires_grad}
    chain.zero_grad()
    chain(x, method=hbp.Highway(k=3)).pow(2).sum().backward()
    assert frozen.grad is None
    for n, p in chain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, exact[n], rtol=1e-10, atol=1e-12)


def test_input_gradient_flows_to_the_stem():
    torch.manual_seed(0)
    stem = nn.Linear(3, 5).double()
    chain = make_chain(["identity", "gated", "relu"], 5).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    chain(stem(x), method=hbp.Exact()).sum().backward()
    exact = stem.weight.grad.clone()
    stem.zero_grad()
    chain(stem(x), method=hbp.Highway(k=3)).sum().backward()
    torch.testing.assert_close(stem.weight.grad, exact, rtol=1e-10, atol=1e-12)


def test_input_that_needs_no_grad_still_gives_exact_parameter_grads():
    torch.manual_seed(0)
    chain = make_chain(["identity", "relu"], 3).double()
    x = torch.randn(2, 3, dtype=torch.float64)  # e.g. data: no gradient wanted
    chain(x, method=hbp.Exact()).pow(2).sum().backward()
    exact = [p.grad.clone() for p in chain.parameters()]
    chain.zero_grad()
    chain(x, method=hbp.Highway(k=2)).pow(2).sum().backward()
    assert x.grad is None
    for p, g in zip(chain.parameters(), exact):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_dropout_masks_are_replayed_in_the_backward():
    torch.manual_seed(0)
    chain = make_chain(["identity", "relu", "gated", "identity"], 8, dropout=0.5).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=True, seed=7)
    highway = grads_of(chain, x, hbp.Highway(k=4), per_layer_loss=True, seed=7)
    assert max_rel_diff(highway, exact) < 1e-10
    # Without replay the re-run would draw new masks and the gradient would be wrong.
    chain.preserve_rng_state = False
    wrong = grads_of(chain, x, hbp.Highway(k=4), per_layer_loss=True, seed=7)
    assert max_rel_diff(wrong, exact) > 1e-3


def test_backward_does_not_change_the_callers_rng_stream():
    torch.manual_seed(0)
    chain = make_chain(["identity"] * 2, 4, dropout=0.5).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.manual_seed(5)
    chain(x, method=hbp.Exact()).sum().backward()
    after_exact = torch.rand(3)
    torch.manual_seed(5)
    chain(x, method=hbp.Highway(k=2)).sum().backward()
    torch.testing.assert_close(torch.rand(3), after_exact)


class BNBlock(nn.Sequential):
    def __init__(self, width):
        super().__init__(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh())


@pytest.mark.parametrize("recompute", [True, False])
def test_batchnorm_statistics_are_exact_and_updated_once(recompute):
    torch.manual_seed(0)
    layers = [hbp.ResidualLayer(BNBlock(4)) for _ in range(3)]
    chain = hbp.ResidualChain(layers, recompute=recompute).double()
    reference = hbp.ResidualChain([hbp.ResidualLayer(BNBlock(4)) for _ in range(3)]).double()
    reference.load_state_dict(chain.state_dict())
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    exact = grads_of(reference, x, hbp.Exact(), per_layer_loss=False)
    highway = grads_of(chain, x, hbp.Highway(k=3), per_layer_loss=False)
    assert max_rel_diff(highway, exact) < 1e-10
    for (name, a), b in zip(chain.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, msg=f"buffer {name} differs")
    assert int(chain.layers[0].block[1].num_batches_tracked) == 1


def _downsample(x):  # [B, 2n] -> [B, n]: keep even features
    return x[:, ::2]


def _downsample_adjoint(v):  # [B, n] -> [B, 2n]
    out = v.new_zeros(v.shape[0], 2 * v.shape[1])
    out[:, ::2] = v
    return out


def test_linear_shortcut_chain_changes_shape_and_is_exact_at_k_equal_L():
    torch.manual_seed(0)
    shortcut = hbp.LinearShortcut(_downsample, _downsample_adjoint)
    shortcut.check_adjoint(torch.randn(2, 8, dtype=torch.float64))
    layers = [
        hbp.ResidualLayer(nn.Sequential(nn.Linear(8, 8), nn.Tanh())),
        hbp.ResidualLayer(nn.Sequential(nn.Linear(8, 4), nn.Tanh()), shortcut),
        hbp.ResidualLayer(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), hbp.ReLUResidual()),
    ]
    chain = hbp.ResidualChain(layers).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=False)
    for method in (hbp.Highway(k=3), hbp.FixedPoint(k=3), hbp.Highway(tol=1e-12, max_k=1)):
        est = grads_of(chain, x, method, per_layer_loss=False)
        assert max_rel_diff(est, exact) < 1e-10, method
    approx = grads_of(chain, x, hbp.Highway(k=1), per_layer_loss=False)
    assert max_rel_diff(approx, exact) > 1e-6


def test_retain_graph_allows_a_second_backward():
    torch.manual_seed(0)
    chain = make_chain(["identity"] * 2, 3).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    out = chain(x, method=hbp.Highway(k=2)).sum()
    out.backward(retain_graph=True)
    first = [p.grad.clone() for p in chain.parameters()]
    out.backward()
    for p, g in zip(chain.parameters(), first):
        torch.testing.assert_close(p.grad, 2 * g)


def test_gradient_fidelity_and_use_method():
    torch.manual_seed(0)
    model = ResidualMLP(5, 3, width=8, depth=4).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss_fn = lambda m: nn.functional.cross_entropy(m(x), y)
    report = hbp.gradient_fidelity(model, loss_fn, {"k0": hbp.Highway(k=0), "k4": hbp.Highway(k=4)})
    assert report["k4"]["cosine"] > 1 - 1e-12 and report["k4"]["rel_error"] < 1e-10
    assert report["k0"]["rel_error"] > 1e-6 and report["k0"]["iterations"] == [0]
    assert model.chain.method == hbp.Exact()  # restored
    assert all(p.grad is None for p in model.parameters())


def test_autocast_state_is_replayed_in_the_backward():
    torch.manual_seed(0)
    chain = make_chain(["identity", "relu", "identity"], 16)
    x = torch.randn(4, 16, requires_grad=True)

    def grads(method, autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = chain(x, method=method)
        return torch.autograd.grad(out.float().pow(2).sum(), [x, *chain.parameters()])

    exact_bf16 = grads(hbp.Exact(), True)
    highway_bf16 = grads(hbp.Highway(k=3), True)
    exact_fp32 = grads(hbp.Exact(), False)
    bf16_gap = max_rel_diff(exact_fp32, exact_bf16)
    assert bf16_gap > 1e-3  # autocast really changed the function
    # The backward re-ran the layers in bf16 too: it matches autocast backprop far more
    # closely than the fp32 function does.
    assert max_rel_diff(highway_bf16, exact_bf16) < 0.1 * bf16_gap
    assert all(g.dtype == torch.float32 for g in highway_bf16)


def test_recompute_false_keeps_forward_graphs_and_allows_one_backward():
    torch.manual_seed(0)
    chain = make_chain(["gated", "relu", "identity"], 5, dropout=0.3, recompute=False).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=True, seed=3)
    highway = grads_of(chain, x, hbp.Highway(k=3), per_layer_loss=True, seed=3)
    assert max_rel_diff(highway, exact) < 1e-10
    out = chain(x, method=hbp.Highway(k=1)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward()


def test_recompute_false_needs_the_loop_backend():
    with pytest.raises(ValueError, match=r"recompute=False.*vjp='loop'"):
        make_chain(["identity"], 3, recompute=False, vjp="batched")


def test_pass_through_block_vjp_is_not_overwritten_in_place():
    # For block = identity, autograd returns grad_output itself as the block VJP; the
    # iteration's in-place scan must not write into the estimate through that alias.
    torch.manual_seed(0)
    layers = [hbp.ResidualLayer(nn.Identity()), hbp.ResidualLayer(make_block(4)),
              hbp.ResidualLayer(nn.Identity(), hbp.Scaled(0.5)), hbp.ResidualLayer(make_block(4))]
    chain = hbp.ResidualChain(layers).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=True)
    for method in (hbp.Highway(k=4), hbp.FixedPoint(k=4)):
        assert max_rel_diff(grads_of(chain, x, method, per_layer_loss=True), exact) < 1e-10


@pytest.mark.parametrize("vjp", ["loop", "batched"])
@pytest.mark.parametrize("method", [hbp.Highway(k=1), hbp.Highway(k=3), hbp.FixedPoint(k=2),
                                    hbp.Highway(tol=1e-6, max_k=3)], ids=repr)  # fmt: skip
def test_layers_above_the_highest_returned_state_get_none_like_autograd(method, vjp):
    # a zero .grad (as before) is still moved by weight decay or momentum; autograd leaves None.
    # Layer 3 ties its weight to layer 1's: that one keeps layer 1's gradient.
    def grads(chain_method):
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double() for _ in range(3)]
        blocks[2][0].weight = blocks[0][0].weight
        chain = hbp.ResidualChain([hbp.ResidualLayer(b) for b in blocks], method=chain_method,
                                  vjp=vjp)  # fmt: skip
        x = torch.randn(5, 4, dtype=torch.float64)
        (h1,) = chain(x, return_states=(1,))
        (h1**2).sum().backward()
        return {name: p.grad for name, p in chain.named_parameters()}

    got, want = grads(method), grads(hbp.Exact())
    assert [n for n, g in want.items() if g is None] == [
        "layers.1.block.0.weight", "layers.1.block.0.bias", "layers.2.block.0.bias"]
    assert {n for n, g in got.items() if g is None} == {n for n, g in want.items() if g is None}
    for name, g in want.items():
        if g is not None:
            torch.testing.assert_close(got[name], g, rtol=1e-12, atol=0)
