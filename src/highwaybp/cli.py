"""The `highwaybp` command. Each subcommand lives in its own module with a
`register(subparsers)` function that adds its parser and sets `func`; this file only
lists them, so commands can be added without touching each other."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from highwaybp._version import __version__

# Top-level subcommands: one module each.
COMMANDS: tuple[str, ...] = (
    "highwaybp.train.demo",
    "highwaybp.bench.cli",
    "highwaybp.train.experiment_cli",
    "highwaybp.train.train_cli",
    "highwaybp.bench.report",
    "highwaybp.selftest_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="highwaybp",
        description="Highway backpropagation for PyTorch: demo, benchmarks, experiments.",
    )
    parser.add_argument("--version", action="version", version=f"highwaybp {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from highwaybp.train.io import CheckpointError, ConfigMismatchError

    try:
        return int(args.func(args) or 0)
    except (ConfigMismatchError, CheckpointError) as err:
        # A user's situation, not a bug: say what is wrong and what to do, no traceback.
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
