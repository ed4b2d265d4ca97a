"""The backward differentiates the function the forward ran, or refuses clearly.

Each case here once gave a silently wrong gradient or an unclear crash."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import highwaybp as hbp
from tests.core.helpers import grads_of, make_block, make_chain, max_rel_diff


def test_layer_overriding_forward_is_refused():
    class LayerScale(hbp.ResidualLayer):
        def forward(self, x):
            return x + 0.1 * self.block(x)

    with pytest.raises(TypeError, match=r"overrides forward\(\).*inside the block"):
        hbp.ResidualChain([LayerScale(nn.Linear(3, 3))])


def test_duck_typed_layer_is_refused():
    class Lookalike(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.residual = nn.Linear(3, 3), hbp.Identity()

        def forward(self, x):
            return x + self.block(x)

    with pytest.raises(TypeError, match="no residual decomposition"):
        hbp.ResidualChain([Lookalike()])


def test_forward_hook_on_a_layer_is_refused():
    chain = make_chain(["identity"] * 2, 3, method=hbp.Highway(k=1))
    chain.layers[0].register_forward_hook(lambda m, i, o: 0.5 * o)
    with pytest.raises(RuntimeError, match="forward hooks"):
        chain(torch.randn(2, 3))
    chain.recompute = False
    with pytest.raises(RuntimeError, match="forward hooks"):
        chain(torch.randn(2, 3))


@pytest.mark.parametrize("recompute", [True, False])
def test_block_writing_into_its_input_is_refused(recompute):
    block = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 3))
    chain = hbp.ResidualChain([hbp.ResidualLayer(nn.Linear(3, 3)), hbp.ResidualLayer(block)],
                              method=hbp.Highway(k=1), recompute=recompute)
    with pytest.raises(RuntimeError, match=r"modified its input in place.*inplace=False"):
        chain(torch.randn(2, 3)).sum().backward()


def test_buffers_updated_by_the_forward_are_replayed_as_they_were():
    # Spectral norm runs a power iteration in each training forward (updates buffer u).
    torch.manual_seed(0)
    layers = [hbp.ResidualLayer(nn.Sequential(spectral_norm(nn.Linear(4, 4)), nn.Tanh()))
              for _ in range(3)]
    chain = hbp.ResidualChain(layers).double()
    reference = hbp.ResidualChain(
        [hbp.ResidualLayer(nn.Sequential(spectral_norm(nn.Linear(4, 4)), nn.Tanh()))
         for _ in range(3)]).double()
    reference.load_state_dict(chain.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    exact = grads_of(reference, x, hbp.Exact(), per_layer_loss=False)
    highway = grads_of(chain, x, hbp.Highway(k=3), per_layer_loss=False)
    assert max_rel_diff(highway, exact) < 1e-10
    for a, b in zip(chain.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b)  # the forward's update happened once, not twice


def test_switching_to_eval_between_forward_and_backward_keeps_the_forward_function():
    torch.manual_seed(0)
    chain = make_chain(["identity", "relu", "gated"], 6, dropout=0.5).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    out = chain(x, method=hbp.Exact(), return_states=True)
    exact = torch.autograd.grad(out.pow(2).sum(), [x, *chain.parameters()])
    torch.manual_seed(1)
    out = chain(x, method=hbp.Highway(k=3), return_states=True)
    chain.eval()
    highway = torch.autograd.grad(out.pow(2).sum(), [x, *chain.parameters()])
    assert max_rel_diff(highway, exact) < 1e-10
    assert not chain.training and not chain.layers[0].block[2].training  # mode restored


def test_parameter_changed_in_place_before_backward_is_an_error():
    chain = make_chain(["identity"] * 2, 3, method=hbp.Highway(k=1))
    out = chain(torch.randn(2, 3)).sum()
    with torch.no_grad():
        chain.layers[0].block[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match=r"modified in place.*Run backward first"):
        out.backward()


def test_parameter_captured_in_a_closure_is_an_error_not_a_missing_gradient():
    proj = nn.Linear(4, 4, bias=False)
    shortcut = hbp.LinearShortcut(lambda x: proj(x), lambda v: v @ proj.weight)
    chain = hbp.ResidualChain([hbp.ResidualLayer(nn.Linear(4, 4), shortcut)],
                              method=hbp.Highway(k=1))
    out = chain(torch.randn(2, 4)).sum()
    with pytest.raises(RuntimeError, match=r"shape \(4, 4\) that requires grad.*Register"):
        out.backward()


def test_activation_from_outside_the_chain_is_an_error():
    cond = nn.Linear(3, 3)(torch.randn(2, 3))  # requires grad, lives in the outer graph

    class Conditioned(nn.Module):
        def forward(self, x):
            return torch.tanh(x + cond)

    chain = hbp.ResidualChain([hbp.ResidualLayer(Conditioned())], method=hbp.Highway(k=1))
    with pytest.raises(RuntimeError, match="not a parameter of the chain"):
        chain(torch.randn(2, 3, requires_grad=True)).sum().backward()


class SumBlock(nn.Module):
    """Its VJP w.r.t. x comes back from autograd as an expanded (stride-0) tensor."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(1, width)

    def forward(self, x):
        return torch.tanh(self.lin(x.sum(-1, keepdim=True)))


