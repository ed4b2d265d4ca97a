"""Exact-backprop pipeline baselines on the same processes as `HighwayPipeline`.

`ExactPipeline` runs ordinary backprop through contiguous groups of a chain's layers, one
group per pipeline stage, with a schedule of `torch.distributed.pipelining`:

| schedule | torch class | stages per rank | notes |
|---|---|---|---|
| "gpipe" | ScheduleGPipe | 1 | all forwards, then all backwards |
| "1f1b" | Schedule1F1B | 1 | one forward one backward in steady state; M >= P |
| "interleaved-zb" | ScheduleInterleavedZeroBubble | 1 | ZB1P: input/weight grads split |
| "interleaved-zb-2" | ScheduleInterleavedZeroBubble | 2 (loop) | the same, interleaved |
| "zbv" | ScheduleZBVZeroBubble | 2 (V layout) | needs exactly 2 stages per rank |
| "dualpipev" | ScheduleDualPipeV | 2 (V layout) | needs M >= 2P micro-batches |

All of them run here (torch 2.13, gloo, CPU) at P = 2..4 within the constraints that
`check_schedule` states: 1F1B needs M >= P, DualPipeV M >= 2P, the two-stage schedules
L >= 2P layers, the interleaved zero-bubble schedule M a multiple of its rounds (M // P).

The step follows torch.distributed.pipelining: `step(x)` on the rank that holds the first
stage, `step(target=y)` on the rank that holds the last one (with a "V" layout both are
rank 0), `step()` elsewhere. The loss is `loss_fn(output, target)` per micro-batch and the
gradients are those of the mean over micro-batches (the schedule's `scale_grads`), which
equals the full-batch gradient for a mean-reduced loss. `tests/test_costmodel.py` does
not need this module; `tests/test_bench_layer_parallel.py` checks every schedule's
gradients against single-process autograd in float64.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from highwaybp.distributed.handshake import check_same_config, dtype_text, layer_fingerprint

SCHEDULES: dict[str, tuple[str, int]] = {
    # name -> (torch class name, stages per rank)
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved-zb": ("ScheduleInterleavedZeroBubble", 1),
    "interleaved-zb-2": ("ScheduleInterleavedZeroBubble", 2),
    "zbv": ("ScheduleZBVZeroBubble", 2),
    "dualpipev": ("ScheduleDualPipeV", 2),
}
V_LAYOUT = ("zbv", "dualpipev")


def stage_ranks(schedule: str, world: int) -> list[int]:
    """The rank that holds each of the schedule's P * V stages (in chain order)."""
    _, per_rank = _spec(schedule)
    n = world * per_rank
    if schedule in V_LAYOUT:  # rank r holds stages r and 2P-1-r
        return [s if s < world else n - 1 - s for s in range(n)]
    return [s % world for s in range(n)]  # loop layout: rank r holds r, r+P, ...


def _spec(schedule: str) -> tuple[str, int]:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[schedule]


@functools.cache
def missing_schedule(schedule: str) -> str | None:
    """Why the installed torch cannot run `schedule` as ExactPipeline uses it, or None.

    The declared torch range reaches back to releases whose `torch.distributed.pipelining`
    lacks the newer schedules (torch 2.5 has no ScheduleZBVZeroBubble or ScheduleDualPipeV)
    or works differently (2.5's PipelineStage needs example inputs, its
    ScheduleInterleavedZeroBubble two stages per rank): the benches and tests skip those
    with this reason rather than raise the floor. The zero-bubble orders are checked as the
    cost model reads them (`costmodel.unmodelled`).
    """
    cls, _ = _spec(schedule)
    try:
        from torch.distributed import pipelining
    except ImportError as error:
        return f"torch {torch.__version__} has no torch.distributed.pipelining ({error})"
    if not hasattr(pipelining, cls):
        return (f"torch {torch.__version__} has no torch.distributed.pipelining.{cls} "
                f"(added in a later torch release)")
    needs = inspect.signature(pipelining.PipelineStage).parameters.get("input_args")
    if needs is not None and needs.default is inspect.Parameter.empty:
        return (f"torch {torch.__version__}'s torch.distributed.pipelining.PipelineStage "
                f"needs example inputs (input_args), which ExactPipeline does not pass "
                f"(later releases infer the shapes)")
    from highwaybp.distributed import costmodel

    return costmodel.unmodelled(schedule)


