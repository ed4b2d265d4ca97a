"""The RNG save/restore of re-runs has one owner, core/replay.py: the chain's VJP re-runs
and DDG's per-stage streams and recomputed forwards use the same helpers."""

from __future__ import annotations

import torch

from highwaybp.core import replay
from highwaybp.ddg import stage


def test_rng_states_used_replays_the_draws_and_restores_the_caller_rng():
    cpu = torch.device("cpu")
    torch.manual_seed(3)
    saved = replay.rng_states(cpu)
    first = torch.rand(5)
    caller_next = torch.rand(5)  # what the caller's stream gives after `first`
    torch.manual_seed(3)
    torch.rand(5)
    with replay.rng_states_used(saved, cpu):
        again = torch.rand(5)
        torch.rand(100)  # draws inside must not move the caller's stream
    assert torch.equal(again, first)
    assert torch.equal(torch.rand(5), caller_next)


def test_ddg_stage_uses_the_replay_helpers_not_a_copy():
    assert stage.rng_states is replay.rng_states
    assert stage.rng_states_used is replay.rng_states_used
    assert not hasattr(stage, "_rng_get") and not hasattr(stage, "_rng_use")
