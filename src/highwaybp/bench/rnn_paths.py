"""Our RNN methods timed on every path of the module (`forward=` x `scan=`), on this device.

`highwaybp bench rnn --paths`: one training step (forward + backward of a per-step loss, as
`bench rnn`) of torch.nn and of our Exact and Highway(k) on each path the module accepts
("loop" or "fused" forward, "sequential" or "log" scans), all interleaved round robin in
the same rounds (`bench.rnn.measure_round_robin`), median of --repeats. Each record has its
ratio to the same method on the device's default path ("auto", `resolve_paths`): above 1,
that path is faster. What `"auto"` picks on a CPU is decided from these files
(docs/rnn.md, "Fused forward and log-depth scans").
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch


def default_path_label(device_type: str = "cpu") -> str:
    """The path label (`opcount.path_label`) of the module's "auto" on `device_type`."""
    from highwaybp.bench.opcount import path_label
    from highwaybp.models.rnn.fused import resolve_paths

    forward, scan = resolve_paths("auto", "auto", torch.device(device_type))
    return path_label({"forward": forward, "scan": scan})


def time_paths(args: Any, seq_len: int) -> list[dict[str, Any]]:
    """One record per method and path at `seq_len` with the bench's sizes (--batch,
    --hidden, --input-size, --layers, --k): fwd / bwd / total ms (medians of the same
    rounds), the ratio to the default path's step and torch.nn's step over this one."""
    from highwaybp.bench.opcount import build_counted, count_names, method_paths
    from highwaybp.bench.rnn import _reference, measure_round_robin

    torch.manual_seed(args.seed)
    ref = _reference(args)
    x = torch.randn(seq_len, args.batch, args.input_size)
    gy = torch.randn(seq_len, args.batch, args.hidden)
    fns, keys = {}, {}
    for name, path, label in method_paths(args.cell, count_names(args.k)):
        key = f"{name} [{label}]"
        fns[key], _ = build_counted(args, name, ref, path)
        keys[key] = (name, label)
    timings = measure_round_robin(fns, ref, {key: (x, gy) for key in fns}, args.repeats,
                                  args.warmup)
    default = default_path_label()
    torch_ms = timings["torch [torch.nn]"]["total_ms"]
    records = []
    for key, t in timings.items():
        name, label = keys[key]
        on_default = timings.get(f"{name} [{default}]")
        records.append({
            "cell": args.cell, "seq_len": seq_len, "batch": args.batch, "hidden": args.hidden,
            "input_size": args.input_size, "layers": args.layers, "method": name,
            "path": label, **t,
            "default_over_this": (on_default["total_ms"] / t["total_ms"]
                                  if on_default and name != "torch" else None),
            "torch_over_this": torch_ms / t["total_ms"]})
    return records


def fastest_paths(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method (ours) and T: its fastest path and that path's ratio to the default's."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["default_over_this"] is None:
            continue
        key = f"{r['method']} T={r['seq_len']}"
        if key not in out or r["total_ms"] < out[key]["total_ms"]:
            out[key] = {"path": r["path"], "total_ms": r["total_ms"],
                        "default_over_this": r["default_over_this"]}
    return out


def run_paths(args: Any, meta: dict[str, Any]) -> int:
    """`highwaybp bench rnn --paths`: `time_paths` at each --seq-len, printed and written to
    --out."""
    from highwaybp.files import atomic_write_text

    default = default_path_label()
    print(f"bench rnn --paths: cell={args.cell} B={args.batch} H={args.hidden} "
          f"In={args.input_size} layers={args.layers}; default path here: {default}",
          flush=True)
    records = []
    for seq_len in args.seq_len:
        recs = time_paths(args, seq_len)
        for r in recs:
            vs = r["default_over_this"]
            print(f"  T={seq_len:5d} {r['method']:14s} {r['path']:30s} fwd {r['fwd_ms']:8.1f} "
                  f"bwd {r['bwd_ms']:8.1f} total {r['total_ms']:8.1f} ms"
                  + (f"  default / this {vs:.2f}" if vs is not None else ""), flush=True)
        records += recs
    result = {"bench": "rnn_paths",
              "meta": {**meta, "load_average_after": os.getloadavg(), "default_path": default,
                       "notes": "a training step (forward + backward of a per-step loss) per "
                                "method and path, medians of --repeats rounds after --warmup, "
                                "all interleaved; default_over_this > 1: this path is faster "
                                "than the default's"},
              "fastest": fastest_paths(records), "records": records}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def render(path: Any, d: dict[str, Any]) -> list[str]:
    """docs/benchmarks.md's section of one `--paths` file."""
    from highwaybp.bench.report import _command_line, _table

    meta, recs = d["meta"], d["records"]
    r0 = recs[0]
    lines = [f"### Paths, {r0['cell'].upper()} batch {r0['batch']}, hidden {r0['hidden']}, "
             f"input {r0['input_size']}, layers {r0['layers']}: `{path}`", "",
             f"A training step per method and path, medians of the same interleaved rounds "
             f"({meta.get('threads')} thread(s), load average "
             f"{meta.get('load_average_before', ['?'])[0]}); the default path here is "
             f"`{meta['default_path']}`. \"default / this\" above 1: this path is faster.",
             *_command_line(meta.get("command"))]
    head = ["T", "method", "path", "fwd ms", "bwd ms", "step ms", "default / this",
            "torch.nn / this"]
    rows = [[str(r["seq_len"]), r["method"], r["path"], f"{r['fwd_ms']:.0f}",
             f"{r['bwd_ms']:.0f}", f"{r['total_ms']:.0f}",
             "-" if r["default_over_this"] is None else f"{r['default_over_this']:.2f}",
             f"{r['torch_over_this']:.2f}"] for r in recs]
    return lines + _table(head, rows) + [""]