def check_schedule(schedule: str, world: int, microbatches: int) -> str | None:
    """Why `schedule` cannot run with `world` ranks and `microbatches`, or None if it can.

    These are torch's own constraints (as of 2.13), and whether this torch has the schedule
    at all (`missing_schedule`), checked up front so that a bench can list a configuration
    as "does not run" with the reason instead of crashing mid-run.
    """
    missing = missing_schedule(schedule)
    if missing is not None:
        return missing
    cls, per_rank = _spec(schedule)
    if world < 2 and per_rank == 1 and schedule != "gpipe":
        return None  # a single stage is plain backprop with micro-batches; torch allows it
    if schedule == "1f1b" and microbatches < world:
        return f"{cls} needs at least P = {world} micro-batches, got {microbatches}"
    if schedule == "dualpipev" and microbatches < 2 * world:
        return f"{cls} needs at least 2P = {2 * world} micro-batches, got {microbatches}"
    if schedule.startswith("interleaved-zb"):
        rounds = max(1, microbatches // world)
        if microbatches % rounds != 0:
            return (f"{cls} needs the micro-batch count to be a multiple of its rounds "
                    f"(M // P = {rounds}), got M = {microbatches}")
    return None


def split_layers(num_layers: int, parts: int,
                 boundaries: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges for `parts` stages: the given boundaries
    (the start of stages 1..parts-1), else as even as possible (earlier stages get the
    remainder)."""
    if boundaries is None:
        base, extra = divmod(num_layers, parts)
        sizes = [base + (1 if i < extra else 0) for i in range(parts)]
        cuts = [sum(sizes[:i]) for i in range(parts + 1)]
    else:
        cuts = [0, *boundaries, num_layers]
        if len(cuts) != parts + 1:
            raise ValueError(f"{parts} stages need {parts - 1} boundaries, got {len(boundaries)}")
    ranges = list(zip(cuts[:-1], cuts[1:]))
    if any(b <= a for a, b in ranges):
        raise ValueError(f"every stage needs at least one layer: {num_layers} layers into "
                         f"{parts} stages gives {ranges}")
    return ranges


class ExactPipeline:
    """Exact backprop through `layers` split into contiguous stages, on a torch schedule.

    Args:
        layers: the whole chain's layers (every rank builds the same list, e.g. from one
            seed); each rank keeps only its stages' layers.
        num_ranks: P, the ranks of the pipeline (stages = P * stages per rank).
        rank: this process's rank in `group`.
        schedule: a key of `SCHEDULES`.
        microbatches: M; the batch dimension 0 is split into M equal chunks.
        loss_fn: loss(output [B/M, ...], target [B/M, ...]) -> scalar, mean-reduced.
        boundaries: optional first-layer index of stages 1..S-1 (S = P * stages per rank).
        group: the process group (default: the world).
        timeout: seconds the configuration handshake may wait for the other ranks.

    When it is built, the ranks compare their configurations (schedule, ranks, micro-batches,
    the layer split, the chain's length, dtype and each layer's parameter shapes and dtypes;
    `highwaybp.distributed.handshake`) and all raise `ConfigMismatchError` if any differs.

    `step(x=None, target=None) -> Tensor | None`: one training step; fills `.grad` of this
    rank's parameters and returns the mean loss on the rank holding the last stage.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        num_ranks: int,
        rank: int,
        schedule: str,
        microbatches: int,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        boundaries: Sequence[int] | None = None,
        group: Any = None,
        timeout: float = 120.0,
    ) -> None:
        from torch.distributed import pipelining

        reason = check_schedule(schedule, num_ranks, microbatches)
        if reason is not None:
            raise ValueError(f"schedule {schedule!r} cannot run here: {reason}")
        cls_name, per_rank = _spec(schedule)
        self.schedule_name = schedule
        self.rank, self.num_ranks = rank, num_ranks
        self.microbatches = microbatches
        num_stages = num_ranks * per_rank
        owners = stage_ranks(schedule, num_ranks)
        self.ranges = split_layers(len(layers), num_stages, boundaries)
        check_same_config("ExactPipeline", {
            "runtime": "ExactPipeline",
            "num_ranks": num_ranks,
            "schedule": schedule,
            "boundaries": [0, *(b for _, b in self.ranges)],
            "num_layers": len(layers),
            "num_microbatches": microbatches,
            "dtype": dtype_text(layers),
            "layers": [layer_fingerprint(layer) for layer in layers],
        }, rank=rank, world=num_ranks, timeout=timeout, group=group)
        self.stage_indices = [s for s in range(num_stages) if owners[s] == rank]
        self.modules = [nn.Sequential(*layers[a:b]) for a, b in
                        (self.ranges[s] for s in self.stage_indices)]
        self.first_rank, self.last_rank = owners[0], owners[-1]
        device = torch.device("cpu")
        stages = [pipelining.PipelineStage(m, s, num_stages, device, group=group)
                  for m, s in zip(self.modules, self.stage_indices)]
        cls = getattr(pipelining, cls_name)
        self._loss = []
        if per_rank == 1 and cls_name != "ScheduleInterleavedZeroBubble":
            self.schedule = cls(stages[0], microbatches, loss_fn=loss_fn)
        else:
            self.schedule = cls(stages, microbatches, loss_fn=loss_fn)

    def parameters(self):
        for m in self.modules:
            yield from m.parameters()

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def step(self, x: Tensor | None = None, target: Tensor | None = None) -> Tensor | None:
        args = () if x is None else (x,)
        if self.rank == self.first_rank and x is None:
            raise ValueError(f"rank {self.rank} holds the first stage: call step(x)")
        if self.rank == self.last_rank and target is None:
            raise ValueError(f"rank {self.rank} holds the last stage: call step(target=y)")
        losses: list[Tensor] = []
        kwargs: dict[str, Any] = {}
        if self.rank == self.last_rank:
            kwargs = {"target": target, "losses": losses}
        self.schedule.step(*args, **kwargs)
        if losses:
            return torch.stack([loss.detach() for loss in losses]).mean()
        return None


def barrier(group: Any = None) -> None:
    """A gloo barrier (kept here so the bench does not import torch.distributed)."""
    dist.barrier(group=group)
