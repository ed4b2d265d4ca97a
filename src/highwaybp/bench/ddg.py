"""`highwaybp bench ddg`: throughput and memory of DDG on K processes vs backprop on one.

Every configuration runs through the same multi-process runtime
(`highwaybp.ddg`, gloo, local processes), so the comparison is like for like:

- backprop = DDG with K = 1 (exactly backprop) on one process with all T threads (the
  baseline of the speedups), and for reference on one process with one thread;
- DDG K = 2, 3, 4 (stash and recompute) on K processes with T // K threads each (at
  least 1: K > T oversubscribes the cores, and the JSON says so).

Throughput: after `--warmup` steps, the remaining steps are cut into `--repeats` windows;
samples/s of a window = batch * steps / time, read on the last rank (the pipeline moves
at the pace of its slowest rank, and the last rank finishes every step last). The JSON
keeps every window and their median; the speedup is the ratio of medians in the same run.
Memory: peak RSS of each rank (includes the ~300 MB of the torch runtime itself) and the
largest in-flight state (stage inputs + stashed parameters) each rank held.

On a 2-core machine K processes cannot show a K-fold speedup: there are only 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from highwaybp.bench.timing import machine_info
from highwaybp.ddg import DDGRunConfig, EpochBatches, spawn_ddg
from highwaybp.models.resnet1d import build_resnet1d
from highwaybp.train.cli_types import nonneg_int, out_file, positive_float, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ddg",
        help="DDG on K processes vs backprop on one: samples/s and memory per rank",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--splits", type=positive_int, nargs="+", default=[2, 3, 4])
    p.add_argument("--semantics", nargs="+", default=["stash", "recompute"])
    p.add_argument(
        "--threads", type=positive_int, default=os.cpu_count() or 1, help="total threads T"
    )
    p.add_argument("--channels", type=positive_int, default=64)
    p.add_argument("--blocks", type=positive_int, default=8)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--warmup", type=nonneg_int, default=5, help="steps not timed")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed windows (median)")
    p.add_argument("--window", type=positive_int, default=8, help="steps per timed window")
    p.add_argument("--timeout", type=positive_float, default=300.0)
    p.add_argument("--out", type=out_file, default="results/ddg/bench_ddg.json")
    p.set_defaults(func=run)


def _config(
    args: argparse.Namespace, semantics: str, world: int, threads: int | None = None
) -> DDGRunConfig:
    gen = torch.Generator().manual_seed(0)
    n = args.batch_size * 4
    x = torch.randn(n, 40, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DDGRunConfig(
        build_model=functools.partial(build_resnet1d, 0, args.channels, args.blocks, 10, "relu"),
        batches=EpochBatches(x, y, args.batch_size, seed=0),
        steps=args.warmup + args.repeats * args.window,
        optimizer_factory=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        semantics=semantics,
        timeout=args.timeout,
        threads=threads or max(1, args.threads // world),
    )


def _measure(
    args: argparse.Namespace, semantics: str, world: int, threads: int | None = None
) -> dict[str, Any]:
    cfg = _config(args, semantics, world, threads)
    results = spawn_ddg(cfg, world)
    ends = results[-1]["stats"]["step_end_s"]
    windows = []
    for w in range(args.repeats):
        a = args.warmup + w * args.window - 1  # end of the step before the window
        b = a + args.window
        windows.append(args.batch_size * args.window / (ends[b] - ends[a]))
    ranks = [
        {
            "rank": r["rank"],
            "threads": r["stats"]["threads"],
            "params": r["stats"]["params"],
            "peak_rss_mb": round(r["stats"]["peak_rss_mb"], 1),
            "max_in_flight_mb": round(r["stats"]["max_in_flight_mb"], 3),
            "forward_s": round(r["stats"]["forward_s"], 3),
            "backward_s": round(r["stats"]["backward_s"], 3),
            "wait_s": round(r["stats"]["wait_s"], 3),
        }
        for r in results
    ]
    return {
        "method": "backprop" if world == 1 else f"ddg-{semantics}",
        "splits": world,
        "processes": world,
        "threads_per_process": cfg.threads,
        "total_threads": cfg.threads * world,
        "oversubscribed": cfg.threads * world > (os.cpu_count() or 1),
        "samples_per_s_windows": windows,
        "samples_per_s": statistics.median(windows),
        "ranks": ranks,
    }


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.window < 1 or args.warmup < 1:
        raise SystemExit("--repeats, --window and --warmup must be >= 1")
    bad = [s for s in args.semantics if s not in ("stash", "recompute")]
    if bad:
        raise SystemExit(f"--semantics takes stash and/or recompute, got {bad}")
    rows = [_measure(args, "stash", 1)]
    if args.threads > 1:  # reference: how well one process uses its threads here
        rows.append(_measure(args, "stash", 1, threads=1))
    for k in args.splits:
        for sem in args.semantics:
            rows.append(_measure(args, sem, k))
    base = rows[0]["samples_per_s"]
    best_bp = max(r["samples_per_s"] for r in rows if r["method"] == "backprop")
    for row in rows:
        row["speedup_vs_backprop"] = row["samples_per_s"] / base
        row["speedup_vs_best_backprop"] = row["samples_per_s"] / best_bp
    report = {
        "bench": "ddg",
        "setting": {
            "model": f"ResNet1d channels={args.channels} blocks={args.blocks}",
            "batch_size": args.batch_size,
            "warmup_steps": args.warmup,
            "windows": args.repeats,
            "steps_per_window": args.window,
            "total_threads": args.threads,
            "cpu_count": os.cpu_count(),
            "note": "backprop = DDG K=1 on one process with all threads; DDG K on K "
            "processes with threads // K each (>= 1). Shared, noisy machine.",
        },
        "machine": machine_info(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    print(f"wrote {out}")
    return 0


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | K procs | threads/proc | samples/s (median) | vs BP (same threads) "
        "| vs best BP | peak RSS/rank MB | in-flight/rank MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rss = " / ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
        fl = " / ".join(f"{x['max_in_flight_mb']:.2f}" for x in r["ranks"])
        lines.append(
            f"| {r['method']} | {r['processes']} | {r['threads_per_process']} "
            f"| {r['samples_per_s']:.0f} | {r['speedup_vs_backprop']:.2f}x "
            f"| {r['speedup_vs_best_backprop']:.2f}x | {rss} | {fl} |"
        )
    return "\n".join(lines)
