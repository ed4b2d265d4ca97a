"""Per-rank, per-phase timing of the layer-parallel runtime, and a step's critical path.

A `Tracer` records events while `HighwayPipeline.step` runs; `save` writes one JSON file per
rank, `merge_traces` joins them, `critical_path` and `phase_breakdown` read them.

Format (stable; `highwaybp bench layer-parallel` reads it):

    {"rank": 0, "world": 2,
     "events": [{"step": 0, "phase": "forward", "iteration": null,
                 "start": 12.031, "end": 12.036, "cpu": 0.0049, "bytes": 0,
                 "peer": null, "kind": null}, ...]}

A merged trace is {"world": P, "ranks": [per-rank dicts as above]}.

- start, end: `time.perf_counter()` seconds (CLOCK_MONOTONIC on Linux: comparable across
  processes on one machine, not across machines).
- cpu: CPU seconds of the process during the event (`time.process_time()`, all threads: on
  an oversubscribed machine, wall - cpu is time spent waiting for a core).
- bytes: bytes this rank sent during the event (comm events only).
- phase, one of:
    "step"     the whole `step()` call (the envelope of the others);
    "forward"  the forward of one micro-batch (iteration = micro-batch index);
    "loss"     loss_fn / state losses and their gradients (iteration = micro-batch);
    "rerun"    re-running the layers under autograd before the first sweep (recompute=True);
    "sweep"    one sweep of input VJPs over this rank's layers (iteration = j, 1-based;
               FixedPoint: the full layer VJPs; Exact: the one backward per micro-batch,
               inputs and parameters together, iteration = micro-batch; an adaptive
               method's exact fallback: iteration null);
    "scan"     local scan work of a scan (iteration = 0 for w^0, j for sweep j);
    "mix"      Anderson mixing (iteration j): this rank's residual and inner products, then
               the mixing weights and the combination of its window's states;
    "comm"     a send (kind "send": posting it) or a wait for a message (kind "recv"),
               with the peer rank; waiting for a late peer is counted here; kind
               "allreduce" (peer null): an adaptive method's global step norm, or the
               Anderson inner products (m + 2 numbers per iteration);
    "param"    the parameter sweep (and the input gradient pushed into x's producer);
    "idle"     gaps between the events above inside a step (Python overhead, bookkeeping).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

PHASES = ("step", "forward", "loss", "rerun", "sweep", "scan", "mix", "comm", "param", "idle")


class Tracer:
    """Collects events of one rank. Use `with tracer.phase("sweep", step, iteration=j):`.

    Args:
        rank, world: this rank and the number of ranks (written to the file).
    """

    enabled = True

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world
        self.events: list[dict[str, Any]] = []

    @contextmanager
    def phase(
        self, phase: str, step: int, iteration: Optional[int] = None, *,
        peer: Optional[int] = None, kind: Optional[str] = None,
    ) -> Iterator[dict[str, Any]]:
        """Time the body as one event; the yielded dict's "bytes" may be increased."""
        event: dict[str, Any] = {"step": step, "phase": phase, "iteration": iteration,
                                 "bytes": 0, "peer": peer, "kind": kind}
        cpu0 = time.process_time()
        event["start"] = time.perf_counter()
        try:
            yield event
        finally:
            event["end"] = time.perf_counter()
            event["cpu"] = time.process_time() - cpu0
            self.events.append(event)

    def fill_idle(self, step: int) -> None:
        """Add "idle" events for the gaps between this step's top-level events."""
        # A step's events are the last ones appended (no scan of earlier steps' events).
        mine = []
        for e in reversed(self.events):
            if e["step"] != step:
                break
            mine.append(e)
        inner = sorted((e for e in mine if e["phase"] != "step"), key=lambda e: e["start"])
        envelope = [e for e in mine if e["phase"] == "step"]
        if not envelope:
            return
        t = envelope[0]["start"]
        gaps = []
        for e in inner:
            if e["start"] > t:
                gaps.append((t, e["start"]))
            t = max(t, e["end"])
        if envelope[0]["end"] > t:
            gaps.append((t, envelope[0]["end"]))
        for start, end in gaps:
            self.events.append({"step": step, "phase": "idle", "iteration": None, "bytes": 0,
                                "peer": None, "kind": None, "start": start, "end": end,
                                "cpu": 0.0})

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world,
                "events": sorted(self.events, key=lambda e: (e["start"], e["end"]))}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path


