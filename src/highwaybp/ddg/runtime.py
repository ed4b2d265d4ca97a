"""DDG on torch.distributed: one rank per module, point-to-point activations and errors.

Rank s holds module s of K (the same `DDGStage` as the single-process oracle in
`highwaybp.ddg.stage`, so both run the same arithmetic) and, at step t:

    x = batch_t                     (rank 0)   |  recv activation of batch t from s-1
    last rank:  loss, backward, update on batch t; send dLoss/dx of batch t to s-1
    other rank: forward, send the output to s+1;
                backward of batch t-d with the error received at step t-1, update,
                send its input error to s-1; recv the error of batch t+1-d from s+1

so a rank's backward overlaps the forwards and backwards of the ranks after it (no
backward locking); the forward still goes rank by rank. Errors that would only be used
after the last step are not sent.

Shapes are negotiated once: before its first activation a rank sends a small header
(ndim, dtype, shape); every later activation must have the same shape (use a fixed batch
size, e.g. drop the last partial batch). The error shape of a rank is its own output
shape. Before anything else the ranks compare their configurations (world, split,
semantics, steps, RNG seed, dtype, each layer's parameter shapes;
`highwaybp.distributed.handshake`) and all raise `ConfigMismatchError` if any differs
(under torchrun each rank parses its own arguments); every message then carries a tag
header (step, kind) that its receiver checks (`highwaybp.distributed.transport`).

Failure handling (never a hang): every receive waits at most `timeout` seconds
(`Work.wait(timeout)`), a dead peer closes its sockets so its neighbours fail at once and
then close theirs, and a watchdog thread ends the process if no step completes within
`timeout` + a grace period (it covers hangs outside a receive, e.g. in teardown). Each
failure is reported as `DDGRuntimeError` naming the rank, the peer and the step. A rank
that is stopped (SIGSTOP, a debugger) cannot report, and its watchdog is stopped too: its
neighbours time out after `timeout`, and the spawn launcher then names it and kills it
(`DDGProcesses.join`), rather than waiting for its own deadline.

Launch: `torchrun --nproc-per-node K -m highwaybp train --method ddg --splits K ...`
(env:// rendezvous, gloo on CPU, NCCL on GPU with one GPU per rank), or `spawn_ddg(...)`
in `highwaybp.ddg.launch` (torch.multiprocessing, used by the tests and by `--launcher spawn`).
"""
from __future__ import annotations

import datetime
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from highwaybp.ddg.stage import SEMANTICS, DDGStage, split_model
from highwaybp.distributed.handshake import check_same_config, dtype_text, layer_fingerprint
from highwaybp.distributed.launch import rank_process, torchrun_rank_world
from highwaybp.distributed.transport import Link, TransportError, Watchdog
from highwaybp.files import load_checkpoint, save_checkpoint

# DDG's name for the transport's error: a rank failed, timed out, or lost a peer.
DDGRuntimeError = TransportError

