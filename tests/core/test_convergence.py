"""Error to exact backprop versus k, and the adaptive method's stopping rules."""

from __future__ import annotations

import pytest
import torch

import highwaybp as hbp
from tests.core.helpers import grads_of, make_chain


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("per_layer_loss", [False, True])
def test_error_non_increasing_in_k_for_contractive_blocks(seed, per_layer_loss):
    torch.manual_seed(seed)
    depth, width = 8, 6
    # Blocks scaled so that ||J|| is well below 1: the m-block path terms shrink with m.
    chain = make_chain(["identity", "relu", "scaled", "gated"] * 2, width, scale=0.2).double()
    x = torch.randn(4, width, dtype=torch.float64, requires_grad=True)
    exact = torch.cat([g.reshape(-1) for g in grads_of(chain, x, hbp.Exact(), per_layer_loss)])
    errors = []
    for k in range(depth + 1):
        est = grads_of(chain, x, hbp.Highway(k=k), per_layer_loss)
        errors.append(float((torch.cat([g.reshape(-1) for g in est]) - exact).norm()))
    for k in range(depth):
        assert errors[k + 1] <= errors[k] + 1e-12, errors
    assert errors[0] > 1e-3  # k = 0 is a real approximation here, not already exact
    assert errors[-1] < 1e-10 * float(exact.norm())


def test_adaptive_stops_on_tolerance_before_max_k():
    torch.manual_seed(0)
    chain = make_chain(["identity"] * 10, 5, scale=0.1).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    grads_of(chain, x, hbp.Highway(tol=1e-4, max_k=10), per_layer_loss=False)
    diag = chain.last_diagnostics
    assert diag.stop_reason == "tol" and diag.converged is True and diag.fallback is None
    assert diag.iterations < 10
    assert diag.step_norms[-1] < 1e-4 <= diag.step_norms[-2]


def _growing_chain():
    # Large blocks: the truncated path sum grows with k before it becomes exact at k = L.
    torch.manual_seed(0)
    return make_chain(["identity"] * 8, 4, scale=6.0).double()


def test_adaptive_falls_back_to_exact_when_the_step_grows():
    chain = _growing_chain()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss=False)
    est = grads_of(chain, x, hbp.Highway(tol=1e-9, max_k=6), per_layer_loss=False)
    diag = chain.last_diagnostics
    assert diag.stop_reason == "growth", diag
    assert diag.fallback == "exact" and diag.converged is False
    for a, b in zip(est, exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adaptive_best_fallback_returns_the_smallest_step_estimate():
    chain = _growing_chain()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    best = grads_of(chain, x, hbp.Highway(tol=1e-9, max_k=6, fallback="best"), False)
    steps = chain.last_diagnostics.step_norms
    k_best = min(range(len(steps)), key=lambda j: steps[j]) + 1
    fixed = grads_of(chain, x, hbp.Highway(k=k_best), False)
    for a, b in zip(best, fixed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_adaptive_reaching_L_is_exact_and_converged():
    torch.manual_seed(2)
    chain = make_chain(["relu"] * 3, 4).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    grads_of(chain, x, hbp.Highway(tol=1e-300, max_k=50), False)
    diag = chain.last_diagnostics
    assert diag.iterations == 3 and diag.converged is True and diag.fallback is None


def test_fixed_k_larger_than_depth_runs_only_L_iterations():
    torch.manual_seed(2)
    chain = make_chain(["identity"] * 3, 4).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    grads_of(chain, x, hbp.Highway(k=10), False)
    assert chain.last_diagnostics.iterations == 3
    assert chain.last_diagnostics.stop_reason == "exact_after_L"
