"""`highwaybp selftest`: it passes on this CPU, and it fails when the code it guards is broken."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

import highwaybp.core.backends.loop as vjp_module
import highwaybp.core.chain as chain_module
import highwaybp.core.scan as scan_module
import highwaybp.models.rnn.function as rnn_module  # where the layer backward looks up fast_iterate
from highwaybp import selftest
from highwaybp.cli import main
from highwaybp.core.methods import Highway

# Written out here (not read from selftest's tables): dropping a case from the table fails.
RESIDUAL_KINDS = ("identity", "scaled", "relu", "gated", "linear_shortcut", "module_shortcut")
LOOP_ONLY_KINDS = ("linear_shortcut", "module_shortcut")
BACKENDS = ("loop", "batched")


@pytest.fixture(scope="module")
def full_run() -> list[selftest.CheckResult]:
    return selftest.run("cpu")


def _statuses(results):
    return {r.name: r.status for r in results}


def test_full_selftest_passes_on_cpu(full_run):
    # The test extras install transformers; without it (only) the HF checks may skip.
    hf_missing = importlib.util.find_spec("transformers") is None
    failed = [
        (r.name, r.status, r.reason)
        for r in full_run
        if r.status != "PASS" and not (r.status == "SKIP" and hf_missing and r.name[:3] == "hf/")
    ]
    assert not failed, failed
    for r in full_run:
        if r.rel_error is not None:  # every comparison measured something and met its bound
            assert r.rel_error <= r.tolerance and r.dtype == "float64"


def test_full_selftest_covers_what_matters(full_run):
    names = [r.name for r in full_run]
    assert len(names) == len(set(names))
    for kind in RESIDUAL_KINDS:
        for method in ("highway-k=L", "fixedpoint-k=L"):
            assert f"chain/{kind}/{method}/loop" in names
        assert f"chain/{kind}/exact" in names
        assert f"chain/{kind}/adaptive-tol-reaches-L/loop" in names
    for kind in ("identity", "scaled", "relu", "gated"):  # LinearShortcut: batched refuses K
        assert f"chain/{kind}/highway-k=L/batched" in names
        assert f"chain/{kind}/highway-k=L/hillis_steele" in names
        assert f"chain/{kind}/highway-k=L/per-layer-loss" in names
    assert "chain/batchnorm-train/highway-k=L/loop" in names
    assert "scan/hillis_steele-vs-sequential" in names
    assert "rng-replay/dropout/highway-k=L/loop" in names
    for rnn in ("gru", "lstm"):
        for check in ("forward", "exact-grad", "highway-k=T-grad", "dropout-train/highway-k=T"):
            assert f"rnn/{rnn}/{check}" in names
        for path in ("loop+sequential", "loop+log", "fused+sequential", "fused+log"):
            assert f"rnn/{rnn}/{path}/highway-k=T-grad" in names
        for check in ("fused/exact-grad", "fused+log/fixedpoint-k=T-grad",
                      "fused+log/adaptive-reaches-T", "fused+log/dropout-train/highway-k=T",
                      "fused+log-vs-loop/highway-k=1"):
            assert f"rnn/{rnn}/{check}" in names
    assert "hf/gpt2/highway-k=L" in names and "hf/bert/highway-k=L" in names
    assert "ddg/2-process-vs-oracle" in names


def test_selftest_leaves_the_callers_rng_alone():
    before = torch.get_rng_state()
    selftest.run("cpu", quick=True)
    assert torch.equal(torch.get_rng_state(), before)


def test_quick_cli_passes_and_prints_the_table(capsys):
    assert main(["selftest", "--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "chain/gated/highway-k=L/loop" in out and "PASS" in out
    assert "passed, 0 failed, 0 skipped" in out


def test_float32_tolerances_hold_on_cpu():
    results = selftest.run("cpu", quick=True, dtype=torch.float32)
    assert {r.dtype for r in results} == {"float32"}
    assert all(r.status == "PASS" for r in results), [(r.name, r.reason) for r in results]


# ---- planted bugs: the selftest must catch them -----------------------------------------


def _scan_skipping_first_k(xs, apply_kt):
    """y_0 = x_0 + y_1: K_1 is not applied (a dropped multiplication)."""
    for i in range(len(xs) - 2, -1, -1):
        fn = apply_kt[i] if i > 0 else None
        xs[i].add_(xs[i + 1] if fn is None else fn(xs[i + 1]))
    return xs


def _scan_off_by_one(xs, apply_kt):
    """The loop stops one index early: y_0 is never accumulated."""
    for i in range(len(xs) - 2, 0, -1):
        fn = apply_kt[i]
        xs[i].add_(xs[i + 1] if fn is None else fn(xs[i + 1]))
    return xs


@pytest.mark.parametrize("bug", [_scan_skipping_first_k, _scan_off_by_one])
def test_planted_bug_in_the_chain_scan_fails(monkeypatch, capsys, bug):
    # The chain's sequential scan is looked up in core/chain.py (imported there by name).
    monkeypatch.setattr(chain_module, "reverse_scan_list_", bug)
    statuses = _statuses(selftest.run("cpu", quick=True))
    # K = I makes the dropped multiplication invisible for Identity; every other kind fails.
    kinds = RESIDUAL_KINDS if bug is _scan_off_by_one else RESIDUAL_KINDS[1:]
    for kind in kinds:
        assert statuses[f"chain/{kind}/highway-k=L/loop"] == "FAIL"
        if kind not in LOOP_ONLY_KINDS:
            assert statuses[f"chain/{kind}/highway-k=L/batched"] == "FAIL"
    # Paths that do not use this scan still pass: the failures point at the scan.
    assert statuses["chain/gated/highway-k=L/hillis_steele"] == "PASS"
    assert statuses["rnn/gru/highway-k=T-grad"] == "PASS"
    assert main(["selftest", "--device", "cpu", "--quick"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "FAILED: chain/" in captured.err


def test_planted_bug_in_the_hillis_steele_scan_fails(monkeypatch):
    def last_round_missing(x, a=None):
        n = x.shape[0]
        y = scan_module.reverse_scan_sequential(x, a)
        if n > 2:  # y_0 without the contribution of the last state
            y = y.clone()
            y[0] = scan_module.reverse_scan_sequential(x[:-1], None if a is None else a[:-1])[0]
        return y

    monkeypatch.setitem(scan_module.SCANS, "hillis_steele", last_round_missing)
    statuses = _statuses(selftest.run("cpu", quick=True))
    assert statuses["scan/hillis_steele-vs-sequential"] == "FAIL"
    assert statuses["chain/gated/highway-k=L/hillis_steele"] == "FAIL"
    assert statuses["chain/gated/highway-k=L/loop"] == "PASS"


def test_planted_bug_in_the_rnn_iteration_fails(monkeypatch):
    real = rnn_module.fast_iterate

    def one_iteration_short(eng, method):
        if isinstance(method, Highway) and not method.adaptive and method.k > 1:
            method = Highway(k=method.k - 1)
        return real(eng, method)

    monkeypatch.setattr(rnn_module, "fast_iterate", one_iteration_short)
    statuses = _statuses(selftest.run("cpu", quick=True))
    assert statuses["rnn/gru/highway-k=T-grad"] == "FAIL"
    assert statuses["rnn/lstm/highway-k=T-grad"] == "FAIL"
    assert statuses["chain/gated/highway-k=L/loop"] == "PASS"


def test_planted_bugs_in_the_log_scan_and_the_gate_recompute_fail(monkeypatch):
    import highwaybp.models.rnn.engine as engine_module
    import highwaybp.models.rnn.gru as gru_module

    real_scan = engine_module.reverse_scan_blocked_rows

    def carries_dropped(x, a_head, block=None):  # each block scanned on its own
        size = 2
        return torch.cat([real_scan(x[s : s + size], None if a_head is None else
                                    a_head[s : s + size - 1]) for s in range(0, len(x), size)])

    monkeypatch.setattr(engine_module, "reverse_scan_blocked_rows", carries_dropped)
    statuses = _statuses(selftest.run("cpu", quick=True))
    for rnn in ("gru", "lstm"):
        assert statuses[f"rnn/{rnn}/fused+log/highway-k=T-grad"] == "FAIL"
        assert statuses[f"rnn/{rnn}/highway-k=T-grad"] == "PASS"  # CPU auto: loop+sequential
    monkeypatch.undo()

    real_recompute = gru_module.GRUEngine._recompute_gates

    def stale_reset_gate(self):  # r from the input side only: h W_hr^T left out
        real_recompute(self)
        H = self.H
        gi = torch.nn.functional.linear(self.x, self.w_ih[:H], self.b_ih[:H] + self.b_hh[:H])
        self.G[..., :H] = torch.sigmoid(gi)
        self.N.copy_(torch.tanh(torch.nn.functional.linear(self.x, self.w_ih[2 * H :],
                                                           self.b_ih[2 * H :])
                                + self.G[..., :H] * self.G[..., 2 * H :]))

    monkeypatch.setattr(gru_module.GRUEngine, "_recompute_gates", stale_reset_gate)
    statuses = _statuses(selftest.run("cpu", quick=True))
    assert statuses["rnn/gru/fused+log-vs-loop/highway-k=1"] == "FAIL"
    assert statuses["rnn/gru/fused+log/highway-k=T-grad"] == "FAIL"
    assert statuses["rnn/lstm/fused+log-vs-loop/highway-k=1"] == "PASS"


def test_planted_bug_rerun_without_rng_and_buffer_replay_fails(monkeypatch):
    # The loop backend re-runs each layer for its VJPs inside _rerun_guard (core/backends/loop.py).
    monkeypatch.setattr(vjp_module, "_rerun_guard", lambda layer, state: contextlib.nullcontext())
    statuses = _statuses(selftest.run("cpu", quick=True))
    assert statuses["rng-replay/dropout/highway-k=L/loop"] == "FAIL"  # other dropout masks
    assert statuses["chain/batchnorm-train/highway-k=L/loop"] == "FAIL"  # statistics updated twice
    assert statuses["chain/gated/highway-k=L/loop"] == "PASS"


def test_a_chain_silently_running_autograd_fails(monkeypatch):
    # Exact gradients, but not Highway-BP: the comparison alone would pass; the check must not.
    monkeypatch.setattr(chain_module.ResidualChain, "_needs_backward", lambda self, x: False)
    results = {r.name: r for r in selftest.run("cpu", quick=True)}
    result = results["chain/scaled/highway-k=L/loop"]
    assert result.status == "FAIL" and "did not report running Highway(k=4)" in result.reason


# ---- how results are judged -------------------------------------------------------------


def _setup(dtype=torch.float64):
    return selftest.Setup(torch.device("cpu"), dtype, quick=True)


def _check_returning(estimate, reference):
    return selftest.Check("planted", lambda setup: selftest.Measured(estimate, reference))


def test_a_small_mismatch_fails_in_float64():
    ref = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)]
    off = [ref[0] + torch.tensor([0.0, 1e-7, 0.0], dtype=torch.float64)]
    result = selftest.run_check(_check_returning(off, ref), _setup())
    assert result.status == "FAIL" and result.rel_error == pytest.approx(1e-7 / 14**0.5)
    same = selftest.run_check(_check_returning([ref[0].clone()], ref), _setup())
    assert same.status == "PASS" and same.rel_error == 0.0


def test_a_wrong_small_tensor_is_not_hidden_by_a_large_one():
    ref = [torch.full((100,), 10.0, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)]
    est = [ref[0].clone(), torch.tensor([0.6], dtype=torch.float64)]
    result = selftest.run_check(_check_returning(est, ref), _setup())
    assert result.status == "FAIL" and result.rel_error > 0.1


def test_a_zero_or_nonfinite_reference_is_a_failure_not_a_pass():
    zero = [torch.zeros(3, dtype=torch.float64)]
    result = selftest.run_check(_check_returning([torch.zeros(3)], zero), _setup())
    assert result.status == "FAIL" and "could not detect" in result.reason
    ref = [torch.ones(3, dtype=torch.float64)]
    nan = [torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64)]
    assert selftest.run_check(_check_returning(nan, ref), _setup()).status == "FAIL"


def test_an_exception_in_a_check_is_a_failure():
    def crash(setup):
        raise RuntimeError("boom")

    result = selftest.run_check(selftest.Check("crash", crash), _setup())
    assert result.status == "FAIL" and "RuntimeError: boom" in result.reason


# ---- skips and devices ------------------------------------------------------------------


def test_missing_transformers_is_a_skip_with_its_reason(monkeypatch):
    real = selftest.importlib.util.find_spec
    monkeypatch.setattr(
        selftest.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transformers" else real(name, *a),
    )
    result = selftest.run_check(selftest.Check("hf", selftest.hf_check("gpt2")), _setup())
    assert result.status == "SKIP" and result.reason == "transformers not installed"
    assert result.rel_error is None


def test_untested_transformers_version_error_is_a_skip_but_a_tested_one_fails(monkeypatch):
    transformers = pytest.importorskip("transformers")

    def broken(*args, **kwargs):
        raise AttributeError("no such attribute in this version")

    monkeypatch.setattr(selftest, "_hf_compare", broken)
    check = selftest.Check("hf", selftest.hf_check("gpt2"))
    monkeypatch.setattr(transformers, "__version__", "4.30.0")
    result = selftest.run_check(check, _setup())
    assert result.status == "SKIP" and "untested transformers version: 4.30.0" in result.reason
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    assert selftest.run_check(check, _setup()).status == "FAIL"


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="this torch build has CUDA")
def test_cuda_without_cuda_build_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="CUDA is not available in this torch build"):
        selftest.run("cuda")
    assert main(["selftest", "--device", "cuda"]) == 2
    assert "CUDA is not available in this torch build" in capsys.readouterr().err


@pytest.mark.skipif(torch.backends.mps.is_built(), reason="this torch build has MPS")
def test_mps_without_mps_build_is_a_clear_error():
    with pytest.raises(ValueError, match="MPS is not available"):
        selftest.run("mps")


def test_unknown_device_and_dtype_are_refused():
    with pytest.raises(ValueError, match="use cpu, cuda, cuda:N or mps"):
        selftest.run("tpu")
    with pytest.raises(ValueError, match="--dtype must be one of"):
        selftest.run("cpu", dtype=torch.float16)
