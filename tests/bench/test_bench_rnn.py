"""`highwaybp bench rnn` runs end to end at a tiny size and writes consistent JSON."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from highwaybp.bench.rnn import AutogradLoopRNN, backward_matmul_flops, peak_memory_mb
from highwaybp.cli import main


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bench_rnn_tiny_writes_json(tmp_path, cell):
    out = tmp_path / "rnn.json"
    argv = [
        "bench",
        "rnn",
        "--cell",
        cell,
        "--seq-len",
        "6,12",
        "--batch",
        "2",
        "--hidden",
        "4",
        "--input-size",
        "3",
        "--layers",
        "2",
        "--k",
        "0,1",
        "--repeats",
        "5",
        "--fidelity-k",
        "0,2,11",
        "--train-steps",
        "3",
        "--scaling-factor",
        "2",
        "--no-memory",
        "--peak-matmul",
        "128,128,128",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    records = data["records"]
    names = [
        "torch",
        "autograd-loop",
        "hbp-exact",
        "highway(k=0)",
        "highway(k=1)",
        "fixedpoint(k=0)",
        "fixedpoint(k=1)",
    ]
    assert [r["method"] for r in records] == names * 2
    assert [r["seq_len"] for r in records] == [6] * 7 + [12] * 7
    for r in records:
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and len(r["total_runs_ms"]) == 5
        assert r["fastest_exact_baseline"] in ("torch", "autograd-loop")
        assert r["fidelity_init"]["rel_error"] >= 0 and r["fidelity_init"]["state"] == "init"
        assert "after 3 exact Adam steps" in r["fidelity_trained"]["state"]
    for r in records:
        if r["method"] in ("torch", "autograd-loop", "hbp-exact"):
            assert r["fidelity_init"]["rel_error"] < 1e-5  # exact methods (float32)
    by = {(r["seq_len"], r["method"]): r for r in records}
    for t in (6, 12):
        assert (
            by[(t, "highway(k=1)")]["fidelity_init"]["rel_error"]
            < by[(t, "highway(k=0)")]["fidelity_init"]["rel_error"]
        )
    curve = data["meta"]["fidelity_curve"]["12"]
    assert [p["method"] for p in curve["points"]] == [
        "highway(k=0)",
        "highway(k=2)",
        "highway(k=11)",
        "fixedpoint(k=0)",
        "fixedpoint(k=2)",
        "fixedpoint(k=11)",
    ]
    assert curve["points"][2]["init"]["rel_error"] < 1e-5  # k = T - 1 is exact
    scaling = data["meta"]["autograd_loop_scaling"]
    assert scaling["6"]["T_big"] == 12 and scaling["6"]["total_ms_T_big"] > 0


def test_autograd_loop_baseline_is_torch_math():
    torch.manual_seed(0)
    for cls, cell in ((torch.nn.GRU, "gru"), (torch.nn.LSTM, "lstm")):
        ref = cls(3, 4, num_layers=2).double()
        loop = AutogradLoopRNN(cell, ref)
        x = torch.randn(5, 2, 3, dtype=torch.float64)
        torch.testing.assert_close(loop(x), ref(x)[0], rtol=0, atol=1e-12)


def test_flop_count_and_memory_probe():
    args = argparse.Namespace(
        cell="gru",
        batch=2,
        hidden=4,
        input_size=3,
        layers=1,
        threads=1,
        memory_timeout=120.0,
        seed=0,
        k=[1],
    )
    # exact: one recurrent sweep + dW_hh + dW_ih; Highway(k=2): two sweeps + the same.
    sweep = 2 * 8 * 2 * 3 * 4 * 4
    assert backward_matmul_flops(args, "torch", 8) == 2 * sweep + 2 * 8 * 2 * 3 * 4 * 3
    assert backward_matmul_flops(args, "highway(k=2)", 8) == 3 * sweep + 2 * 8 * 2 * 3 * 4 * 3
    peak = peak_memory_mb(args, "highway(k=1)", 8)
    assert peak is not None and peak >= 0


def test_bench_rnn_rejects_few_repeats(tmp_path):
    assert main(["bench", "rnn", "--repeats", "2", "--out", str(tmp_path / "x.json")]) == 2
