"""`highwaybp bench scan`: sequential vs Hillis-Steele reverse scan, same inputs, same run.

Decides the default scan: the faster one here. Inputs are [N, width]; two kinds of K:

- "diagonal": coefficients a ~ U(0, 1), one per element (a Gated/ReLU residual, a GRU);
  the torch baseline is one fused elementwise pass over the same data (addcmul of x, a and
  x into a new tensor): the memory-traffic floor any scan of this data pays at least once.
- "identity": K = I (a reverse cumulative sum); the baseline is torch's fused kernel,
  torch.cumsum(x, 0) alone (a reverse cumsum needs two flips more). The sequential scan
  is a loop of row adds there: on CPU, torch.cumsum along dim 0 is far slower.

Methods are interleaved in rounds (one call of each per round, `--repeats` rounds after one
warm-up round) and the median of each is reported, so machine load drifts hit all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from highwaybp.bench.timing import machine_info
from highwaybp.core.scan import SCANS
from highwaybp.train.cli_types import out_file, positive_int
from highwaybp.train.io import atomic_write_json
from highwaybp.train.threads import use_threads

KINDS = ("diagonal", "identity")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("scan", help="sequential vs log-depth scan timings")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--width", type=positive_int, default=16384, help="elements per state")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--out", type=out_file, default="results/bench/scan.json")
    p.set_defaults(func=run)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called once each per round (after a warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_index:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _calls(x: torch.Tensor, a: torch.Tensor | None) -> dict[str, Callable[[], object]]:
    """Each scan on (x, a), and the torch baseline (see the module docstring)."""
    fns: dict[str, Callable[[], object]] = {
        name: (lambda f=fn: f(x, a)) for name, fn in SCANS.items()}
    if a is None:
        fns["torch_fused"] = lambda: torch.cumsum(x, 0)
    else:
        fns["torch_fused"] = lambda: torch.addcmul(x, a, x)
    return fns


def bench_scans(lengths: list[int], width: int, repeats: int, dtype: torch.dtype,
                kinds: tuple[str, ...] | list[str] = KINDS) -> list[dict]:
    records = []
    for kind in kinds:
        for n in lengths:
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(n, width, generator=gen, dtype=dtype)
            a = torch.rand(n, width, generator=gen, dtype=dtype) if kind == "diagonal" else None
            times = interleaved_medians(_calls(x, a), repeats)
            fused = ("torch.cumsum(x, 0) (a forward cumsum: no flips)" if a is None
                     else "one fused elementwise pass over x and a (floor, not a scan)")
            records.append({
                "coefficients": kind,
                "length": n,
                "width": width,
                **{f"{name}_ms": 1e3 * t for name, t in times.items()},
                "torch_fused": fused,
                "hillis_steele_over_sequential": times["hillis_steele"] / times["sequential"],
                "sequential_over_torch_fused": times["sequential"] / times["torch_fused"],
            })
    return records


def run(args: argparse.Namespace) -> int:
    use_threads(args.threads, "highwaybp bench scan")
    dtype = getattr(torch, args.dtype)
    records = bench_scans(args.lengths, args.width, args.repeats, dtype, args.kinds)
    print(f"{'K':>9} {'N':>6} {'width':>7} {'sequential ms':>14} {'hillis_steele ms':>17} "
          f"{'ratio':>6} {'torch fused ms':>15}")
    for r in records:
        print(f"{r['coefficients']:>9} {r['length']:>6} {r['width']:>7} "
              f"{r['sequential_ms']:>14.2f} {r['hillis_steele_ms']:>17.2f} "
              f"{r['hillis_steele_over_sequential']:>6.2f} {r['torch_fused_ms']:>15.2f}")
    atomic_write_json(args.out, {"bench": "scan", "dtype": args.dtype, "repeats": args.repeats,
                                 "interleaved": True, "machine": machine_info(),
                                 "records": records})
    print(f"wrote {args.out}")
    return 0
