"""`highwaybp bench rnn` runs end to end at a tiny size and writes consistent JSON."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from highwaybp.bench.rnn import backward_matmul_flops, peak_memory_mb
from highwaybp.cli import main
from highwaybp.models.rnn import AutogradLoopRNN


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
        assert r["fidelity_init"]["state"] == "init"
        assert "after 3 exact Adam steps" in r["fidelity_trained"]["state"]
        assert r["floor_fwd_ms"] > 0
        assert r["fwd_over_floor"] == pytest.approx(r["fwd_ms"] / r["floor_fwd_ms"])
    floors = data["meta"]["matmul_floor"]
    assert set(floors) == {"6", "12"} and all(len(f["runs_ms"]) == 5 for f in floors.values())
    for r in records:
        assert r["floor_fwd_ms"] == floors[str(r["seq_len"])]["fwd_ms"]
    ratios = data["meta"]["ratios"]["12"]
    assert ratios["highway(k=1) vs hbp-exact"] == pytest.approx(
        by_method(records, 12, "hbp-exact")["total_ms"]
        / by_method(records, 12, "highway(k=1)")["total_ms"]
    )
    assert ratios["hbp forward / matmul floor"] == by_method(records, 12, "hbp-exact")[
        "fwd_over_floor"
    ]
    for r in records:
        if r["method"] in ("torch", "autograd-loop", "hbp-exact"):
            assert r["fidelity_init"]["rel_error"] < 1e-5  # exact methods (float32)
        if r["method"].endswith("(k=0)"):  # k = 0 drops every block path: visibly inexact
            assert r["fidelity_init"]["rel_error"] > 1e-3
            assert r["fidelity_init"]["cosine"] < 1 - 1e-6
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


def by_method(records: list[dict], seq_len: int, method: str) -> dict:
    return next(r for r in records if r["seq_len"] == seq_len and r["method"] == method)


def test_autograd_loop_baseline_is_torch_math():
    torch.manual_seed(0)
    for cls, cell in ((torch.nn.GRU, "gru"), (torch.nn.LSTM, "lstm")):
        ref = cls(3, 4, num_layers=2).double()
        loop = AutogradLoopRNN(cell, ref)
        x = torch.randn(5, 2, 3, dtype=torch.float64)
        torch.testing.assert_close(loop(x), ref(x)[0], rtol=0, atol=1e-12)


def test_flop_count():
    args = argparse.Namespace(cell="gru", batch=2, hidden=4, input_size=3, layers=1)
    # exact: one recurrent sweep + dW_hh + dW_ih; Highway(k=2): two sweeps + the same.
    sweep = 2 * 8 * 2 * 3 * 4 * 4
    assert backward_matmul_flops(args, "torch", 8) == 2 * sweep + 2 * 8 * 2 * 3 * 4 * 3
    assert backward_matmul_flops(args, "highway(k=2)", 8) == 3 * sweep + 2 * 8 * 2 * 3 * 4 * 3


def test_memory_probe_sees_the_stored_gates_and_one_extra_state():
    """Replaces `peak >= 0` (true of any value). At T=256, B=64, H=128 a state [T, B, H] is
    8 MiB: the engine stores the gates ([T, B, 3H] and two [T, B, H] buffers at the backward,
    5 states) and the outputs for any method;
    Highway keeps one more adjoint state than the sequential exact backward (two buffers
    swapped each iteration), and no more at k = 3 than at k = 1."""
    args = argparse.Namespace(cell="gru", batch=64, hidden=128, input_size=128, layers=1,
                              threads=1, memory_timeout=600.0, seed=0, k=[1])  # fmt: skip
    state_mb = 256 * 64 * 128 * 4 / 2**20
    mem = {n: peak_memory_mb(args, n, 256) for n in ("hbp-exact", "highway(k=1)", "highway(k=3)")}
    assert all(v is not None for v in mem.values()), mem
    assert mem["hbp-exact"] > 6 * state_mb, mem
    assert 0.5 * state_mb < mem["highway(k=1)"] - mem["hbp-exact"] < 2.5 * state_mb, mem
    assert abs(mem["highway(k=3)"] - mem["highway(k=1)"]) < 0.5 * state_mb, mem


def test_bench_rnn_profile_writes_phases_and_the_sweep_op_mix(tmp_path):
    out = tmp_path / "profile.json"
    argv = ["bench", "rnn", "--profile", "--seq-len", "40", "--batch", "3", "--hidden", "5",
            "--input-size", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    (prof,) = json.loads(out.read_text())["profiles"]
    assert set(prof["phases"]) >= {"forward_ms", "prepare_ms", "sweep_ms", "sweep_with_norms_ms",
                                   "param_grads_ms", "exact_backward_ms", "torch_forward_ms",
                                   "torch_forward_backward_ms"}  # fmt: skip
    assert prof["cell"] == "gru"
    sweep = prof["sweep_profile"]
    repeats, chunks = sweep["repeats"], prof["chunks"]
    # the attribution follows GRUEngine.sweep: one scan row (addcmul_) per time step, one
    # gate-adjoint mul and one matmul per chunk
    assert sweep["op_calls"]["aten::addcmul_"] == repeats * 40
    calls = sweep["op_calls"]
    matmuls = calls.get("aten::mm", 0) + calls.get("mkldnn::_linear_pointwise", 0)
    assert matmuls == repeats * chunks
    assert sweep["op_calls"]["aten::mul"] == repeats * chunks
    shares = sweep["share_of_non_view_op_time"]
    assert {"matmul", "scan rows", "gate adjoints", "losses"} <= set(shares)
    assert "step-norm difference" not in shares  # a fixed-k iteration computes no norms
    assert sum(shares.values()) == pytest.approx(1.0)
    assert sum(sweep["share_of_op_time"].values()) == pytest.approx(1.0)


def test_bench_rnn_rejects_few_repeats(tmp_path):
    assert main(["bench", "rnn", "--repeats", "2", "--out", str(tmp_path / "x.json")]) == 2


def test_bench_rnn_profile_runs_the_lstm_engine(tmp_path):
    """--profile --cell lstm times the LSTM engine's phases beside torch.nn.LSTM's (it was
    refused before): the sweep runs one scan row per time step on each of c and h."""
    out = tmp_path / "profile.json"
    argv = ["bench", "rnn", "--profile", "--cell", "lstm", "--seq-len", "30", "--batch", "2",
            "--hidden", "4", "--input-size", "3", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    (prof,) = json.loads(out.read_text())["profiles"]
    assert prof["cell"] == "lstm"
    assert all(prof["phases"][k] > 0 for k in ("forward_ms", "sweep_ms", "torch_forward_ms"))
    assert prof["sweep_profile"]["op_calls"]["aten::addcmul_"] >= 30 * prof["sweep_profile"][
        "repeats"]
