"""`highwaybp bench <name>`: benchmarks that write JSON (never run by pytest for timing)."""

from __future__ import annotations

import argparse
import importlib

# One module per benchmark, each with `register(subparsers)`.
BENCHES: tuple[str, ...] = (
    "highwaybp.bench.scan",
    "highwaybp.bench.deep",
    "highwaybp.bench.ddg",
    "highwaybp.bench.rnn",
    "highwaybp.bench.layer_parallel",
    "highwaybp.bench.launchmodel",
    "highwaybp.bench.gpu",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and write JSON")
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCHES:
        importlib.import_module(name).register(bench_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
