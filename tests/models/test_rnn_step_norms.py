"""Step norms in the RNN backward: computed only when something reads them.

A fixed k with record_step_norms off skips the norm pass (observed: no norm is computed and
the diagnostics have none) and gives the same gradient bit for bit; adaptive methods, the
switch, and core.fidelity.step_norms_recorded (the controllers' and the fidelity report's
way in) still get them, equal to the relative steps of the iteration.
"""

from __future__ import annotations

import pytest
import torch

import highwaybp as hbp
from highwaybp.core.fidelity import step_norms_recorded
from highwaybp.models.rnn import GRU, LSTM, CellRNN, Engine, GRUCellRef

T, B, IN, H = 7, 3, 4, 5
CELLS = {"gru": GRU, "lstm": LSTM}


class _CountNorms:
    """Counts the engine's norm passes (Engine._sq) while delegating to it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = Engine._sq

        def counting(eng, new, old, acc):
            self.calls += 1
            return original(eng, new, old, acc)

        monkeypatch.setattr(Engine, "_sq", counting)


def _grads(m, x):
    m.zero_grad()
    y, _ = m(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("iterate", ["fast", "reference"])
def test_fixed_k_skips_step_norms_unless_asked(cell, iterate, monkeypatch):
    torch.manual_seed(0)
    m = CELLS[cell](IN, H, method=hbp.Highway(k=2), iterate=iterate).double()
    x = torch.randn(T, B, IN, dtype=torch.float64)
    counter = _CountNorms(monkeypatch)
    off = _grads(m, x)
    d_off = m.last_diagnostics
    assert d_off.iterations == 2 and d_off.step_norms == []
    if iterate == "fast":
        assert counter.calls == 0  # the norm pass itself did not run
    m.record_step_norms = True
    on = _grads(m, x)
    d_on = m.last_diagnostics
    assert len(d_on.step_norms) == 2 and all(s > 0 for s in d_on.step_norms)
    if iterate == "fast":
        assert counter.calls > 0
    for a, b in zip(off, on):
        assert torch.equal(a, b)  # recording changes nothing in the estimate


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_adaptive_methods_always_get_step_norms(cell):
    torch.manual_seed(1)
    m = CELLS[cell](IN, H, method=hbp.Highway(tol=1e-6, max_k=T)).double()
    assert m.record_step_norms is False
    _grads(m, torch.randn(T, B, IN, dtype=torch.float64))
    d = m.last_diagnostics
    assert d.iterations >= 1 and len(d.step_norms) == d.iterations


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recorded_norms_are_the_relative_steps(cell):
    """With recording on, step j is ||w^j - w^(j-1)|| / ||w^j|| of the reference iteration
    (the fast loop's norms against the generic core loop's)."""
    torch.manual_seed(2)
    fast = CELLS[cell](IN, H, method=hbp.Highway(k=3), record_step_norms=True).double()
    ref = CELLS[cell](IN, H, method=hbp.Highway(k=3), iterate="reference",
                      record_step_norms=True).double()  # fmt: skip
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(T, B, IN, dtype=torch.float64)
    _grads(fast, x)
    _grads(ref, x)
    assert len(fast.last_diagnostics.step_norms) == 3
    assert fast.last_diagnostics.step_norms == pytest.approx(
        ref.last_diagnostics.step_norms, rel=1e-9
    )


def test_step_norms_recorded_context_switches_rnn_modules():
    torch.manual_seed(3)
    m = GRU(IN, H, method=hbp.Highway(k=1)).double()
    x = torch.randn(T, B, IN, dtype=torch.float64)
    with step_norms_recorded(m):
        assert m.record_step_norms is True
        _grads(m, x)
    assert m.record_step_norms is False
    assert len(m.last_diagnostics.step_norms) == 1


def test_cell_rnn_records_on_request_only():
    torch.manual_seed(4)
    rnn = CellRNN(GRUCellRef(IN, H).double(), method=hbp.Highway(k=2))
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(B, H, dtype=torch.float64)
    rnn(x, h0).sum().backward()
    assert rnn.last_diagnostics.step_norms == []
    rnn.record_step_norms = True
    rnn(x, h0).sum().backward()
    assert len(rnn.last_diagnostics.step_norms) == 2
