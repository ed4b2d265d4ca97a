"""`highwaybp train --method ddg` on several processes, and `highwaybp experiment ddg`:
a rerun into the same --out with another configuration is refused before anything runs."""

from __future__ import annotations

import pytest

from highwaybp.cli import main
from highwaybp.ddg import free_port

TINY = [
    "--num-samples", "400", "--channels", "6", "--blocks", "2", "--batch-size", "16",
    "--threads", "1", "--quiet", "--method", "ddg", "--splits", "2",
]  # fmt: skip



def _refused(capsys, argv: list[str]) -> str:
    """The CLI refuses (exit 2, the reason on stderr, no traceback); the stderr text."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_spawn_rerun_with_another_configuration_is_refused(tmp_path, capsys):
    """Fails on eab6026 (before this fix): the rerun resumed the per-rank checkpoints of
    the old configuration and wrote config.json and result.json labelled with the new."""
    out = tmp_path / "run"
    args = ["train", *TINY, "--launcher", "spawn", "--timeout", "60", "--out", str(out)]
    assert main([*args, "--steps", "4", "--lr", "0.05", "--seed", "0"]) == 0
    before = _snapshot(out)
    assert {"config.json", "result.json", "ddg_rank0.ckpt", "ddg_rank1.ckpt"} <= set(before)
    for changed, line in [
        (["--steps", "4", "--lr", "0.1", "--seed", "0"], "lr: 0.05 (in config.json) -> 0.1"),
        (["--steps", "4", "--lr", "0.05", "--seed", "1"], "seed: 0 (in config.json) -> 1"),
        (["--steps", "6", "--lr", "0.05", "--seed", "0"], "steps: 4 (in config.json) -> 6"),
    ]:
        err = _refused(capsys, [*args, *changed])
        assert "another configuration" in err and line in err
        assert _snapshot(out) == before  # nothing resumed, nothing rewritten


@pytest.mark.parametrize("rank", [0, 1])
def test_torchrun_rank_refuses_another_configuration_before_writing(
    tmp_path, monkeypatch, rank, capsys
):
    """Under torchrun each rank runs this command: every rank must refuse a mismatching
    --out before it joins the process group or writes a file. Fails on eab6026 (before
    this fix): the rank rewrote config.json, then went on to the rendezvous."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--out", str(out)]) == 0  # one process
    before = _snapshot(out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nobody listens: a short failure
    argv = ["train", *TINY, "--steps", "3", "--lr", "0.1", "--timeout", "5", "--out", str(out)]
    assert "lr: 0.05 (in config.json) -> 0.1" in _refused(capsys, argv)
    assert _snapshot(out) == before
    assert not (out / "ranks").exists()


class _Interrupted(Exception):
    """Stands for a Ctrl-C while the arms run."""


def test_experiment_rerun_with_other_run_settings_is_refused(tmp_path, monkeypatch, capsys):
    """An interrupted `highwaybp experiment ddg` rerun with another --lr must be refused
    with the diff before any run marker is rewritten or run started; more seeds are a
    valid extension. Fails on eab6026 (before this fix): the rerun rewrote every run's
    command.json and started the arms, each then failing on its own (or, for an arm with
    no checkpoint yet, training with the new settings beside arms trained with the old)."""
    from highwaybp.train import ddg_experiment

    started: list[str] = []

    def interrupted_arms(jobs, parallel):
        started.extend(name for name, _ in jobs)
        raise _Interrupted

    monkeypatch.setattr(ddg_experiment, "_run_arms", interrupted_arms)
    out = tmp_path / "exp"
    argv = ["experiment", "ddg", "--tiny", "--splits", "2", "--semantics", "stash",
            "--highway-k", "--out", str(out)]  # fmt: skip
    with pytest.raises(_Interrupted):
        main([*argv, "--lr", "0.05"])
    assert started == ["bp/seed0", "ddg-k2-stash/seed0"]
    markers = {p: p.read_bytes() for p in out.rglob("command.json")}
    assert len(markers) == 2
    started.clear()
    assert "lr: '0.05' (in config.json) -> '0.1'" in _refused(capsys, [*argv, "--lr", "0.1"])
    assert started == []
    assert {p: p.read_bytes() for p in out.rglob("command.json")} == markers
    with pytest.raises(_Interrupted):  # another seed: same settings, more runs
        main([*argv, "--lr", "0.05", "--seeds", "0", "1"])
    assert started == ["bp/seed0", "ddg-k2-stash/seed0", "bp/seed1", "ddg-k2-stash/seed1"]
