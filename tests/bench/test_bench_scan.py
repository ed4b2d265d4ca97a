"""`highwaybp bench scan` runs end to end at tiny sizes and writes both kinds of K."""

from __future__ import annotations

import json

import pytest

from highwaybp.cli import main


def test_bench_scan_writes_both_kinds_with_the_torch_baseline(tmp_path):
    out = tmp_path / "scan.json"
    code = main(["bench", "scan", "--lengths", "4", "9", "--width", "8", "--repeats", "1",
                 "--threads", "1", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["interleaved"] is True
    got = [(r["coefficients"], r["length"]) for r in data["records"]]
    assert got == [("diagonal", 4), ("diagonal", 9), ("identity", 4), ("identity", 9)]
    for r in data["records"]:
        assert r["sequential_ms"] > 0 and r["hillis_steele_ms"] > 0 and r["torch_fused_ms"] > 0
        ratio = r["hillis_steele_ms"] / r["sequential_ms"]
        assert r["hillis_steele_over_sequential"] == pytest.approx(ratio, rel=1e-12)
