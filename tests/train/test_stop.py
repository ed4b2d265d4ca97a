"""Stopping a resumable loop (--stop-after, SIGINT, SIGTERM) saves a checkpoint at that
step, and rerunning the same command continues to the result an uninterrupted run gives.

Each command test here fails on eab6026 (before this fix; checked, with loop.py copied
in): --stop-after below the evaluation interval saved nothing (a rerun started again from
step 0, so a `--stop-after` loop never finished), steps since the last checkpoint were lost
on every stop, and a signal ended in a KeyboardInterrupt traceback without saving.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from highwaybp.cli import build_parser, main
from highwaybp.core.methods import Highway
from highwaybp.train import deep_experiment as de
from highwaybp.train.loop import StopGuard

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_stop_guard_turns_a_signal_into_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGINT)
    with StopGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only a request
        assert guard.should_stop(0)
        assert guard.exit_code() == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before
    guard = StopGuard(stop_at=5)
    assert not guard.should_stop(4) and guard.should_stop(5) and guard.exit_code() == 0


TRAIN = ["train", "--num-samples", "400", "--channels", "6", "--blocks", "2", "--batch-size",
         "16", "--threads", "1", "--quiet", "--lr", "0.05", "--method", "highway", "--k", "1",
         "--steps", "9", "--eval-every", "5"]  # fmt: skip


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as handle:
        return [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(handle)]


def test_train_stop_after_below_the_eval_interval_makes_progress(tmp_path):
    full = tmp_path / "full"
    assert main([*TRAIN, "--out", str(full)]) == 0
    part = tmp_path / "part"
    steps_saved = []
    for _ in range(3):  # 3 x 3 steps = 9: each invocation continues where the last stopped
        assert main([*TRAIN, "--out", str(part), "--stop-after", "3"]) == 0
        if (part / "checkpoint.pt").exists():
            steps_saved.append(torch.load(part / "checkpoint.pt", weights_only=False)["step"])
    assert steps_saved[:2] == [3, 6]
    assert (part / "result.json").exists()
    a = json.loads((full / "result.json").read_text())
    b = json.loads((part / "result.json").read_text())
    # bit for bit: same batches, model, optimizer and the partial train-loss window
    assert _rows(full) == _rows(part)
    assert a["final_test_loss"] == b["final_test_loss"]
    assert a["final_test_acc"] == b["final_test_acc"]


def test_deep_train_run_stopped_between_checkpoints_resumes_exactly(tmp_path):
    args = build_parser().parse_args(
        ["experiment", "deep", "--tiny", "--quiet", "--tasks", "gpt", "--out", str(tmp_path)]
    )
    de.apply_tiny(args)
    args.steps = 6
    task = de.gpt_task(args)
    diag = de.diag_methods_of(args)
    full = de.train_run(task, Highway(k=1), diag, tmp_path / "a.pt", 4, lambda s: None)
    ckpt = tmp_path / "b.pt"
    logs: list[str] = []
    # checkpoints every 4 steps, stopped at step 3: the stop itself must save step 3
    stopped = de.train_run(task, Highway(k=1), diag, ckpt, 4, logs.append, StopGuard(3))
    assert stopped is None
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    assert any("stopped at step 3/6" in line for line in logs)
    resumed = de.train_run(task, Highway(k=1), diag, ckpt, 4, lambda s: None)
    assert resumed["history"] == full["history"]
    assert resumed["final"] == full["final"]
    assert [c["step"] for c in resumed["checkpoints"]] == [c["step"] for c in full["checkpoints"]]


CHARLM = ["experiment", "charlm", "--eval-every", "2", "--hidden", "8", "--embed", "4",
          "--seq-len", "8", "--batch", "2", "--eval-batches", "1", "--max-chars", "20000",
          "--methods", "exact,highway:k=1", "--threads", "1"]  # fmt: skip


def _histories(out: Path) -> dict[str, list]:
    runs = json.loads((out / "charlm.json").read_text())["runs"]
    return {
        r["method"]: [(h["step"], h["train_loss"], h["valid_loss"]) for h in r["history"]]
        for r in runs
    }


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_charlm_signal_saves_and_a_rerun_continues_exactly(tmp_path, sig):
    out = tmp_path / "stopped"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "highwaybp", *CHARLM, "--steps", "100000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        for line in proc.stdout:  # the first evaluation line: the loop (and guard) runs
            if " step " in line:
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "stopped at step" in err and "Traceback" not in err
    done = {m: h[-1][0] for m, h in _histories(out).items()}
    states = [torch.load(p, weights_only=False) for p in (out / "checkpoints").glob("*.pt")]
    stopped_at = min(s["step"] for s in states)
    assert stopped_at >= max(done.values()) >= 2  # saved at the stop, not at the last eval
    # Continue to a few steps past the stop (a larger --steps is a continuation) and compare
    # with an uninterrupted run to the same step: bit for bit.
    target = str(stopped_at + 3)
    assert main([*CHARLM, "--steps", target, "--out", str(out)]) == 0
    ref = tmp_path / "ref"
    assert main([*CHARLM, "--steps", target, "--out", str(ref)]) == 0
    assert _histories(out) == _histories(ref)


def test_demo_signal_exits_cleanly_and_keeps_finished_methods(tmp_path):
    """A signal during the demo ended in a KeyboardInterrupt traceback (fails on eab6026)."""
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["demo", "--samples", "300", "--depth", "2", "--width", "8", "--steps", "1000000",
            "--methods", "exact", "--rnn-steps", "0", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "highwaybp", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        for line in proc.stdout:  # printed once the guard is installed
            if line.startswith("1. MNIST-1D"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "rerun the same command to continue" in err and "Traceback" not in err
