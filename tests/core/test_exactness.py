"""Highway at k = L equals autograd backprop of the same model (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import highwaybp as hbp
from tests.core.helpers import RESIDUAL_KINDS, grads_of, make_chain, max_rel_diff


@settings(max_examples=40, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(RESIDUAL_KINDS), min_size=1, max_size=12),
    width=st.integers(1, 16),
    batch=st.integers(1, 3),
    per_layer_loss=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
    recompute=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_highway_at_k_equal_L_is_backprop(
    kinds, width, batch, per_layer_loss, dropout, recompute, seed
):
    torch.manual_seed(seed)
    chain = make_chain(kinds, width, dropout=dropout, recompute=recompute).double()
    x = torch.randn(batch, width, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss, seed)
    highway = grads_of(chain, x, hbp.Highway(k=len(kinds)), per_layer_loss, seed)
    assert max_rel_diff(highway, exact) < 1e-10


@settings(max_examples=15, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(RESIDUAL_KINDS), min_size=1, max_size=8),
    width=st.integers(1, 8),
    per_layer_loss=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fixed_point_at_k_equal_L_is_backprop(kinds, width, per_layer_loss, seed):
    torch.manual_seed(seed)
    chain = make_chain(kinds, width).double()
    x = torch.randn(2, width, dtype=torch.float64, requires_grad=True)
    exact = grads_of(chain, x, hbp.Exact(), per_layer_loss, seed)
    fixed = grads_of(chain, x, hbp.FixedPoint(k=len(kinds)), per_layer_loss, seed)
    assert max_rel_diff(fixed, exact) < 1e-10


def test_hillis_steele_scan_in_chain_matches_sequential():
    torch.manual_seed(0)
    kinds = ["relu", "gated", "scaled", "identity", "relu"]
    seq = make_chain(kinds, 6).double()
    hs = make_chain(kinds, 6, scan="hillis_steele").double()
    hs.load_state_dict(seq.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    for k in (0, 2, 5):
        a = grads_of(seq, x, hbp.Highway(k=k), per_layer_loss=True)
        b = grads_of(hs, x, hbp.Highway(k=k), per_layer_loss=True)
        assert max_rel_diff(b, a) < 1e-12


def test_exact_method_on_chain_is_autograd_and_reports_exact():
    torch.manual_seed(0)
    chain = make_chain(["identity", "relu", "gated"], 4, dropout=0.3).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    (chain(x) ** 2).sum().backward()
    assert chain.last_diagnostics.stop_reason == "exact"
    assert chain.last_diagnostics.iterations == 0
    # Bit-identical to the same layers run as an nn.Sequential under autograd.
    chain_grads = [x.grad.clone(), *(p.grad.clone() for p in chain.parameters())]
    chain.zero_grad()
    x.grad = None
    torch.manual_seed(1)
    (nn.Sequential(*chain.layers)(x) ** 2).sum().backward()
    for a, b in zip(chain_grads, [x.grad, *(p.grad for p in chain.parameters())]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method", [hbp.Highway(k=4), hbp.FixedPoint(k=4)], ids=repr)
def test_state_gradients_at_k_equal_L_match_autograd_for_every_state(method):
    """Every w_i, not only w_0, equals dLoss/dh_i (compared with autograd per state)."""
    torch.manual_seed(2)
    chain = make_chain(["relu", "gated", "identity", "scaled"], 5).double()
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    h = [x]
    for layer in chain.layers:  # each state a graph node we can differentiate w.r.t.
        h.append(layer(h[-1]))
    grad_out = torch.randn(len(chain), 2, 5, dtype=torch.float64)
    auto = torch.autograd.grad(torch.stack(h[1:]), h, grad_out)
    ws = chain.state_gradients(x.detach(), grad_out, method=method, return_states=True)
    assert len(ws) == len(auto) == 5
    for i, (w, a) in enumerate(zip(ws, auto)):
        torch.testing.assert_close(w, a, rtol=1e-10, atol=1e-12, msg=f"state {i}")


def test_exact_state_gradients_match_autograd_per_state():
    torch.manual_seed(1)
    chain = make_chain(["relu", "gated", "identity"], 5).double()
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    states = chain(x, method=hbp.Exact(), return_states=True)
    grad_out = torch.randn_like(states)
    auto = torch.autograd.grad(states, x, grad_out)[0]
    ws = chain.state_gradients(x, grad_out, method=hbp.Exact(), return_states=True)
    h = [x]
    for layer in chain.layers:
        h.append(layer(h[-1]))
    per_state = torch.autograd.grad(torch.stack(h[1:]), h, grad_out)
    torch.testing.assert_close(per_state[0], auto, rtol=1e-12, atol=1e-12)
    assert len(ws) == len(per_state) == 4
    for i, (w, a) in enumerate(zip(ws, per_state)):
        torch.testing.assert_close(w, a, rtol=1e-12, atol=1e-12, msg=f"state {i}")


@pytest.mark.parametrize("vjp", ["loop", "batched"])
@pytest.mark.parametrize("indices", [(2, 4), (1, 5), (5,)])
def test_selected_states_are_per_state_losses(vjp, indices):
    """return_states=(i, j, ...): losses on those states are per-state losses; at k = L the
    gradient is autograd's (layers past the last selected state get zero, not None)."""

    def build(method):
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(5)]
        kw = {} if method.exact else {"vjp": vjp}
        return hbp.ResidualChain([hbp.ResidualLayer(b) for b in blocks], method=method,
                                 **kw).double()

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for chain in (build(hbp.Highway(k=5)), build(hbp.Exact())):
        outs = chain(x, return_states=indices)
        assert isinstance(outs, tuple) and len(outs) == len(indices)
        sum((o ** 2).sum() * (n + 1) for n, o in enumerate(outs)).backward()
        grads.append([x.grad.clone()] + [torch.zeros_like(p) if p.grad is None else p.grad
                                         for p in chain.parameters()])
        x.grad = None
    assert max(float((a - b).abs().max()) for a, b in zip(*grads)) < 1e-12
    with pytest.raises(ValueError, match="increasing state indices"):
        build(hbp.Highway(k=1))(x, return_states=(3, 2))
