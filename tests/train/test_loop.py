"""The harness's one training loop (`highwaybp.train.loop.TrainLoop`): resuming gives the
uninterrupted run bit for bit, a checkpoint of another configuration is refused, a stop
saves the step it stops at, the progress bar stays out of captured output, and an arm of
`experiment kschedule` trained through the loop is a plain hand-written loop."""

from __future__ import annotations

import argparse
import io
import signal

import pytest
import torch
import torch.nn.functional as F

from highwaybp.control import KController
from highwaybp.models.mlp import ResidualMLP
from highwaybp.train import kschedule
from highwaybp.train.deep_experiment import Task
from highwaybp.train.io import ConfigMismatchError
from highwaybp.train.loop import Progress, StopGuard, TrainLoop, warmup_cosine_lr

STEPS = 8


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long()


def _run(path, stop_at=None, config=None, log=None):
    """A tiny model trained through TrainLoop; (final parameters, losses, loop, exit code)."""
    x, y = _data()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.2),
                                torch.nn.Linear(8, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses: list[float] = []

    def step(t: int) -> float:
        idx = torch.arange(t * 8, t * 8 + 8) % 64
        loss = F.cross_entropy(model(x[idx]), y[idx])  # dropout: the global RNG is state
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    def state():
        return {"model": model.state_dict(), "opt": opt.state_dict(), "losses": losses,
                "rng": torch.get_rng_state()}

    def load_state(saved):
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        losses[:] = saved["losses"]
        torch.set_rng_state(saved["rng"])

    loop = TrainLoop(step, STEPS, state=state, load_state=load_state, checkpoint_path=path,
                     checkpoint_every=3, config=config or {"lr": 0.05},
                     after_step=lambda t, loss: losses.append(loss),
                     guard=None if stop_at is None else StopGuard(stop_at),
                     log=log or (lambda msg: None))
    loop.resume()
    code = loop.run()
    return [p.detach().clone() for p in model.parameters()], losses, loop, code


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    params, losses, _, code = _run(tmp_path / "full.pt")
    assert code is None and len(losses) == STEPS
    logs: list[str] = []
    # stop at step 4: between two periodic checkpoints (3 and 6); the stop saves step 4
    _, part, _, code = _run(tmp_path / "part.pt", stop_at=4, log=logs.append)
    assert code == 0 and len(part) == 4
    assert torch.load(tmp_path / "part.pt", weights_only=False)["step"] == 4
    assert any("stopped at step 4/8" in m for m in logs)
    resumed_params, resumed_losses, _, code = _run(tmp_path / "part.pt")
    assert code is None
    assert resumed_losses == losses
    assert all(torch.equal(a, b) for a, b in zip(resumed_params, params))


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    _run(tmp_path / "c.pt", stop_at=2)
    with pytest.raises(ConfigMismatchError, match=r"lr: 0.05 -> 0.1"):
        _run(tmp_path / "c.pt", config={"lr": 0.1})


def test_signal_stops_at_the_next_step_and_saves_it(tmp_path):
    import os

    def step(t: int) -> float:
        if t == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 2 runs
        return 0.0

    with StopGuard() as guard:
        loop = TrainLoop(step, 10, state=lambda: {"mark": "x"}, guard=guard,
                         checkpoint_path=tmp_path / "s.pt", log=lambda m: None)
        code = loop.run()
    assert code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "s.pt", weights_only=False)["step"] == 3


def test_end_early_ends_after_the_current_step():
    seen: list[int] = []
    loop = TrainLoop(lambda t: float("nan") if t == 2 else 1.0, 10,
                     after_step=lambda t, loss: (seen.append(t), loss != loss and loop.end_early()))
    assert loop.run() is None
    assert seen == [0, 1, 2]


