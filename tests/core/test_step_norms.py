"""Step norms are computed only when something reads them (adaptive methods, a request)."""

from __future__ import annotations

import pytest
import torch

import highwaybp as hbp
from highwaybp.core import iteration
from highwaybp.core.iteration import StopRule
from highwaybp.schedules import Adaptive
from tests.core.helpers import grads_of, make_chain


def _chain(**kwargs):
    torch.manual_seed(0)
    return make_chain(["identity", "relu", "gated", "scaled", "identity"], 4, **kwargs).double()


def _x():
    torch.manual_seed(1)
    return torch.randn(3, 4, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("method", [hbp.Highway(k=3), hbp.FixedPoint(k=3)])
def test_fixed_k_computes_no_step_norms_unless_asked(method, monkeypatch):
    chain, x = _chain(), _x()
    asked = grads_of(_chain(record_step_norms=True), x, method, per_layer_loss=True)

    def refuse(*args):
        raise AssertionError("a step norm was computed although nothing reads it")

    monkeypatch.setattr(iteration, "_relative_step", refuse)
    plain = grads_of(chain, x, method, per_layer_loss=True)
    diag = chain.last_diagnostics
    assert diag.step_norms == [] and diag.iterations == 3 and diag.stop_reason == "fixed_k"
    for a, b in zip(plain, asked):
        assert torch.equal(a, b)  # the same estimate, bit for bit


@pytest.mark.parametrize("method", [hbp.Highway(k=3), hbp.FixedPoint(k=3)])
def test_requested_step_norms_are_the_relative_steps_of_the_estimates(method):
    chain, x = _chain(record_step_norms=True), _x()
    grads_of(chain, x, method, per_layer_loss=False)
    steps = chain.last_diagnostics.step_norms
    assert len(steps) == 3
    # w^j from state_gradients with k = j (the same iteration stopped at j)
    with torch.no_grad():  # grads_of's loss: (weights * out).sum() + 0.5 * (out**2).sum()
        out = chain(x, method=hbp.Exact())
    grad_out = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape) + out
    kind = type(method)
    ws = [torch.stack(chain.state_gradients(x.detach(), grad_out, kind(k=j))) for j in range(4)]
    expected = [float((ws[j] - ws[j - 1]).norm() / ws[j].norm()) for j in range(1, 4)]
    assert steps == pytest.approx(expected, rel=1e-10)
    assert min(expected) > 1e-6  # real steps, not zeros both ways


def test_the_attribute_is_read_at_each_forward():
    chain, x = _chain(), _x()
    grads_of(chain, x, hbp.Highway(k=2), per_layer_loss=False)
    assert chain.last_diagnostics.step_norms == []
    chain.record_step_norms = True
    grads_of(chain, x, hbp.Highway(k=2), per_layer_loss=False)
    assert len(chain.last_diagnostics.step_norms) == 2


def test_adaptive_methods_always_record_and_give_the_fixed_k_estimate():
    chain, x = _chain(), _x()
    assert chain.record_step_norms is False
    adaptive = grads_of(chain, x, hbp.Highway(tol=1e-3, max_k=5, fallback="last"), False)
    diag = chain.last_diagnostics
    assert len(diag.step_norms) == diag.iterations >= 1
    fixed = grads_of(chain, x, hbp.Highway(k=diag.iterations), False)
    for a, b in zip(adaptive, fixed):
        assert torch.equal(a, b)


def test_stop_rule_says_when_step_norms_are_needed():
    fixed, adaptive = hbp.Highway(k=2), hbp.Highway(tol=1e-3, max_k=4)
    assert not StopRule(fixed, 5).needs_step_norms
    assert StopRule(fixed, 5, record_steps=True).needs_step_norms
    assert StopRule(adaptive, 5).needs_step_norms
    rule = StopRule(fixed, 5)
    assert rule.record(1) is False and not rule.should_stop(1)
    assert rule.finish().step_norms == [] and rule.diag.iterations == 1
    with pytest.raises(ValueError, match="needs the step norm"):
        StopRule(adaptive, 5).record(1)


def test_gradient_fidelity_reports_step_norms_for_fixed_k_and_restores_the_switch():
    chain, x = _chain(), _x()
    report = hbp.gradient_fidelity(chain, lambda m: m(x).square().sum(), [hbp.Highway(k=2)])
    (entry,) = report.values()
    assert len(entry["step_norms"][0]) == 2
    assert chain.record_step_norms is False


def test_a_watching_controller_turns_step_norms_on():
    chain = _chain()
    hbp.KController(chain, "linear:0,2,10", total_steps=10).step(0)
    assert chain.record_step_norms is False  # nothing reads them
    ctl = hbp.KController(chain, Adaptive(target_cosine=0.5, probe_every=100))
    x = _x()
    ctl.step(0, loss_fn=lambda: chain(x).square().sum())
    assert chain.record_step_norms is True
    chain(x).square().sum().backward()
    assert len(chain.last_diagnostics.step_norms) == chain.last_diagnostics.iterations
