"""Bad command-line values and reruns with another configuration: a clear error (exit 2,
message on stderr), never a traceback.

Checked against eab6026 (before these fixes, with only cli_types.py copied in): every test
here fails there (values were accepted and crashed or ran later; reruns mixed settings or
crashed), except `--ks 0,x` (argparse already refused it), the pure type checks and
`test_charlm_rerun_may_add_methods` (a behaviour kept). The bench-rnn/bench-ddg --out cases
were not run on eab6026: there the full default benchmark runs before the write fails."""

from __future__ import annotations

import argparse
import json

import pytest

from highwaybp.cli import main
from highwaybp.train import cli_types

# --methods comes last: the tests below replace its value.
DEMO = ["demo", "--samples", "300", "--steps", "2", "--depth", "2", "--width", "8",
        "--rnn-steps", "0", "--methods", "exact"]  # fmt: skip
TRAIN = ["train", "--num-samples", "400", "--channels", "4", "--blocks", "1", "--batch-size",
         "16", "--threads", "1", "--quiet", "--steps", "2"]  # fmt: skip
CHARLM = ["experiment", "charlm", "--steps", "2", "--eval-every", "2", "--hidden", "8",
          "--embed", "4", "--seq-len", "8", "--batch", "2", "--eval-batches", "1",
          "--max-chars", "20000", "--methods", "exact,highway:k=1", "--threads", "1"]  # fmt: skip
DEEP = ["experiment", "deep", "--tiny", "--quiet", "--tasks", "gpt"]


def _usage_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 and no traceback; the stderr text."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)  # a returned 2 (run-time refusal) counts the same
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    assert "error:" in err
    return err


@pytest.mark.parametrize(
    "argv, option",
    [
        ([*DEMO[:-1], "bogus"], "--methods"),
        ([*DEMO[:-1], "highway:k=abc"], "--methods"),
        ([*DEMO, "--depth", "0"], "--depth"),
        ([*DEMO, "--steps", "0"], "--steps"),
        ([*DEMO, "--threads", "-1"], "--threads"),
        ([*TRAIN, "--threads", "-1"], "--threads"),
        ([*TRAIN[:-2], "--epochs", "0"], "--epochs"),
        ([*TRAIN, "--num-samples", "0"], "--num-samples"),
        ([*TRAIN, "--num-samples", "5"], "--num-samples"),
        ([*DEMO, "--samples", "9"], "--samples"),
        ([*TRAIN, "--stop-after", "0"], "--stop-after"),
        ([*TRAIN, "--momentum", "2"], "--momentum"),
        ([*TRAIN, "--momentum", "1"], "--momentum"),  # the velocity never decays
        ([*TRAIN, "--momentum", "-0.1"], "--momentum"),
        ([*TRAIN, "--eval-every", "0"], "--eval-every"),
        ([*TRAIN, "--k-schedule", "linear:0,4"], "--k-schedule"),
        ([*TRAIN, "--k-schedule", "adaptive:target=0.99,every=10,target=0.5"], "--k-schedule"),
        ([*CHARLM, "--methods", "exact,bogus"], "--methods"),
        ([*CHARLM, "--threads", "-1"], "--threads"),
        ([*DEEP, "--threads", "-1"], "--threads"),
        ([*DEEP, "--ks", "0,x"], "--ks"),
        (["experiment", "kschedule", "--tiny", "--probes", "0"], "--probes"),
        (["experiment", "kschedule", "--tiny", "--evals", "0"], "--evals"),
        (["experiment", "kschedule", "--tiny", "--gru-lr", "-1"], "--gru-lr"),
        (["experiment", "vision", "--tiny", "--epochs", "0"], "--epochs"),
        (["bench", "rnn", "--threads", "-1"], "--threads"),
        (["bench", "deep", "--depth", "0"], "--depth"),
    ],
)
def test_bad_values_are_argparse_errors(capsys, tmp_path, argv, option):
    err = _usage_error(capsys, [*argv, "--out", str(tmp_path / "out")] if argv[0] != "bench"
                       else [*argv, "--out", str(tmp_path / "o.json")])
    assert f"argument {option}" in err


@pytest.mark.parametrize(
    "argv",
    [DEMO, TRAIN, CHARLM, DEEP, ["bench", "deep", "--quick"], ["bench", "rnn"],
     ["bench", "scan"], ["bench", "ddg"]],
    ids=["demo", "train", "charlm", "deep", "bench-deep", "bench-rnn", "bench-scan",
         "bench-ddg"],
)
def test_unwritable_out_is_refused_before_running(capsys, tmp_path, argv):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = _usage_error(capsys, [*argv, "--out", str(blocker / "sub" / "x")])
    assert "argument --out" in err and "a_file" in err and "not a folder" in err


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _usage_error(capsys, [*DEMO, "--out", str(blocker)])
    assert "existing file" in err


