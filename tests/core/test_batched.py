"""The batched (torch.func vmap) VJP backend equals the per-layer loop backend."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.core.backends.batched import BatchedVJP, check_batchable
from highwaybp.core.replay import capture_forward_state
from highwaybp.models.resnet import CifarResNet, PreActBlock
from highwaybp.models.transformer import GPT, EncoderClassifier
from tests.core.helpers import grads_of, max_rel_diff

V, T, B = 11, 5, 3


class ConvStack(nn.Module):
    """L identical pre-activation conv blocks with BatchNorm (one ResNet stage)."""

    def __init__(self, depth=4, ch=4):
        super().__init__()
        self.chain = hbp.ResidualChain(
            [hbp.ResidualLayer(PreActBlock(ch, ch), hbp.Identity()) for _ in range(depth)]
        )

    def forward(self, x):
        return self.chain(x)


class ReLUMLP(nn.Module):
    def __init__(self, depth=5, width=6):
        super().__init__()
        blocks = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)]
        self.chain = hbp.ResidualChain([hbp.ResidualLayer(b, hbp.ReLUResidual()) for b in blocks])

    def forward(self, x):
        return self.chain(x)


def _model(name):
    torch.manual_seed(0)
    if name == "gpt":
        return GPT(V, block_size=8, d_model=16, n_layer=2, n_head=2).double()
    if name == "encoder":
        return EncoderClassifier(V, 3, max_len=8, d_model=16, n_layer=2, n_head=2).double()
    if name == "encoder_no_affine":
        return EncoderClassifier(
            V, 3, max_len=8, d_model=16, n_layer=2, n_head=2, layer_norm_affine=False
        ).double()
    if name == "conv_bn":
        return ConvStack().double()
    return ReLUMLP().double()


def _grads(model, method, vjp):
    """Gradients w.r.t. the chain input and all parameters, with the chain's backend set."""
    model.chain.vjp = vjp
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    if isinstance(model, (GPT, EncoderClassifier)):
        ids = torch.randint(0, V, (B, T), generator=g)
        emb = model.embed(ids) if isinstance(model, GPT) else model.tok(ids) + model.pos.weight[:T]
        x = emb.detach().requires_grad_(True)
    elif isinstance(model, ConvStack):
        x = torch.randn(B, 4, 6, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    else:
        x = torch.randn(B, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    out = model.chain(x, method=method)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    ((w * out).sum() + (out**2).sum()).backward()
    return [x.grad] + [p.grad for p in model.parameters()], model.chain.last_diagnostics


NAMES = ["gpt", "encoder", "encoder_no_affine", "conv_bn", "relu_mlp"]


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_loop(name):
    model = _model(name)
    L = len(model.chain)
    for method in (hbp.Highway(k=0), hbp.Highway(k=2), hbp.Highway(k=L), hbp.FixedPoint(k=2)):
        loop, _ = _grads(model, method, "loop")
        batched, _ = _grads(model, method, "batched")
        n_checked = 0
        for a, b in zip(loop, batched):
            if a is None:
                assert b is None
                continue
            torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
            n_checked += 1
        assert n_checked >= 3


def test_batched_adaptive_exact_fallback_equals_loop():
    model = _model("gpt")
    method = hbp.Highway(tol=1e-30, max_k=1, fallback="exact")  # never converges -> exact
    loop, d_loop = _grads(model, method, "loop")
    batched, d_batched = _grads(model, method, "batched")
    assert d_batched.fallback == "exact" == d_loop.fallback
    exact, _ = _grads(model, hbp.Exact(), "loop")
    for a, b, e in zip(loop, batched, exact):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(b, e, atol=1e-9, rtol=1e-9)


def test_batched_batchnorm_stats_updated_once():
    base = _model("conv_bn")
    exact, batched = copy.deepcopy(base), copy.deepcopy(base)
    _grads(exact, hbp.Exact(), "loop")
    _grads(batched, hbp.Highway(k=1), "batched")
    for (name, a), (_, b) in zip(exact.named_buffers(), batched.named_buffers()):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)


def test_batched_groups_resnet_stages():
    """The paper-form ResNet batches per stage (3 groups of identical blocks)."""
    torch.manual_seed(0)
    resnet = CifarResNet(20, width=4, in_channels=1, downsample="updown").double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    h = resnet.stem(x)
    assert check_batchable(list(resnet.chain.layers), [h] * 9) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    grads = {}
    for vjp in ("loop", "batched"):
        resnet.zero_grad(set_to_none=True)
        resnet.chain.vjp = vjp
        with hbp.use_method(resnet, hbp.Highway(k=2)):
            resnet(x).square().sum().backward()
        grads[vjp] = [p.grad for p in resnet.parameters()]
    for a, b in zip(grads["loop"], grads["batched"]):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)


def test_batched_rejects_unbatchable_chains():
    x = torch.randn(2, 1, 8, 8)
    option_a = CifarResNet(20, width=4, in_channels=1, downsample="option_a", vjp="batched")
    with hbp.use_method(option_a, hbp.Highway(k=1)), pytest.raises(ValueError, match="linear K"):
        option_a(x.float()).sum().backward()
    gpt = GPT(V, block_size=8, d_model=16, n_layer=2, n_head=2, dropout=0.1, vjp="batched")
    ids = torch.randint(0, V, (B, T))
    with hbp.use_method(gpt, hbp.Highway(k=1)), pytest.raises(RuntimeError, match="vjp='loop'"):
        gpt.loss(ids, ids).backward()
    gpt.eval()  # no dropout in eval mode: batchable
    with hbp.use_method(gpt, hbp.Highway(k=1)):
        gpt.loss(ids, ids).backward()


