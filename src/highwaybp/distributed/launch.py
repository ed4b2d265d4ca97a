"""Launching multi-process runs: local processes (`spawn`, `LocalProcesses`) or torchrun
(`init_from_env`).

`spawn(fn, world, args)` starts `world` local processes, initializes the default process
group in each (gloo on CPU, or the backend given), and runs `fn(ctx, *args)` there with a
`RankContext` (rank, world, device, timeout); it returns every rank's return value (which
must be picklable), or raises `TransportError` with every rank's message as soon as the
ranks that can still report have done so. A failure, a killed rank or a stopped one never
makes the launcher wait past a bounded time (`LocalProcesses.join`). Each process runs with
`torch.set_num_threads(threads)` (default 1: one core per rank).

Under torchrun: `ctx = init_from_env()` in the script (env:// rendezvous, gloo on CPU or
NCCL when CUDA is available, one GPU per local rank).
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from highwaybp.distributed.transport import TransportError, Watchdog, free_port


def _no_heartbeat() -> None:
    return None


@dataclass
class RankContext:
    """What a spawned function learns about its process.

    `heartbeat()`: tell the spawn launcher's watchdog this rank is alive. Every completed
    receive and every `HighwayPipeline.step` already does; call it in long work of your own
    between steps (evaluation, checkpointing) that takes more than 2 * timeout + 10 s.
    """

    rank: int
    world: int
    device: torch.device
    timeout: float
    heartbeat: Callable[[], None] = _no_heartbeat


def mp_context(preload: Sequence[str] = ("torch",)):
    """forkserver with torch (and `preload`) imported once: each rank starts in well under a
    second instead of re-importing torch (seconds on a loaded machine). Fork itself is
    unsafe once the parent has run OpenMP kernels; the server has not. Falls back to spawn
    where forkserver does not exist."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(list(preload))
    return ctx


