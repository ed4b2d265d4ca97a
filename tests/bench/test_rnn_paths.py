"""`highwaybp bench rnn --paths` (`highwaybp.bench.rnn_paths`): our methods timed on every
module path against the default one."""

from __future__ import annotations

import json
import math

from highwaybp.bench import rnn_paths as RP
from highwaybp.cli import main


def test_default_path_is_the_modules_auto_on_each_device():
    assert RP.default_path_label("cpu") == "forward=loop,scan=sequential"
    assert RP.default_path_label("cuda") == "forward=fused,scan=log"


def _record(method, path, total, default_over=None):
    return {"method": method, "path": path, "seq_len": 8, "total_ms": total,
            "default_over_this": default_over}


def test_fastest_path_is_the_least_step_per_method_and_length():
    recs = [_record("torch", "torch.nn", 1.0),  # torch.nn has no other path: left out
            _record("hbp-exact", "a", 5.0, 1.0), _record("hbp-exact", "b", 4.0, 1.25),
            _record("highway(k=1)", "a", 3.0, 1.0), _record("highway(k=1)", "b", 6.0, 0.5)]
    assert RP.fastest_paths(recs) == {
        "hbp-exact T=8": {"path": "b", "total_ms": 4.0, "default_over_this": 1.25},
        "highway(k=1) T=8": {"path": "a", "total_ms": 3.0, "default_over_this": 1.0}}


def test_paths_cli_times_every_path_against_the_default_and_renders(tmp_path):
    from highwaybp.bench.report import render

    out = tmp_path / "results" / "rnn" / "paths.json"
    assert main(["bench", "rnn", "--paths", "--cell", "lstm", "--seq-len", "6", "--batch",
                 "2", "--hidden", "3", "--input-size", "2", "--k", "1", "--repeats", "5",
                 "--threads", "1", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    paths = {"forward=loop,scan=sequential", "forward=loop,scan=log",
             "forward=fused,scan=sequential", "forward=fused,scan=log"}
    assert {(r["method"], r["path"]) for r in d["records"]} == {("torch", "torch.nn")} | {
        (m, p) for m in ("hbp-exact", "highway(k=1)") for p in paths}
    by = {(r["method"], r["path"]): r for r in d["records"]}
    torch_ms = by[("torch", "torch.nn")]["total_ms"]
    for (method, _path), r in by.items():
        assert math.isclose(r["torch_over_this"], torch_ms / r["total_ms"])
        if method == "torch":
            assert r["default_over_this"] is None
            continue
        default = by[(method, d["meta"]["default_path"])]
        assert math.isclose(r["default_over_this"], default["total_ms"] / r["total_ms"])
        assert len(r["total_runs_ms"]) == 5  # every path timed in each of the rounds
    assert set(d["fastest"]) == {"hbp-exact T=6", "highway(k=1) T=6"}
    text = render(tmp_path / "results", root=tmp_path)
    assert "RNN paths" in text and "forward=fused,scan=log" in text


def test_paths_refuses_another_mode_instead_of_ignoring_it(capsys):
    assert main(["bench", "rnn", "--paths", "--count-ops", "--seq-len", "4"]) == 2
    assert "--count-ops and --paths" in capsys.readouterr().err
