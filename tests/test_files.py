"""Atomic files get the user's umask; unreadable checkpoints are named with what to do."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from highwaybp.files import (
    CheckpointError,
    atomic_write_json,
    current_umask,
    load_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_current_umask_reads_without_changing_it(umask_027):
    assert current_umask() == 0o027
    assert current_umask() == 0o027


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_results_and_checkpoints_get_the_users_umask(tmp_path, umask):
    """mkstemp's 0600 leaked into every result and checkpoint (unreadable by the group
    even with umask 002): fails on eab6026 (before this fix)."""
    old = os.umask(umask)
    try:
        json_path = atomic_write_json(tmp_path / "r.json", {"a": 1})
        ckpt_path = save_checkpoint(tmp_path / "c.pt", {"step": 3})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() gives a file under this umask
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE(plain.stat().st_mode) == want
    assert stat.S_IMODE(json_path.stat().st_mode) == want
    assert stat.S_IMODE(ckpt_path.stat().st_mode) == want
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def _truncated(path):
    save_checkpoint(path, {"model": {"w": torch.randn(64, 64)}, "step": 7})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(b""),
        _truncated,
        lambda p: p.write_bytes(b"this is not a checkpoint\n" * 20),
        lambda p: torch.save([1, 2, 3], p),
    ],
    ids=["empty", "truncated", "garbage", "not-a-dict"],
)
def test_unreadable_checkpoint_names_the_file_and_what_to_do(tmp_path, make):
    """A bad checkpoint gave a raw torch/pickle traceback: fails on eab6026 (before this
    fix; CheckpointError did not exist and torch.load's own error escaped)."""
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    make(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "Delete it" in message and str(path.parent) in message


def test_missing_checkpoint_is_a_fresh_run_and_a_good_one_loads(tmp_path):
    assert load_checkpoint(tmp_path / "none.pt") is None
    save_checkpoint(tmp_path / "ok.pt", {"step": 5, "w": torch.arange(3)})
    state = load_checkpoint(tmp_path / "ok.pt")
    assert state["step"] == 5 and torch.equal(state["w"], torch.arange(3))
