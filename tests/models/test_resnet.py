"""CIFAR ResNets: exactness at k = L in float64 for both forms and both downsampling modes."""

from __future__ import annotations

import copy

import pytest
import torch

import highwaybp as hbp
from highwaybp.models.resnet import (
    CifarResNet,
    ReLUShortcut,
    down,
    subsample_pad,
    subsample_pad_adjoint,
    up,
)

CASES = [(f, d) for f in ("pre", "post") for d in ("updown", "option_a")]


def _grads(model, x, method, seed=0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with hbp.use_method(model, method):
        logits = model(x)
    target = torch.arange(x.shape[0]) % logits.shape[1]
    loss = torch.nn.functional.cross_entropy(logits, target) + 0.1 * (logits**2).mean()
    loss.backward()
    return [x.grad] + [p.grad for p in model.parameters()]


def _small(form, downsample, depth=20, **kw):
    torch.manual_seed(0)
    return CifarResNet(
        depth, form=form, downsample=downsample, width=4, in_channels=1, **kw
    ).double()


@pytest.mark.parametrize("form,downsample", CASES)
def test_highway_k_equals_L_is_exact(form, downsample):
    model = _small(form, downsample)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    exact = _grads(model, x, hbp.Exact())
    L = model.num_layers
    assert L == 9
    highway = _grads(model, x, hbp.Highway(k=L))
    for g_e, g_h in zip(exact, highway):
        assert g_e is not None and g_h is not None
        torch.testing.assert_close(g_h, g_e, atol=1e-9, rtol=1e-9)
    # k < L is an approximation: it must differ somewhere (the test is not vacuous).
    low = _grads(model, x, hbp.Highway(k=0))
    assert max(float((a - b).abs().max()) for a, b in zip(low, exact)) > 1e-6


@pytest.mark.parametrize("form,downsample", CASES)
def test_fixedpoint_k_equals_L_is_exact(form, downsample):
    model = _small(form, downsample)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    exact = _grads(model, x, hbp.Exact())
    fp = _grads(model, x, hbp.FixedPoint(k=model.num_layers))
    for g_e, g_h in zip(exact, fp):
        torch.testing.assert_close(g_h, g_e, atol=1e-9, rtol=1e-9)


def test_parameter_counts_match_the_originals():
    expected = {20: 269_722, 32: 464_154, 56: 853_018, 110: 1_727_962}
    for depth, count in expected.items():
        for form in ("post", "pre"):
            model = CifarResNet(depth, form=form, downsample="option_a")
            assert sum(p.numel() for p in model.parameters()) == count
    assert CifarResNet(110, downsample="option_a").num_layers == 54
    assert CifarResNet(32, downsample="updown").num_layers == 15


def test_down_up_inverse_and_shortcut_adjoint():
    y = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(down(up(y)), y, atol=0, rtol=0)
    x = torch.randn(3, 4, 8, 6, dtype=torch.float64)
    v = torch.randn(3, 8, 4, 3, dtype=torch.float64)
    lhs = (subsample_pad(x, 4, 8) * v).sum()
    rhs = (x * subsample_pad_adjoint(v, 4, 8)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=1e-12)
    hbp.LinearShortcut(
        lambda t: subsample_pad(t, 4, 8), lambda t: subsample_pad_adjoint(t, 4, 8)
    ).check_adjoint(x)
    # The post-activation shortcut's K^T agrees with autograd through ReLU(S x + z).
    relu_sc = ReLUShortcut(4, 8)
    z = torch.randn(3, 8, 4, 3, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    y = relu_sc.combine(xg, z)
    (auto,) = torch.autograd.grad(y, xg, v)
    ctx = relu_sc.k_context(x, z, y.detach())
    torch.testing.assert_close(relu_sc.apply_kt(v, ctx), auto, atol=1e-12, rtol=1e-12)


def test_batchnorm_running_stats_match_exact_step():
    base = _small("post", "option_a")
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    models = {name: copy.deepcopy(base) for name in ("exact", "highway")}
    _grads(models["exact"], x, hbp.Exact())
    _grads(models["highway"], x, hbp.Highway(k=2))
    for (name, b_e), (_, b_h) in zip(
        models["exact"].named_buffers(), models["highway"].named_buffers()
    ):
        torch.testing.assert_close(b_h, b_e, atol=0, rtol=0, msg=name)
    # And the buffers moved exactly once (a second count would change running_mean again).
    assert int(models["highway"].chain.layers[0].block.bn1.num_batches_tracked) == 1


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="form"):
        CifarResNet(20, form="mid")
    with pytest.raises(ValueError, match="downsample"):
        CifarResNet(20, downsample="b")
    model = CifarResNet(20, downsample="option_a", width=4, in_channels=1)
    with pytest.raises(ValueError, match="even"):
        model(torch.randn(2, 1, 6, 6))
