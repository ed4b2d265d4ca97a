"""Hooks under a Highway/FixedPoint chain behave as under autograd, or are refused.

Parameter hooks (register_hook, register_post_accumulate_grad_hook) run once per backward on
the parameter's total gradient, at every k, for both VJP backends, with tied and shared
weights. Module backward hooks, double backward and torch.func transforms are refused with
an error that says to use Exact().
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import highwaybp as hbp
from tests.core.helpers import make_block, make_chain, max_rel_diff

L = 4
BACKENDS = [("loop", True), ("loop", False), ("batched", True)]


def _chain(vjp: str, recompute: bool) -> hbp.ResidualChain:
    torch.manual_seed(0)
    return make_chain(["identity", "scaled", "identity", "scaled"], 5, vjp=vjp,
                      recompute=recompute).double()


def _param_grads(chain, method, x):
    chain.zero_grad(set_to_none=True)
    out = chain(x, method=method, return_states=True)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    ((weights * out).sum() + out.pow(2).sum()).backward()
    return [p.grad.clone() for p in chain.parameters()]


@pytest.mark.parametrize(("vjp", "recompute"), BACKENDS)
@pytest.mark.parametrize("method", [hbp.Highway(k=L), hbp.FixedPoint(k=L), hbp.Highway(k=1),
                                    hbp.FixedPoint(k=2), hbp.Exact()], ids=repr)
def test_parameter_hook_runs_once_on_the_total_gradient(vjp, recompute, method):
    """A hook g -> 0.5 g scales that parameter's gradient by 0.5, once, at every k.

    Fails on eab6026 (before this fix): the loop backend's parameter sweep ran
    autograd.grad on the parameters (hook applied), then AccumulateGrad ran it again (0.25x).
    """
    chain = _chain(vjp, recompute)
    x = torch.randn(3, 5, dtype=torch.float64)
    plain = _param_grads(chain, method, x)
    hooked = chain.layers[1].block[0].weight
    calls = []
    handle = hooked.register_hook(lambda g: (calls.append(1), 0.5 * g)[1])
    with_hook = _param_grads(chain, method, x)
    handle.remove()
    assert len(calls) == 1
    for p, a, b in zip(chain.parameters(), plain, with_hook):
        torch.testing.assert_close(b, 0.5 * a if p is hooked else a, rtol=1e-12, atol=1e-14)
    if method in (hbp.Highway(k=L), hbp.FixedPoint(k=L)):  # exact: equal to autograd + hook
        handle = hooked.register_hook(lambda g: 0.5 * g)
        exact = _param_grads(chain, hbp.Exact(), x)
        handle.remove()
        assert max_rel_diff(with_hook, exact) < 1e-10


@pytest.mark.parametrize(("vjp", "recompute"), BACKENDS)
def test_post_accumulate_grad_hook_runs_once_and_sees_the_final_grad(vjp, recompute):
    chain = _chain(vjp, recompute)
    x = torch.randn(3, 5, dtype=torch.float64)
    exact = _param_grads(chain, hbp.Exact(), x)
    seen = []
    params = list(chain.parameters())
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: seen.append((p, p.grad.clone())))
    highway = _param_grads(chain, hbp.Highway(k=L), x)
    assert [id(p) for p, _ in sorted(seen, key=lambda s: id(s[0]))] == sorted(map(id, params))
    for p, grad in seen:
        torch.testing.assert_close(grad, p.grad, rtol=0, atol=0)
    assert max_rel_diff(highway, exact) < 1e-10


class TwoUses(nn.Module):
    """Uses one Linear twice in its forward (a tied weight inside a block)."""

    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.first, self.second = shared, shared

    def forward(self, x):
        return torch.tanh(self.second(torch.tanh(self.first(x))))


def _tied_model():
    """One weight in two layers, one Linear used twice in a block, and a weight shared with
    a module outside the chain (a tied embedding/head)."""
    torch.manual_seed(0)
    stem = nn.Linear(5, 5)
    shared = nn.Linear(5, 5)
    layers = [hbp.ResidualLayer(make_block(5)), hbp.ResidualLayer(TwoUses(nn.Linear(5, 5))),
              hbp.ResidualLayer(make_block(5)), hbp.ResidualLayer(nn.Sequential(shared, nn.Tanh())),
              hbp.ResidualLayer(nn.Sequential(shared, nn.Tanh()))]
    layers[2].block[0].weight = layers[0].block[0].weight
    layers[0].block[3].weight = stem.weight
    chain = hbp.ResidualChain(layers)
    return nn.ModuleDict({"stem": stem, "chain": chain}).double()


@pytest.mark.parametrize("vjp", ["loop", "batched"])
@pytest.mark.parametrize("method", [hbp.Highway(k=5), hbp.FixedPoint(k=5)], ids=repr)
def test_tied_and_shared_weights_run_their_hooks_once_on_the_summed_gradient(vjp, method):
    """Fails on eab6026 (before this fix): with vjp="loop" the hooks ran twice (0.25x the
    gradient); with vjp="batched" the block using one Linear twice crashed (functional_call
    left that Linear's parameters swapped for the stacked ones)."""
    model = _tied_model()
    model["chain"].vjp = vjp
    x = torch.randn(3, 5, dtype=torch.float64)
    tied = [model["chain"].layers[0].block[0].weight, model["chain"].layers[1].block.first.weight,
            model["chain"].layers[3].block[0].weight, model["stem"].weight]
    calls: dict[str, list] = {"exact": [], "highway": []}

    def grads(m, key):
        model.zero_grad(set_to_none=True)
        handles = [p.register_hook(lambda g: (calls[key].append(1), 0.5 * g)[1]) for p in tied]
        with hbp.use_method(model, m):
            model["chain"](model["stem"](x)).pow(2).sum().backward()
        for h in handles:
            h.remove()
        return [p.grad for p in model.parameters()]

    exact = grads(hbp.Exact(), "exact")
    highway = grads(method, "highway")
    assert len(calls["exact"]) == len(tied) == len(calls["highway"])
    assert max_rel_diff(highway, exact) < 1e-10


def test_module_backward_hooks_in_a_layer_are_refused():
    """Fails on eab6026 (before this fix): the block's full backward hook ran at every
    iteration on an estimate (and its change of grad_input was silently mixed in)."""
    for register in ("register_full_backward_hook", "register_full_backward_pre_hook"):
        chain = make_chain(["identity"] * 2, 3, method=hbp.Highway(k=1))
        getattr(chain.layers[1].block[0], register)(lambda *args: None)
        with pytest.raises(RuntimeError, match=r"module backward hook.*method=Exact\(\)"):
            chain(torch.randn(2, 3)).sum().backward()
        chain(torch.randn(2, 3), method=hbp.Exact()).sum().backward()  # autograd: allowed


def test_double_backward_is_refused_with_advice():
    chain = make_chain(["identity"] * 2, 3, method=hbp.Highway(k=2)).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = chain(x).pow(2).sum()
    with pytest.raises(RuntimeError, match=r"double backward.*unsupported.*Exact\(\)"):
        torch.autograd.grad(out, x, create_graph=True)
    (g,) = torch.autograd.grad(chain(x, method=hbp.Exact()).pow(2).sum(), x, create_graph=True)
    g.sum().backward()  # Exact() is plain autograd: double backward works


def test_torch_func_transforms_are_refused_with_advice():
    chain = make_chain(["identity"] * 2, 3, method=hbp.Highway(k=2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"torch.func transforms.*unsupported.*Exact\(\)"):
        torch.func.grad(lambda x: chain(x).sum())(x)
    exact = torch.func.grad(lambda x: chain(x, method=hbp.Exact()).sum())(x)
    x.requires_grad_(True)
    (auto,) = torch.autograd.grad(chain(x, method=hbp.Exact()).sum(), x)
    torch.testing.assert_close(exact, auto)


class FlatWeights(nn.Module):
    """Keeps its own reference to a parameter (as nn.LSTM's flat weights do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.refs = [self.lin.weight]

    def forward(self, x):
        return torch.tanh(x @ self.refs[0].T + self.lin.bias)


def test_parameter_used_through_its_own_reference_gets_the_exact_gradient():
    """The re-run cannot alias a parameter a module reaches through its own reference: the
    gradient is still exact, and a hook on it (which would run twice) is refused.
    Fails on eab6026 (before this fix): the hook ran twice, no error."""
    torch.manual_seed(0)
    chain = hbp.ResidualChain([hbp.ResidualLayer(FlatWeights()) for _ in range(3)]).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    exact = _param_grads(chain, hbp.Exact(), x)
    assert max_rel_diff(_param_grads(chain, hbp.Highway(k=3), x), exact) < 1e-10
    handle = chain.layers[0].block.lin.weight.register_hook(lambda g: 0.5 * g)
    with pytest.raises(RuntimeError, match=r"hook.*outside _parameters"):
        _param_grads(chain, hbp.Highway(k=3), x)
    chain.vjp = "batched"
    with pytest.raises(RuntimeError, match=r"hook.*outside _parameters"):
        _param_grads(chain, hbp.Highway(k=3), x)
    handle.remove()
    with pytest.raises(ValueError, match=r"outside _parameters.*vjp='loop'"):
        _param_grads(chain, hbp.Highway(k=3), x)


def test_global_module_hooks():
    """A global forward hook runs on each layer's own block under vjp="batched" (all layers
    run unbatched); a global backward hook is refused. Fails on eab6026 (before this fix):
    the batched backend ran layer 0's block, once, for the whole group."""
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_full_backward_hook,
    )

    torch.manual_seed(0)
    chain = make_chain(["identity"] * 3, 4, vjp="batched").double()
    x = torch.randn(2, 4, dtype=torch.float64)
    scales = {id(layer.block[0]): float(i + 1) for i, layer in enumerate(chain.layers)}
    handle = register_module_forward_hook(lambda m, i, o: o * scales.get(id(m), 1.0))
    try:
        exact = _param_grads(chain, hbp.Exact(), x)
        batched = _param_grads(chain, hbp.Highway(k=3), x)
    finally:
        handle.remove()
    assert max_rel_diff(batched, exact) < 1e-10
    handle = register_module_full_backward_hook(lambda *args: None)
    try:
        with pytest.raises(RuntimeError, match=r"global module backward hook.*Exact\(\)"):
            _param_grads(chain, hbp.Highway(k=3), x)
    finally:
        handle.remove()


def test_module_backward_hooks_are_refused_with_recorded_graphs_too():
    """recompute=False skipped the hook checks (the hook then ran once per iteration on
    estimates); found by the hostile review."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)]
    blocks[1][0].register_full_backward_hook(lambda m, gi, go: None)
    chain = hbp.ResidualChain([hbp.ResidualLayer(b) for b in blocks], method=hbp.Highway(k=3),
                              recompute=False)
    with pytest.raises(RuntimeError, match="module backward hook"):
        chain(torch.randn(2, 4, requires_grad=True))