class NullTracer(Tracer):
    """A tracer that records nothing (the default: no cost but a context manager)."""

    enabled = False

    @contextmanager
    def phase(self, phase: str, step: int, iteration: Optional[int] = None, *,
              peer: Optional[int] = None, kind: Optional[str] = None
              ) -> Iterator[dict[str, Any]]:
        yield {"bytes": 0}

    def fill_idle(self, step: int) -> None:
        return None


def merge_traces(traces: Sequence[dict[str, Any] | str | Path]) -> dict[str, Any]:
    """Merge per-rank traces (dicts or JSON paths) into {"world": P, "ranks": [...]}."""
    ranks = []
    for t in traces:
        ranks.append(json.loads(Path(t).read_text()) if isinstance(t, (str, Path)) else t)
    ranks.sort(key=lambda r: r["rank"])
    return {"world": len(ranks), "ranks": ranks}


def _as_merged(trace: dict[str, Any]) -> dict[str, Any]:
    return trace if "ranks" in trace else merge_traces([trace])


def phase_breakdown(trace: dict[str, Any], step: int) -> dict[int, dict[str, dict[str, float]]]:
    """{rank: {phase: {"wall": s, "cpu": s, "bytes": n, "count": n}}} for one step."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for r in _as_merged(trace)["ranks"]:
        phases: dict[str, dict[str, float]] = {}
        for e in r["events"]:
            if e["step"] != step:
                continue
            p = phases.setdefault(e["phase"], {"wall": 0.0, "cpu": 0.0, "bytes": 0, "count": 0})
            p["wall"] += e["end"] - e["start"]
            p["cpu"] += e["cpu"]
            p["bytes"] += e["bytes"]
            p["count"] += 1
        out[r["rank"]] = phases
    return out


def critical_path(trace: dict[str, Any], step: int) -> dict[str, Any]:
    """The chain of events that set one step's wall time, walked back from its end.

    Starts on the rank whose step ends last and walks its events backwards; a "recv" wait
    during which the peer posted its last send to this rank (the peer was late) moves the
    path to that peer, at the time it posted; otherwise the path stays on the rank. Returns
    {"step", "total": wall time of the step (earliest start to latest end over ranks),
     "phases": {phase: seconds on the path}, "path": [[rank, phase, iteration, start, end],
     ...] in time order}. Gaps on the path count as "idle"; the "comm" time on the path is
    the latency of the messages it follows plus the time to post sends.
    """
    ranks = {r["rank"]: [e for e in r["events"] if e["step"] == step]
             for r in _as_merged(trace)["ranks"]}
    envelopes = {r: [e for e in evs if e["phase"] == "step"] for r, evs in ranks.items()}
    envelopes = {r: e[0] for r, e in envelopes.items() if e}
    if not envelopes:
        raise ValueError(f"step {step} is not in the trace")
    t0 = min(e["start"] for e in envelopes.values())
    rank = max(envelopes, key=lambda r: envelopes[r]["end"])
    t_end = envelopes[rank]["end"]
    work = {r: sorted((e for e in evs if e["phase"] not in ("step", "idle")),
                      key=lambda e: e["end"]) for r, evs in ranks.items()}
    phases: dict[str, float] = {}
    path: list[list[Any]] = []

    def add(phase: str, r: int, it: Any, start: float, end: float) -> None:
        if end > start:
            phases[phase] = phases.get(phase, 0.0) + (end - start)
            path.append([r, phase, it, start, end])

    t = t_end
    guard = sum(len(v) for v in work.values()) * 2 + 10
    while t > t0 and guard > 0:
        guard -= 1
        before = [e for e in work[rank] if e["start"] < t]
        if not before:
            add("idle", rank, None, t0, t)
            break
        e = max(before, key=lambda e: e["end"])
        if e["end"] < t:
            add("idle", rank, None, e["end"], t)
            t = e["end"]
            continue
        if e["phase"] == "comm" and e["kind"] == "recv" and e["peer"] in work:
            # The peer's last send to us posted before the wait ended (a send may return
            # after the receiver woke up, so its start, not its end, orders them).
            sends = [s for s in work[e["peer"]] if s["phase"] == "comm" and s["kind"] == "send"
                     and s["peer"] == rank and s["start"] <= t]
            late = max(sends, key=lambda s: s["start"]) if sends else None
            if late is not None and late["start"] > e["start"]:
                add("comm", rank, e["iteration"], late["start"], t)  # the message's latency
                rank, t = e["peer"], late["start"]
                continue
        add(e["phase"], rank, e["iteration"], e["start"], t)
        t = e["start"]
    path.reverse()
    return {"step": step, "total": t_end - t0, "phases": phases, "path": path}
