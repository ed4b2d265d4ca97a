"""`ModuleShortcut`: r(x, z) = S(x) + z (or ReLU of it) for a shortcut module S, K = dS/dx.

float64 against autograd: Highway(k = L) and FixedPoint(k = L) are exact; the shortcut is
re-run under the forward's replayed RNG, train/eval modes and buffers like the block.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.core.residual import ModuleShortcut


def _block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
    )


def _projection(cin: int, cout: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Dropout(dropout), nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout)
    )


def _chain(relu: bool, dropout: float = 0.0, **kwargs) -> hbp.ResidualChain:
    torch.manual_seed(0)
    layers = [
        hbp.ResidualLayer(_block(3, 3, 1), hbp.ReLUResidual()),
        hbp.ResidualLayer(_block(3, 5, 2), ModuleShortcut(_projection(3, 5, dropout), relu)),
        hbp.ResidualLayer(_block(5, 5, 1), hbp.ReLUResidual()),
        hbp.ResidualLayer(_block(5, 7, 2), ModuleShortcut(_projection(5, 7, dropout), relu)),
    ]
    return hbp.ResidualChain(layers, **kwargs).double()


def _grads(chain, method, x, w, seed=3, switch_to_eval=False):
    chain = copy.deepcopy(chain)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = chain(x, method=method)
    if switch_to_eval:
        chain.eval()  # between forward and backward: the re-run must use the forward's modes
    (out * w).sum().backward()
    return [x.grad, *(p.grad for p in chain.parameters())], [b.clone() for b in chain.buffers()]


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4, 7, 2, 2, generator=g, dtype=torch.float64)
    return x, w


def _max_diff(a, b):
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("method", [hbp.Highway(k=4), hbp.FixedPoint(k=4)])
@pytest.mark.parametrize("recompute", [True, False])
def test_k_equal_L_equals_autograd(relu, method, recompute):
    chain = _chain(relu, recompute=recompute)
    x, w = _data()
    exact, exact_buffers = _grads(chain, hbp.Exact(), x, w)
    grads, buffers = _grads(chain, method, x, w)
    assert _max_diff(grads, exact) < 1e-10
    assert all(torch.equal(a, b) for a, b in zip(buffers, exact_buffers))
    assert _max_diff(_grads(chain, hbp.Highway(k=1), x, w)[0], exact) > 1e-3


def test_state_gradients_exact_matches_autograd_input_gradient():
    chain = _chain(True)
    x, w = _data()
    exact, _ = _grads(chain, hbp.Exact(), x, w)
    ws = copy.deepcopy(chain).state_gradients(x, w, method=hbp.Exact())
    assert _max_diff([ws[0]], [exact[0]]) < 1e-12


def test_dropout_in_the_shortcut_is_replayed():
    chain = _chain(True, dropout=0.3)
    x, w = _data()
    exact, _ = _grads(chain, hbp.Exact(), x, w)
    grads, _ = _grads(chain, hbp.Highway(k=4), x, w)
    assert _max_diff(grads, exact) < 1e-10


def test_train_mode_of_the_shortcut_is_replayed():
    """model.eval() between forward and backward: K is still the train-mode BatchNorm's."""
    chain = _chain(False)
    x, w = _data()
    exact, _ = _grads(chain, hbp.Exact(), x, w, switch_to_eval=True)
    grads, _ = _grads(chain, hbp.Highway(k=4), x, w, switch_to_eval=True)
    assert _max_diff(grads, exact) < 1e-10


def test_refusals():
    with pytest.raises(TypeError, match=r"nn\.Module shortcut"):
        ModuleShortcut(lambda x: x)
    layer = hbp.ResidualLayer(_block(3, 5, 2), ModuleShortcut(nn.Conv2d(3, 5, 1)))  # no stride
    with pytest.raises(ValueError, match="shortcut output shape"):
        layer(torch.randn(2, 3, 8, 8))
    chain = _chain(True, vjp="batched")
    x, w = _data()
    with pytest.raises(ValueError, match="vjp='loop'"):
        _grads(chain, hbp.Highway(k=1), x, w)