@pytest.mark.parametrize("scan", ["sequential", "hillis_steele"])
def test_expanded_block_vjps_are_copied_before_in_place_updates(scan):
    torch.manual_seed(0)
    layers = [hbp.ResidualLayer(SumBlock(4)), hbp.ResidualLayer(make_block(4)),
              hbp.ResidualLayer(SumBlock(4))]
    chain = hbp.ResidualChain(layers, scan=scan).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=True)
    for method in (hbp.Highway(k=3), hbp.FixedPoint(k=3)):
        assert max_rel_diff(grads_of(chain, x, method, per_layer_loss=True), exact) < 1e-10


def test_adaptive_reaching_L_is_exact_even_if_the_last_step_grew():
    # A growing path sum where the step at j = L (the exact estimate) is larger than at L-1.
    for seed in range(20):
        torch.manual_seed(seed)
        chain = make_chain(["identity", "relu"], 3, scale=6.0).double()
        x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=False)
        est = grads_of(chain, x, hbp.Highway(tol=1e-12, max_k=2, fallback="best"), False)
        diag = chain.last_diagnostics
        steps = diag.step_norms
        assert diag.stop_reason == "exact_after_L" and diag.converged and diag.fallback is None
        assert max_rel_diff(est, exact) < 1e-10
        if len(steps) == 2 and steps[1] > steps[0]:
            return  # the case that used to be taken for growth
    pytest.fail("no seed produced a growing last step; the test lost its case")


def test_state_gradients_checks_the_upstream_shape():
    chain = make_chain(["identity"] * 3, 4).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(3, 2, 4\)"):
        chain.state_gradients(x, torch.randn(2, 4, dtype=torch.float64), return_states=True)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(2, 4\)"):
        chain.state_gradients(x, torch.randn(5, 2, 4, dtype=torch.float64), hbp.Exact())


def test_gradient_fidelity_leaves_rng_and_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), hbp.ResidualChain(
        [hbp.ResidualLayer(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))] * 1)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(123)
    hbp.gradient_fidelity(model, lambda m: m(x).sum(), [hbp.Highway(k=1)])
    after = torch.rand(3)
    torch.manual_seed(123)
    torch.testing.assert_close(after, torch.rand(3))
    for a, b in zip(model.buffers(), buffers):
        torch.testing.assert_close(a, b)


def test_fixed_k_with_a_fallback_is_refused():
    with pytest.raises(ValueError, match="fallback are for the adaptive form"):
        hbp.Highway(k=3, fallback="best")


def test_public_scans_are_differentiable():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    a = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hbp.reverse_scan_sequential, (x, a))
    assert torch.autograd.gradcheck(hbp.reverse_scan_hillis_steele, (x, a))


