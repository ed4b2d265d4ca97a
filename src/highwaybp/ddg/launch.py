"""Launching the DDG runtime: `spawn_ddg` starts one local process per module
(torch.multiprocessing) and reports every rank's failure, a stopped or hung rank included,
within a bounded time; under torchrun use `highwaybp.ddg.runtime.run_from_env`."""

from __future__ import annotations

import queue as queue_mod
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

from highwaybp.ddg.runtime import DDGRunConfig, DDGRuntimeError, _spawn_entry, check_config
from highwaybp.distributed.transport import free_port


def _mp_context():
    """forkserver with torch and this module preloaded: each rank starts in well under a
    second instead of re-importing torch (seconds on a loaded machine). Fork itself is
    unsafe once the parent has run OpenMP kernels; the server has not. Falls back to
    spawn where forkserver does not exist."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(["torch", "highwaybp.ddg.runtime"])
    return ctx


class DDGProcesses:
    """K local processes running DDG (torch.multiprocessing); see `spawn_ddg`.

    .procs are the processes (rank order); .events collects ("step" | "done" | "error",
    rank, payload) messages as `poll` reads them.
    """

    def __init__(self, cfg: DDGRunConfig, world: int) -> None:
        if world < 1:
            raise ValueError(f"need at least one rank, got {world}")
        self.cfg, self.world = cfg, world
        self._tmp = tempfile.TemporaryDirectory(prefix="ddg_")
        ctx = _mp_context()
        self._queue = ctx.Queue()
        init = f"tcp://127.0.0.1:{free_port()}"
        self.procs = [
            ctx.Process(
                target=_spawn_entry,
                args=(r, world, cfg, init, self._queue, self._tmp.name),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.events: list[tuple[str, int, Any]] = []
        self.last_step = [-1] * world
        self.stuck: list[int] = []  # see `join`
        self.grace = 0.0

    def poll(self, wait: float = 0.1) -> None:
        """Move queued messages into .events (waits at most `wait` s for the first)."""
        try:
            item = self._queue.get(timeout=wait)
        except queue_mod.Empty:
            return
        while True:
            self.events.append(item)
            if item[0] == "step":
                self.last_step[item[1]] = item[2]
            try:
                item = self._queue.get_nowait()
            except queue_mod.Empty:
                return

    def errors(self) -> dict[int, str]:
        return {r: msg for kind, r, msg in self.events if kind == "error"}

    def join(self, deadline: float, grace: Optional[float] = None) -> list[Optional[int]]:
        """Wait until every process exits, a failed run has settled, or `deadline` seconds
        pass; the exit codes (None: still running).

        Once the run has failed (a rank reported an error or exited non-zero), a rank that
        can no longer progress (it reported an error, or both its neighbours r-1 and r+1
        exited or reported one) gets `grace` seconds (default timeout + 10) to exit; the
        wait does not go on for it. A healthy rank fails as soon as its neighbours are gone,
        and every wait of its own is bounded by `timeout`, so one still running without a
        report after that (10 s more for a busy machine) is stopped (SIGSTOP, a debugger)
        or hung: it is listed in `.stuck`, and `close()` kills it. Without this, a stopped
        rank, whose own watchdog is stopped too, kept the launcher waiting until `deadline`.
        """
        grace = self.cfg.timeout + 10.0 if grace is None else grace
        end = time.monotonic() + deadline
        settled_at: dict[int, float] = {}  # rank -> when it could no longer progress
        while True:
            self.poll(0.1)
            codes = [p.exitcode for p in self.procs]
            now = time.monotonic()
            if all(c is not None for c in codes) or now >= end:
                break
            errors = self.errors()
            if not errors and all(c in (None, 0) for c in codes):
                continue  # no failure: a slow rank is just slow
            gone = [c is not None or r in errors for r, c in enumerate(codes)]
            for r in range(self.world):
                neighbours = [n for n in (r - 1, r + 1) if 0 <= n < self.world]
                if r not in settled_at and (r in errors or all(gone[n] for n in neighbours)):
                    settled_at[r] = now
            if all(
                c is not None or (r in settled_at and now - settled_at[r] >= grace)
                for r, c in enumerate(codes)
            ):
                break
        self.poll(0.0)
        codes = [p.exitcode for p in self.procs]
        errors = self.errors()
        self.stuck = [r for r in settled_at if codes[r] is None and r not in errors]
        self.grace = grace
        return codes

    def results(self) -> list[dict[str, Any]]:
        return [
            torch.load(Path(self._tmp.name) / f"rank{r}.pt", weights_only=False)
            for r in range(self.world)
        ]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)

    def close(self) -> None:
        self.kill_all()
        self._tmp.cleanup()


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
            errors = procs.errors()
            if errors or any(c != 0 for c in codes):
                stuck = procs.stuck
                late = [r for r, c in enumerate(codes) if c is None and r not in stuck]
                messages = dict(errors)
                for r in stuck:
                    messages[r] = (
                        f"stopped or hung: still running {procs.grace:.0f}s after its "
                        "neighbours failed, without reporting an error (a SIGSTOP, a "
                        "debugger, a deadlock?); killed"
                    )
                detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(messages.items()))
                raise DDGRuntimeError(
                    f"DDG run failed (exit codes {codes}"
                    + (f", still running after {deadline:.0f}s: {late}" if late else "")
                    + f"): {detail or 'a rank exited without a message'}"
                )
            out.append(procs.results())
        return out
    finally:
        for procs in started:
            procs.close()
