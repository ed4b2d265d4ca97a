"""The dispatch counter (`highwaybp.bench.opcount`), the launch-aware step model
(`highwaybp.bench.launchmodel`) and the one-command GPU suite (`highwaybp bench gpu`)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from highwaybp.bench import launchmodel as LM
from highwaybp.bench import opcount as OC
from highwaybp.cli import main

# ---- the counter ---------------------------------------------------------------------------


def test_counter_records_each_op_with_its_kind_and_shapes():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    with OC.OpCounter() as c:
        torch.mm(a, b)
        a.add_(1.0)
        a[1:]
    by = {op.name: op for op in c.trace.ops}
    assert c.trace.total == 3 and set(by) == {"aten::mm", "aten::add_", "aten::slice"}
    assert [by[n].kind for n in ("aten::mm", "aten::add_", "aten::slice")] == [
        "matmul", "compute", "view"]
    assert by["aten::mm"].inputs == ((3, 5), (5, 7)) and by["aten::mm"].outputs == ((3, 7),)
    assert by["aten::mm"].flops == 2 * 3 * 5 * 7
    assert by["aten::add_"].bytes == 4 * (15 + 15) and by["aten::slice"].bytes == 0


def test_a_product_records_its_operand_strides_and_other_ops_none():
    """A CPU library's product runs far apart on the same shapes with another layout, so
    the trace keeps a product's strides; two layouts are two signatures."""
    a, w = torch.randn(3, 5), torch.randn(7, 5)
    w_t, w_t_copy, bias, out = w.t(), w.t().contiguous(), torch.zeros(7), torch.empty(3, 7)
    with OC.OpCounter() as c:
        torch.mm(a, w_t)  # a transposed view
        torch.mm(a, w_t_copy)
        torch.addmm(bias, a, w_t, out=out)
        a.add_(1.0)
    layouts = {(op.name, op.strides) for op in c.trace.ops}
    assert layouts == {("aten::mm", ((5, 1), (1, 5))), ("aten::mm", ((5, 1), (7, 1))),
                       ("aten::addmm", ((1,), (5, 1), (1, 5), (7, 1))),
                       ("aten::add_", ())}
    for op in c.trace.ops:
        assert OC.OpSignature.from_json(json.loads(json.dumps(op.to_json()))) == op
    # a file counted before strides were recorded reads as no strides
    old = {k: v for k, v in next(iter(c.trace.ops)).to_json().items() if k != "strides"}
    assert OC.OpSignature.from_json(old).strides == ()


def test_addmm_flops_read_k_from_the_first_matrix_not_the_bias():
    op = OC.OpSignature("aten::addmm", "matmul", ((7,), (3, 5), (5, 7)), ((3, 7),), 4)
    assert op.flops == 2 * 3 * 5 * 7


@pytest.mark.parametrize("cls, fn, gates", [(nn.GRU, "gru", 3), (nn.LSTM, "lstm", 4)])
def test_torch_fused_rnn_call_is_one_op(cls, fn, gates):
    m = cls(3, 5, num_layers=2)
    x = torch.randn(6, 2, 3)
    with OC.OpCounter() as c:
        m(x)
    fused = [op for op in c.trace.ops if op.kind == "fused_rnn"]
    assert [op.name for op in fused] == [f"fused:{fn}"] and c.trace.ops[fused[0]] == 1
    assert c.fused_meta == [{"function": fn, "seq_len": 6, "batch": 2, "input_size": 3,
                             "hidden": 5, "gates": gates, "layers": 2, "itemsize": 4}]
    assert c.inner.total >= 1  # what it ran underneath on this device, kept apart


def _args(cell="gru", **kw):
    base = dict(cell=cell, batch=2, hidden=4, input_size=3, layers=1, seed=0)
    return argparse.Namespace(**{**base, **kw})


def test_forward_ops_grow_by_a_fixed_number_per_step_and_backward_with_k():
    """Today's loop path: the same ops per time step (so T=32 minus T=16 is twice T=16
    minus T=8), and one more Highway sweep adds backward ops."""
    fwd = {}
    for seq_len in (8, 16, 32):
        recs = OC.count_methods(_args(), seq_len, ["highway(k=0)", "highway(k=1)"])
        fwd[seq_len] = recs[0]["forward"]["ops"]
        assert recs[1]["backward"]["ops"] > recs[0]["backward"]["ops"]
        assert recs[0]["forward"]["ops"] == recs[1]["forward"]["ops"]
    per_step = (fwd[16] - fwd[8]) / 8
    assert per_step >= 4 and fwd[32] - fwd[16] == 16 * per_step


