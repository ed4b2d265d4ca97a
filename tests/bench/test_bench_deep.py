"""`highwaybp bench deep` runs end to end at tiny sizes and writes consistent JSON."""

from __future__ import annotations

import json

import torch

from highwaybp.bench.deep import build_stack, memory_probe
from highwaybp.cli import main


def test_bench_deep_quick_writes_json(tmp_path):
    out = tmp_path / "deep.json"
    code = main(["bench", "deep", "--quick", "--no-memory", "--quiet", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {r["model"] for r in rows} == {"mlp", "transformer", "resnet"}
    for model in ("mlp", "transformer", "resnet"):
        mine = [r for r in rows if r["model"] == model]
        timed = [r for r in mine if "bwd_ms" in r]
        # exact + k in {0, 1} x {loop, batched}
        assert [(r["k"], r["vjp"]) for r in timed] == [
            (None, "autograd"),
            (0, "loop"),
            (0, "batched"),
            (1, "loop"),
            (1, "batched"),
        ]
        for r in timed:
            assert r["bwd_ms"] > 0 and r["fwd_ms"] > 0 and len(r["bwd_runs_ms"]) == 2
        # loop and batched compute the same gradient (float32 rounding)
        by = {(r["k"], r["vjp"]): r for r in timed}
        for k in (0, 1):
            assert abs(by[(k, "loop")]["cosine"] - by[(k, "batched")]["cosine"]) < 1e-5
        assert by[(1, "loop")]["rel_error"] < by[(0, "loop")]["rel_error"]
        (check,) = [r for r in mine if "exactness_rel_error" in r]
        assert check["k"] == check["depth"] and check["exactness_rel_error"] < 1e-5


def test_memory_probe_reports_growth():
    spec = {
        "model": "mlp",
        "depth": 4,
        "width": 16,
        "batch": 4,
        "seq": 8,
        "image": 6,
        "dtype": "float32",
        "threads": 1,
        "k": 1,
        "vjp": "batched",
    }
    threads = torch.get_num_threads()
    mem = memory_probe(spec)
    torch.set_num_threads(threads)
    assert mem["state_bytes"] == 4 * 16 * 4
    assert mem["peak_rss_growth_bytes"] >= 0


def test_build_stack_shapes():
    assert build_stack("resnet", 2, 4, 3, 5, 6).x.shape == (3, 4, 6, 6)
    assert build_stack("transformer", 2, 32, 3, 5, 6).x.shape == (3, 5, 32)