@dataclass
class EpochBatches:
    """Deterministic batch of step t: epoch e = t // steps_per_epoch uses the permutation
    drawn from seed + e, and drops the last partial batch (fixed shapes for the runtime).

    x: [N, ...] inputs, y: [N] targets. Picklable, so every rank can rebuild the stream.
    """

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.batch_size > len(self.x):
            raise ValueError(
                f"batch_size must be in 1..{len(self.x)} (dataset size), got {self.batch_size}"
            )
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.x) // self.batch_size

    def __call__(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(t, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.x), generator=gen))
        idx = self._perm[1][i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perm"] = None
        return state


@dataclass
class DDGRunConfig:
    """What every rank needs; picklable (use functools.partial, not lambdas).

    build_model() -> the whole model as nn.Sequential / list of modules; every rank builds
    it (seed inside build_model) and keeps its own part. batches(t) -> (x [B, ...],
    target [B]) for step t, the same on every rank (rank 0 uses x, the last rank target).
    """

    build_model: Callable[[], Any]
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    steps: int
    optimizer_factory: Callable[..., torch.optim.Optimizer]
    scheduler_factory: Optional[Callable[..., Any]] = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    semantics: str = "stash"
    boundaries: Optional[Sequence[int]] = None
    balance: str = "params"
    rng_seed: Optional[int] = 0
    timeout: float = 60.0  # seconds: max wait for a peer, and watchdog base
    threads: Optional[int] = None  # torch threads per rank (default: cpus // world)
    backend: Optional[str] = None  # "gloo" | "nccl" | None (nccl if CUDA else gloo)
    checkpoint_dir: Optional[str] = None  # per-rank checkpoints (resume) if set
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- rank loop


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _in_flight_mb(stage: DDGStage) -> float:
    total = 0
    for e in stage.pending.values():
        total += e.x.numel() * e.x.element_size()
        if e.params is not None:
            total += sum(v.numel() * v.element_size() for v in e.params.values())
    return total / 2**20


def _ckpt_path(cfg: DDGRunConfig, rank: int) -> Optional[Path]:
    if cfg.checkpoint_dir is None:
        return None
    return Path(cfg.checkpoint_dir) / f"ddg_rank{rank}.ckpt"


_CKPT_KEYS = ("t", "module", "stage", "losses", "correct", "pending_err", "out_like")


def _load_rank_checkpoint(path: Path, rank: int, world: int, steps: int) -> Optional[dict]:
    """The per-rank checkpoint at `path` (None if there is none), refused with a
    DDGRuntimeError naming the file when it is not one written by rank `rank` of `world`
    of a run of at least its step. (Unreadable files are `load_checkpoint`'s to report.)"""
    state = load_checkpoint(path)
    if state is None:
        return None
    problem = None
    if not isinstance(state, dict) or any(key not in state for key in _CKPT_KEYS):
        problem = "is not a DDG per-rank checkpoint"
    elif (state.get("rank", rank), state.get("world", world)) != (rank, world):
        problem = (
            f"was written by rank {state['rank']} of {state['world']}, and this is rank "
            f"{rank} of {world}"
        )
    elif state["t"] > steps:
        problem = f"is at step {state['t']}, past the end of this {steps}-step run"
    if problem is not None:
        raise DDGRuntimeError(
            f"{path} {problem}; delete the ddg_rank*.ckpt files in {path.parent} to start "
            "afresh, or use another checkpoint folder (--out)"
        )
    return state


def _check_same_config(cfg: DDGRunConfig, modules: Sequence[nn.Sequential], rank: int,
                       world: int, device: torch.device) -> int:
    """The configuration handshake (`highwaybp.distributed.handshake`): under torchrun every
    rank parses its own arguments and builds its own model, and ranks that split it
    differently or run another semantics or step count would exchange tensors that still
    fit. Any difference raises `ConfigMismatchError` on every rank."""
    sizes = [len(m) for m in modules]
    return check_same_config("DDG", {
        "runtime": "DDG",
        "num_stages": world,
        "boundaries": [sum(sizes[:i]) for i in range(world + 1)],
        "num_layers": sum(sizes),
        "semantics": cfg.semantics,
        "steps": cfg.steps,
        "rng_seed": cfg.rng_seed,
        "dtype": dtype_text(modules),
        "layers": [layer_fingerprint(layer) for m in modules for layer in m],
    }, rank=rank, world=world, timeout=cfg.timeout, device=device)


def run_rank(
    rank: int,
    world: int,
    cfg: DDGRunConfig,
    device: torch.device | str = "cpu",
    progress: Optional[Callable[[int], None]] = None,
    watchdog: Optional[Watchdog] = None,
) -> dict[str, Any]:
    """Run the DDG schedule as rank `rank` of `world` (= K); the process group must be up.

    Returns {"rank", "module_state", "losses" (last rank: [steps]), "correct" (last rank:
    per-step count of right predictions), "stats": timings [s], peak RSS [MB], threads}.
    """
    if cfg.semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {cfg.semantics!r}")
    device = torch.device(device)
    modules = split_model(cfg.build_model(), world, cfg.boundaries, cfg.balance)
    channel = _check_same_config(cfg, modules, rank, world, device)
    module = modules[rank].to(device)
    optimizer = cfg.optimizer_factory(module.parameters())
    scheduler = cfg.scheduler_factory(optimizer) if cfg.scheduler_factory else None
    # Same RNG stream as stage `rank` of the single-process oracle (make_stages).
    seed = None if cfg.rng_seed is None else cfg.rng_seed + rank
    stage = DDGStage(module, rank, world, optimizer, scheduler, cfg.semantics, seed)
    del modules
    link = Link(rank, world, cfg.timeout, device, channel=channel)
    last, first_rank = rank == world - 1, rank == 0
    losses: list[float] = []
    correct: list[int] = []
    pending_err: Optional[torch.Tensor] = None
    out_like: Optional[torch.Tensor] = None
    start = 0
    ckpt = _ckpt_path(cfg, rank)
    if ckpt is not None and (state := _load_rank_checkpoint(ckpt, rank, world, cfg.steps)):
        module.load_state_dict(state["module"])
        stage.load_state_dict(state["stage"])
        start, losses, correct = state["t"], state["losses"], state["correct"]
        pending_err, out_like = state["pending_err"], state["out_like"]
    if world > 1:  # every rank must resume from the same step
        steps_seen = torch.tensor([start], dtype=torch.int64, device=device)
        gathered = [torch.zeros_like(steps_seen) for _ in range(world)]
        try:
            dist.all_gather(gathered, steps_seen)
        except Exception as err:  # typically: a peer failed to build or load its part
            raise DDGRuntimeError(
                f"DDG rank {rank}/{world}: agreeing on the start step with the other ranks "
                f"failed: {type(err).__name__}: {err}. A peer failed before its first "
                "step (see its message); every rank stops."
            ) from err
        if len({int(g) for g in gathered}) != 1:
            raise DDGRuntimeError(
                f"DDG per-rank checkpoints are at different steps {[int(g) for g in gathered]}"
                "; delete the ddg_rank*.ckpt files to restart"
            )
    stats: dict[str, Any] = {"forward_s": 0.0, "backward_s": 0.0, "wait_s": 0.0, "steps": 0}
    stats["step_end_s"] = []  # time since the loop started at the end of each step
    stats["max_in_flight_mb"] = 0.0  # stage inputs + stashed parameters held

    t0 = time.perf_counter()
    for t in range(start, cfg.steps):
        if first_rank or last:
            xb, yb = cfg.batches(t)
            xb, yb = xb.to(device), yb.to(device)
        tic = time.perf_counter()
        x = xb if first_rank else link.recv_activation(t)
        stats["wait_s"] += time.perf_counter() - tic
        send_back = rank > 0 and t < cfg.steps - 1  # the error is used at step t+1
        if last:
            tic = time.perf_counter()
            loss, out, g = stage.train_last(t, x, yb, cfg.loss_fn, need_input_grad=rank > 0)
            stats["backward_s"] += time.perf_counter() - tic
            losses.append(float(loss))
            if out.dim() == 2 and yb.dim() == 1:
                correct.append(int((out.argmax(1) == yb).sum()))
            if send_back:
                link.send_error(g, t)
        else:
            tic = time.perf_counter()
            y = stage.forward(t, x)
            stats["forward_s"] += time.perf_counter() - tic
            link.send_activation(y, t)
            out_like = y
            stats["max_in_flight_mb"] = max(stats["max_in_flight_mb"], _in_flight_mb(stage))
            if t - stage.delay >= 0:
                tic = time.perf_counter()
                g = stage.backward(t, pending_err, need_input_grad=rank > 0)
                stats["backward_s"] += time.perf_counter() - tic
                if send_back:
                    link.send_error(g, t)
            pending_err = None
            if t + 1 < cfg.steps and t + 1 - stage.delay >= 0:
                tic = time.perf_counter()
                pending_err = link.recv_error(out_like, t)
                stats["wait_s"] += time.perf_counter() - tic
        stage.end_step()
        link.flush(t)
        stats["steps"] += 1
        stats["step_end_s"].append(time.perf_counter() - t0)
        if watchdog is not None:
            watchdog.beat()
        if progress is not None:
            progress(t)
        every = cfg.checkpoint_every
        if ckpt is not None and every > 0 and (t + 1) % every == 0 and t + 1 < cfg.steps:
            save_checkpoint(
                ckpt,
                {
                    "t": t + 1,
                    "rank": rank,
                    "world": world,
                    "module": module.state_dict(),
                    "stage": stage.state_dict(),
                    "losses": losses,
                    "correct": correct,
                    "pending_err": pending_err,
                    "out_like": None if out_like is None else torch.empty_like(out_like),
                },
            )
    stats["total_s"] = time.perf_counter() - t0
    stats["peak_rss_mb"] = _peak_rss_mb()
    stats["threads"] = torch.get_num_threads()
    stats["updates"] = stage.updates
    stats["params"] = sum(p.numel() for p in module.parameters())
    return {
        "rank": rank,
        "world": world,
        "module_state": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "losses": losses,
        "correct": correct,
        "stats": stats,
    }


# ----------------------------------------------------------------------------- launch


def _pick_backend(cfg: DDGRunConfig) -> str:
    if cfg.backend is not None:
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def _setup_rank(rank: int, world: int, cfg: DDGRunConfig) -> torch.device:
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    if _pick_backend(cfg) == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def run_from_env(cfg: DDGRunConfig, result_dir: Optional[str] = None) -> dict[str, Any]:
    """Entry point under `torchrun`: env:// rendezvous, one rank per module.

    With `result_dir`, every rank saves its result there as rank{r}.pt and all ranks
    meet at a (bounded) barrier, so rank 0 can then read every module.
    """
    rank, world = torchrun_rank_world("run_from_env", "highwaybp.ddg.spawn_ddg(cfg, world)")
    check_config(cfg, world)
    device = _setup_rank(rank, world, cfg)
    watchdog = Watchdog(cfg.timeout + 30.0, rank)
    timeout = datetime.timedelta(seconds=cfg.timeout)
    try:
        dist.init_process_group(_pick_backend(cfg), timeout=timeout)
        watchdog.beat()
        result = run_rank(rank, world, cfg, device, watchdog=watchdog)
        watchdog.beat()
        if result_dir is not None:
            Path(result_dir).mkdir(parents=True, exist_ok=True)
            torch.save(result, Path(result_dir) / f"rank{rank}.pt")
            dist.barrier()
        dist.destroy_process_group()
        return result
    finally:
        watchdog.stop()


def _spawn_entry(
    rank: int,
    world: int,
    cfg: DDGRunConfig,
    init_method: str,
    events: Any,
    result_dir: str,
) -> None:
    device = _setup_rank(rank, world, cfg)

    def work(watchdog: Watchdog) -> dict:
        return run_rank(rank, world, cfg, device,
                        progress=lambda t: events.put(("step", rank, t)), watchdog=watchdog)

    rank_process(rank, world, backend=_pick_backend(cfg), timeout=cfg.timeout,
                 init_method=init_method, events=events, result_dir=result_dir, work=work,
                 label="DDG")


def check_config(cfg: DDGRunConfig, world: int) -> None:
    """Fail early, in the launching process, on settings every rank would reject."""
    if cfg.semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {cfg.semantics!r}")
    if world < 1:
        raise ValueError(f"need at least one rank (one per module), got {world}")
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {cfg.timeout}")


def assemble_model(cfg: DDGRunConfig, results: Sequence[dict]) -> nn.Sequential:
    """The whole trained model from the per-rank results (built with cfg.build_model)."""
    modules = split_model(cfg.build_model(), len(results), cfg.boundaries, cfg.balance)
    for m, res in zip(modules, sorted(results, key=lambda r: r["rank"])):
        m.load_state_dict(res["module_state"])
    return nn.Sequential(*modules)