def test_progress_is_silent_in_captured_output(capsys):
    loop = TrainLoop(lambda t: 0.5, 5, progress=True, k_label=lambda: "highway:1")
    loop.run()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_shows_loss_k_and_rate(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    bar = Progress(4, desc="run", mininterval=0)
    assert bar.active
    for _ in range(4):
        bar.update(0.25, "highway:1")
    bar.close()
    text = term.getvalue()
    assert "loss=0.2500" in text and "k=highway:1" in text and "step/s" in text
    off = Progress(4, enabled=False)
    off.update(1.0)
    assert not off.active


def _toy_task(steps: int) -> Task:
    """A float64 residual MLP on a fixed toy set: a `Task` of experiment deep/kschedule."""
    x, y = _data()

    def make_model():
        torch.manual_seed(2)
        return ResidualMLP(6, 2, width=4, depth=3).double()

    def batch(step):
        idx = torch.arange(step * 16, step * 16 + 16) % 64
        return x[idx], y[idx]

    def loss(model, b):
        return F.cross_entropy(model(b[0]), b[1])

    def evaluate(model):
        with torch.no_grad():
            return float(loss(model, (x, y)))

    return Task("toy", "valid_loss", steps, 0.05, make_model, batch, loss, evaluate,
                (x, y), 3, {})


SCHEDULE = "steps:0=highway:k=0,2=highway:k=1,4=exact"


def test_kschedule_arm_through_the_loop_is_the_plain_loop():
    """Float64: the arm trained by kschedule.train_run (through TrainLoop) against a loop
    written out by hand, same schedule: same losses, evaluations and methods bit for bit."""
    steps, spec = 6, SCHEDULE
    task = _toy_task(steps)
    make_model, batch, loss, evaluate = task.make_model, task.batch, task.loss, task.evaluate
    args = argparse.Namespace(evals=3, checkpoint_every=100, quiet=True)
    run = kschedule.train_run(task, spec, None, args, lambda s: None)

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    ctl = KController(model, spec, total_steps=steps)
    evals, losses = [], []
    marks = {round(i * steps / 3) for i in range(4)}
    for step in range(steps + 1):
        if step in marks:
            evals.append({"step": step, "sweeps": ctl.total_sweeps(),
                          "valid_loss": evaluate(model)})
        if step == steps:
            break
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(task.lr, step, steps)
        b = batch(step)
        ctl.step(step, loss_fn=lambda b=b: loss(model, b))
        value = loss(model, b)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    assert run["losses"] == losses
    assert run["evals"] == evals
    assert run["methods"] == [h["method"] for h in ctl.history]
    assert len(set(run["methods"])) == 3  # the schedule really changed the method


def test_train_command_without_quiet_prints_no_bar_when_captured(tmp_path, capsys):
    from highwaybp.cli import main

    argv = ["train", "--num-samples", "400", "--channels", "4", "--blocks", "1",
            "--batch-size", "16", "--threads", "1", "--steps", "4", "--eval-every", "2",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "step 4/4" in captured.out  # the log lines are there; the bar is not
    assert "step/s" not in captured.err + captured.out and "\r" not in captured.err


def test_kschedule_arm_stopped_and_resumed_equals_the_whole_run(tmp_path):
    task = _toy_task(6)
    args = argparse.Namespace(evals=3, checkpoint_every=4, quiet=True)
    whole = kschedule.train_run(task, SCHEDULE, tmp_path / "a.pt", args, lambda s: None)
    ckpt = tmp_path / "b.pt"
    assert kschedule.train_run(task, SCHEDULE, ckpt, args, lambda s: None, StopGuard(3)) is None
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    resumed = kschedule.train_run(task, SCHEDULE, ckpt, args, lambda s: None)
    for key in ("losses", "evals", "methods", "sweeps_per_step", "final", "total_sweeps"):
        assert resumed[key] == whole[key], key


def test_without_tqdm_the_loop_trains_with_no_bar(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # import tqdm -> ImportError
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert not Progress(3).active
    seen: list[int] = []
    loop = TrainLoop(lambda t: 1.0, 3, after_step=lambda t, loss: seen.append(t))
    assert loop.run() is None and seen == [0, 1, 2]


def test_method_label_names_k_or_exact():
    from highwaybp.core.methods import Exact, FixedPoint, Highway
    from highwaybp.train.loop import method_label

    assert [method_label(m) for m in (Exact(), Highway(k=1), FixedPoint(k=3),
                                      Highway(tol=1e-3, max_k=8))] == [
        "exact", "highway:1", "fixedpoint:3", "highway:adaptive"]
