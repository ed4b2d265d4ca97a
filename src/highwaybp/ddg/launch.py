"""Launching the DDG runtime: `spawn_ddg` starts one local process per module
(torch.multiprocessing) and reports every rank's failure, a stopped or hung rank included,
within a bounded time; under torchrun use `highwaybp.ddg.runtime.run_from_env`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

from highwaybp.ddg.runtime import DDGRunConfig, DDGRuntimeError, _spawn_entry, check_config
from highwaybp.distributed.launch import LocalProcesses


class DDGProcesses(LocalProcesses):
    """K local processes running DDG (torch.multiprocessing); see `spawn_ddg`.

    .procs are the processes (rank order); .events collects ("step" | "done" | "error",
    rank, payload) messages as `poll` reads them; `join` waits with the failure rules of
    `highwaybp.distributed.launch.LocalProcesses.join` (grace: cfg.timeout + 10 s).
    """

    def __init__(self, cfg: DDGRunConfig, world: int) -> None:
        self.cfg = cfg
        super().__init__(
            _spawn_entry, world, cfg.timeout,
            lambda r, init, q, out: (r, world, cfg, init, q, out),
            preload=("torch", "highwaybp.ddg.runtime"),
        )


def spawn_ddg(cfg: DDGRunConfig, world: int, deadline: Optional[float] = None) -> list[dict]:
    """Run DDG on `world` local processes (gloo unless cfg.backend says otherwise).

    Returns the per-rank results of `run_rank`. Raises DDGRuntimeError (with every rank's
    message) if a rank fails, as soon as the ranks that can still report have done so: a
    rank stopped or hung is named and killed `timeout + 10` s after its neighbours
    failed (see `DDGProcesses.join`); never waits longer than `deadline` seconds
    (default: 4 * cfg.timeout + 60).
    """
    return spawn_ddg_many([(cfg, world)], deadline)[0]


def spawn_ddg_many(
    runs: Sequence[tuple[DDGRunConfig, int]], deadline: Optional[float] = None
) -> list[list[dict]]:
    """Several independent `spawn_ddg` runs started together (their start-up overlaps)."""
    for cfg, world in runs:
        check_config(cfg, world)
    if deadline is None:
        deadline = max(4 * cfg.timeout + 60 for cfg, _ in runs)
    started = []
    try:
        for cfg, world in runs:
            started.append(DDGProcesses(cfg, world))
        end = time.monotonic() + deadline
        out = []
        for procs in started:
            codes = procs.join(max(0.0, end - time.monotonic()))
            if procs.errors() or any(c != 0 for c in codes):
                raise DDGRuntimeError(procs.failure_message(codes, deadline, "DDG run"))
            out.append(procs.results())
        return out
    finally:
        for procs in started:
            procs.close()
