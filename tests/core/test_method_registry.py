"""A method says how it runs; the engines read that, not its class. Adding a method is one
class and one `register_method` line: the chain, the RNNs and the CLI's text form follow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.core.methods import METHODS, Method, method_from_string, register_method


@dataclass(frozen=True)
class ToyJacobi(Method):
    """A toy: the fixed-point iteration under another name (K = 0, k iterations)."""

    k: int = 1
    keeps_residual: ClassVar[bool] = False
    option_types: ClassVar[dict[str, type]] = {"k": int}

    @property
    def iteration_bound(self) -> int:
        return self.k


@pytest.fixture
def toy():
    register_method("toyjacobi")(ToyJacobi)
    yield ToyJacobi
    del METHODS["toyjacobi"]


def _chain_grads(method: Method, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 5)) for _ in range(4)]
    chain = hbp.ResidualChain([hbp.ResidualLayer(b) for b in blocks], method=method)
    chain.double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    (chain(x, return_states=True) ** 2).sum().backward()  # losses on every state
    return [x.grad, *(p.grad for p in chain.parameters())]


def test_text_form_round_trips_through_the_registry(toy):
    method = method_from_string("toyjacobi:k=2")
    assert method == ToyJacobi(k=2) and method.to_string() == "toyjacobi:k=2"
    with pytest.raises(ValueError, match="takes k"):
        method_from_string("toyjacobi:tol=1e-3")


def test_a_registered_method_runs_in_the_chain_as_its_attributes_say(toy):
    for k in (1, 2):
        ours, ref = _chain_grads(ToyJacobi(k=k)), _chain_grads(hbp.FixedPoint(k=k))
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    # And it is not Highway: with K = 0 and k = 1 the estimate differs.
    highway = _chain_grads(hbp.Highway(k=1))
    assert not torch.allclose(_chain_grads(ToyJacobi(k=1))[0], highway[0])
    exact = _chain_grads(hbp.Exact())
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(_chain_grads(ToyJacobi(k=4)),
                                                              exact))


def test_a_registered_method_runs_in_the_rnn_engines(toy):
    torch.manual_seed(0)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    grads = {}
    for name, method in (("toy", ToyJacobi(k=2)), ("fp", hbp.FixedPoint(k=2))):
        torch.manual_seed(1)
        rnn = hbp.GRU(3, 4, method=method).double()
        out, _ = rnn(x)
        (out ** 2).sum().backward()
        grads[name] = [p.grad for p in rnn.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads["toy"], grads["fp"]))


def test_registering_a_taken_name_is_refused(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_method("highway")(ToyJacobi)
