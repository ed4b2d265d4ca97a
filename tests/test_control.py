"""KController: sets every chain and RNN, counts sweeps, resumes, and Adaptive's logic
(raises k when the gradient's fidelity falls, falls back to exact when the estimate
diverges)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import highwaybp as hbp
from highwaybp import Exact, Highway, KController
from highwaybp.control import EXACT_SWEEPS
from highwaybp.schedules import Adaptive, Constant, Finish, Linear, Steps

D = 6


def _linear_chain(num_layers: int, scale: float, seed: int = 0) -> hbp.ResidualChain:
    """h_i = h_{i-1} + W_i h_{i-1}, W_i ~ scale * N(0, 1/D): the path-sum terms with m blocks
    grow like (L choose m) scale^m, so a large scale makes the truncated sum move away from
    the gradient (the transient growth of the path sum, docs/rnn.md) and a small one makes
    k = 0 or 1 exact enough."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        lin = nn.Linear(D, D, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(D, D, generator=gen, dtype=torch.float64))
            lin.weight.mul_(scale / D**0.5)
        layers.append(hbp.ResidualLayer(lin))
    return hbp.ResidualChain(layers)


def _set_scale(chain: hbp.ResidualChain, old: float, new: float) -> None:
    with torch.no_grad():
        for layer in chain.layers:
            layer.block.weight.mul_(new / old)


