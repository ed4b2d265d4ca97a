"""`highwaybp train`: tiny end-to-end runs of every method, resume, DDG K = 1 == backprop."""

from __future__ import annotations

import csv
import json

import pytest

from highwaybp.cli import main

TINY = [
    "--num-samples", "400", "--channels", "6", "--blocks", "2", "--batch-size", "16",
    "--threads", "1", "--quiet", "--lr", "0.05",
]  # fmt: skip


def _train(out, *extra: str) -> dict:
    assert main(["train", *TINY, "--out", str(out), *extra]) == 0
    return json.loads((out / "result.json").read_text())


def _rows(out) -> list[dict]:
    with open(out / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_ddg_k1_is_exact_backprop_bit_for_bit(tmp_path):
    exact = _train(tmp_path / "bp", "--method", "exact", "--steps", "12", "--eval-every", "4")
    ddg = _train(
        tmp_path / "ddg1", "--method", "ddg", "--splits", "1", "--steps", "12",
        "--eval-every", "4",
    )  # fmt: skip
    keys = ("train_loss", "test_loss", "test_acc")
    assert [[r[k] for k in keys] for r in _rows(tmp_path / "bp")] == [
        [r[k] for k in keys] for r in _rows(tmp_path / "ddg1")
    ]
    assert exact["final_test_loss"] == ddg["final_test_loss"]
    assert (tmp_path / "bp" / "config.json").exists()


@pytest.mark.parametrize("semantics", ["stash", "recompute"])
def test_ddg_resumes_from_checkpoint(tmp_path, semantics):
    args = ["--method", "ddg", "--splits", "3", "--semantics", semantics, "--steps", "10",
            "--eval-every", "3"]  # fmt: skip
    full = _train(tmp_path / "full", *args)
    part = tmp_path / "part"
    assert main(["train", *TINY, "--out", str(part), *args, "--stop-after", "7"]) == 0
    assert not (part / "result.json").exists()
    resumed = _train(part, *args)
    keys = ("step", "train_loss", "test_loss", "test_acc")
    assert [[r[k] for k in keys] for r in _rows(tmp_path / "full")] == [
        [r[k] for k in keys] for r in _rows(part)
    ]
    assert full["final_test_loss"] == resumed["final_test_loss"]


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    _train(tmp_path, "--method", "exact", "--steps", "4")
    assert main(["train", *TINY, "--out", str(tmp_path), "--method", "exact", "--steps", "4",
                 "--lr", "0.1"]) == 2  # fmt: skip
    assert "another configuration" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["highway", "fixedpoint"])
def test_chain_methods_train(tmp_path, method):
    """Replaces `0 <= acc <= 1` (true of any accuracy): 40 steps must lift the test accuracy
    well above chance (10 classes: 0.1; these deterministic runs reach 0.26), and the final
    figure must be the evaluation of the trained model (the last history row)."""
    res = _train(tmp_path, "--method", method, "--k", "1", "--steps", "40", "--eval-every", "20")
    assert res["config"]["method"] == method
    assert [r["step"] for r in res["history"]] == [20, 40]
    assert res["final_test_acc"] > 0.15
    assert res["final_test_acc"] == res["history"][-1]["test_acc"]
    assert res["final_test_loss"] == res["history"][-1]["test_loss"]


def test_ddg_spawn_launcher_matches_single_process(tmp_path):
    args = ["--method", "ddg", "--splits", "2", "--steps", "6", "--eval-every", "3"]
    single = _train(tmp_path / "single", *args)
    multi = _train(tmp_path / "multi", *args, "--launcher", "spawn", "--timeout", "60")
    assert multi["launcher"] == "spawn"
    assert [r["rank"] for r in multi["ranks"]] == [0, 1]
    assert multi["final_test_loss"] == pytest.approx(single["final_test_loss"], rel=1e-4)
    assert multi["final_test_acc"] == pytest.approx(single["final_test_acc"], abs=1e-6)


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="--splits must be"):
        _train(tmp_path, "--method", "ddg", "--splits", "9", "--steps", "2")
    with pytest.raises(SystemExit, match="--batch-size"):
        main(["train", *TINY, "--batch-size", "100000", "--steps", "2"])


@pytest.mark.slow
def test_ddg_experiment_tiny_writes_table_and_plot(tmp_path):
    out = tmp_path / "exp"
    argv = ["experiment", "ddg", "--tiny", "--splits", "2", "--semantics", "recompute",
            "--highway-k", "--jobs", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["arm"] for r in summary["rows"]] == ["bp", "ddg-k2-recompute"]
    assert summary["rows"][0]["seeds"] == [0]
    # (replaces `0 <= acc <= 1`): the summary is the runs' own figures, seed by seed
    for row in summary["rows"]:
        per_run = json.loads((out / "runs" / "seed0" / row["arm"] / "result.json").read_text())
        assert row["final_test_acc_per_seed"] == [per_run["final_test_acc"]]
        assert row["final_test_acc"] == per_run["final_test_acc"]
    assert (out / "curves.png").stat().st_size > 1000
    assert "| ddg-k2-recompute |" in (out / "table.md").read_text()
    # rerunning finds every arm finished and only rebuilds the summary
    assert main(argv) == 0