class WarmUp(nn.Module):
    """Scales its output by a warm-up factor counted in a Python attribute."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.lin(x)) * min(1.0, self.calls / 4)


@pytest.mark.parametrize("vjp", ["loop", "batched"])
def test_python_state_changed_by_the_re_run_is_an_error_and_put_back(vjp):
    """Fails on eab6026 (before this fix): the re-run counted again (calls ended at 2) and
    the gradient at k = L was that of calls = 2, not of the forward's calls = 1."""
    torch.manual_seed(0)
    chain = hbp.ResidualChain([hbp.ResidualLayer(WarmUp(3)) for _ in range(2)], vjp=vjp)
    x = torch.randn(2, 3)
    out = chain(x, method=hbp.Highway(k=2)).sum()
    assert [layer.block.calls for layer in chain.layers] == [1, 1]
    with pytest.raises(RuntimeError, match=r"WarmUp.calls changed from 0 to 1.*outside the block"):
        out.backward()
    assert [layer.block.calls for layer in chain.layers] == [1, 1]


def test_python_state_the_re_run_leaves_alone_is_accepted():
    """A scalar the forward only reads is not an error; one the caller changes between
    forward and backward is replayed as the forward saw it (as autograd differentiates the
    forward's function) and keeps the caller's value afterwards."""
    torch.manual_seed(0)
    chain = make_chain(["scaled", "identity"], 3).double()
    chain.layers[0].block.note = "read-only"
    x = torch.randn(2, 3, dtype=torch.float64)
    expected = torch.autograd.grad(chain(x, method=hbp.Exact()).pow(2).sum(),
                                   list(chain.parameters()))
    out = chain(x, method=hbp.Highway(k=2)).pow(2).sum()
    chain.layers[1].block.note = "set after the forward"
    chain.zero_grad()
    out.backward()
    assert max_rel_diff([p.grad for p in chain.parameters()], expected) < 1e-10
    assert chain.layers[1].block.note == "set after the forward"


@pytest.mark.parametrize("vjp", ["loop", "batched"])
def test_hyper_parameter_changed_between_forward_and_backward_is_replayed(vjp):
    """Fails on eab6026 (before this fix): the backward used the new Scaled(c) and block
    scale, so the gradient was that of another function."""
    torch.manual_seed(0)
    layers = [hbp.ResidualLayer(ScaledTanh(3), hbp.Scaled(0.5)) for _ in range(3)]
    chain = hbp.ResidualChain(layers, vjp=vjp).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=True)
    out = chain(x, method=hbp.Highway(k=3), return_states=True)
    chain.layers[1].residual.c = 0.9
    chain.layers[2].block.scale = 3.0
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = (weights * out).sum() + 0.5 * (out**2).sum()
    highway = torch.autograd.grad(loss, [x, *chain.parameters()])
    assert max_rel_diff(highway, exact) < 1e-10
    assert chain.layers[1].residual.c == 0.9 and chain.layers[2].block.scale == 3.0


class ScaledTanh(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.scale = 1.0

    def forward(self, x):
        return self.scale * torch.tanh(self.lin(x))


@pytest.mark.parametrize("vjp", ["loop", "batched"])
def test_frozen_parameter_changed_in_place_before_backward_is_refused(vjp):
    """A frozen weight (a LoRA base, an EMA copy) changed in place after the forward: the
    re-run read its new value and the gradient was another model's, silently (found by the
    hostile review; autograd and recompute=False raised)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)]
    for b in blocks:
        b[0].weight.requires_grad_(False)
    chain = hbp.ResidualChain([hbp.ResidualLayer(b) for b in blocks], method=hbp.Highway(k=3),
                              vjp=vjp)
    y = chain(torch.randn(2, 4, requires_grad=True)).sum()
    with torch.no_grad():
        blocks[1][0].weight.mul_(3)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.backward()
