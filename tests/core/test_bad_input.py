"""Bad input gets an error that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import highwaybp as hbp
from tests.core.helpers import make_chain


@pytest.mark.parametrize("k", [-1, -5])
def test_negative_k(k):
    with pytest.raises(ValueError, match="k must be >= 0"):
        hbp.Highway(k=k)
    with pytest.raises(ValueError, match="k must be >= 0"):
        hbp.FixedPoint(k=k)


@pytest.mark.parametrize("k", [1.5, "3", True, None])
def test_non_int_k(k):
    with pytest.raises(TypeError, match="k must be an int"):
        hbp.FixedPoint(k=k)


def test_non_int_k_highway():
    with pytest.raises(TypeError, match="k must be an int"):
        hbp.Highway(k=2.0)


def test_tol_without_max_k():
    with pytest.raises(ValueError, match="needs a bound"):
        hbp.Highway(tol=1e-3)


@pytest.mark.parametrize("kwargs", [{"tol": 0.0, "max_k": 5}, {"tol": -1, "max_k": 5},
                                    {"tol": float("nan"), "max_k": 5}])
def test_bad_tol(kwargs):
    with pytest.raises(ValueError, match="tol"):
        hbp.Highway(**kwargs)


def test_k_and_tol_together_and_bad_fallback():
    with pytest.raises(ValueError, match="either k"):
        hbp.Highway(k=2, tol=1e-3, max_k=4)
    with pytest.raises(ValueError, match="fallback"):
        hbp.Highway(tol=1e-3, max_k=4, fallback="hope")
    with pytest.raises(ValueError, match="max_k and fallback are for the adaptive"):
        hbp.Highway(max_k=4)


def test_residual_shape_mismatch():
    layer = hbp.ResidualLayer(nn.Linear(4, 3))
    chain = hbp.ResidualChain([layer], method=hbp.Highway(k=1))
    with pytest.raises(ValueError, match=r"does not match the layer input shape.*LinearShortcut"):
        chain(torch.randn(2, 4))


def test_gated_needs_a_pair():
    layer = hbp.ResidualLayer(nn.Linear(4, 4), hbp.Gated())
    with pytest.raises(TypeError, match="pair"):
        layer(torch.randn(2, 4))


def test_single_map_given_a_pair():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="Gated"):
        hbp.ResidualLayer(Pair())(torch.randn(2, 4))


def test_zero_layers():
    with pytest.raises(ValueError, match="at least one layer"):
        hbp.ResidualChain([])


def test_block_without_residual_decomposition():
    with pytest.raises(TypeError, match=r"no residual decomposition.*ResidualLayer"):
        hbp.ResidualChain([nn.Linear(3, 3)])


def test_residual_must_be_a_map():
    with pytest.raises(TypeError, match="residual map"):
        hbp.ResidualLayer(nn.Linear(3, 3), residual=lambda x, z: x + z)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_floating_input(dtype):
    chain = make_chain(["identity"], 3)
    with pytest.raises(TypeError, match="floating point"):
        chain(torch.zeros(2, 3, dtype=dtype), method=hbp.Highway(k=1))


def test_bad_method_and_scan_and_backend():
    with pytest.raises(TypeError, match="method must be"):
        make_chain(["identity"], 3, method="highway")
    with pytest.raises(ValueError, match="unknown scan"):
        make_chain(["identity"], 3, scan="magic")
    with pytest.raises(ValueError, match="unknown vjp backend"):
        make_chain(["identity"], 3, vjp="magic")


class Explode(nn.Module):
    """Finite forward, infinite local derivative: an Inf appears in the estimate."""

    def forward(self, x):
        return torch.sqrt(x - x.detach())  # value 0, derivative +inf


@pytest.mark.parametrize("record_step_norms", [True, False])
def test_nonfinite_estimate_names_layer_and_iteration(record_step_norms):
    layers = [hbp.ResidualLayer(nn.Linear(3, 3)), hbp.ResidualLayer(Explode()),
              hbp.ResidualLayer(nn.Linear(3, 3))]
    chain = hbp.ResidualChain(layers, method=hbp.Highway(k=2),
                              record_step_norms=record_step_norms)
    out = chain(torch.randn(2, 3)).sum()
    # with step norms every iteration is checked; without, the returned estimate (k = 2)
    iteration = 1 if record_step_norms else 2
    expected = rf"iteration {iteration}, entering at h_1, the input of layer 2"
    with pytest.raises(FloatingPointError, match=expected):
        out.backward()


def test_nonfinite_incoming_gradient():
    chain = make_chain(["identity"] * 2, 3, method=hbp.Highway(k=1))
    out = chain(torch.randn(2, 3))
    with pytest.raises(FloatingPointError, match="gradient flowing into the chain"):
        out.backward(torch.full_like(out, float("nan")))


def test_backward_twice_through_a_freed_chain():
    chain = make_chain(["identity"] * 2, 3, method=hbp.Highway(k=1))
    out = chain(torch.randn(2, 3)).sum()
    out.backward()
    with pytest.raises(RuntimeError, match=r"second time.*retain_graph=True"):
        out.backward()


def test_return_states_needs_uniform_shapes():
    shortcut = hbp.LinearShortcut(lambda x: x[:, :2], lambda v: nn.functional.pad(v, (0, 2)))
    layers = [hbp.ResidualLayer(nn.Linear(4, 4)), hbp.ResidualLayer(nn.Linear(4, 2), shortcut)]
    chain = hbp.ResidualChain(layers, method=hbp.Highway(k=1))
    with pytest.raises(ValueError, match="keep the state's shape"):
        chain(torch.randn(3, 4), return_states=True)


def test_linear_shortcut_adjoint_check_catches_a_wrong_adjoint():
    wrong = hbp.LinearShortcut(lambda x: 2 * x, lambda v: v)
    with pytest.raises(ValueError, match="adjoint mismatch"):
        wrong.check_adjoint(torch.randn(3, 4))


def test_method_from_string():
    assert hbp.method_from_string("highway:k=3") == hbp.Highway(k=3)
    assert hbp.method_from_string("highway:2") == hbp.Highway(k=2)
    assert hbp.method_from_string("fixedpoint:k=1") == hbp.FixedPoint(k=1)
    assert hbp.method_from_string("exact") == hbp.Exact()
    adaptive = hbp.method_from_string("highway:tol=1e-3,max_k=9,fallback=best")
    assert adaptive == hbp.Highway(tol=1e-3, max_k=9, fallback="best")
    with pytest.raises(ValueError, match="unknown method"):
        hbp.method_from_string("sgd")


@pytest.mark.parametrize(("text", "message"), [
    ("highway:k=2,k=3", "'k' given twice"),
    ("highway:tol=1e-3,max_k=4,tol=1e-4", "'tol' given twice"),
    ("exact:k=3", "'exact' takes no options"),
    ("exact:3", "'exact' takes no options"),
    ("fixedpoint:tol=1e-3", "'fixedpoint' takes k, anderson;"),
    ("highway:depth=3", "'highway' takes k, tol, max_k, fallback"),
    ("highway:k=two", "'k' .* must be an integer, got 'two'"),
    ("highway:tol=small,max_k=3", "'tol' .* must be a number"),
])
def test_method_from_string_bad_options(text, message):
    """Fails on eab6026 (before this fix): a repeated option silently kept the last value,
    exact:k=3 and fixedpoint:tol= gave a TypeError about a keyword argument, and a bad
    number gave int()'s message without the option's name."""
    with pytest.raises(ValueError, match=message):
        hbp.method_from_string(text)
