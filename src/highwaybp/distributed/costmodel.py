"""Step-time model of layer-parallel training: Highway-BP, FixedPoint, exact pipeline
schedules (GPipe, 1F1B, zero bubble) and DDG, as small discrete-event simulations.

Inputs are measured (or derived) costs: per layer and per micro-batch the forward, the
input VJP, the parameter VJP and both at once (exact backprop's per-layer backward), the
re-run, the scan cost per state, the bytes of a state, and a link (latency + bytes /
bandwidth). Each schedule is written as per-rank lists of tasks in the order the runtime
runs them, with cross-rank dependencies carrying a message delay; `simulate` starts every
task as soon as its rank is free and its inputs have arrived. The same timeline gives the
step time, the per-rank per-phase busy time, the idle time and the critical path.

Assumptions (docs/costmodel.md discusses them):
- a rank runs one task at a time (one thread; no compute/communication overlap on a rank
  other than messages in flight);
- a message costs `latency + bytes / bandwidth` between the end of the sending task and
  the start of the receiving one; it does not occupy either rank (gloo posts sends
  asynchronously; receiving into a buffer is not modelled as work) and links do not
  contend (each message its own link);
- costs add: a sweep over n layers and M micro-batches costs the sum of the per-layer,
  per-micro-batch VJPs (the runtime's one autograd call over all of them does that work);
- the exact schedules' orders are torch.distributed.pipelining's: GPipe and 1F1B as their
  runtime loops run them, the zero-bubble family from the schedules' own `pipeline_order`.

The paper's Eq. 13, T_HBP = T_fwd + (k/L) T_bwd + O(k log L), is the special case of
`highway` with one layer per rank (P = L), one micro-batch, no parameter sweep (v_par = 0,
v_in = v_both = T_bwd / L) and the distributed scan (its O(log P) message hops per scan);
tests/test_costmodel.py checks it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

PHASES = ("forward", "loss", "rerun", "sweep", "scan", "mix", "param", "backward", "comm",
          "idle")


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class LayerCost:
    """Costs of one layer on one micro-batch, in seconds (or any one unit).

    forward: the forward as the schedule runs it (recording a graph: exact schedules and
        Highway with recompute=False).
    vjp_input / vjp_param / vjp_both: the VJP w.r.t. the layer's input only, w.r.t. its
        parameters only, and both in one call (exact backprop's per-layer backward).
    forward_nograd: the forward without a tape (Highway with recompute=True); default =
        forward.
    rerun: re-running the layer under autograd in the backward; default = forward.
    scan: one scan step on this layer's output state (a multiply-add of a state).
    state_bytes: bytes of the layer's output state (a message carrying it).
    """

    forward: float
    vjp_input: float
    vjp_param: float
    vjp_both: float
    forward_nograd: float | None = None
    rerun: float | None = None
    scan: float = 0.0
    state_bytes: int = 0

    @property
    def forward_tapeless(self) -> float:
        return self.forward if self.forward_nograd is None else self.forward_nograd

    @property
    def rerun_cost(self) -> float:
        return self.forward if self.rerun is None else self.rerun


def uniform_layers(num_layers: int, forward: float = 1.0, vjp_input: float = 1.0,
                   vjp_param: float = 1.0, vjp_both: float | None = None, **kw: Any
                   ) -> list[LayerCost]:
    """`num_layers` identical layers (vjp_both defaults to vjp_input + vjp_param)."""
    both = vjp_input + vjp_param if vjp_both is None else vjp_both
    return [LayerCost(forward, vjp_input, vjp_param, both, **kw) for _ in range(num_layers)]


@dataclass(frozen=True)
class Link:
    """A message of b bytes takes latency + b / bandwidth seconds."""

    latency: float = 0.0
    bandwidth: float = math.inf  # bytes per second

    def time(self, nbytes: float) -> float:
        return self.latency + (nbytes / self.bandwidth if nbytes else 0.0)


# ----------------------------------------------------------------------------- simulation


@dataclass
class Task:
    """One piece of work on one rank. deps: (task id, message bytes or None for a local
    dependency); a dependency with bytes waits for the message to arrive over the link."""

    id: str
    rank: int
    phase: str
    duration: float
    deps: list[tuple[str, float | None]] = field(default_factory=list)
    start: float = math.nan
    end: float = math.nan
    why: tuple[str, str] | None = None  # ("rank" | "msg", task id) that set the start


@dataclass
class Timeline:
    """A simulated step: every task with its start and end, per rank in run order."""

    ranks: list[list[Task]]
    link: Link

    @property
    def step_time(self) -> float:
        return max((t.end for r in self.ranks for t in r), default=0.0)

    def busy(self) -> list[dict[str, float]]:
        """Per rank: seconds of each phase (idle = step time minus the rest)."""
        out = []
        for tasks in self.ranks:
            d: dict[str, float] = {}
            for t in tasks:
                d[t.phase] = d.get(t.phase, 0.0) + t.duration
            d["idle"] = self.step_time - sum(d.values())
            out.append(d)
        return out

    def critical_path(self) -> list[tuple[int, str, float, float]]:
        """(rank, phase, start, end) segments that set the step time, in time order:
        task work, "comm" for a message in flight, "idle" for a rank waiting on nothing
        modelled (never happens inside a step: a task starts when its rank is free or a
        message arrives)."""
        by_id = {t.id: t for r in self.ranks for t in r}
        if not by_id:
            return []
        t = max(by_id.values(), key=lambda x: x.end)
        path: list[tuple[int, str, float, float]] = []
        while t is not None:
            path.append((t.rank, t.phase, t.start, t.end))
            if t.why is None:
                if t.start > 0:
                    path.append((t.rank, "idle", 0.0, t.start))
                break
            kind, pid = t.why
            prev = by_id[pid]
            if kind == "msg" and t.start > prev.end:
                path.append((t.rank, "comm", prev.end, t.start))
            t = prev
        return path[::-1]

    def critical_phases(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, phase, a, b in self.critical_path():
            out[phase] = out.get(phase, 0.0) + (b - a)
        return out

    def summary(self) -> dict[str, Any]:
        return {"step_s": self.step_time, "busy": self.busy(),
                "critical_path": self.critical_phases()}


def simulate(ranks: list[list[Task]], link: Link) -> Timeline:
    """Start each rank's tasks in list order, each as soon as the rank is free and all its
    dependencies have ended (plus the message time for remote ones). Raises on a deadlock
    (a schedule whose orders wait on each other)."""
    by_id: dict[str, Task] = {}
    for tasks in ranks:
        for t in tasks:
            if t.id in by_id:
                raise ValueError(f"duplicate task id {t.id!r}")
            by_id[t.id] = t
    for t in by_id.values():
        for d, _ in t.deps:
            if d not in by_id:
                raise ValueError(f"task {t.id!r} depends on unknown task {d!r}")
    nxt = [0] * len(ranks)
    free = [0.0] * len(ranks)
    last: list[str | None] = [None] * len(ranks)
    done: set[str] = set()
    remaining = sum(len(r) for r in ranks)
    while remaining:
        progressed = False
        for r, tasks in enumerate(ranks):
            while nxt[r] < len(tasks):
                t = tasks[nxt[r]]
                if any(d not in done for d, _ in t.deps):
                    break
                start, why = free[r], (("rank", last[r]) if last[r] else None)
                for d, nbytes in t.deps:
                    dep = by_id[d]
                    arrive = dep.end + (0.0 if nbytes is None else link.time(nbytes))
                    if arrive > start:
                        start, why = arrive, ("msg" if nbytes is not None else "rank", d)
                t.start, t.end, t.why = start, start + t.duration, why
                free[r], last[r] = t.end, t.id
                done.add(t.id)
                nxt[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [tasks[nxt[r]].id for r, tasks in enumerate(ranks) if nxt[r] < len(tasks)]
            raise RuntimeError(f"schedule deadlocks: waiting tasks {stuck}")
    return Timeline(ranks, link)


# ----------------------------------------------------------------------------- helpers


def split_even(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges, as even as possible, earlier parts one more (the runtime's and
    the baselines' default split)."""
    if not 1 <= parts <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {parts} non-empty parts")
    base, extra = divmod(num_layers, parts)
    cuts = [0]
    for s in range(parts):
        cuts.append(cuts[-1] + base + (1 if s < extra else 0))
    return list(zip(cuts[:-1], cuts[1:]))


def _ranges(layers: Sequence[LayerCost], parts: int,
            boundaries: Sequence[int] | None) -> list[tuple[int, int]]:
    if boundaries is None:
        return split_even(len(layers), parts)
    cuts = list(boundaries)
    if len(cuts) != parts + 1 or cuts[0] != 0 or cuts[-1] != len(layers) or any(
            b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"boundaries must be {parts + 1} increasing layer counts from 0 to "
                         f"{len(layers)}, got {boundaries}")
    return list(zip(cuts[:-1], cuts[1:]))


def _sum(layers: Sequence[LayerCost], rng: tuple[int, int], attr: str) -> float:
    return sum(getattr(layers[i], attr) for i in range(*rng))


# ----------------------------------------------------------------------------- exact


EXACT_SCHEDULES = ("gpipe", "1f1b", "interleaved-zb", "interleaved-zb-2", "zbv", "dualpipev")


def exact(layers: Sequence[LayerCost], num_ranks: int, microbatches: int, link: Link,
          schedule: str = "gpipe", loss: float = 0.0,
          boundaries: Sequence[int] | None = None) -> Timeline:
    """Exact backprop on a pipeline schedule (torch.distributed.pipelining's orders).

    "gpipe": all forwards, then the backwards (micro-batch order 0..M-1, as torch's
    ScheduleGPipe and HighwayPipeline(method=Exact()) run them); "1f1b": min(M, P - r)
    warm-up forwards on rank r, then one backward one forward; the zero-bubble family
    ("interleaved-zb" one stage per rank, "interleaved-zb-2" two in a loop, "zbv" and
    "dualpipev" two stages per rank in a V)
    splits the backward into input (I, vjp_input) and weight (W) parts, in the order the
    torch schedule builds. W costs vjp_both - vjp_input: torch's weight backward reuses the
    gradients of the layer's intermediate nodes that I computed, so I + W is one full
    backward (Highway's parameter sweep has no such I before it: it costs vjp_param).
    `loss` is the cost of the loss (and its gradient) per micro-batch on the last stage.
    """
    if schedule in ("gpipe", "1f1b"):
        orders = _single_stage_orders(schedule, num_ranks, microbatches)
        owners = list(range(num_ranks))
    else:
        orders, owners = _torch_orders(schedule, num_ranks, microbatches)
    num_stages = len(owners)
    ranges = _ranges(layers, num_stages, boundaries)
    fwd = [_sum(layers, r, "forward") for r in ranges]
    both = [_sum(layers, r, "vjp_both") for r in ranges]
    vin = [_sum(layers, r, "vjp_input") for r in ranges]
    out_bytes = [layers[r[1] - 1].state_bytes for r in ranges]  # stage s's output state
    ranks: list[list[Task]] = [[] for _ in range(num_ranks)]
    last = num_stages - 1

    def remote(s_from: int, s_to: int, nbytes: int) -> float | None:
        return None if owners[s_from] == owners[s_to] else nbytes

    for rank, order in enumerate(orders):
        for kind, s, m in order:
            deps: list[tuple[str, float | None]] = []
            if kind == "F":
                if s > 0:
                    deps.append((f"F{s - 1}.{m}", remote(s - 1, s, out_bytes[s - 1])))
                duration, phase = fwd[s] + (loss if s == last else 0.0), "forward"
            elif kind in ("B", "I"):
                if s == last:
                    deps.append((f"F{s}.{m}", None))
                else:
                    deps.append((f"G{s + 1}.{m}", remote(s + 1, s, out_bytes[s])))
                duration = both[s] if kind == "B" else vin[s]
                phase = "backward" if kind == "B" else "sweep"
            else:  # W: what the full backward costs beyond I (see the docstring)
                deps.append((f"G{s}.{m}", None))
                duration, phase = max(both[s] - vin[s], 0.0), "param"
            tid = f"G{s}.{m}" if kind in ("B", "I") else f"{kind}{s}.{m}"
            ranks[rank].append(Task(tid, rank, phase, duration, deps))
    return simulate(ranks, link)


def _single_stage_orders(schedule: str, world: int, mbs: int) -> list[list[tuple[str, int, int]]]:
    orders = []
    for r in range(world):
        if schedule == "gpipe":
            orders.append([("F", r, m) for m in range(mbs)] + [("B", r, m) for m in range(mbs)])
            continue
        warm = min(mbs, world - r)  # torch 2.13 Schedule1F1B: num_stages - stage_index
        order = [("F", r, m) for m in range(warm)]
        f, b = warm, 0
        while b < mbs:
            order.append(("B", r, b))
            b += 1
            if f < mbs:
                order.append(("F", r, f))
                f += 1
        orders.append(order)
    return orders


_TORCH_CLASSES = {"interleaved-zb": ("ScheduleInterleavedZeroBubble", 1),
                  "interleaved-zb-2": ("ScheduleInterleavedZeroBubble", 2),
                  "zbv": ("ScheduleZBVZeroBubble", 2),
                  "dualpipev": ("ScheduleDualPipeV", 2)}


def _torch_orders(schedule: str, world: int, mbs: int
                  ) -> tuple[list[list[tuple[str, int, int]]], list[int]]:
    """The per-rank compute actions that torch's schedule class builds (its pipeline_order,
    built without processes, as torch's own schedule visualizer does), and each stage's
    rank. Overlapped F/B pairs (DualPipeV) run one after the other on a one-thread rank.

    Raises RuntimeError with the reason where this torch lacks the schedule or builds it
    differently (`highwaybp.distributed.baselines.missing_schedule`)."""
    if schedule not in _TORCH_CLASSES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {EXACT_SCHEDULES}")
    missing = unmodelled(schedule)
    if missing is not None:
        raise RuntimeError(f"cannot model schedule {schedule!r}: {missing}")
    return read_torch_orders(schedule, world, mbs)


@functools.cache
def unmodelled(schedule: str) -> str | None:
    """Why this torch's class for `schedule` gives no order to model, or None (always None
    for GPipe and 1F1B, modelled without torch). An older torch in the declared range lacks
    the class (2.5: ZBV, DualPipeV) or builds it otherwise (2.5's InterleavedZeroBubble):
    tried on 2 ranks and 4 micro-batches."""
    if schedule not in _TORCH_CLASSES:
        return None
    import torch
    from torch.distributed import pipelining

    cls_name = _TORCH_CLASSES[schedule][0]
    if not hasattr(pipelining, cls_name):
        return (f"torch {torch.__version__} has no torch.distributed.pipelining.{cls_name} "
                f"(added in a later torch release)")
    try:
        read_torch_orders(schedule, 2, 4)
    except Exception as error:  # an older class: other arguments or stage attributes
        return (f"torch {torch.__version__}'s torch.distributed.pipelining.{cls_name} does "
                f"not build as this code uses it ({type(error).__name__}: {error})")
    return None


def read_torch_orders(schedule: str, world: int, mbs: int
                      ) -> tuple[list[list[tuple[str, int, int]]], list[int]]:
    """`_torch_orders` without the check that this torch has the schedule (what the check
    itself runs)."""
    from unittest import mock

    from torch.distributed import pipelining
    from torch.distributed.pipelining.stage import PipelineStage

    cls_name, per_rank = _TORCH_CLASSES[schedule]
    cls = getattr(pipelining, cls_name)
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = 0, world, None
    stage.num_stages = world * per_rank
    instance = cls([stage] * per_rank, mbs)
    num_stages = world * per_rank
    owners = [0] * num_stages
    orders: list[list[tuple[str, int, int]]] = []
    for r in range(world):
        order: list[tuple[str, int, int]] = []
        for action in instance.pipeline_order[r]:
            if action is None:
                continue
            for a in (action.sub_actions or (action,)):
                kind = a.computation_type.value
                if kind in ("F", "B", "I", "W"):
                    order.append((kind, a.stage_index, a.microbatch_index))
                    owners[a.stage_index] = r
        orders.append(order)
    return orders, owners


# ----------------------------------------------------------------------------- Highway


SCANS = ("distributed", "centralized", "sequential")


def highway(layers: Sequence[LayerCost], num_ranks: int, microbatches: int, link: Link,
            k: int, scan: str = "distributed", recompute: bool = False,
            fixed_point: bool = False, loss: float = 0.0,
            boundaries: Sequence[int] | None = None, anderson: int = 0) -> Timeline:
    """Highway(k) (or FixedPoint(k)) on `HighwayPipeline`: the forward pipelined over
    micro-batches as GPipe's; then, on all micro-batches at once, w^0 by a scan, k
    iterations of (input-VJP sweep on every rank at once, scan across ranks), and the
    parameter sweep. FixedPoint has no scan: each iteration sends the VJP of a rank's
    first layer to the rank before. recompute=True: the forward runs without a tape and
    the backward first re-runs every layer under autograd.

    Scans ("highwaybp.distributed.dscan"): local scan, then the carries across ranks
    ("distributed": 1 + ceil(log2(P - 1)) message hops; "centralized": to rank 0 and back;
    "sequential": P - 1 dependent hops carrying the scan itself), then a local fix-up.

    anderson=m (>= 2, with k < L: a fixed k >= L runs plain steps): after each iteration's
    F value, every rank forms its residual and w + 1 inner products (w = the window's
    length, at most m; priced as w + 2 state-sized passes, like a scan's multiply-add),
    the ranks all-reduce those w + 2 float64 numbers (priced as 2 ceil(log2 P) messages
    after the slowest rank's inner products: a recursive-doubling all-reduce's hops), and
    each rank combines w of its states (w passes).
    """
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    P, M = num_ranks, microbatches
    ranges = _ranges(layers, P, boundaries)
    iterations = min(k, len(layers))
    ranks: list[list[Task]] = [[] for _ in range(P)]
    fwd_attr = "forward_tapeless" if recompute else "forward"
    state_bytes = [layers[b - 1].state_bytes for _, b in ranges]  # rank r's top state
    for r, rng in enumerate(ranges):
        for m in range(M):
            deps = [(f"F{r - 1}.{m}", float(state_bytes[r - 1]))] if r > 0 else []
            ranks[r].append(Task(f"F{r}.{m}", r, "forward", _sum(layers, rng, fwd_attr), deps))
            if r == P - 1 and loss:
                ranks[r].append(Task(f"L{m}", r, "loss", loss))
        if recompute:
            ranks[r].append(Task(f"R{r}", r, "rerun", M * _sum(layers, rng, "rerun_cost")))
    scan_cost = [M * _sum(layers, rng, "scan") for rng in ranges]
    carry_bytes = [M * b for b in state_bytes]
    combine = [M * layers[b - 1].scan for _, b in ranges]  # one state-sized multiply-add
    if fixed_point:
        for j in range(1, iterations + 1):
            for r, rng in enumerate(ranges):
                deps = [(f"V{r + 1}.{j - 1}", float(carry_bytes[r]))] if (
                    r < P - 1 and j > 1) else []
                # The VJP sweep of iteration j needs w^{j-1} on this rank's top state,
                # which comes from rank r+1's sweep j-1.
                ranks[r].append(Task(f"V{r}.{j}", r, "sweep",
                                     M * _sum(layers, rng, "vjp_input"), deps))
                ranks[r].append(Task(f"A{r}.{j}", r, "scan", scan_cost[r]))
            if anderson >= 2 and k < len(layers):
                _mix_tasks(ranks, j, min(j, anderson), scan_cost, link)
        last_deps = {r: [(f"V{r + 1}.{iterations}", float(carry_bytes[r]))]
                     for r in range(P - 1)} if iterations else {}
    else:
        for j in range(0, iterations + 1):
            for r, rng in enumerate(ranges):
                if j > 0:
                    ranks[r].append(Task(f"V{r}.{j}", r, "sweep",
                                         M * _sum(layers, rng, "vjp_input")))
            _scan_tasks(ranks, j, scan, scan_cost, combine, carry_bytes)
            if j > 0:  # w^j = w^0 + u: one add per state
                for r in range(P):
                    ranks[r].append(Task(f"A{r}.{j}", r, "scan", scan_cost[r]))
                if anderson >= 2 and k < len(layers):
                    _mix_tasks(ranks, j, min(j, anderson), scan_cost, link)
        last_deps = {}
    for r, rng in enumerate(ranges):
        ranks[r].append(Task(f"W{r}", r, "param", M * _sum(layers, rng, "vjp_param"),
                             last_deps.get(r, [])))
    return simulate(ranks, link)


def _mix_tasks(ranks: list[list[Task]], j: int, window: int, cost: list[float],
               link: Link) -> None:
    """Append iteration j's Anderson mixing to every rank (see `highway`): inner products,
    the all-reduce of window + 2 numbers, the combination of `window` states."""
    P = len(ranks)
    nbytes = 8.0 * (window + 2)
    hops = 2 * math.ceil(math.log2(P)) if P > 1 else 0
    for r in range(P):
        ranks[r].append(Task(f"D{r}.{j}", r, "mix", (window + 2) * cost[r]))
    for r in range(P):
        deps = [(f"D{q}.{j}", nbytes if q != r else None) for q in range(P)] if P > 1 else []
        # the first hop is the message in `deps`; the rest of the all-reduce's hops follow
        ranks[r].append(Task(f"G{r}.{j}", r, "comm", max(hops - 1, 0) * link.time(nbytes),
                             deps))
        ranks[r].append(Task(f"M{r}.{j}", r, "mix", window * cost[r]))


def _scan_tasks(ranks: list[list[Task]], j: int, scan: str, cost: list[float],
                combine: list[float], carry_bytes: list[int]) -> None:
    """Append scan j's tasks (local scan, carries, fix-up) to every rank, as dscan runs.
    cost[r]: a scan over rank r's states; combine[r]: one carry multiply-add on rank r."""
    P = len(ranks)
    local = [f"S{r}.{j}" for r in range(P)]
    if scan == "sequential" or P == 1:
        for r in range(P - 1, -1, -1):
            deps = [(local[r + 1], float(carry_bytes[r]))] if r < P - 1 else []
            ranks[r].append(Task(local[r], r, "scan", cost[r], deps))
        return
    for r in range(P):
        ranks[r].append(Task(local[r], r, "scan", cost[r]))
    if scan == "centralized":
        last = P - 1
        deps = [(local[r], float(carry_bytes[r - 1])) for r in range(1, P)]
        # Rank 0 combines P - 1 carries: one state-sized multiply-add each.
        ranks[0].append(Task(f"C{j}", 0, "scan", sum(combine[1:]), deps))
        for r in range(1, last):
            ranks[r].append(Task(f"X{r}.{j}", r, "scan", cost[r],
                                 [(f"C{j}", float(carry_bytes[r]))]))
        ranks[0].append(Task(f"X0.{j}", 0, "scan", cost[0]))
        return
    # distributed: dscan.exclusive_carries' log-depth exchange; acc[r] = the task whose
    # end holds rank r's current accumulated carry.
    top = P - 2
    acc: dict[int, str] = {}
    for r in range(0, top + 1):
        tid = f"H{r}.{j}.0"
        ranks[r].append(Task(tid, r, "scan", 0.0, [(local[r + 1], float(carry_bytes[r]))]))
        acc[r] = tid
    d = 1
    while d <= top:
        new = dict(acc)
        for r in range(0, top + 1):
            if r + d <= top:
                tid = f"H{r}.{j}.{d}"
                ranks[r].append(Task(tid, r, "scan", combine[r],
                                     [(acc[r + d], float(carry_bytes[r]))]))
                new[r] = tid
        acc = new
        d *= 2
    for r in range(0, top + 1):
        ranks[r].append(Task(f"X{r}.{j}", r, "scan", cost[r]))


# ----------------------------------------------------------------------------- DDG


def ddg(layers: Sequence[LayerCost], modules: int, link: Link, recompute: bool = False,
        steps: int | None = None, boundaries: Sequence[int] | None = None) -> float:
    """Steady-state seconds per step of DDG with K modules (docs/ddg.md): module s runs the
    forward of batch t, then the backward of batch t - (K-1-s) with the error module s+1
    sent; the forward stays sequential across modules, backwards overlap the later
    modules' forwards. recompute=True (Features Replay) re-runs the module's forward
    before its backward. Simulates `steps` steps (default 4K + 8) and returns the mean of
    the last half's step intervals on the last module."""
    K = modules
    steps = steps or 4 * K + 8
    ranges = _ranges(layers, K, boundaries)
    ranks: list[list[Task]] = [[] for _ in range(K)]
    for t in range(steps):
        for s, rng in enumerate(ranges):
            deps = [(f"F{s - 1}.{t}", float(layers[rng[0] - 1].state_bytes))] if s > 0 else []
            ranks[s].append(Task(f"F{s}.{t}", s, "forward", _sum(layers, rng, "forward"), deps))
            b = t - (K - 1 - s)
            if b < 0:
                continue
            deps = [(f"B{s + 1}.{b}", float(layers[rng[1] - 1].state_bytes))] if s < K - 1 else []
            cost = _sum(layers, rng, "vjp_both") + (
                _sum(layers, rng, "forward") if recompute else 0.0)
            ranks[s].append(Task(f"B{s}.{b}", s, "backward", cost, deps))
    simulate(ranks, link)
    ends = [t.end for t in ranks[-1] if t.phase == "backward"]
    half = ends[len(ends) // 2:]
    return (half[-1] - half[0]) / max(1, len(half) - 1)


# ----------------------------------------------------------------------------- front


@dataclass(frozen=True)
class Config:
    """One measured or predicted configuration: method in ("exact", "highway",
    "fixedpoint"); schedule for exact (EXACT_SCHEDULES), scan for highway."""

    method: str
    ranks: int
    microbatches: int = 1
    k: int = 0
    schedule: str = "gpipe"
    scan: str = "distributed"
    recompute: bool = False
    anderson: int = 0

    @property
    def label(self) -> str:
        if self.method == "exact":
            return f"exact-{self.schedule} P={self.ranks} M={self.microbatches}"
        name = "highway" if self.method == "highway" else "fixedpoint"
        extra = f" {self.scan}" if self.method == "highway" and self.ranks > 1 else ""
        re = " rerun" if self.recompute else ""
        mix = f",anderson={self.anderson}" if self.anderson else ""
        return f"{name}(k={self.k}{mix}){extra}{re} P={self.ranks} M={self.microbatches}"


def predict(config: Config, layers: Sequence[LayerCost], link: Link, loss: float = 0.0,
            boundaries: Sequence[int] | None = None) -> Timeline:
    """The simulated step of `config` with per-micro-batch layer costs `layers`."""
    if config.method == "exact":
        return exact(layers, config.ranks, config.microbatches, link, config.schedule,
                     loss=loss, boundaries=boundaries)
    if config.method in ("highway", "fixedpoint"):
        return highway(layers, config.ranks, config.microbatches, link, config.k,
                       scan=config.scan, recompute=config.recompute,
                       fixed_point=config.method == "fixedpoint", loss=loss,
                       boundaries=boundaries, anderson=config.anderson)
    raise ValueError(f"unknown method {config.method!r}: exact, highway or fixedpoint")


def scale(layers: Sequence[LayerCost], factor: float) -> list[LayerCost]:
    """Every time cost times `factor` (bytes unchanged): e.g. a micro-batch of 1/M rows
    when costs are linear in the rows."""
    def mul(v: float | None) -> float | None:
        return None if v is None else v * factor
    return [replace(c, forward=c.forward * factor, vjp_input=c.vjp_input * factor,
                    vjp_param=c.vjp_param * factor, vjp_both=c.vjp_both * factor,
                    forward_nograd=mul(c.forward_nograd), rerun=mul(c.rerun),
                    scan=c.scan * factor) for c in layers]


def break_even_k(layers: Sequence[LayerCost], num_ranks: int, microbatches: int, link: Link,
                 scan: str = "distributed", anderson: int = 0, recompute: bool = False,
                 boundaries: Sequence[int] | None = None, loss: float = 0.0) -> int:
    """The largest k at which the modelled Highway(k) step on `num_ranks` ranks is no slower
    than the best exact pipeline schedule's (over EXACT_SCHEDULES that accept this P
    and M and that this torch has); -1 when even k = 0 is slower. What
    `Auto(break_even_k=...)` takes for a layer-parallel pipeline. The step time grows with
    k, so the search stops at the first k that loses."""
    best_exact = math.inf
    for schedule in EXACT_SCHEDULES:
        if unmodelled(schedule) is not None:  # this torch lacks it (see `unmodelled`)
            continue
        try:
            t = exact(layers, num_ranks, microbatches, link, schedule, loss=loss,
                      boundaries=boundaries).step_time
        except ValueError:  # a schedule that does not take this P and M
            continue
        best_exact = min(best_exact, t)
    chosen = -1
    for k in range(len(layers) + 1):
        t = highway(layers, num_ranks, microbatches, link, k, scan=scan, recompute=recompute,
                    loss=loss, boundaries=boundaries, anderson=anderson).step_time
        if t > best_exact:
            break
        chosen = k
    return chosen