class LocalProcesses:
    """`world` local processes running `target(rank, *args_of(rank))`, which report through
    a queue: ("step" | "done" | "error", rank, payload). See `join` for the failure rules.

    .procs are the processes (rank order); .events the messages `poll` has read; results
    are read from `<tmpdir>/rank<r>.pt` (the target writes them; `self.result_dir`).
    """

    def __init__(self, target: Callable[..., None], world: int, timeout: float,
                 args_of: Callable[[int, str, Any, str], tuple],
                 preload: Sequence[str] = ("torch",)) -> None:
        if world < 1:
            raise ValueError(f"need at least one rank, got {world}")
        self.world, self.timeout = world, timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="hbp_ranks_")
        self.result_dir = self._tmp.name
        ctx = mp_context(preload)
        # One queue per rank: a multiprocessing queue's writers share one lock, and a rank
        # stopped (SIGSTOP) while its feeder thread held it blocked every other rank's
        # report, so the neighbours' errors never arrived (seen in a CI run)
        self._queues = [ctx.Queue() for _ in range(world)]
        init = f"tcp://127.0.0.1:{free_port()}"
        self.procs = [
            ctx.Process(target=target, args=args_of(r, init, self._queues[r], self.result_dir),
                        daemon=True)
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
        end = time.monotonic() + wait
        while True:
            received = False
            for q in self._queues:
                while True:
                    try:
                        item = q.get_nowait()
                    except queue_mod.Empty:
                        break
                    received = True
                    self.events.append(item)
                    if item[0] == "step":
                        self.last_step[item[1]] = item[2]
            left = end - time.monotonic()
            if received or left <= 0:
                return
            time.sleep(min(0.01, left))

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
        grace = self.timeout + 10.0 if grace is None else grace
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

    def failure_message(self, codes: list[Optional[int]], deadline: float, what: str) -> str:
        """One message naming every failed, stuck or late rank (after `join`)."""
        late = [r for r, c in enumerate(codes) if c is None and r not in self.stuck]
        messages = dict(self.errors())
        for r in self.stuck:
            messages[r] = (
                f"stopped or hung: still running {self.grace:.0f}s after its neighbours "
                "failed, without reporting an error (a SIGSTOP, a debugger, a deadlock?); "
                "killed"
            )
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(messages.items()))
        return (
            f"{what} failed (exit codes {codes}"
            + (f", still running after {deadline:.0f}s: {late}" if late else "")
            + f"): {detail or 'a rank exited without a message'}"
        )

    def results(self) -> list[Any]:
        return [
            torch.load(Path(self.result_dir) / f"rank{r}.pt", weights_only=False)
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


def _pick_device(backend: str, rank: int) -> torch.device:
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank)) % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def rank_process(rank: int, world: int, *, backend: str, timeout: float, init_method: str,
                 events: Any, result_dir: str, work: Callable[[Watchdog], Any],
                 label: str = "HighwayPipeline") -> None:
    """What every locally spawned rank runs (the layer-parallel runtime's and DDG's): join
    the process group, run `work(watchdog)`, save its result as rank{r}.pt in
    `result_dir` and report "done" on `events`; on any error report it and leave at once,
    without waiting on peers that may be dead. A watchdog ends a rank silent for
    2 * timeout + 10 s: the backstop for hangs outside a bounded wait (receives time out
    first, with a clearer error)."""

    def report(kind: str, msg: str) -> None:
        # Flush the queue's feeder thread before the process ends, or the message is lost.
        events.put((kind, rank, msg))
        events.close()
        events.join_thread()

    watchdog = Watchdog(2 * timeout + 10.0, rank, lambda msg: report("error", msg),
                        label=label)
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        watchdog.beat()
        result = work(watchdog)
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
        watchdog.beat()
        dist.destroy_process_group()
        events.put(("done", rank, None))
        events.close()
        events.join_thread()
    except BaseException as err:  # report, then leave without waiting on dead peers
        msg = f"{type(err).__name__}: {err}"
        try:
            report("error", msg)
        finally:
            sys.stderr.write(f"[{label} rank {rank}] {msg}\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
    watchdog.stop()


def _spawn_entry(rank: int, world: int, fn: Callable[..., Any], args: tuple, backend: str,
                 timeout: float, threads: Optional[int], init_method: str, events: Any,
                 result_dir: str) -> None:
    from highwaybp.distributed import pipeline

    if threads is not None:
        torch.set_num_threads(threads)

    def work(watchdog: Watchdog) -> Any:
        pipeline.set_heartbeat(watchdog.beat)
        ctx = RankContext(rank, world, _pick_device(backend, rank), timeout, watchdog.beat)
        return fn(ctx, *args)

    rank_process(rank, world, backend=backend, timeout=timeout, init_method=init_method,
                 events=events, result_dir=result_dir, work=work)


def spawn(fn: Callable[..., Any], world: int, args: tuple = (), *, backend: str = "gloo",
          timeout: float = 60.0, threads: Optional[int] = 1,
          deadline: Optional[float] = None) -> list[Any]:
    """Run `fn(ctx: RankContext, *args)` on `world` local processes; their return values.

    fn and args must be picklable (a module-level function). `timeout` bounds every wait
    for another rank (and the process group's own operations); `threads` is each rank's
    torch.set_num_threads (None: torch's default); `deadline` (default 4 * timeout + 60 s)
    bounds the whole run. Raises TransportError naming each failed rank.
    """
    if deadline is None:
        deadline = 4 * timeout + 60.0
    procs = LocalProcesses(
        _spawn_entry, world, timeout,
        lambda r, init, q, out: (r, world, fn, args, backend, timeout, threads, init, q, out),
        preload=("torch", "highwaybp.distributed.pipeline"),
    )
    try:
        codes = procs.join(deadline)
        if procs.errors() or any(c != 0 for c in codes):
            raise TransportError(procs.failure_message(codes, deadline, "layer-parallel run"))
        return procs.results()
    finally:
        procs.close()


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether this process is one rank of a torchrun job (torchrun sets $RANK): how a
    script chooses between its torchrun path and starting local processes itself."""
    return "RANK" in os.environ


def torchrun_rank_world(caller: str, instead: str) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment. Outside torchrun: a RuntimeError that
    names the missing variable and what to use instead (`instead`), not a bare KeyError."""
    for key in TORCHRUN_VARIABLES:
        if key not in os.environ:
            raise RuntimeError(f"{caller}: ${key} is not set; launch with torchrun "
                               f"(torchrun --nproc-per-node P script.py) or use {instead}")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def init_from_env(timeout: float = 60.0, backend: Optional[str] = None) -> RankContext:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); NCCL when CUDA is available, else gloo."""
    rank, world = torchrun_rank_world("init_from_env", "spawn()")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = _pick_device(backend, rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout))
    return RankContext(rank, world, device, timeout)