@pytest.mark.parametrize("extra, message", [
    (["--k-schedule", "linear:0,4"], "argument --k-schedule"),
    (["--k-schedule", "exact", "--method", "ddg"], "not with ddg"),
])  # fmt: skip
def test_train_refuses_a_bad_k_schedule_before_loading_the_data(
        capsys, tmp_path, monkeypatch, extra, message):
    from highwaybp.train import train_cli

    def load_data(args):
        raise AssertionError("the data was loaded before --k-schedule was checked")

    monkeypatch.setattr(train_cli, "load_data", load_data)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*TRAIN, *extra, "--out", str(tmp_path / "out")])
    assert message in str(info.value.code) + capsys.readouterr().err


def test_momentum_type():
    assert cli_types.momentum_value("0") == 0.0
    assert cli_types.momentum_value("0.99") == 0.99
    for bad in ("1", "1.5", "-0.5", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_types.momentum_value(bad)


def test_method_and_list_types():
    assert cli_types.method_spec("highway:k=2") == "highway:k=2"
    assert cli_types.method_list("exact, fixedpoint:k=1") == ["exact", "fixedpoint:k=1"]
    assert cli_types.nonneg_int_list("0,1,3") == [0, 1, 3]
    for bad in ("", "1,-1", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_types.nonneg_int_list(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        cli_types.positive_int_list("0,4")
    for bad in ("nan", "inf", "0", "-1e-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_types.positive_float(bad)


# ---- reruns into the same --out with another configuration ---------------------------


def test_charlm_rerun_with_another_lr_is_refused(capsys, tmp_path):
    """Used to skip the finished runs and rewrite charlm.json with the new --lr."""
    out = str(tmp_path)
    assert main([*CHARLM, "--out", out]) == 0
    before = (tmp_path / "charlm.json").read_text()
    err = _usage_error(capsys, [*CHARLM, "--out", out, "--lr", "0.01"])
    assert "lr: 0.003" in err and "0.01" in err and "another --out" in err
    assert (tmp_path / "charlm.json").read_text() == before


def test_charlm_rerun_with_another_hidden_is_refused(capsys, tmp_path):
    """Used to crash with a state_dict size mismatch traceback."""
    out = str(tmp_path)
    assert main([*CHARLM, "--out", out]) == 0
    err = _usage_error(capsys, [*CHARLM, "--out", out, "--hidden", "12"])
    assert "hidden: 8" in err and "12" in err


def test_charlm_rerun_may_add_methods(tmp_path):
    out = str(tmp_path)
    assert main([*CHARLM, "--out", out]) == 0
    assert main([*CHARLM[:-4], "--methods", "exact,fixedpoint:k=0", "--threads", "1",
                 "--out", out]) == 0  # fmt: skip
    runs = json.loads((tmp_path / "charlm.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["exact", "fixedpoint:k=0"]


def test_demo_rerun_with_another_lr_is_refused(capsys, tmp_path):
    """Used to throw the finished results away silently and start again."""
    out = str(tmp_path)
    assert main([*DEMO, "--out", out]) == 0
    before = (tmp_path / "results.json").read_text()
    err = _usage_error(capsys, [*DEMO, "--out", out, "--lr", "0.01"])
    assert "lr: 0.003" in err
    assert (tmp_path / "results.json").read_text() == before


def test_deep_rerun_with_another_lr_is_refused(capsys, tmp_path):
    """Used to log 'config changed' and discard the finished runs of that task."""
    out = str(tmp_path)
    assert main([*DEEP, "--out", out]) == 0
    before = (tmp_path / "deep_results.json").read_text()
    err = _usage_error(capsys, [*DEEP, "--out", out, "--gpt-lr", "0.01"])
    assert "gpt_lr: 0.003" in err
    assert (tmp_path / "deep_results.json").read_text() == before


def test_train_rerun_with_another_lr_is_refused(capsys, tmp_path):
    out = str(tmp_path)
    assert main([*TRAIN, "--out", out]) == 0
    err = _usage_error(capsys, [*TRAIN, "--out", out, "--lr", "0.1"])
    assert "lr: 0.05" in err and "0.1" in err


def test_corrupt_checkpoint_is_a_clear_cli_error(capsys, tmp_path):
    """Used to end in torch.load's traceback (fails on eab6026)."""
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out), "--steps", "4", "--stop-after", "2"]) == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    err = _usage_error(capsys, [*TRAIN, "--out", str(out), "--steps", "4"])
    assert str(ckpt) in err and "Delete it" in err
