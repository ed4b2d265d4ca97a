"""Multi-process execution of residual chains (docs/layer-parallel.md).

- `HighwayPipeline`: a `ResidualChain` split across ranks, one stage per rank, whose
  backward is Highway-BP run layer-parallel (or FixedPoint, or an exact GPipe backward).
- `spawn` / `init_from_env`: local processes or torchrun (`under_torchrun` tells which).
- `Tracer`, `critical_path`, `phase_breakdown`, `merge_traces`: per-phase timings.
- `transport`: the point-to-point links with bounded waits shared with DDG.
"""

from highwaybp.distributed.launch import RankContext, init_from_env, spawn, under_torchrun
from highwaybp.distributed.pipeline import HighwayPipeline, balanced_boundaries
from highwaybp.distributed.trace import (
    Tracer,
    critical_path,
    merge_traces,
    phase_breakdown,
)
from highwaybp.distributed.transport import TransportError

__all__ = [
    "HighwayPipeline",
    "RankContext",
    "Tracer",
    "TransportError",
    "balanced_boundaries",
    "critical_path",
    "init_from_env",
    "merge_traces",
    "phase_breakdown",
    "spawn",
    "under_torchrun",
]