class _WithPaths(nn.Module):
    def __init__(self, input_size, hidden_size, forward="loop", scan="sequential"):
        super().__init__()
        if forward not in ("loop", "fused") or scan not in ("sequential", "log"):
            raise ValueError("bad option")


class _WithoutPaths(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()


def test_path_options_are_detected_from_the_constructor():
    assert OC.available_options(_WithoutPaths) == {"forward": None, "scan": None}
    assert OC.paths(_WithoutPaths) == [{}]
    assert OC.available_options(_WithPaths) == {"forward": ("loop", "fused"),
                                                "scan": ("sequential", "log")}
    combos = OC.paths(_WithPaths)
    assert len(combos) == 4 and {"forward": "fused", "scan": "log"} in combos
    assert OC.path_label({"forward": "fused", "scan": "log"}) == "forward=fused,scan=log"


def test_count_ops_cli_writes_json_the_report_renders(tmp_path):
    from highwaybp.bench.report import render

    out = tmp_path / "results" / "rnn" / "opcount.json"
    assert main(["bench", "rnn", "--count-ops", "--cell", "lstm", "--seq-len", "4,8",
                 "--batch", "2", "--hidden", "4", "--k", "0", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["bench"] == "rnn_opcount"
    assert {(r["method"], r["seq_len"]) for r in d["records"]} == {
        (m, t) for m in ("torch", "hbp-exact", "highway(k=0)") for t in (4, 8)}
    text = render(tmp_path / "results", root=tmp_path)
    assert "RNN dispatch counts" in text and "fwd T=8 / T=4" in text
    assert "Other results files" not in text


# ---- the model -----------------------------------------------------------------------------


def test_curve_is_exact_at_points_and_log_linear_between():
    c = LM.Curve(((1.0, 10.0), (100.0, 1000.0)))
    assert c(1.0) == 10.0 and c(100.0) == 1000.0 and c(0.5) == 10.0 and c(1e4) == 1000.0
    assert math.isclose(c(10.0), 100.0)


DEV = LM.Device("toy", launch_s=1e-5, view_s=1e-6, sync_s=5e-5,
                matmul={"blas": LM.Curve.constant(1e9)}, bandwidth=LM.Curve.constant(1e9),
                fused_step_s=2e-5, fused_native=("lstm",))


def test_op_seconds_is_the_largest_of_latency_flops_and_bytes():
    small = OC.OpSignature("aten::mul", "compute", ((2, 2),), ((2, 2),), 4)
    big = OC.OpSignature("aten::mul", "compute", ((1000, 1000),), ((1000, 1000),), 4)
    mm = OC.OpSignature("aten::mm", "matmul", ((100, 100), (100, 100)), ((100, 100),), 4)
    view = OC.OpSignature("aten::slice", "view", ((1000, 1000),), ((10, 1000),), 4)
    assert LM.op_seconds(small, DEV) == 1e-5
    assert math.isclose(LM.op_seconds(big, DEV), 8e6 / 1e9)
    assert math.isclose(LM.op_seconds(mm, DEV), 2e6 / 1e9)  # flops (2e6) over bytes (1.2e5)
    assert LM.op_seconds(view, DEV) == 1e-6


def _mm(strides, name="aten::mm", inputs=((100, 100), (100, 100))):
    return OC.OpSignature(name, "matmul", inputs, ((100, 100),), 4, strides, "float32")


def test_a_measured_product_is_priced_by_its_measurement_for_its_layout_only():
    measured, other = _mm(((1, 100), (100, 1))), _mm(((100, 1), (100, 1)))
    dev = LM.Device(**{**DEV.__dict__, "products": {LM.product_key(measured): 0.25}})
    assert LM.op_seconds(measured, dev) == 0.25
    # the same shapes in another layout, and the device without its table: the curve
    assert math.isclose(LM.op_seconds(other, dev), 2e6 / 1e9)
    assert math.isclose(LM.op_seconds(measured, dev.without_products()), 2e6 / 1e9)
    # a measurement below the launch latency is still one launch
    fast = LM.Device(**{**DEV.__dict__, "products": {LM.product_key(measured): 1e-9}})
    assert LM.op_seconds(measured, fast) == DEV.launch_s
    assert LM.Device.from_json(json.loads(json.dumps(dev.to_json()))) == dev


def _traced(fn):
    with OC.OpCounter() as c:
        fn()
    (op,) = [op for op in c.trace.ops if op.kind == "matmul"]
    return op


def test_a_replayed_product_dispatches_exactly_the_traced_signature():
    """Trace a product, replay it, trace the replay: the same signature (shapes, strides,
    dtype, keyword arguments), whatever the layout: a transposed view, an expanded bias,
    beta=0, an out= tensor, an in-place product into a non-contiguous row."""
    a, w, w64 = torch.randn(3, 5), torch.randn(7, 5), torch.randn(7, 5, dtype=torch.float64)
    bias, out, acc = torch.zeros(7).expand(3, 7), torch.empty(7, 3).t(), torch.zeros(7, 6)
    x = torch.randn(5)
    products = {
        "mm of a transposed view": lambda: torch.mm(a, w.t()),
        "addmm, expanded bias, beta=0, out= a transposed view":
            lambda: torch.addmm(bias, a, w.t(), beta=0.0, out=out),
        "float64 mm": lambda: torch.mm(w64, w64.t()),
        "in-place addmm_ into a column slice": lambda: acc[:, :3].addmm_(w, a.t()[:, :3]),
        "addmv": lambda: torch.addmv(torch.zeros(7), w, x, alpha=2.0),
    }
    for label, call in products.items():
        op = _traced(call)
        replay = LM.replay_product(op)
        assert replay is not None, label
        assert _traced(replay) == op, label
    assert _traced(products["float64 mm"]).dtype == "float64"
    assert dict(_traced(products["addmv"]).scalars) == {"alpha": 2.0}


def test_what_cannot_be_replayed_faithfully_is_left_to_the_curve():
    i = torch.ones(3, 3, dtype=torch.int32)
    sparse = torch.eye(3).to_sparse()
    assert LM.replay_product(_traced(lambda: torch.mm(i, i))) is None  # not float
    assert LM.replay_product(_traced(lambda: torch.mm(sparse, torch.eye(3)))) is None
    assert LM.replay_product(_mm(())) is None  # counted before strides were recorded
    assert LM.replay_product(_mm(((1, 100), (100, 1)), name="mkldnn::_linear_pointwise")) is None
    # a signature whose strides do not match its inputs is refused, not guessed
    assert LM.replay_product(_mm(((1, 100),))) is None


def test_measure_products_keys_each_layout_once_and_skips_what_it_cannot_replay(
        monkeypatch):
    a, b = _mm(((1, 100), (100, 1))), _mm(((100, 1), (100, 1)))
    calls, real = [], LM.replay_product
    monkeypatch.setattr(LM, "replay_product", lambda op: calls.append(op) or real(op))
    table = LM.measure_products([a, b, a, _mm(()), OC.OpSignature(
        "aten::mul", "compute", ((4,),), ((4,),), 4)], repeats=1, min_bytes=0)
    assert set(table) == {LM.product_key(a), LM.product_key(b)}
    assert sorted(map(LM.product_key, calls)) == sorted(
        map(LM.product_key, [a, b, _mm(())]))  # each distinct product once
    # only products beyond the cache (120 kB each here): smaller ones keep the run's rates
    assert LM.measure_products([a, b], repeats=1, min_bytes=a.bytes) == {}


def test_last_level_cache_is_the_largest_cache_sysfs_lists(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert LM.last_level_cache_bytes(sysfs=tmp_path) == 32 << 20
    (tmp_path / "index4").mkdir()
    (tmp_path / "index4" / "size").write_text("64M\n")
    assert LM.last_level_cache_bytes(sysfs=tmp_path) == 64 << 20
    assert LM.last_level_cache_bytes(default=123, sysfs=tmp_path / "absent") == 123


def test_validation_pairs_a_measured_step_with_the_path_it_ran():
    """bench rnn measures each module on its default path; a count file holds every path:
    only the default's record (and torch.nn's) is compared with the measured step."""
    recs = OC.count_methods(_args(), 8, ["torch", "hbp-exact"])
    assert len({r["path"] for r in recs}) == 5  # torch.nn and four paths of ours
    measured = [{k: r[k] for k in ("cell", "seq_len", "batch", "hidden", "input_size",
                                   "layers", "method")} for r in recs]
    pairs = LM.measured_pairs(recs, measured)
    assert sorted(r["path"] for r, _ in pairs) == ["forward=loop,scan=sequential", "torch.nn"]
    assert len(LM.validate(recs, [{**m, "fwd_ms": 1.0, "bwd_ms": 1.0, "total_ms": 2.0}
                                  for m in measured], DEV)) == 2
    # a file counted before the path options existed gives way to one naming the path
    old = [{**r, "path": "loop (only path)"} for r in recs
           if r["path"] == "forward=loop,scan=sequential"]
    for counts in (old + recs, recs + old):
        pairs = LM.measured_pairs(counts, measured)
        assert sorted(r["path"] for r, _ in pairs) == ["forward=loop,scan=sequential",
                                                       "torch.nn"]
    # the same setting counted twice on the same path is refused, not counted twice
    with pytest.raises(ValueError, match="one file per setting"):
        LM.measured_pairs(recs + recs, measured)


def test_launch_model_prices_the_measured_products_per_measured_file(tmp_path, monkeypatch):
    """`bench launch-model` end to end on tiny files (the calibration and the Table 6
    counts stubbed): the products it measures are those of the validated traces, they
    reach each run's device, and each row's curve-only error is its own file's."""
    recs = OC.count_methods(_args(), 8, ["torch", "hbp-exact"])
    rec = recs[0]  # torch.nn's
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"bench": "rnn_opcount", "meta": {}, "records": recs}))
    product = next(op for op in OC.OpTrace.from_json(rec["backward"]).ops
                   if op.kind == "matmul")
    seen = []

    def calibrate(threads, products=()):
        seen.extend(products)
        return LM.Device(**{**DEV.__dict__, "products": {LM.product_key(product): 1.0}})

    monkeypatch.setattr(LM, "calibrate_cpu", calibrate)
    monkeypatch.setattr(LM, "count_table6", lambda ks: [])
    monkeypatch.setattr(LM, "device_from_bench", lambda meta, base, *a: base)
    key = {k: rec[k] for k in ("cell", "seq_len", "batch", "hidden", "input_size", "layers",
                               "method")}
    files = []
    for i, total in enumerate((2000.0, 4000.0)):  # two runs of the same setting
        f = tmp_path / f"measured{i}.json"
        f.write_text(json.dumps({"meta": {}, "records": [
            {**key, "fwd_ms": total / 2, "bwd_ms": total / 2, "total_ms": total},
            {**key, "method": "hbp-exact", "fwd_ms": 1.0, "bwd_ms": 1.0, "total_ms": 2.0}]}))
        files.append(f)
    out = tmp_path / "lm.json"
    assert main(["bench", "launch-model", "--counts", str(counts), "--measured", *map(str, files),
                 "--out", str(out)]) == 0
    assert product in seen
    d = json.loads(out.read_text())
    with_table = {r["measured_file"]: r for r in d["validation"] if r["method"] == "torch"}
    curve = {r["measured_file"]: r for r in d["validation_without_products"]
             if r["method"] == "torch"}
    for f, total in zip(files, (2000.0, 4000.0)):
        # the measured product costs 1 s: the model's step is at least that
        assert with_table[str(f)]["model_bwd_ms"] >= 1000.0 > curve[str(f)]["model_bwd_ms"]
        assert with_table[str(f)]["measured_total_ms"] == total
    text = "\n".join(LM.render(out, d))
    for f in files:
        row = next(line for line in text.splitlines() if line.startswith("| GRU")
                   and f"/ {int(float(curve[str(f)]['measured_total_ms']))} |" in line)
        assert row.rstrip(" |").endswith(f"{curve[str(f)]['total_error_pct']:+.0f}%")


def test_fused_kernel_is_t_dependent_steps_each_at_least_one_latency():
    meta = {"function": "lstm", "seq_len": 50, "batch": 1, "input_size": 1, "hidden": 1,
            "gates": 4, "layers": 2, "itemsize": 4}
    fast = LM.Device("fast", 1e-6, 0, 0, {"blas": LM.Curve.constant(1e18)},
                     LM.Curve.constant(1e18), 2e-5, ("lstm",))
    # per layer: one batched projection (one launch) and 50 steps at the step latency
    assert math.isclose(LM.fused_rnn_seconds(meta, fast, False), 2 * (1e-6 + 50 * 2e-5))
    # backward: the 50 steps, the weight gradients and the input gradient
    assert math.isclose(LM.fused_rnn_seconds(meta, fast, True), 2 * (50 * 2e-5 + 2e-6))


def test_a_fused_call_the_device_does_not_fuse_is_priced_by_what_it_ran():
    """torch.nn.GRU on a CPU (no fused GRU kernel there) is priced by its counted inner
    ops; on a device that fuses it, by the fused model."""
    rec = OC.count_methods(_args(), 8, ["torch"])[0]
    cpu_like = LM.predict_record(rec, DEV)  # DEV fuses only the LSTM
    inner = OC.OpTrace.from_json(rec["forward"]["fused_inner"])
    assert math.isclose(
        cpu_like["fwd_by_kind_s"]["fused_rnn"],
        LM.trace_seconds(inner, DEV, [], None, False)["total"])
    gpu_like = LM.predict_record(rec, LM.Device(**{**DEV.__dict__, "fused_native": ("gru",)}))
    meta = rec["forward"]["fused_calls"][0]
    fused_dev = LM.Device(**{**DEV.__dict__, "fused_native": ("gru",)})
    assert math.isclose(gpu_like["fwd_by_kind_s"]["fused_rnn"],
                        LM.fused_rnn_seconds(meta, fused_dev, False))
    assert math.isclose(gpu_like["bwd_s"], LM.fused_rnn_seconds(meta, fused_dev, True))


def test_highway_after_a_fused_forward_is_priced_by_its_own_backward_ops():
    """On a device that fuses the GRU, torch.nn's backward and our Exact's on the fused path
    (autograd through torch's fused function) are the fused-backward model; Highway's after
    a fused forward is the engine's own backward (gates recomputed, sweeps), priced by the
    ops it dispatched, never the fused kernel's (that once made it cost what cuDNN does)."""
    fused_dev = LM.Device(**{**DEV.__dict__, "fused_native": ("gru",)})
    recs = OC.count_methods(_args(), 8, ["hbp-exact", "highway(k=1)"])
    fused = {r["method"]: r for r in recs if "forward=fused" in r["path"]
             and "sequential" in r["path"]}
    meta = fused["hbp-exact"]["forward"]["fused_calls"][0]
    exact = LM.predict_record(fused["hbp-exact"], fused_dev)
    assert math.isclose(exact["bwd_s"], LM.fused_rnn_seconds(meta, fused_dev, True))
    rec = fused["highway(k=1)"]
    highway = LM.predict_record(rec, fused_dev)
    counted = LM.trace_seconds(OC.OpTrace.from_json(rec["backward"]), fused_dev, [], None,
                               True)["total"]
    assert math.isclose(highway["bwd_s"], counted)
    assert highway["bwd_s"] > LM.fused_rnn_seconds(meta, fused_dev, True)


def test_validate_reports_the_models_error_against_a_measured_step():
    rec = OC.count_methods(_args(), 8, ["hbp-exact"])[0]
    p = LM.predict_record(rec, DEV)
    measured = {k: rec[k] for k in ("cell", "seq_len", "batch", "hidden", "input_size",
                                    "layers", "method")}
    measured.update(fwd_ms=1e3 * p["fwd_s"] * 2, bwd_ms=1e3 * p["bwd_s"],
                    total_ms=1e3 * p["total_s"] / 0.8)
    (row,) = LM.validate([rec], [measured, {**measured, "method": "other"}], DEV)
    assert math.isclose(row["fwd_error_pct"], -50.0)
    assert math.isclose(row["bwd_error_pct"], 0.0, abs_tol=1e-9)
    assert math.isclose(row["total_error_pct"], -20.0)


# ---- the GPU suite on this CPU (the CI run) ----------------------------------------------


def test_gpu_suite_tiny_on_cpu_writes_every_section(tmp_path):
    pytest.importorskip("sklearn")  # the pixel GRU's default data: scikit-learn's digits
    from highwaybp.bench.report import render

    out = tmp_path / "results" / "gpu"
    assert main(["bench", "gpu", "--device", "cpu", "--tiny", "--out", str(out)]) == 0
    d = json.loads((out / "gpu_suite.json").read_text())
    assert d["skipped"] == [] and set(d["sections"]) == {
        "selftest", "timing", "counts", "training", "predictions"}
    assert d["sections"]["selftest"]["failed"] == []
    timed = {(r["setting"], r["method"]) for r in d["sections"]["timing"]}
    assert len({s for s, _ in timed}) == 4
    assert {m for _, m in timed} == {"torch", "hbp-exact", "highway(k=0)", "highway(k=1)"}
    assert all(r["timer"] == "perf_counter" and r["peak_mb"] > 0 and r["runs"] == 2
               for r in d["sections"]["timing"])
    arms = d["sections"]["training"]["arms"]
    assert set(arms) == {"exact", "highway(k=0)", "highway(k=1)"}
    assert all(len(a["losses"]) == 5 for a in arms.values())
    assert len(d["sections"]["predictions"]["rows"]) == 4
    text = render(tmp_path / "results", root=tmp_path)
    assert "GPU suite" in text and "measured step ms" in text


def test_gpu_suite_starts_nothing_once_its_budget_is_spent(tmp_path):
    assert main(["bench", "gpu", "--device", "cpu", "--tiny", "--budget-s", "0",
                 "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert d["sections"] == {"timing": [], "counts": []}
    assert "selftest" in d["skipped"] and "training" in d["skipped"]
    assert any(s.startswith("timing ") for s in d["skipped"])


def test_signature_json_is_run_length_encoded_and_round_trips():
    op = OC.OpSignature("aten::stack", "compute", ((2, 3),) * 100 + ((4,),), ((100, 2, 3),), 4)
    d = op.to_json()
    assert d["inputs"] == [[[2, 3], 100], [[4], 1]]
    assert OC.OpSignature.from_json(json.loads(json.dumps(d))) == op


def _bench_meta(gflop_projection: float, gflop_weights: float) -> dict:
    return {"forward_floor": {"8": {"dispatch_us_per_op": 4.0, "elementwise_us_per_op": 10.0}},
            "step_floor": {"8": {"parts": {
                "recurrent_forward": {"gflop": 1.0, "gflops": 50.0},
                "input_projection": {"gflop": gflop_projection, "gflops": 200.0,
                                     "paths": ["onednn"]},
                "recurrent_backward_batched": {"gflop": 0.0, "gflops": None},
                "weight_grads": {"gflop": gflop_weights, "gflops": 300.0,
                                 "paths": ["onednn", "onednn"]}}}},
            "large_matmul": {"shape": [1000, 1000, 1000], "onednn_gflops": 400.0,
                             "torch_mm_gflops": 100.0}}


def test_device_from_bench_prices_with_the_runs_own_floors():
    rows, n_in, hidden, gh = 8192, 256, 512, 1536  # T * B, input, hidden, 3 * hidden
    projection = 2.0 * rows * n_in * gh
    weights = 2.0 * rows * gh * (n_in + hidden)  # dW_ih and dW_hh
    trace = OC.OpTrace()
    trace.add(OC.OpSignature("aten::mul", "compute", ((10,),), ((10,),), 4), 3)  # 80 bytes
    trace.add(OC.OpSignature("aten::tanh", "compute", ((30,),), ((30,),), 4), 1)  # 240 bytes
    base = LM.Device(**{**DEV.__dict__,
                        "bandwidth": LM.Curve(((100.0, 1e9), (1e6, 5e9), (1e8, 4e9))),
                        "products": {"a product": 1.0}})
    dev = LM.device_from_bench(_bench_meta(projection / 1e9, weights / 1e9), base, gates=3,
                               batch=32, hidden=hidden, input_size=n_in, forward_trace=trace)
    assert dev.launch_s == 4e-6 and dev.fused_step_s == 4e-6 and dev.view_s == DEV.view_s
    assert dev.products == base.products != {}  # the calibration's measured products
    # a 50 MFLOP step goes through oneDNN (engine.STEP_ONEDNN_MIN_FLOPS), as the engines'
    assert math.isclose(dev.matmul_rate("onednn", 2 * 32 * hidden * gh), 50e9)
    assert math.isclose(dev.matmul_rate("onednn", projection), 200e9)
    assert math.isclose(dev.matmul_rate("onednn", weights / 2), 300e9)  # two products
    assert math.isclose(dev.matmul_rate("onednn", 2e9), 400e9)  # the large matmul
    assert dev.matmul["blas"].points == ((2e9, 100e9),)  # MKL: only its large matmul
    mean = (3 * 80 + 240) / 4
    assert math.isclose(dev.bandwidth(mean), mean / 10e-6)
    # from 4x those bytes up, the base device's ladder (its 100-byte point is dropped)
    assert dev.bandwidth.points[1:] == ((1e6, 5e9), (1e8, 4e9))
    # a 3-wide input's projection is bandwidth-bound: its FLOP/s is no matmul rate
    narrow = LM.device_from_bench(_bench_meta(2.0 * rows * 3 * gh / 1e9, weights / 1e9), base,
                                  gates=3, batch=32, hidden=hidden, input_size=3,
                                  forward_trace=trace)
    assert 200e9 not in [y for _, y in narrow.matmul["blas"].points]
