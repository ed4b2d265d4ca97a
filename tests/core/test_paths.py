"""The identity behind the method (Theorems 1-2): w^k is the sum over all gradient paths
that cross at most k blocks; FixedPoint(k) is the Jacobi iteration. Checked with explicit
Jacobian matrices on tiny chains."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd.functional import jacobian

import highwaybp as hbp
from tests.core.helpers import make_chain


def layer_matrices(chain, x):
    """Per layer (K_i, J_i) as [n, n] matrices (row-vector convention) at the forward point."""
    mats, h = [], x
    for layer in chain.layers:
        shape = h.shape
        full = jacobian(lambda t, f=layer, s=shape: f(t.reshape(s)).reshape(-1), h.reshape(-1))
        # K = dr/dx with the block's output held fixed, by autograd on r itself (not from
        # the library's own apply_kt, so a wrong K would show here).
        with torch.no_grad():
            z = layer.block(h)
            y = layer.residual.combine(h, z)
        k_mat = jacobian(
            lambda t, r=layer.residual, z=z, s=shape: r.combine(t.reshape(s), z).reshape(-1),
            h.reshape(-1),
        )
        mats.append((k_mat, full - k_mat))
        h = y
    return mats


def upstream(num_layers, n, per_layer_loss):
    """A random dLoss/d(output) and the per-state g_0..g_L it means (g_0 = 0)."""
    grad_out = torch.randn((num_layers, 1, n) if per_layer_loss else (1, n), dtype=torch.float64)
    zero = torch.zeros(n, dtype=torch.float64)
    if per_layer_loss:
        return grad_out, [zero, *(grad_out[i].reshape(-1) for i in range(num_layers))]
    return grad_out, [zero] * num_layers + [grad_out.reshape(-1)]


def path_sum(mats, g, i, k):
    """sum_{j>=i} g_j @ sum over paths layer j..i+1 crossing at most k blocks (J)."""
    total = torch.zeros_like(g[i])
    num_layers = len(mats)
    for j in range(i, num_layers + 1):
        layers = list(range(j, i, -1))  # layers j, j-1, ..., i+1 (1-based)
        for n_blocks in range(min(k, len(layers)) + 1):
            for subset in itertools.combinations(layers, n_blocks):
                row = g[j]
                for m in layers:
                    k_mat, j_mat = mats[m - 1]
                    row = row @ (j_mat if m in subset else k_mat)
                total = total + row
    return total


@pytest.mark.parametrize("kinds", [
    ["identity"] * 4,
    ["relu", "gated", "scaled", "relu", "identity", "gated"],
    ["scaled", "relu"],
])
@pytest.mark.parametrize("per_layer_loss", [False, True])
def test_highway_estimate_is_the_short_path_sum(kinds, per_layer_loss):
    torch.manual_seed(3)
    n = 3
    chain = make_chain(kinds, n).double()
    x = torch.randn(1, n, dtype=torch.float64)
    num_layers = len(kinds)
    grad_out, g = upstream(num_layers, n, per_layer_loss)
    mats = layer_matrices(chain, x)
    for k in range(num_layers + 1):
        ws = chain.state_gradients(x, grad_out, hbp.Highway(k=k), return_states=per_layer_loss)
        for i in range(num_layers + 1):
            expected = path_sum(mats, g, i, k)
            torch.testing.assert_close(ws[i].reshape(-1), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("per_layer_loss", [False, True])
def test_fixed_point_is_the_jacobi_iteration(per_layer_loss):
    torch.manual_seed(4)
    n, kinds = 3, ["relu", "gated", "identity", "scaled", "relu"]
    chain = make_chain(kinds, n).double()
    x = torch.randn(1, n, dtype=torch.float64)
    num_layers = len(kinds)
    grad_out, g = upstream(num_layers, n, per_layer_loss)
    full = [k_mat + j_mat for k_mat, j_mat in layer_matrices(chain, x)]
    w = list(g)  # w^0 = g
    for k in range(num_layers + 2):
        ws = chain.state_gradients(x, grad_out, hbp.FixedPoint(k=k), return_states=per_layer_loss)
        for i in range(num_layers + 1):
            torch.testing.assert_close(ws[i].reshape(-1), w[i], rtol=1e-10, atol=1e-12)
        # Jacobi: w_i^{k+1} = g_i + w_{i+1}^k @ df_{i+1}/dh_i, all i from the old iterate.
        w = [g[i] + (w[i + 1] @ full[i] if i < num_layers else 0) for i in range(num_layers + 1)]