class Nested(nn.Module):
    """Two ResidualChains (one inside a Sequential) and a highwaybp GRU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = _linear_chain(4, 0.3, seed=1)
        self.inner = nn.Sequential(nn.Tanh(), _linear_chain(2, 0.3, seed=2))
        self.rnn = hbp.GRU(D, D, method=Exact()).double()

    def forward(self, x: Tensor) -> Tensor:
        """x [T, B, D] -> [T, B, D]."""
        h = self.inner(self.first(x))
        return self.rnn(h)[0]


def _data(T: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(T, 2, D, generator=g, dtype=torch.float64),
        torch.randn(T, 2, D, generator=g, dtype=torch.float64),
    )


def _train_step(model: nn.Module, ctl: KController, step: int, x: Tensor, y: Tensor, opt=None):
    ctl.step(step, loss_fn=lambda: ((model(x) - y) ** 2).mean())
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad()
        with torch.no_grad():  # and the first chain's Jacobians grow: k has to follow
            for layer in model.first.layers:
                layer.block.weight.mul_(1.25)


def test_controller_sets_every_chain_and_rnn_in_a_nested_model():
    model = Nested()
    x, y = _data()
    schedule = Steps({0: Highway(k=1), 2: Highway(k=3), 4: Exact()})
    ctl = KController(model, schedule)
    modules = [model.first, model.inner[1], model.rnn]
    for step in range(5):
        method = ctl.step(step)
        assert method == schedule(step)
        assert [m.method for m in modules] == [schedule(step)] * 3
        ((model(x) - y) ** 2).mean().backward()
    assert [h["method"] for h in ctl.history] == [repr(schedule(t)) for t in range(5)]


def test_sweeps_are_iterations_plus_one_weighted_by_layers():
    model = Nested()
    x, y = _data(T=5)
    ctl = KController(model, Constant(Highway(k=3)))
    ctl.step(0)
    ((model(x) - y) ** 2).mean().backward()
    (entry,) = ctl.history
    # chain of 4 runs 3 iterations, chain of 2 stops at 2 (exact after L), GRU (T = 5) runs 3
    assert entry["iterations"] == [3, 2, 3]
    assert entry["sweeps"] == pytest.approx((4 * (3 + 1) + 2 * (2 + 1) + 1 * (3 + 1)) / 7)
    ctl.step(1)  # an exact step: 2 sweeps whatever the depth
    assert ctl.method == Highway(k=3)
    ctl2 = KController(model, "exact")
    ctl2.step(0)
    ((model(x) - y) ** 2).mean().backward()
    assert ctl2.history[0]["sweeps"] == EXACT_SWEEPS


def test_loss_fn_is_only_called_when_the_schedule_probes():
    model = Nested()

    def loss_fn() -> Tensor:
        raise AssertionError("a fixed schedule must not evaluate the loss")

    ctl = KController(model, Linear(0, 2, 4))
    for step in range(3):
        ctl.step(step, loss_fn=loss_fn)
    adaptive = KController(model, Adaptive(probe_every=2))
    with pytest.raises(ValueError, match="loss_fn"):
        adaptive.step(0)


def test_steps_must_increase_and_model_must_have_chains():
    ctl = KController(Nested(), "highway:k=1")
    ctl.step(3)
    with pytest.raises(ValueError, match="steps must increase"):
        ctl.step(3)
    with pytest.raises(ValueError, match="no ResidualChain"):
        KController(nn.Linear(2, 2), "exact")


def test_probe_leaves_grads_rng_and_buffers_untouched():
    torch.manual_seed(0)
    chain = _linear_chain(3, 0.3)
    model = nn.Sequential(nn.BatchNorm1d(D).double(), chain)
    x = torch.randn(8, D, dtype=torch.float64)
    ctl = KController(model, Adaptive(probe_every=1, k_max=3))
    rng = torch.get_rng_state()
    mean_before = model[0].running_mean.clone()
    ctl.step(0, loss_fn=lambda: (model(x) ** 2).sum())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model[0].running_mean, mean_before)
    assert ctl.history == []  # no backward yet: the step's entry is still open


def _grow_run(ctl: KController, chain: hbp.ResidualChain, steps: int, scales: list[float]):
    x = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for step in range(steps):
        _train_step(chain, ctl, step, x, t)
        chain.zero_grad()
        _set_scale(chain, scales[step], scales[step + 1])  # "training" makes J larger


def test_adaptive_raises_k_when_fidelity_falls():
    """Blocks whose Jacobians grow step by step: the cosine at a fixed k falls (at k = 1:
    ~1.0 at scale 0.05, 0.75 at scale 1). Adaptive must move from a small k to a larger
    one, and each probe's choice must be the smallest probed k meeting the target."""
    chain = _linear_chain(8, 0.05)
    steps = 24
    scales = [0.05 + (1.0 - 0.05) * t / steps for t in range(steps + 1)]
    schedule = Adaptive(target_cosine=0.99, probe_every=6, k_max=7, rise=float("inf"))
    ctl = KController(chain, schedule)
    _grow_run(ctl, chain, steps, scales)
    probes = [h for h in ctl.history if "probed" in h]
    assert len(probes) == 4
    chosen = [int(h["method"].split("=")[1].rstrip(")")) for h in probes]
    assert chosen[0] <= 1
    assert chosen[-1] >= chosen[0] + 2, chosen
    assert chosen == sorted(chosen)
    for h, k in zip(probes, chosen):
        assert h["probed"][k] >= 0.99
        if k - 1 in h["probed"]:
            assert h["probed"][k - 1] < 0.99
        assert h["cosine"] == h["probed"][k]
    # a probe costs its forwards and backwards: exact (1 + 2) + each Highway k (1 + k + 1)
    first = probes[0]
    assert first["probe_sweeps"] == pytest.approx(3 + sum(k + 2 for k in first["probed"]))