class Configurable(nn.Module):
    """Layers of one class that differ in a non-parameter attribute."""

    def __init__(self, act=torch.tanh, factor=None, config=None) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = act
        self.factor = factor
        self.config = {"scale": 1.0} if config is None else config

    def forward(self, x):
        y = self.act(self.lin(x)) * self.config["scale"]
        return y if self.factor is None else y * self.factor


def _f64(value):
    return torch.tensor(value, dtype=torch.float64)


DIFFERING = {
    "function attribute": [Configurable(torch.tanh), Configurable(torch.sin),
                           Configurable(torch.tanh)],
    "plain tensor attribute": [Configurable(factor=_f64(1.0)), Configurable(factor=_f64(3.0)),
                               Configurable(factor=_f64(1.0))],
    "dict attribute": [Configurable(config={"scale": 1.0}), Configurable(config={"scale": 3.0}),
                       Configurable(config={"scale": 1.0})],
}


def _loop_and_batched(layers, method):
    torch.manual_seed(0)
    chain = hbp.ResidualChain([hbp.ResidualLayer(b) for b in layers]).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = {}
    for vjp in ("loop", "batched"):
        chain.vjp = vjp
        out[vjp] = grads_of(chain, x, method, per_layer_loss=True)
    return chain, out


@pytest.mark.parametrize("kind", list(DIFFERING))
@pytest.mark.parametrize("method", [hbp.Highway(k=3), hbp.Highway(k=1)], ids=repr)
def test_layers_differing_in_an_attribute_are_not_batched_together(kind, method):
    """Fails on eab6026 (before this fix): every layer ran layer 0's attribute (O(1) error)."""
    layers = [copy.deepcopy(b) for b in DIFFERING[kind]]
    chain, grads = _loop_and_batched(layers, method)
    assert max_rel_diff(grads["batched"], grads["loop"]) < 1e-12
    h = torch.randn(3, 4, dtype=torch.float64)
    assert check_batchable(list(chain.layers), [h] * 3) == [[0, 2], [1]]


def test_a_forward_hook_on_one_block_runs_on_that_block_only():
    """Fails on eab6026 (before this fix): layer 0's block (without the hook) ran for all."""
    layers = [Configurable() for _ in range(3)]
    layers[1].register_forward_hook(lambda m, i, o: 2 * o)
    chain, grads = _loop_and_batched(layers, hbp.Highway(k=3))
    assert max_rel_diff(grads["batched"], grads["loop"]) < 1e-12
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=True)
    assert max_rel_diff(grads_of(chain, x, hbp.Highway(k=3), per_layer_loss=True), exact) < 1e-10
    h = [torch.randn(2, 4, dtype=torch.float64) for _ in range(3)]
    states = [capture_forward_state(t, False, layer) for t, layer in zip(h, chain.layers)]
    backend = BatchedVJP(list(chain.layers), h, states)
    assert backend.groups == [[0, 2]] and backend.looped == [1]


def test_identical_layers_still_share_one_group():
    """The grouping rule keeps the speed-up where it is provably safe: equal attributes,
    equal plain tensors (distinct objects), the same function object."""
    layers = [hbp.ResidualLayer(Configurable(torch.sin, _f64(2.0), {"scale": 0.5}))
              for _ in range(4)]
    h = torch.randn(3, 4)
    assert check_batchable(layers, [h] * 4) == [[0, 1, 2, 3]]


def test_captured_tensor_is_an_error_as_with_the_loop_backend():
    """Fails on eab6026 (before this fix): vjp="batched" left the captured tensor's source
    without a gradient (None) instead of raising the loop backend's error."""
    stem = nn.Linear(3, 3).double()
    cond = stem(torch.randn(2, 3, dtype=torch.float64))

    class Conditioned(nn.Module):
        def forward(self, x):
            return torch.tanh(x + cond)

    for vjp in ("loop", "batched"):
        chain = hbp.ResidualChain([hbp.ResidualLayer(Conditioned()) for _ in range(2)],
                                  method=hbp.Highway(k=1), vjp=vjp)
        with pytest.raises(RuntimeError, match="not a parameter of the chain"):
            chain(torch.randn(2, 3, dtype=torch.float64, requires_grad=True)).sum().backward(
                retain_graph=True)
        assert stem.weight.grad is None


class _ItemBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * float(x.abs().max().item() > 0)


@pytest.mark.parametrize("make", [_ItemBlock, lambda: nn.Sequential(
    nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None))], ids=["item", "bn-momentum-none"])
def test_what_vmap_cannot_batch_is_a_clear_error(make):
    """torch's raw vmap message used to reach the user with no hint (hostile review M3)."""
    chain = hbp.ResidualChain([hbp.ResidualLayer(make()) for _ in range(3)],
                              method=hbp.Highway(k=2), vjp="batched")
    with pytest.raises(RuntimeError, match=r"vjp='batched' cannot vmap .*Use vjp='loop'"):
        chain(torch.randn(5, 4, requires_grad=True)).sum().backward()
