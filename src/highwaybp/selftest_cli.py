"""`highwaybp selftest [--device cpu|cuda|mps] [--quick]`: run `highwaybp.selftest` and print
its table; exit 0 only if no check failed (1 on a failure, 2 if the device is unusable)."""

from __future__ import annotations

import argparse
import sys

import torch

from highwaybp import selftest


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "selftest",
        help="check Highway-BP against autograd on this machine's device (run it first on a GPU)",
        description=(
            "Exactness checks on your device: ResidualChain at k = L against autograd for each "
            "residual kind and VJP backend, the scans, dropout RNG replay, GRU/LSTM against "
            "torch.nn, the Hugging Face adapter and a 2-process DDG run (float64 where the "
            "device has it). Prints a table; exits non-zero if any check fails."
        ),
    )
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=["float64", "float32"], default=None,
                   help="default: float64 where the device has it (not on mps), else float32")
    p.add_argument("--quick", action="store_true",
                   help="a subset at small sizes: Highway(k=L) per residual kind and backend, "
                        "scans, RNG replay, RNN gradients, GPT-2 (no DDG processes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    try:
        selftest.resolve_device(args.device)
        selftest.resolve_dtype(args.device, dtype)
    except ValueError as err:
        print(f"highwaybp selftest: {err}", file=sys.stderr)
        return 2
    width = max(len(c.name) for c in selftest.all_checks())
    print(selftest.format_header(width), flush=True)

    def show(result: selftest.CheckResult) -> None:
        print(selftest.format_row(result, width), flush=True)

    results = selftest.run(args.device, quick=args.quick, progress=show, dtype=dtype)
    print(selftest.summary(results) + (" (--quick subset)" if args.quick else ""))
    failed = [r.name for r in results if r.status == "FAIL"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
