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
