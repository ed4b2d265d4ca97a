"""`highwaybp experiment <name>`: training experiments that write CSV/JSON and plots."""

from __future__ import annotations

import argparse
import importlib

# One module per experiment, each with `register(subparsers)`.
EXPERIMENTS: tuple[str, ...] = (
    "highwaybp.train.deep_experiment",
    "highwaybp.train.ddg_experiment",
    "highwaybp.train.charlm",
    "highwaybp.train.vision_experiment",
    "highwaybp.train.kschedule",
    "highwaybp.train.recipes",
    "highwaybp.train.paper_experiment",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="run a training experiment")
    exp_sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    for name in EXPERIMENTS:
        importlib.import_module(name).register(exp_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
