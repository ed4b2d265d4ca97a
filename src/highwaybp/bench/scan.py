"""`highwaybp bench scan`: sequential vs Hillis-Steele reverse scan, same inputs, same run.

Decides the default scan: the faster one here. Inputs are [N, width] with diagonal
coefficients a ~ U(0, 1); results (medians) go to JSON.
"""

from __future__ import annotations

import argparse

import torch

from highwaybp.bench.timing import machine_info, median_seconds
from highwaybp.core.scan import SCANS
from highwaybp.train.cli_types import out_file, positive_int
from highwaybp.train.io import atomic_write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("scan", help="sequential vs log-depth scan timings")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--width", type=positive_int, default=16384, help="elements per state")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--out", type=out_file, default="results/bench/scan.json")
    p.set_defaults(func=run)


def bench_scans(lengths: list[int], width: int, repeats: int, dtype: torch.dtype) -> list[dict]:
    records = []
    for n in lengths:
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, width, generator=gen, dtype=dtype)
        a = torch.rand(n, width, generator=gen, dtype=dtype)
        times = {name: median_seconds(lambda f=fn, x=x, a=a: f(x, a), repeats)["median_s"]
                 for name, fn in SCANS.items()}
        records.append({
            "length": n,
            "width": width,
            **{f"{name}_ms": 1e3 * t for name, t in times.items()},
            "hillis_steele_over_sequential": times["hillis_steele"] / times["sequential"],
        })
    return records


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    records = bench_scans(args.lengths, args.width, args.repeats, dtype)
    print(f"{'N':>6} {'width':>7} {'sequential ms':>14} {'hillis_steele ms':>17} {'ratio':>6}")
    for r in records:
        print(f"{r['length']:>6} {r['width']:>7} {r['sequential_ms']:>14.2f} "
              f"{r['hillis_steele_ms']:>17.2f} {r['hillis_steele_over_sequential']:>6.2f}")
    atomic_write_json(args.out, {"bench": "scan", "dtype": args.dtype, "repeats": args.repeats,
                                 "machine": machine_info(), "records": records})
    print(f"wrote {args.out}")
    return 0
