"""How many torch threads a command or example uses, said where the user sees it.

One owner for the rule: every `highwaybp` command with a `--threads` option, and every
script in examples/, goes through `use_threads`, which applies the request (or leaves
torch's default: `OMP_NUM_THREADS`, else the number of cores) and prints the count used and
the flag that changes it. On a busy machine extra threads spin: the README's residual-chain
example took 124 s at torch's default of 2 threads on a loaded 2-core machine and 9.6 s
with `--threads 1`, so the count is printed rather than left for the user to guess.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, TextIO

import torch

FLAG = "--threads"


def use_threads(requested: Optional[int], who: str, file: Optional[TextIO] = None) -> int:
    """Set torch's intra-op threads to `requested` (None: keep torch's default) and print
    the count used, and the flag that changes it, to `file` (default stderr).

    Returns the thread count in use.
    """
    if requested is not None:
        torch.set_num_threads(requested)
    used = torch.get_num_threads()
    origin = f"{FLAG} {requested}" if requested is not None else "torch's default"
    print(f"{who}: {used} torch thread(s) ({origin}); change with {FLAG} N "
          f"({FLAG} 1 on a busy machine)", file=sys.stderr if file is None else file)
    return used


def example_threads(argv: Optional[Sequence[str]] = None) -> int:
    """For the scripts in examples/: read `--threads N` from the command line (torch's
    default without it), apply it and print the count (see `use_threads`)."""
    from highwaybp.train.cli_types import positive_int

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(FLAG, type=positive_int, default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return use_threads(args.threads, Path(sys.argv[0]).name or "python")
