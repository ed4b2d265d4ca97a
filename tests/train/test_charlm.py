"""`highwaybp experiment charlm` at a tiny size: writes CSV/JSON/PNG and resumes."""

from __future__ import annotations

import json

import pytest

from highwaybp.cli import main


def _argv(out, steps):
    return [
        "experiment",
        "charlm",
        "--steps",
        str(steps),
        "--eval-every",
        "2",
        "--hidden",
        "8",
        "--embed",
        "4",
        "--seq-len",
        "8",
        "--batch",
        "2",
        "--eval-batches",
        "1",
        "--max-chars",
        "20000",
        "--methods",
        "exact,highway:k=1,fixedpoint:k=1",
        "--out",
        str(out),
    ]


def test_charlm_tiny_run_writes_results_and_resumes(tmp_path):
    assert main(_argv(tmp_path, 2)) == 0
    first = json.loads((tmp_path / "charlm.json").read_text())
    assert [r["method"] for r in first["runs"]] == ["exact", "highway:k=1", "fixedpoint:k=1"]
    assert main(_argv(tmp_path, 4)) == 0  # resumes from the step-2 checkpoints
    data = json.loads((tmp_path / "charlm.json").read_text())
    for run in data["runs"]:
        assert [h["step"] for h in run["history"]] == [0, 2, 4]
        assert (
            run["history"][:2]
            == next(r for r in first["runs"] if r["method"] == run["method"])["history"]
        )
    csv = (tmp_path / "charlm.csv").read_text().splitlines()
    assert csv[0] == "method,step,train_loss,valid_loss,train_seconds" and len(csv) == 1 + 9
    assert (tmp_path / "charlm.png").stat().st_size > 0
    with pytest.raises(SystemExit) as info:  # a bad method name is an argparse error
        main(["experiment", "charlm", "--methods", "highway:q=1", "--out", str(tmp_path)])
    assert info.value.code == 2


def test_k_schedule_arm_records_its_methods_and_sweeps_and_resumes(tmp_path):
    """--k-schedule adds an arm whose method a KController sets per step; linear 0 -> 2 over
    4 steps gives k = 0, 1, 1, 2, 2, 2 on steps 0..5: 1+2+2+3+3+3 = 14 VJP sweeps."""
    def argv(out, steps):
        base = _argv(out, steps)
        i = base.index("--methods")
        return [*base[:i], "--methods", "exact", "--k-schedule", "linear:0,2,4",
                "--eval-every", "3", *base[i + 2:]]

    assert main(argv(tmp_path / "direct", 6)) == 0
    assert main(argv(tmp_path / "resumed", 3)) == 0
    assert main(argv(tmp_path / "resumed", 6)) == 0  # continues the controller too
    runs = {}
    for name in ("direct", "resumed"):
        data = json.loads((tmp_path / name / "charlm.json").read_text())
        runs[name] = next(r for r in data["runs"] if r["method"] == "schedule:linear:0,2,4")
    last = runs["direct"]["history"][-1]
    assert (last["step"], last["k_method"], last["vjp_sweeps"]) == (6, "Highway(k=2)", 14.0)
    def timeless(history):
        return [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]

    assert timeless(runs["resumed"]["history"]) == timeless(runs["direct"]["history"])
    with pytest.raises(SystemExit) as info:
        main([*argv(tmp_path / "bad", 2)[:-2], "--k-schedule", "linear:4", "--out",
              str(tmp_path / "bad")])
    assert info.value.code == 2