def test_adaptive_raises_k_between_probes_when_step_norms_stop_shrinking():
    """One probe (step 0) only; the growing Jacobians make the last iteration's relative
    step grow, and the watch must raise k before any further probe."""
    chain = _linear_chain(8, 0.05)
    steps = 30
    scales = [0.05 * 1.15**t for t in range(steps + 1)]
    schedule = Adaptive(target_cosine=0.9, probe_every=1000, k_min=1, k_max=6, rise=1.5, window=2)
    ctl = KController(chain, schedule)
    _grow_run(ctl, chain, steps, scales)
    history = ctl.history
    assert sum("probed" in h for h in history) == 1
    raises = [h["raised_to"] for h in history if "raised_to" in h]
    assert raises and raises == sorted(raises) and raises[0] == 2
    assert ctl.method == Highway(k=raises[-1])
    # with the watch off, the same run keeps the k of its one probe
    chain2 = _linear_chain(8, 0.05)
    off = KController(chain2, Adaptive(target_cosine=0.9, probe_every=1000, k_min=1, k_max=6,
                                       rise=float("inf")))  # fmt: skip
    _grow_run(off, chain2, steps, scales)
    assert off.method == Highway(k=1)


def _divergent_chain(num_layers: int = 8) -> hbp.ResidualChain:
    """Section 9's case built by hand: block Jacobians J_i = -1.5 I + 0.3 R_i (R_i random),
    so each layer's Jacobian I + J_i is small but the paths with m blocks sum to about
    (L choose m) 1.5^m with alternating signs: the truncated sums w^k grow away from the
    gradient as k grows (relative error 10 at k = 0, ~900 at k = 4) until k nears L."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(num_layers):
        lin = nn.Linear(D, D, bias=False).double()
        with torch.no_grad():
            noise = torch.randn(D, D, generator=gen, dtype=torch.float64) / D**0.5
            lin.weight.copy_(-1.5 * torch.eye(D, dtype=torch.float64) + 0.3 * noise)
        layers.append(hbp.ResidualLayer(lin))
    return hbp.ResidualChain(layers)


def test_the_divergent_model_really_diverges():
    """The fallback test's model: the estimate's relative steps grow at every iteration and
    its error to the exact gradient grows with k."""
    chain = _divergent_chain()
    x, t = _data()[0][0], _data()[1][0]
    chain.method = Highway(k=4)
    chain.record_step_norms = True
    ((chain(x) - t) ** 2).sum().backward()
    norms = chain.last_diagnostics.step_norms
    assert all(b > a > 1.0 for a, b in zip(norms, norms[1:]))
    report = hbp.gradient_fidelity(
        chain, lambda m: ((m(x) - t) ** 2).sum(), {k: Highway(k=k) for k in (0, 4)}
    )
    assert report[4]["rel_error"] > 10 * report[0]["rel_error"] > 10


def test_adaptive_falls_back_to_exact_when_the_estimate_diverges():
    """No k <= k_max reaches the target on the divergent model: Adaptive must use Exact()
    until a probe finds a k that does (here after the blocks are made benign)."""
    chain = _divergent_chain()
    x, t = _data()[0][0], _data()[1][0]
    ctl = KController(chain, Adaptive(target_cosine=0.99, probe_every=3, k_max=4))
    _train_step(chain, ctl, 0, x, t)
    probe = ctl.history[0]
    assert ctl.method == Exact()
    assert probe["method"] == "Exact()"
    assert max(probe["probed"].values()) < 0.99
    assert sorted(probe["probed"]) == [0, 1, 2, 3, 4]  # searched up to k_max
    assert ctl.history[0]["sweeps"] == EXACT_SWEEPS
    chain.zero_grad()
    _train_step(chain, ctl, 1, x, t)
    assert ctl.method == Exact()  # no probe at step 1: stays exact
    with torch.no_grad():
        for layer in chain.layers:
            layer.block.weight.mul_(0.01)
    chain.zero_grad()
    _train_step(chain, ctl, 3, x, t)
    assert isinstance(ctl.method, Highway) and ctl.method.k <= 1


def _resumable_run(stop_at: int | None, steps: int = 16) -> list[str]:
    torch.manual_seed(0)
    model = Nested()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = Adaptive(target_cosine=0.999, probe_every=3, k_max=4, rise=1.2, window=2)
    ctl = KController(model, schedule)
    start = 0
    if stop_at is not None:
        for step in range(stop_at):
            _train_step(model, ctl, step, x, y, opt)
        saved = {"model": model.state_dict(), "opt": opt.state_dict(), "ctl": ctl.state_dict()}
        model = Nested()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        ctl = KController(model, schedule)
        ctl.load_state_dict(saved["ctl"])
        start = stop_at
    for step in range(start, steps):
        _train_step(model, ctl, step, x, y, opt)
    return [h["method"] for h in ctl.history]


def test_state_dict_resume_gives_the_same_sequence_of_methods():
    straight = _resumable_run(None)
    assert len(set(straight)) >= 3  # the sequence changes, so the comparison means something
    for stop in (4, 7):
        assert _resumable_run(stop) == straight


def _watch_run(stop_at: int | None = None, steps: int = 30):
    """The between-probes watch run of the test above (one probe, at step 0; growing
    Jacobians raise the last step norm). At `stop_at` the chain and the controller are
    rebuilt from their state_dicts. Returns (history, the controller's saved state, its
    AdaptiveState when saved)."""
    chain = _linear_chain(8, 0.05)
    scales = [0.05 * 1.15**t for t in range(steps + 1)]
    schedule = Adaptive(target_cosine=0.9, probe_every=1000, k_min=1, k_max=6, rise=1.5, window=2)
    ctl = KController(chain, schedule)
    x = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    saved, state = None, None
    for step in range(steps):
        if step == stop_at:
            saved, state = ctl.state_dict(), copy.deepcopy(ctl.state)
            weights = chain.state_dict()
            chain = _linear_chain(8, 0.3, seed=9)
            chain.load_state_dict(weights)
            ctl = KController(chain, schedule)
            ctl.load_state_dict(copy.deepcopy(saved))
            # the FULL controller state, Adaptive's included, is what it was
            assert ctl.state == state
            assert ctl.state_dict() == saved
        _train_step(chain, ctl, step, x, t)
        chain.zero_grad()
        _set_scale(chain, scales[step], scales[step + 1])
    return ctl.history, saved, state


def test_resume_between_probes_keeps_the_watchs_reference_and_raises_at_the_same_step():
    """Stopped after the window has filled since the last raise (Adaptive's reference_step
    set, recent_steps full): the resumed run must raise k at the step the straight run
    does. A state_dict without reference_step re-measures it from the rising norms after
    the resume, and raises later (issue 18, item 7)."""
    straight, _, _ = _watch_run()
    raises = [h["step"] for h in straight if "raised_to" in h]
    assert len(raises) >= 2
    stop = raises[1]  # a raise whose window refilled after the one before
    assert stop - raises[0] >= 3
    resumed, saved, state = _watch_run(stop_at=stop)
    assert state.reference_step is not None and len(state.recent_steps) == 2
    assert saved["adaptive"]["reference_step"] == state.reference_step
    assert [h["step"] for h in resumed if "raised_to" in h] == raises
    assert resumed == straight


def test_load_state_dict_refuses_another_schedule():
    model = Nested()
    state = KController(model, "linear:0,4,100").state_dict()
    with pytest.raises(ValueError, match="saved schedule"):
        KController(model, "linear:0,4,200").load_state_dict(state)


# ---- the CLI: `highwaybp train --k-schedule` and `highwaybp experiment kschedule` ----------

TRAIN_TINY = [
    "train", "--num-samples", "300", "--channels", "4", "--blocks", "3", "--batch-size", "16",
    "--threads", "1", "--quiet", "--steps", "12", "--eval-every", "4",
]  # fmt: skip


def _csv(path) -> list[dict]:
    import csv

    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_train_cli_follows_the_schedule_and_writes_it(tmp_path):
    from highwaybp.cli import main

    out = tmp_path / "run"
    spec = "steps:0=highway:k=2,6=exact"
    assert main([*TRAIN_TINY, "--k-schedule", spec, "--out", str(out)]) == 0
    rows = _csv(out / "k_schedule.csv")
    assert [r["method"] for r in rows] == ["Highway(k=2)"] * 6 + ["Exact()"] * 6
    assert [float(r["sweeps"]) for r in rows] == [3.0] * 6 + [EXACT_SWEEPS] * 6
    metrics = _csv(out / "metrics.csv")
    assert [r["method"] for r in metrics] == ["Highway(k=2)", "Exact()", "Exact()"]
    assert [float(r["sweeps"]) for r in metrics] == [4 * 3.0, 6 * 3.0 + 2 * 2.0, 6 * 3.0 + 6 * 2.0]
    import json

    result = json.loads((out / "result.json").read_text())
    assert result["config"]["k_schedule"] == spec
    assert result["k_schedule_sweeps"] == 6 * 3 + 6 * EXACT_SWEEPS


def test_train_cli_adaptive_resumes_to_the_same_run(tmp_path):
    from highwaybp.cli import main

    args = [*TRAIN_TINY, "--k-schedule", "adaptive:target=0.999,every=3,k_max=3"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    assert main([*args, "--out", str(tmp_path / "part"), "--stop-after", "5"]) == 0
    assert main([*args, "--out", str(tmp_path / "part")]) == 0
    full, part = (
        _csv(tmp_path / "full" / "k_schedule.csv"),
        _csv(tmp_path / "part" / "k_schedule.csv"),
    )
    assert len(full) == 12 and full == part
    assert sum(float(r["probe_sweeps"]) > 0 for r in full) == 4  # steps 0, 3, 6, 9
    keys = ("train_loss", "test_loss", "sweeps")
    assert [[r[k] for k in keys] for r in _csv(tmp_path / "full" / "metrics.csv")] == [
        [r[k] for k in keys] for r in _csv(tmp_path / "part" / "metrics.csv")
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k-schedule", "linear:0,4"], "K_START,K_END,STEPS"),
        (["--k-schedule", "exact", "--method", "ddg"], "not with ddg"),
    ],
)
def test_train_cli_refuses_a_bad_schedule(tmp_path, capsys, extra, message):
    from highwaybp.cli import main

    with pytest.raises(SystemExit) as info:  # a bad text: argparse's usage error (exit 2)
        main([*TRAIN_TINY, *extra, "--out", str(tmp_path)])
    assert message in str(info.value.code) + capsys.readouterr().err


def test_kschedule_experiment_tiny_runs_reports_and_refuses_another_config(tmp_path, capsys):
    import json

    from highwaybp.cli import main

    expected_arms = ("exact", "k0", "k1", "linear", "steps", "adaptive", "finish", "adaptive99")
    base = ["experiment", "kschedule", "--tiny", "--tasks", "gru", "--seeds", "0", "--quiet"]
    assert main([*base, "--out", str(tmp_path)]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == sorted(
        f"gru_s0_{a}.json" for a in expected_arms
    )
    adaptive = json.loads((tmp_path / "runs" / "gru_s0_adaptive.json").read_text())
    assert adaptive["probe_sweeps"] > 0 and len(adaptive["probes"]) == 2
    assert adaptive["total_sweeps"] == adaptive["train_sweeps"] + adaptive["probe_sweeps"]
    k1 = json.loads((tmp_path / "runs" / "gru_s0_k1.json").read_text())
    assert k1["total_sweeps"] == 2.0 * 6  # 6 steps of Highway(k=1)
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]["gru"]
    assert set(summary["arms"]) == set(expected_arms)
    assert "Verdict" in (tmp_path / "table.md").read_text()
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path), "--target", "0.5"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_finish_through_the_controller_needs_and_uses_total_steps():
    model = Nested()
    schedule = Finish(Constant(Highway(k=1)), exact_last=2)
    ctl = KController(model, schedule, total_steps=5)
    assert [ctl.step(t) for t in range(5)] == [Highway(k=1)] * 3 + [Exact()] * 2
    assert model.rnn.method == Exact()
    with pytest.raises(ValueError, match="total_steps"):
        KController(model, schedule).step(0)
