"""`highwaybp bench layer-parallel` end to end (quick mode) and the exact-pipeline baselines'
gradients against single-process autograd (float64, 2 gloo ranks). No timing thresholds."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
import torch
from torch import nn

from highwaybp.distributed import costmodel as cm
from highwaybp.distributed.baselines import (
    SCHEDULES,
    check_schedule,
    missing_schedule,
    split_layers,
    stage_ranks,
)

SCHEDULE_CASES = [("gpipe", 1), ("gpipe", 3), ("1f1b", 2), ("interleaved-zb", 2),
                  ("interleaved-zb-2", 2), ("zbv", 2), ("dualpipev", 4)]
# This torch's schedules: an older torch in the declared range lacks some (skipped below
# with the reason, in test_missing_schedules_are_named).
AVAILABLE_CASES = [(s, m) for s, m in SCHEDULE_CASES if missing_schedule(s) is None]
L, W, B = 8, 6, 12


def _problem():
    import highwaybp as hbp

    torch.manual_seed(0)
    layers = [hbp.ResidualLayer(nn.Sequential(nn.LayerNorm(W), nn.Linear(W, 2 * W), nn.GELU(),
                                              nn.Linear(2 * W, W)), hbp.Identity()).double()
              for _ in range(L)]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, W, generator=gen, dtype=torch.float64)
    y = torch.randn(B, W, generator=gen, dtype=torch.float64)
    return layers, x, y


def _baseline_rank(ctx, cases):
    from highwaybp.distributed.baselines import ExactPipeline

    out = {}
    for schedule, m in cases:
        layers, x, y = _problem()
        pipe = ExactPipeline(layers, ctx.world, ctx.rank, schedule, m, nn.functional.mse_loss)
        kwargs = {}
        if ctx.rank == pipe.first_rank:
            kwargs["x"] = x
        if ctx.rank == pipe.last_rank:
            kwargs["target"] = y
        loss = pipe.step(**kwargs)
        grads = {}
        for s, module in zip(pipe.stage_indices, pipe.modules):
            start = pipe.ranges[s][0]
            for i, layer in enumerate(module):
                for name, p in layer.named_parameters():
                    grads[f"{start + i}.{name}"] = p.grad.clone()
        out[f"{schedule} M={m}"] = {"grads": grads, "loss": loss}
    return out


def test_baselines_equal_autograd():
    from highwaybp.distributed.launch import spawn

    if not AVAILABLE_CASES:  # an older torch in the declared range
        pytest.skip(missing_schedule("gpipe") or "no schedule runs on this torch")
    per_rank = spawn(_baseline_rank, 2, (AVAILABLE_CASES,), timeout=120.0)
    layers, x, y = _problem()
    h = x
    for layer in layers:
        h = layer(h)
    ref_loss = nn.functional.mse_loss(h, y)
    ref_loss.backward()
    ref = {f"{i}.{n}": p.grad for i, layer in enumerate(layers)
           for n, p in layer.named_parameters()}
    for schedule, m in AVAILABLE_CASES:
        key = f"{schedule} M={m}"
        grads = {}
        for r in per_rank:
            grads.update(r[key]["grads"])
        assert sorted(grads) == sorted(ref), key  # every parameter, once
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12, msg=key)
        losses = [r[key]["loss"] for r in per_rank if r[key]["loss"] is not None]
        assert len(losses) == 1
        torch.testing.assert_close(losses[0], ref_loss.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule", sorted({s for s, _ in SCHEDULE_CASES}))
def test_missing_schedules_are_named(schedule):
    """A schedule this torch lacks is skipped (here, in the benches and the cost model) with
    the reason, not an AttributeError."""
    reason = missing_schedule(schedule)
    if reason is None:
        assert check_schedule(schedule, 2, 8) is None
        return
    assert "torch.distributed.pipelining." in reason and torch.__version__ in reason
    assert check_schedule(schedule, 2, 8) == reason
    if cm.unmodelled(schedule) is not None:  # the cost model reads this order from torch
        with pytest.raises(RuntimeError, match="cannot model schedule"):
            cm._torch_orders(schedule, 2, 8)
    pytest.skip(reason)


def test_schedule_layouts_and_constraints():
    assert stage_ranks("gpipe", 3) == [0, 1, 2]
    assert stage_ranks("interleaved-zb-2", 2) == [0, 1, 0, 1]
    assert stage_ranks("zbv", 3) == [0, 1, 2, 2, 1, 0]
    assert check_schedule("1f1b", 3, 2) is not None
    assert check_schedule("1f1b", 3, 3) == missing_schedule("1f1b")  # None if here
    assert check_schedule("dualpipev", 2, 3) is not None
    assert check_schedule("dualpipev", 2, 4) == missing_schedule("dualpipev")  # None if here
    assert split_layers(7, 3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError, match="at least one layer"):
        split_layers(2, 3)
    # the model's split is the baselines' (and the runtime's) split
    assert cm.split_even(7, 3) == split_layers(7, 3)


def test_quick_bench_end_to_end(tmp_path):
    from highwaybp.bench import layer_parallel as lp

    out = tmp_path / "lp.json"
    parser = argparse.ArgumentParser()
    lp.register(parser.add_subparsers())
    args = parser.parse_args(["layer-parallel", "--quick", "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["bench"] == "layer_parallel"
    assert report["command"] == f"highwaybp bench layer-parallel --quick --out {out}"
    assert (tmp_path / "lp.png").exists()
    depth = report["stack"]["depth"]
    labels = {(r["ranks"], r["label"]) for r in report["measured"]}
    for expect in [(1, "exact-sequential M=1"), (2, "exact-sequential M=1"),
                   (2, "highway(k=0) distributed M=1"), (2, "highway(k=1) distributed M=1"),
                   (2, "highway(k=1) centralized M=1"), (2, "fixedpoint(k=1) M=1"),
                   (2, "highway(k=1) distributed rerun M=1"),
                   (2, "exact-gpipe M=2"), (2, "exact-1f1b M=2"), (2, "exact-zbv M=2")]:
        schedule = expect[1].split()[0].removeprefix("exact-")
        if schedule in SCHEDULES and missing_schedule(schedule):
            assert expect not in labels  # skipped, with the reason in the report
            continue
        assert expect in labels
    for r in report["measured"]:
        assert len(r["step_s_rounds"]) == report["rounds"]
        assert r["step_s"] == pytest.approx(statistics.median(r["step_s_rounds"]))
        assert r["busy_error_pct"] == pytest.approx(100 * (
            max(r["predicted_cpu_s_per_rank"]) - max(r["cpu_s_per_rank"]))
            / max(r["cpu_s_per_rank"]))
        pred = r["predicted_cpu_bound_step_s"] if r["oversubscribed"] else r["predicted_step_s"]
        assert r["error_pct"] == pytest.approx(100 * (pred - r["step_s"]) / r["step_s"])
        if r["config"]["runtime"] == "highway":  # traced: per-rank phases of the median step
            assert sorted(r["phases"]) == [str(i) for i in range(r["ranks"])]
            assert "forward" in r["phases"]["0"]
    # The predictions come from the measured per-layer costs and link: recompute two of
    # them by hand (P = 2, M = 1, two layers per rank).
    c = report["layer_costs"]["1"]
    lat, bw = report["link"]["latency_s"], report["link"]["bandwidth_bytes_per_s"]
    msg = lat + c["state_bytes"] / bw
    f, b, s, vpar, loss = c["forward"], c["vjp_both"], c["scan"], c["vjp_param"], c["loss"]
    n = depth // 2
    by = {(r["ranks"], r["label"]): r for r in report["measured"]}
    exact = n * f + msg + n * f + loss + n * b + msg + n * b
    assert by[(2, "exact-sequential M=1")]["predicted_step_s"] == pytest.approx(exact)
    # Highway k=0, distributed scan: rank 1 scans after its forward and loss, sends its
    # carry; rank 0 fixes up its states, then both take their parameter VJPs.
    carry_at = n * f + msg + n * f + loss + n * s + msg
    rank0 = max(n * f + n * s, carry_at) + n * s + n * vpar
    rank1 = n * f + msg + n * f + loss + n * s + n * vpar
    hw = by[(2, "highway(k=0) distributed M=1")]["predicted_step_s"]
    assert hw == pytest.approx(max(rank0, rank1))
    # the CPU-clock work per rank of exact-sequential: each rank's forward and backward
    cc = c["cpu"]
    work = by[(2, "exact-sequential M=1")]["predicted_cpu_s_per_rank"]
    assert work == pytest.approx([n * (cc["forward"] + cc["vjp_both"]),
                                  n * (cc["forward"] + cc["vjp_both"]) + cc["loss"]])
    # the prediction table is there and marked as predictions
    pp = report["paper_predictions"]
    assert "PREDICTIONS" in pp["note"] and pp["rows"]
    for row in pp["rows"]:
        assert row["ddg"]["step_s"] > 0
        for h in row["highway"].values():
            assert h["speedup_vs_best_exact"] == pytest.approx(
                row["best_exact"]["step_s"] / h["step_s"])
    # highwaybp report renders it (docs/benchmarks.md section, docs/costmodel.md block)
    from highwaybp.bench.report import costmodel_block, render

    results = tmp_path / "results"
    (results / "bench" / "layer_parallel").mkdir(parents=True)
    (results / "bench" / "layer_parallel" / "bench.json").write_text(out.read_text())
    text = render(results, root=tmp_path)
    assert "## Layer-parallel" in text and "Predictions, not measurements" in text
    rows = report["paper_predictions"]["rows"]
    for model in {r["model"] for r in rows}:  # every predicted win, and only those, listed
        line = next(x for x in text.splitlines() if x.startswith(f"- {model}: "))
        wins = sum(h["speedup_vs_best_exact"] > 1 for r in rows if r["model"] == model
                   for h in r["highway"].values())
        assert line.count("x)") == wins
    first = report["measured"][0]
    assert f"{1000 * first['step_s']:.1f}" in text
    block = costmodel_block(results)
    within = sum(abs(r["error_pct"]) <= 20 for r in report["measured"])
    assert f"within 20% of the measured step for {within} of {len(report['measured'])}" in block
    # the README's front-door row: Highway k=0, 1 against the best exact at P = 2
    from highwaybp.bench.report import headline

    best = min(r["step_s"] for r in report["measured"]
               if r["ranks"] == 2 and r["config"]["method"] == "exact")
    k1 = by[(2, "highway(k=1) distributed M=1")]["step_s"]
    assert f"{best / k1:.2f}x vs best exact pipeline" in headline(results)
