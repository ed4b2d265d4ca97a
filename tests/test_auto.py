"""`KController(model)` / "auto": the Auto schedule (bisection up to the break-even k, probes
over the parameters the method changes, a probe budget) and the one-device break-even table."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.control import ONE_DEVICE_BREAK_EVEN, break_even_k
from highwaybp.core.fidelity import changed_parameters, compare_gradients, use_method
from highwaybp.schedules import Auto, schedule_from_string

ROOT = Path(__file__).resolve().parents[1]
T, B, V, E, H = 12, 3, 11, 5, 6


class TinyLM(nn.Module):
    def __init__(self, decoder_scale: float = 1.0, recurrent_scale: float = 3.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.rnn = hbp.GRU(E, H)
        self.head = nn.Linear(H, V)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(recurrent_scale)
            self.head.weight.mul_(decoder_scale)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0])


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (T, B), generator=g), torch.randint(0, V, (T, B), generator=g)


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))


def _cosines(model, x, y, ks, anderson, changed=True):
    """Independent of the controller: the cosine to exact of Highway(k, anderson) per k."""
    params = list(model.parameters())
    with use_method(model, hbp.Exact()):
        exact = torch.autograd.grad(_loss(model, x, y), params)
    out = {}
    for k in ks:
        with use_method(model, hbp.Highway(k=k, anderson=anderson)):
            loss = _loss(model, x, y)
            mask = changed_parameters(loss, params)
            grad = torch.autograd.grad(loss, params)
        keep = mask if changed else [True] * len(params)
        pick_grad = [g for g, m in zip(grad, keep) if m]
        pick_exact = [g for g, m in zip(exact, keep) if m]
        out[k] = compare_gradients(pick_grad, pick_exact)["cosine"]
    return out


# ---- the break-even table is what the committed benches say -------------------------------
def _fit_break_even(points: dict[int, float], exact: float) -> int:
    ks = np.array(sorted(points), dtype=float)
    times = np.array([points[int(k)] for k in ks])
    slope, intercept = np.polyfit(ks, times, 1)
    return math.floor((exact - intercept) / slope) if exact >= intercept else -1


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_break_even_matches_the_committed_benches(cell):
    values = []
    for path in sorted(glob.glob(str(ROOT / f"results/rnn/bench_{cell}_*_2threads.json"))):
        records = json.loads(Path(path).read_text())["records"]
        total = {r["method"]: r["total_ms"] for r in records if r.get("layers", 1) == 1}
        points = {int(m[len("highway(k="):-1]): t for m, t in total.items()
                  if m.startswith("highway(k=")}
        values.append(_fit_break_even(points, total["hbp-exact"]))
    assert values
    assert ONE_DEVICE_BREAK_EVEN[cell.upper()] == min(values)


def test_chain_break_even_matches_the_committed_benches():
    for name in ("mlp", "transformer", "resnet"):
        results = json.loads((ROOT / f"results/deep/bench_{name}.json").read_text())["results"]
        k0 = [r["step_speedup_vs_exact"] for r in results if r.get("k") == 0]
        assert k0 and max(k0) < 1.0  # Highway(k=0) already slower: no k pays
    assert ONE_DEVICE_BREAK_EVEN["ResidualChain"] == -1


def test_break_even_of_a_model_is_its_least_paying_unit():
    assert break_even_k(TinyLM()) == ONE_DEVICE_BREAK_EVEN["GRU"]
    mixed = nn.ModuleList([TinyLM(), hbp.LSTM(3, 4)])
    assert break_even_k(mixed) == min(ONE_DEVICE_BREAK_EVEN["GRU"], ONE_DEVICE_BREAK_EVEN["LSTM"])
    chain = hbp.ResidualChain([hbp.ResidualLayer(nn.Linear(3, 3))], method=hbp.Highway(k=1))
    assert break_even_k(nn.ModuleList([TinyLM(), chain])) == -1


# ---- the controller ---------------------------------------------------------------------
def _train(ctl, model, steps, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        x, y = _data(seed + step)
        ctl.step(step, loss_fn=lambda x=x, y=y: _loss(model, x, y))
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


def test_default_controller_is_auto_and_text_round_trips():
    torch.manual_seed(0)
    ctl = hbp.KController(TinyLM())
    assert isinstance(ctl.schedule, Auto) and ctl.schedule.to_string() == "auto"
    spec = schedule_from_string("auto:target=0.9,every=7,anderson=3,budget=0.5,break_even=4")
    assert spec == Auto(target_cosine=0.9, probe_every=7, anderson=3, budget=0.5,
                        break_even_k=4)
    assert schedule_from_string(spec.to_string()) == spec
    with pytest.raises(ValueError, match="twice"):
        schedule_from_string("auto:target=0.9,target=0.5")
    with pytest.raises(ValueError, match="window"):
        Auto(anderson=1)
    with pytest.raises(ValueError, match="budget"):
        Auto(budget=0)


def test_bisection_picks_the_smallest_k_meeting_the_target():
    torch.manual_seed(1)
    model = TinyLM()
    x, y = _data(0)
    cos = _cosines(model, x, y, range(0, 9), anderson=3)
    ks_ok = [k for k in range(9) if cos[k] >= 0.99]
    assert ks_ok and ks_ok[0] > 0  # the case is not trivial: k = 0 misses the target
    want = ks_ok[0]
    ctl = hbp.KController(model, Auto(target_cosine=0.99, anderson=3, break_even_k=8))
    method = ctl.step(0, loss_fn=lambda: _loss(model, x, y))
    assert method == hbp.Highway(k=want, anderson=3)
    probed = ctl._pending["probed"]
    assert len(probed) <= 1 + math.ceil(math.log2(9))  # 8 first, then bisection
    for k, c in probed.items():
        assert c == pytest.approx(cos[k], abs=1e-12)


def test_no_k_under_break_even_meeting_the_target_trains_exact():
    torch.manual_seed(1)
    model = TinyLM()
    x, y = _data(0)
    cos = _cosines(model, x, y, [1], anderson=3)
    assert cos[1] < 0.99
    ctl = hbp.KController(model, Auto(target_cosine=0.99, anderson=3, break_even_k=1))
    assert ctl.step(0, loss_fn=lambda: _loss(model, x, y)) == hbp.Exact()


def test_probe_is_over_the_changed_parameters():
    """The decoder's gradient dominates the norm (a small decoder weight shrinks what flows
    back into the RNN, not the decoder's own gradient): over all parameters Highway(k=1)
    looks exact, over the RNN and embedding it does not; Auto must see the latter."""
    torch.manual_seed(2)
    model = TinyLM(decoder_scale=0.1)
    x, y = _data(0)
    all_params = _cosines(model, x, y, [1], anderson=3, changed=False)[1]
    changed = _cosines(model, x, y, [1], anderson=3, changed=True)[1]
    assert all_params >= 0.99 > changed
    ctl = hbp.KController(model, Auto(target_cosine=0.99, anderson=3, break_even_k=1))
    assert ctl.step(0, loss_fn=lambda: _loss(model, x, y)) == hbp.Exact()
    assert ctl._pending["probed"][1] == pytest.approx(changed, abs=1e-12)


def test_negative_break_even_never_probes():
    model = TinyLM()
    ctl = hbp.KController(model, Auto(break_even_k=-1))
    _train(ctl, model, 3)
    assert all(h["method"] == "Exact()" and h["probe_sweeps"] == 0 for h in ctl.history)


def test_probes_stay_within_the_budget():
    torch.manual_seed(3)
    model = TinyLM(recurrent_scale=1.0)
    sched = Auto(target_cosine=0.9999, probe_every=2, anderson=2, budget=0.5, break_even_k=4)
    ctl = hbp.KController(model, sched)
    _train(ctl, model, 40)
    hist = ctl.history
    probes = [h for h in hist if h.get("probed")]
    assert len(probes) >= 2  # it does probe again
    # without the budget it would probe every 2 steps
    assert len(probes) < 20
    # each probe after the first ran only when all probes so far stayed within the budget
    # of the training sweeps before it
    for h in probes[1:]:
        before = [e for e in hist if e["step"] <= h["step"]]
        train = sum(e["sweeps"] for e in before if e["step"] < h["step"])
        spent = sum(e["probe_sweeps"] for e in before)
        assert spent <= 0.5 * train


def test_auto_resume_equals_a_straight_run():
    def run(split):
        torch.manual_seed(4)
        model = TinyLM()
        sched = Auto(target_cosine=0.95, probe_every=3, anderson=3, break_even_k=3, budget=1.0)
        ctl = hbp.KController(model, sched)
        if split is None:
            _train(ctl, model, 10)
            return ctl
        _train(ctl, model, split)
        state = ctl.state_dict()
        ctl2 = hbp.KController(model, sched)
        ctl2.load_state_dict(state)
        assert vars(ctl2.auto) == vars(ctl.auto)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(split, 10):
            x, y = _data(step)
            ctl2.step(step, loss_fn=lambda x=x, y=y: _loss(model, x, y))
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        return ctl2

    straight = run(None)
    for split in (4, 7):
        resumed = run(split)
        assert [h["method"] for h in resumed.history] == [h["method"] for h in straight.history]
    # the same schedule text on hardware/models whose cost model differs: refused
    state = hbp.KController(TinyLM()).state_dict()  # GRU: break-even 1
    with pytest.raises(ValueError, match=r"Auto\(break_even_k=1\)"):
        hbp.KController(hbp.LSTM(3, 4)).load_state_dict(state)  # LSTM: 0
    # ... and doing what the message says resumes
    hbp.KController(hbp.LSTM(3, 4), Auto(break_even_k=1)).load_state_dict(state)
