"""`highwaybp experiment deep` runs end to end (tiny) and resumes from a checkpoint."""

from __future__ import annotations

import argparse
import json

import pytest

from highwaybp.cli import build_parser, main
from highwaybp.core.methods import Exact, Highway
from highwaybp.train import deep_experiment as de


def _tiny_args(tmp_path, *extra):
    args = build_parser().parse_args(
        ["experiment", "deep", "--tiny", "--quiet", "--out", str(tmp_path), *extra]
    )
    de.apply_tiny(args)
    return args


def test_experiment_deep_tiny_end_to_end(tmp_path):
    assert main(["experiment", "deep", "--tiny", "--quiet", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "deep_results.json").read_text())
    for name, metric in (("resnet", "test_acc"), ("gpt", "valid_loss")):
        task = results["tasks"][name]
        assert task["metric"] == metric
        assert set(task["runs"]) == {"exact", "highway_k0", "highway_k1", "fixedpoint_k1"}
        exact = task["runs"]["exact"]
        fractions = [c["fraction"] for c in exact["checkpoints"]]
        assert fractions[0] == 0.0 and fractions[-1] == 1.0
        for c in exact["checkpoints"]:
            assert set(c["cosines"]) == {
                "highway_k0",
                "highway_k1",
                "fixedpoint_k0",
                "fixedpoint_k1",
            }
            # (replaces `-1 <= cos <= 1`, true of any cosine) near init in these tiny nets
            # (margins >= 0.01): more iterations are closer to exact, Highway is closer than
            # FixedPoint at the same k, and none of them is exact (L > k).
            cos = {n: v["cosine"] for n, v in c["cosines"].items()}
            assert cos["highway_k1"] > cos["highway_k0"] > 0.5
            assert cos["fixedpoint_k1"] > cos["fixedpoint_k0"] > 0.5
            assert cos["highway_k0"] > cos["fixedpoint_k0"]
            assert cos["highway_k1"] > cos["fixedpoint_k1"]
            assert max(cos.values()) < 1 - 1e-6
        for run in task["runs"].values():
            assert run["final"] == run["checkpoints"][-1][metric]
    # GPT in the tiny setting has L = 2 layers: Highway(k=1) keeps all but the 2-block path.
    gpt_cos = results["tasks"]["gpt"]["runs"]["exact"]["checkpoints"][-1]["cosines"]
    assert gpt_cos["highway_k1"]["cosine"] > gpt_cos["highway_k0"]["cosine"]
    table = (tmp_path / "table.md").read_text()
    assert "Fig. 6 diagnostic" in table and "highway_k1" in table
    pytest.importorskip("matplotlib")
    for png in ("deep_final_vs_k.png", "deep_fig6_cosine.png", "deep_training_curves.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # A second invocation skips finished runs and leaves the results unchanged.
    assert main(["experiment", "deep", "--tiny", "--quiet", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "deep_results.json").read_text())
    assert again["tasks"]["gpt"]["runs"] == results["tasks"]["gpt"]["runs"]


class _Crash(RuntimeError):
    pass


def test_train_run_resumes_from_checkpoint(tmp_path):
    args = _tiny_args(tmp_path, "--tasks", "gpt")
    args.steps = 6
    task = de.gpt_task(args)
    diag = de.diag_methods_of(args)
    full = de.train_run(task, Highway(k=1), diag, tmp_path / "a.pt", 2, lambda s: None)

    batch = task.batch

    def crashing(step):
        if step == 4:
            raise _Crash
        return batch(step)

    task.batch = crashing
    ckpt = tmp_path / "b.pt"
    with pytest.raises(_Crash):
        de.train_run(task, Highway(k=1), diag, ckpt, 2, lambda s: None)
    assert ckpt.exists()
    task.batch = batch
    logs = []
    resumed = de.train_run(task, Highway(k=1), diag, ckpt, 2, logs.append)
    assert any("resumed" in line and "step 4" in line for line in logs)
    assert [s for s, _ in resumed["history"]] == list(range(6))
    for (_, a), (_, b) in zip(full["history"], resumed["history"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    assert resumed["final"] == pytest.approx(full["final"], rel=1e-6)


def test_method_names_and_lr_schedule():
    assert de.method_name(Exact()) == "exact"
    assert de.method_name(Highway(k=3)) == "highway_k3"
    task = argparse.Namespace(steps=100, lr=1.0)
    assert de._lr(task, 0) < de._lr(task, 4) <= 1.0
    assert de._lr(task, 99) < 0.01


class _Stop(Exception):
    pass


def test_k_schedule_arm_follows_its_schedule_and_resumes(tmp_path):
    """A schedule arm (--k-schedule) records the method the KController set and the VJP
    sweeps: 0 -> 2 over 4 steps on a 6-step run gives k = 0, 1, 1, 2, 2, 2 (halves round
    up) and 1+2+2+3+3+3 = 14 sweeps; a crash mid-run resumes to the same."""
    args = _tiny_args(tmp_path, "--tasks", "gpt")
    args.steps = 6
    task = de.gpt_task(args)
    diag = de.diag_methods_of(args)
    full = de.train_run(task, Exact(), diag, tmp_path / "a.pt", 2, lambda s: None,
                        schedule="linear:0,2,4")
    assert full["method"] == "schedule:linear:0,2,4"
    last = full["checkpoints"][-1]
    assert (last["k_method"], last["vjp_sweeps"]) == ("Highway(k=2)", 14.0)
    batch = task.batch

    def crashing(step):
        if step == 4:
            raise _Stop
        return batch(step)

    task.batch = crashing
    with pytest.raises(_Stop):
        de.train_run(task, Exact(), diag, tmp_path / "b.pt", 2, lambda s: None,
                     schedule="linear:0,2,4")
    task.batch = batch
    resumed = de.train_run(task, Exact(), diag, tmp_path / "b.pt", 2, lambda s: None,
                           schedule="linear:0,2,4")
    assert resumed["checkpoints"][-1]["vjp_sweeps"] == 14.0
    for (_, a), (_, b) in zip(full["history"], resumed["history"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
