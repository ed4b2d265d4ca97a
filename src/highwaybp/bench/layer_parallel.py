"""`highwaybp bench layer-parallel`: Highway-BP across processes against pipeline schedules
of exact backprop, measured on this machine and predicted by the cost model.

1. Per-layer costs, in this process with one thread, at each micro-batch size used: the
   forward recording a graph and without one, the input VJP, the parameter VJP (as
   `HighwayPipeline` calls them: one autograd call over a group of layers), both at once
   (exact backprop through the group), a scan step (one state add), the loss.
2. The link: a ping-pong between two local gloo processes at three message sizes, fitted
   to latency + bytes / bandwidth.
3. The runs: for each P, P local processes with one thread each run every configuration
   (Highway k = 0, 1, 2, Highway k = 1 re-running the forward in the backward, FixedPoint
   k = 1, Exact sequential on `HighwayPipeline`, and Highway k = 1 with M micro-batches
   and the centralized scan; GPipe,
   1F1B and the zero-bubble schedules of torch.distributed.pipelining on
   `highwaybp.distributed.baselines.ExactPipeline`) on the same chain, in rounds (one step
   of each configuration per round, a barrier before each step): the step time of a
   configuration is the median over rounds of (latest end - earliest start over ranks).
   Highway runs are traced (`highwaybp.distributed.trace`): per-phase wall and CPU time of
   the median step, and its critical path.
4. Predictions: `highwaybp.distributed.costmodel` from the measured costs and link, for
   every measured configuration, with the error in %. When P exceeds the cores, ranks
   share cores and the wall time is not what the model (one device per rank) predicts:
   the JSON then also gives the CPU-bound prediction max(model, total modelled work /
   cores), and compares the measured per-rank CPU seconds (which do not count waiting for
   a core) with the modelled per-rank busy time.
5. A table of predictions (marked as such) for the paper's models on P = 2..64 devices
   from FLOP counts at a stated device throughput and link (`PAPER_MODELS`).

Times on a loaded machine are noisy; the committed JSON must come from a quiet run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from highwaybp.bench.timing import machine_info
from highwaybp.distributed import costmodel as cm
from highwaybp.train.cli_types import out_file, positive_int

DEFAULT_OUT = "results/bench/layer_parallel/bench.json"


# ----------------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class Stack:
    """Residual MLP blocks h + W2 GELU(W1 LN(h)): depth L, width, hidden, rows per batch."""

    depth: int = 16
    width: int = 256
    hidden: int = 512
    rows: int = 512
    seed: int = 0

    def build(self, dtype: torch.dtype = torch.float32):
        import highwaybp as hbp

        torch.manual_seed(self.seed)
        layers = [hbp.ResidualLayer(nn.Sequential(
            nn.LayerNorm(self.width), nn.Linear(self.width, self.hidden), nn.GELU(),
            nn.Linear(self.hidden, self.width)), hbp.Identity()) for _ in range(self.depth)]
        chain = hbp.ResidualChain(layers).to(dtype)
        gen = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.rows, self.width, generator=gen, dtype=dtype)
        y = torch.randn(self.rows, self.width, generator=gen, dtype=dtype)
        return chain, x, y


def loss_fn(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(h, target)


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class RunConfig:
    """A measured configuration. runtime: "highway" (HighwayPipeline) or "torch"
    (ExactPipeline); method: "highway", "fixedpoint" or "exact"; schedule for exact."""

    runtime: str
    method: str
    microbatches: int
    k: int = 0
    scan: str = "distributed"
    schedule: str = "gpipe"
    recompute: bool = False

    @property
    def label(self) -> str:
        if self.method == "exact":
            name = "exact-sequential" if self.runtime == "highway" else f"exact-{self.schedule}"
            return f"{name} M={self.microbatches}"
        if self.method == "fixedpoint":
            return f"fixedpoint(k={self.k}) M={self.microbatches}"
        rerun = " rerun" if self.recompute else ""
        return f"highway(k={self.k}) {self.scan}{rerun} M={self.microbatches}"

    def model_config(self, ranks: int) -> cm.Config:
        return cm.Config(self.method, ranks, self.microbatches, self.k, self.schedule,
                         self.scan, recompute=self.recompute)


def run_configs(ranks: int, ks: list[int], microbatches: list[int], depth: int,
                rows: int) -> tuple[list[RunConfig], list[dict[str, str]]]:
    """The configurations measured at P = ranks, and those skipped with the reason."""
    from highwaybp.distributed.baselines import SCHEDULES, check_schedule

    out = [RunConfig("highway", "highway", 1, k=k) for k in ks]
    out.append(RunConfig("highway", "highway", 1, k=1, recompute=True))
    out.append(RunConfig("highway", "fixedpoint", 1, k=1))
    out.append(RunConfig("highway", "exact", 1))
    if ranks == 1:
        return out, []
    out.append(RunConfig("highway", "highway", 1, k=1, scan="centralized"))
    skipped = []
    mbs = sorted({m for m in microbatches if rows % m == 0})
    for m in mbs:
        if m > 1:
            out.append(RunConfig("highway", "highway", m, k=1))
        for schedule in ("gpipe", "1f1b", "interleaved-zb", "interleaved-zb-2", "zbv",
                         "dualpipev"):
            per_rank = SCHEDULES[schedule][1]
            reason = check_schedule(schedule, ranks, m)
            if reason is None and depth < ranks * per_rank:
                reason = f"needs {ranks * per_rank} stages of >= 1 layer, L = {depth}"
            if reason is None:
                out.append(RunConfig("torch", "exact", m, schedule=schedule))
            else:
                skipped.append({"config": f"exact-{schedule} M={m}", "reason": reason})
    if ("dualpipev" not in {c.schedule for c in out if c.runtime == "torch"}
            and check_schedule("dualpipev", ranks, 2 * ranks) is None):
        m = 2 * ranks
        if rows % m == 0 and depth >= 2 * ranks:
            out.append(RunConfig("torch", "exact", m, schedule="dualpipev"))
    return out, skipped


# ----------------------------------------------------------------------------- costs


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clocks()
    return wall - t0[0], cpu - t0[1]


def _medians(samples: list[tuple[float, float]], scale: float = 1.0) -> tuple[float, float]:
    return (statistics.median(x[0] for x in samples) * scale,
            statistics.median(x[1] for x in samples) * scale)


def _timed(fn, repeats: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(repeats):
        t0 = _clocks()
        fn()
        out.append(_since(t0))
    return out


def measure_layer_costs(stack: Stack, rows: int, repeats: int = 7, group: int = 4
                        ) -> dict[str, Any]:
    """Per-layer costs (s) at `rows` rows, as medians over `repeats` runs of a group of
    `group` layers (the runtime calls autograd once per group), divided by the group.

    Each cost is taken on two clocks: wall time (the model's inputs) and this process's
    CPU time (under "cpu": what the work costs when the process has a core to itself;
    on a loaded machine the wall time also counts waiting for one)."""
    from highwaybp.core.backends.loop import LoopVJP

    chain, x, _ = stack.build()
    layers = list(chain.layers[:group])
    n = len(layers)
    x = x[:rows].clone() if rows <= x.shape[0] else x.repeat(
        math.ceil(rows / x.shape[0]), 1)[:rows].clone()
    params = [p for layer in layers for p in layer.parameters()]
    w = torch.randn_like(x)

    def record():
        backend = LoopVJP([])
        h = x
        for layer in layers:
            h = backend.record(layer, h).detach()
        return backend

    def fwd_nograd():
        with torch.no_grad():
            h = x
            for layer in layers:
                h = layer(h)

    def timed_vjps():
        backend = record()
        ws = [w] * n
        t0 = _clocks()
        backend.block_vjps(ws)
        t_in = _since(t0)
        t0 = _clocks()
        backend.param_vjps(ws, params)
        return t_in, _since(t0)

    def timed_both():
        x0 = x.detach().requires_grad_(True)
        h = x0
        for layer in layers:
            h = layer(h)
        t0 = _clocks()
        torch.autograd.backward(h, w, inputs=[x0, *params])
        return _since(t0)

    def timed_loss():
        h = x.detach().requires_grad_(True)
        t0 = _clocks()
        value = loss_fn(h, w)
        torch.autograd.grad(value, h)
        return _since(t0)

    a, b = torch.randn_like(x), torch.randn_like(x)
    for _ in range(2):  # warm-up: allocator, first-call overheads
        record(), fwd_nograd(), timed_vjps(), timed_both(), timed_loss()
    vjps = [timed_vjps() for _ in range(repeats)]
    both = [timed_both() for _ in range(repeats)]
    losses = [timed_loss() for _ in range(repeats)]
    costs = {
        "forward": _medians(_timed(record, repeats), 1 / n),
        "forward_nograd": _medians(_timed(fwd_nograd, repeats), 1 / n),
        "vjp_input": _medians([v[0] for v in vjps], 1 / n),
        "vjp_param": _medians([v[1] for v in vjps], 1 / n),
        "vjp_both": _medians(both, 1 / n),
        "scan": _medians(_timed(lambda: a.add_(b), repeats * 4)),
        "loss": _medians(losses),
    }
    for p in params:
        p.grad = None
    return {"rows": rows, **{k: v[0] for k, v in costs.items()},
            "cpu": {k: v[1] for k, v in costs.items()},
            "state_bytes": x.numel() * x.element_size()}


def layer_costs(measured: dict[str, Any], depth: int, clock: str = "wall"
                ) -> list[cm.LayerCost]:
    """The model's per-layer costs from `measure_layer_costs` (identical layers), on the
    wall clock or (clock="cpu") the process's CPU clock."""
    c = measured if clock == "wall" else measured["cpu"]
    return [cm.LayerCost(c["forward"], c["vjp_input"], c["vjp_param"], c["vjp_both"],
                         forward_nograd=c["forward_nograd"], scan=c["scan"],
                         state_bytes=int(measured["state_bytes"]))
            for _ in range(depth)]


# ----------------------------------------------------------------------------- link


def _link_rank(ctx: Any, sizes: list[int], repeats: int) -> dict[str, list[float]]:
    import torch.distributed as dist

    out: dict[str, list[float]] = {}
    peer = 1 - ctx.rank
    for n in sizes:
        buf = torch.zeros(max(1, n // 4), dtype=torch.float32)
        times = []
        for i in range(repeats + 2):
            dist.barrier()
            t = time.perf_counter()
            if ctx.rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)
            if i >= 2:
                times.append((time.perf_counter() - t) / 2)
        out[str(buf.numel() * 4)] = times
    return out


def measure_link(sizes: list[int], repeats: int, timeout: float) -> dict[str, Any]:
    """One-way message time between two local gloo processes (half a round trip, median
    over `repeats`): latency = the smallest message's time, bandwidth from the largest
    (robust to one noisy size, unlike a least-squares fit over all of them)."""
    from highwaybp.distributed.launch import spawn

    res = spawn(_link_rank, 2, (sizes, repeats), timeout=timeout)[0]
    points = sorted((int(b), statistics.median(t)) for b, t in res.items())
    (b0, t0), (b1, t1) = points[0], points[-1]
    latency = t0
    per_byte = max((t1 - t0) / (b1 - b0), 1e-15) if b1 > b0 else 1e-15
    return {"latency_s": latency, "bandwidth_bytes_per_s": 1.0 / per_byte,
            "points": [{"bytes": b, "one_way_s": t} for b, t in points]}


# ----------------------------------------------------------------------------- runs


def _rank_main(ctx: Any, stack: Stack, configs: list[RunConfig], warmup: int, rounds: int,
               timeout: float) -> dict[str, Any]:
    import torch.distributed as dist

    from highwaybp.core.methods import Exact, FixedPoint, Highway
    from highwaybp.distributed.baselines import ExactPipeline
    from highwaybp.distributed.pipeline import HighwayPipeline
    from highwaybp.distributed.trace import Tracer

    P, rank = ctx.world, ctx.rank
    chain, x, y = stack.build()
    pipes, tracers, calls = [], [], []
    for c in configs:
        if c.runtime == "highway":
            if c.method == "highway":
                method = Highway(k=c.k)
            elif c.method == "fixedpoint":
                method = FixedPoint(k=c.k)
            else:
                method = Exact()
            tracer = Tracer(rank, P)
            scan = c.scan if P > 1 else None
            pipe = HighwayPipeline(chain, P, rank, method=method, loss_fn=loss_fn, scan=scan,
                                   num_microbatches=c.microbatches, trace=tracer,
                                   recompute=c.recompute, timeout=timeout)
            kwargs = {}
            if rank == 0:
                kwargs["x"] = x
            if rank == P - 1:
                kwargs["target"] = y
        else:
            tracer = None
            pipe = ExactPipeline(list(chain.layers), P, rank, c.schedule, c.microbatches,
                                 loss_fn, timeout=timeout)
            kwargs = {}
            if rank == pipe.first_rank:
                kwargs["x"] = x
            if rank == pipe.last_rank:
                kwargs["target"] = y
        pipes.append(pipe)
        tracers.append(tracer)
        calls.append(kwargs)
    params = list(chain.parameters())
    records: list[list[dict[str, float]]] = [[] for _ in configs]
    for _ in range(warmup + rounds):
        for i, (pipe, kwargs) in enumerate(zip(pipes, calls)):
            for p in params:
                p.grad = None
            if P > 1:
                dist.barrier()
            cpu, t0 = time.process_time(), time.perf_counter()
            pipe.step(**kwargs)
            t1 = time.perf_counter()
            records[i].append({"start": t0, "end": t1, "cpu": time.process_time() - cpu})
    return {"rank": rank, "records": records,
            "traces": [t.to_dict() if t is not None else None for t in tracers]}


def measure_runs(stack: Stack, ranks: int, configs: list[RunConfig], warmup: int, rounds: int,
                 timeout: float) -> list[dict[str, Any]]:
    """Run every configuration at P = ranks; per configuration the median step and its
    per-rank CPU time, the per-round steps, and (Highway runtime) the traced phases."""
    from highwaybp.distributed.launch import spawn
    from highwaybp.distributed.trace import critical_path, merge_traces, phase_breakdown

    deadline = 4 * timeout + 60 + 30 * len(configs) * (warmup + rounds)
    per_rank = spawn(_rank_main, ranks, (stack, configs, warmup, rounds, timeout),
                     timeout=timeout, deadline=deadline)
    out = []
    for i, c in enumerate(configs):
        steps = []
        for s in range(warmup, warmup + rounds):
            recs = [r["records"][i][s] for r in per_rank]
            steps.append({"round": s, "wall_s": max(x["end"] for x in recs)
                          - min(x["start"] for x in recs),
                          "cpu_s_per_rank": [x["cpu"] for x in recs]})
        walls = [s["wall_s"] for s in steps]
        median_round = sorted(steps, key=lambda s: s["wall_s"])[len(steps) // 2]
        row: dict[str, Any] = {
            "label": c.label, "config": asdict(c), "ranks": ranks,
            "oversubscribed": ranks > (os.cpu_count() or 1),
            "step_s": statistics.median(walls), "step_s_rounds": walls,
            "cpu_s_per_rank": [statistics.median(s["cpu_s_per_rank"][r] for s in steps)
                               for r in range(ranks)],
        }
        if per_rank[0]["traces"][i] is not None:
            trace = merge_traces([r["traces"][i] for r in per_rank])
            step = median_round["round"]
            row["phases"] = {str(r): v for r, v in phase_breakdown(trace, step).items()}
            path = critical_path(trace, step)
            row["critical_path"] = path["phases"]
        out.append(row)
    return out


# ----------------------------------------------------------------------------- model


def predict_row(row: dict[str, Any], costs: dict[int, dict[str, float]], link: cm.Link,
                depth: int, cores: int) -> dict[str, Any]:
    """The model's prediction for a measured row, with the error in % of the measured."""
    c = RunConfig(**row["config"])
    ranks = row["ranks"]
    mc = costs[c.microbatches]
    timeline = cm.predict(c.model_config(ranks), layer_costs(mc, depth), link, loss=mc["loss"])
    step = timeline.step_time
    busy = timeline.busy()
    work = sum(sum(v for k, v in b.items() if k != "idle") for b in busy)
    # The same schedule on CPU-clock costs: each rank's modelled work, to compare with its
    # measured CPU seconds (neither counts waiting for a core or a message).
    cpu_timeline = cm.predict(c.model_config(ranks), layer_costs(mc, depth, "cpu"), link,
                              loss=mc["cpu"]["loss"])
    work_per_rank = [sum(v for k, v in b.items() if k != "idle") for b in cpu_timeline.busy()]
    cpu_bound = max(step, work / cores)
    compare = cpu_bound if row["oversubscribed"] else step
    critical = timeline.critical_phases()
    if c.runtime == "highway" and "backward" in critical:  # the runtime's trace calls
        critical["sweep"] = critical.pop("backward")       # Exact's backward a "sweep"
    return {
        "predicted_step_s": step,
        "predicted_cpu_bound_step_s": cpu_bound,
        "predicted_busy_s_per_rank": [{k: v for k, v in b.items()} for b in busy],
        "predicted_critical_path": critical,
        "error_pct": 100.0 * (compare - row["step_s"]) / row["step_s"],
        # Work alone, without waiting: the busiest rank's modelled work (CPU-clock costs)
        # against its measured CPU seconds (readable when ranks share cores).
        "predicted_cpu_s_per_rank": work_per_rank,
        "busy_error_pct": 100.0 * (max(work_per_rank) - max(row["cpu_s_per_rank"]))
        / max(row["cpu_s_per_rank"]),
        "compared_with": "cpu_bound" if row["oversubscribed"] else "step",
    }


# ----------------------------------------------------------------------------- paper


@dataclass(frozen=True)
class Device:
    """Stated (not measured) figures for the prediction table."""

    name: str = "A100-class GPU, bf16"
    flops: float = 100e12  # effective FLOP/s on these layers (~1/3 of a 312 TFLOP/s peak)
    overhead_s: float = 20e-6  # per layer call (kernel launches, framework)
    link_latency_s: float = 10e-6  # NVLink-class point-to-point
    link_bandwidth: float = 100e9  # bytes/s
    bytes_per_value: int = 2


PAPER_MODELS: dict[str, dict[str, Any]] = {
    # per layer: forward FLOPs of the whole batch, bytes of a state (values)
    "ResNet110 (CIFAR-10, batch 128)": {
        # 54 residual blocks, two 3x3 convs each: 2 * (2 * 9 * C^2 * H * W) FLOPs per image;
        # C x H x W = 16x32x32, 32x16x16, 64x8x8 (same FLOPs per stage), 18 blocks each.
        "layers": 54, "batch": 128,
        "flops": [2 * 2 * 9 * c * c * s * s for c, s in ((16, 32), (32, 16), (64, 8))
                  for _ in range(18)],
        "state": [c * s * s for c, s in ((16, 32), (32, 16), (64, 8)) for _ in range(18)],
        # The parameter VJP of conv-BN-ReLU-conv-BN needs the gradient at the first conv's
        # output, so it takes conv 2's input gradient and both weight gradients: 3 of the 4
        # conv-sized products of the whole backward, 1.5 forwards; it skips only conv 1's
        # input gradient.
        "param_vjp_forwards": 1.5,
    },
    "GPT-2 small (12 blocks = 24 sub-layers, batch 8 x 1024 tokens)": {
        # per token: attention 8 d^2 + 4 T d, MLP 16 d^2 (d = 768, T = 1024).
        "layers": 24, "batch": 8 * 1024,
        "flops": [8 * 768 ** 2 + 4 * 1024 * 768 if i % 2 == 0 else 16 * 768 ** 2
                  for i in range(24)],
        "state": [768] * 24,
        # Pre-LayerNorm sub-layers: LayerNorm's own weight and bias need the gradient at
        # its output, so the parameter VJP takes every input gradient of the sub-layer but
        # the LayerNorm's: as much as the whole backward (measured so for the MLP block of
        # `highwaybp bench layer-parallel`: vjp_param = vjp_both).
        "param_vjp_forwards": 2.0,
    },
    "GRU over 1024 steps split in time (hidden 64, batch 128)": {
        # per step and sample: 3 gates x (input 1 + hidden 64) x 64 x 2 FLOPs.
        "layers": 1024, "batch": 128,
        "flops": [3 * 65 * 64 * 2] * 1024,
        "state": [64] * 1024,
        # One step: the weight gradients need only the gates' adjoints (elementwise) and
        # one outer product; the hidden state's input gradient is the other product.
        "param_vjp_forwards": 1.0,
    },
}


def paper_layer_costs(model: dict[str, Any], device: Device, microbatches: int
                      ) -> list[cm.LayerCost]:
    """Per-layer, per-micro-batch costs from FLOPs: forward = F / throughput + overhead;
    the input VJP costs one forward and both VJPs at once two (the usual 1:2 rule); the
    parameter VJP alone costs the model's `param_vjp_forwards` forwards (1 to 2: what
    the parameter gradients need of the backward, see PAPER_MODELS); a scan step moves
    three states through memory at 1 TB/s."""
    out = []
    for f, state in zip(model["flops"], model["state"]):
        rows = model["batch"] / microbatches
        fwd = f * rows / device.flops + device.overhead_s
        nbytes = int(state * rows * device.bytes_per_value)
        work = fwd - device.overhead_s
        vjp_param = model["param_vjp_forwards"] * work + device.overhead_s
        out.append(cm.LayerCost(fwd, fwd, vjp_param, 2 * work + device.overhead_s,
                                scan=3 * nbytes / 1e12 + 5e-6, state_bytes=nbytes))
    return out


def paper_predictions(device: Device, ranks: list[int], ks: list[int],
                      microbatches: list[int]) -> list[dict[str, Any]]:
    """For each model and P: the best exact schedule (over schedules and M) and, per k,
    the best Highway(k) (over M, both scans) and whether it beats the best exact. Schedules
    whose order this torch cannot give (`costmodel.unmodelled`) are left out."""
    link = cm.Link(device.link_latency_s, device.link_bandwidth)
    rows = []
    for name, model in PAPER_MODELS.items():
        L = model["layers"]
        for P in ranks:
            if P > L:
                continue
            mbs = [m for m in microbatches if model["batch"] % m == 0]
            exact: list[tuple[float, str, int]] = []
            for m in mbs:
                layers = paper_layer_costs(model, device, m)
                for schedule in cm.EXACT_SCHEDULES:
                    stages = P * (2 if schedule in ("zbv", "dualpipev", "interleaved-zb-2")
                                  else 1)
                    if cm.unmodelled(schedule) is not None:
                        continue
                    if stages > L or (schedule == "1f1b" and m < P) or (
                            schedule == "dualpipev" and m < 2 * P) or (
                            schedule.startswith("interleaved-zb") and m % max(1, m // P)):
                        continue
                    t = cm.exact(layers, P, m, link, schedule).step_time
                    exact.append((t, schedule, m))
            best_exact = min(exact)
            row: dict[str, Any] = {"model": name, "ranks": P, "layers": L,
                                   "best_exact": {"step_s": best_exact[0],
                                                  "schedule": best_exact[1],
                                                  "microbatches": best_exact[2]},
                                   "highway": {}}
            for k in ks:
                best = None
                for m in mbs:
                    layers = paper_layer_costs(model, device, m)
                    for scan in ("distributed", "centralized"):
                        t = cm.highway(layers, P, m, link, k, scan=scan).step_time
                        if best is None or t < best[0]:
                            best = (t, m, scan)
                row["highway"][str(k)] = {"step_s": best[0], "microbatches": best[1],
                                          "scan": best[2],
                                          "speedup_vs_best_exact": best_exact[0] / best[0]}
            row["ddg"] = {"step_s": cm.ddg(paper_layer_costs(model, device, 1), P, link),
                          "note": "steady state, stale gradients (docs/ddg.md)"}
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "layer-parallel",
        help="Highway-BP across processes vs pipeline schedules of exact backprop, "
             "measured and predicted by the cost model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="tiny stack, P <= 2, 2 rounds: checks the pipeline end to end")
    p.add_argument("--ranks", type=positive_int, nargs="+", default=_DEFAULTS["ranks"])
    p.add_argument("--ks", type=int, nargs="+", default=_DEFAULTS["ks"])
    p.add_argument("--microbatches", type=positive_int, nargs="+",
                   default=_DEFAULTS["microbatches"])
    p.add_argument("--depth", type=positive_int, default=_DEFAULTS["depth"])
    p.add_argument("--width", type=positive_int, default=_DEFAULTS["width"])
    p.add_argument("--hidden", type=positive_int, default=_DEFAULTS["hidden"])
    p.add_argument("--rows", type=positive_int, default=_DEFAULTS["rows"])
    p.add_argument("--rounds", type=positive_int, default=_DEFAULTS["rounds"],
                   help="timed rounds (median)")
    p.add_argument("--warmup", type=positive_int, default=_DEFAULTS["warmup"],
                   help="rounds not timed")
    p.add_argument("--timeout", type=float, default=_DEFAULTS["timeout"])
    p.add_argument("--no-paper", action="store_true", help="skip the paper-model table")
    p.add_argument("--out", type=out_file, default=_DEFAULTS["out"])
    p.set_defaults(func=run)


_DEFAULTS = {"ranks": [1, 2, 3, 4], "ks": [0, 1, 2], "microbatches": [1, 4], "depth": 16,
             "width": 256, "hidden": 512, "rows": 512, "rounds": 7, "warmup": 2,
             "timeout": 120.0, "out": DEFAULT_OUT}


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (the options that differ from the defaults)."""
    parts = ["highwaybp bench layer-parallel"]
    if args.quick:
        parts.append("--quick")
    if args.no_paper:
        parts.append("--no-paper")
    for name, default in _DEFAULTS.items():
        value = getattr(args, name)
        if value != default:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            parts.append(f"--{name} {shown}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    if any(k < 0 for k in args.ks):
        raise SystemExit("--ks must be >= 0")
    if args.quick:
        stack = Stack(depth=4, width=16, hidden=32, rows=32)
        ranks = [r for r in args.ranks if r <= 2] or [1, 2]
        ks, mbs, rounds, warmup = [0, 1], [1, 2], 2, 1
        paper_ranks, paper_mbs, paper_ks = [2, 4], [1, 4], [0, 1]
    else:
        stack = Stack(args.depth, args.width, args.hidden, args.rows)
        ranks, ks, mbs = args.ranks, args.ks, args.microbatches
        rounds, warmup = args.rounds, args.warmup
        paper_ranks, paper_mbs = [2, 4, 8, 16, 32, 64], [1, 4, 16, 64]
        paper_ks = [0, 1, 2, 4, 10]
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    all_mbs = sorted({1, *mbs, *(2 * r for r in ranks)})
    costs = {m: measure_layer_costs(stack, stack.rows // m) for m in all_mbs
             if stack.rows % m == 0}
    state_sizes = sorted({int(costs[m]["state_bytes"]) for m in costs})
    link_info = measure_link(sorted({4, *state_sizes}), repeats=5 if args.quick else 15,
                             timeout=args.timeout)
    link = cm.Link(link_info["latency_s"], link_info["bandwidth_bytes_per_s"])
    measured, skipped = [], []
    for P in ranks:
        if stack.depth < P:
            skipped.append({"config": f"P={P}",
                            "reason": f"more ranks than layers ({stack.depth})"})
            continue
        configs, skip = run_configs(P, ks, mbs, stack.depth, stack.rows)
        skipped += [{**s, "ranks": P} for s in skip]
        for row in measure_runs(stack, P, configs, warmup, rounds, args.timeout):
            row.update(predict_row(row, costs, link, stack.depth, cores))
            measured.append(row)
        print(f"P={P}: {len(configs)} configurations measured", flush=True)
    device = Device()
    paper = [] if args.no_paper else paper_predictions(device, paper_ranks, paper_ks, paper_mbs)
    report = {
        "bench": "layer_parallel",
        "command": command_line(args),
        "stack": asdict(stack), "threads_per_rank": 1, "cpu_count": cores,
        "rounds": rounds, "warmup_rounds": warmup,
        "layer_costs": {str(m): c for m, c in costs.items()},
        "link": link_info,
        "measured": measured,
        "skipped": skipped,
        "paper_predictions": {"device": asdict(device), "rows": paper,
                              "note": "PREDICTIONS from FLOP counts at the stated device "
                                      "throughput, overhead and link; nothing here was "
                                      "measured"},
        "machine": machine_info(),
        "seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(format_measured(report))
    try:
        plot(report, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return 0


# ----------------------------------------------------------------------------- output


def format_measured(report: dict[str, Any]) -> str:
    """Markdown: measured vs predicted step per configuration, and the error."""
    head = ["P", "configuration", "measured ms", "predicted ms", "error",
            "busiest rank: CPU ms measured / modelled", "speedup vs best exact at this P "
            "(measured)", "critical path (measured, ms)"]
    best: dict[int, float] = {}
    for r in report["measured"]:
        if r["config"]["method"] == "exact":
            best[r["ranks"]] = min(best.get(r["ranks"], math.inf), r["step_s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["measured"]:
        pred = r["predicted_cpu_bound_step_s"] if r["oversubscribed"] else r["predicted_step_s"]
        cp = ", ".join(f"{k} {1000 * v:.1f}" for k, v in sorted(
            (r.get("critical_path") or {}).items(), key=lambda kv: -kv[1]) if v > 0)
        over = " (oversubscribed: CPU-bound prediction)" if r["oversubscribed"] else ""
        lines.append(f"| {r['ranks']} | {r['label']}{over} | {1000 * r['step_s']:.1f} | "
                     f"{1000 * pred:.1f} | {r['error_pct']:+.0f}% | "
                     f"{1000 * max(r['cpu_s_per_rank']):.0f} / "
                     f"{1000 * max(r['cpu_s_per_rank']) * (1 + r['busy_error_pct'] / 100):.0f} | "
                     f"{best[r['ranks']] / r['step_s']:.2f}x | {cp} |")
    return "\n".join(lines)


def format_paper(report: dict[str, Any]) -> str:
    """Markdown: the prediction table for the paper's models."""
    pp = report["paper_predictions"]
    ks = sorted({k for r in pp["rows"] for k in r["highway"]}, key=int)
    head = ["model", "P", "best exact (schedule, M) ms"] + [
        f"Highway k={k}: ms (M), vs best exact" for k in ks] + ["DDG ms (stale gradients)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in pp["rows"]:
        e = r["best_exact"]
        cells = [f"{1000 * h['step_s']:.2f} (M={h['microbatches']}), "
                 f"{'**' if h['speedup_vs_best_exact'] > 1 else ''}"
                 f"{h['speedup_vs_best_exact']:.2f}x"
                 f"{'**' if h['speedup_vs_best_exact'] > 1 else ''}"
                 for h in (r["highway"][k] for k in ks)]
        lines.append(f"| {r['model']} | {r['ranks']} | {1000 * e['step_s']:.2f} "
                     f"({e['schedule']}, M={e['microbatches']}) | " + " | ".join(cells)
                     + f" | {1000 * r['ddg']['step_s']:.2f} |")
    return "\n".join(lines)


def paper_summary(report: dict[str, Any]) -> list[str]:
    """One line per paper model: for each k, the devices P at which Highway(k) beats the
    best exact schedule (with the micro-batch count it uses there), or none."""
    rows = report["paper_predictions"]["rows"]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        parts = []
        for k in sorted(mine[0]["highway"], key=int):
            wins = [(r["ranks"], r["highway"][k]) for r in mine
                    if r["highway"][k]["speedup_vs_best_exact"] > 1]
            if wins:
                parts.append(f"k={k} at P = " + ", ".join(
                    f"{p} (M={h['microbatches']}, {h['speedup_vs_best_exact']:.2f}x)"
                    for p, h in wins))
            else:
                parts.append(f"k={k} at no P up to {max(r['ranks'] for r in mine)}")
        out.append(f"- {model}: " + "; ".join(parts) + ".")
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Measured vs predicted step per configuration; per phase for the traced runs
    (measured critical path vs predicted critical path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["measured"]
    labels = [f"P={r['ranks']} {r['label']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(rows)), 9))
    xs = range(len(rows))
    ax1.bar([x - 0.2 for x in xs], [1000 * r["step_s"] for r in rows], 0.4, label="measured")
    ax1.bar([x + 0.2 for x in xs], [1000 * (r["predicted_cpu_bound_step_s"] if
                                            r["oversubscribed"] else r["predicted_step_s"])
                                    for r in rows], 0.4, label="predicted")
    ax1.set_ylabel("step ms")
    ax1.set_xticks(list(xs), labels, rotation=75, fontsize=7)
    ax1.legend()
    traced = [r for r in rows if r.get("critical_path")]
    phases = ["forward", "loss", "sweep", "scan", "mix", "param", "backward", "comm", "idle"]
    bottom_m = [0.0] * len(traced)
    bottom_p = [0.0] * len(traced)
    colors = plt.get_cmap("tab10")
    for i, ph in enumerate(phases):
        m = [1000 * r["critical_path"].get(ph, 0.0) for r in traced]
        p = [1000 * r["predicted_critical_path"].get(ph, 0.0) for r in traced]
        xs2 = range(len(traced))
        ax2.bar([x - 0.2 for x in xs2], m, 0.4, bottom=bottom_m, color=colors(i), label=ph)
        ax2.bar([x + 0.2 for x in xs2], p, 0.4, bottom=bottom_p, color=colors(i), alpha=0.5)
        bottom_m = [a + b for a, b in zip(bottom_m, m)]
        bottom_p = [a + b for a, b in zip(bottom_p, p)]
    ax2.set_xticks(list(range(len(traced))),
                   [f"P={r['ranks']} {r['label']}" for r in traced], rotation=75, fontsize=7)
    ax2.set_ylabel("critical path ms (left measured, right predicted)")
    ax2.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
