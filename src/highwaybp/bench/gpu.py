"""`highwaybp bench gpu`: everything the first GPU should measure, in one command.

    highwaybp bench gpu --device cuda --out results/gpu            # < 8 minutes on one GPU
    highwaybp bench gpu --device cpu --tiny --out /tmp/gpu-tiny    # the CI run (seconds)

Sections, each written to `<out>/gpu_suite.json` as soon as it finishes (a later failure or
the time budget keeps the earlier ones):

1. `selftest`: `highwaybp selftest --device D --quick` (exactness on the device).
2. `timing`: the paper's Table 6 settings (`launchmodel.TABLE6`) for torch.nn (cuDNN on
   CUDA), our Exact and Highway(k) for k in --ks on every path the modules offer
   (`opcount.paths`: forward= and scan= once another branch adds them), methods
   interleaved round-robin, forward / backward / step time from CUDA events (perf_counter
   on a CPU), median of --repeats after --warmup, and each method's peak memory (CUDA:
   the allocator's peak above what was allocated before the step; CPU: the tensors
   created in the step, `TensorMemory`).
3. `counts`: the aten ops each method dispatches per forward and backward on the device
   (`opcount.count_methods`; Highway at the smallest two k: counts grow linearly in k).
4. `training`: --train-steps Adam steps of the pixel GRU (hidden 64, T = side^2 = 1024,
   batch 128) at Exact and Highway(k) for k in --train-ks from the same initialisation on
   the same batches: losses, held-out accuracy and time per step. Data: pixel-CIFAR-10
   (grey, 32x32) from --data-dir when it holds CIFAR-10's python batches, else
   scikit-learn's digits upsampled to 32x32.
5. `predictions`: the launch model's H100 predictions for the same settings
   (`launchmodel.predict_table6`), so the report shows them beside the measurements.

The run stops starting new work when --budget-s is spent (each skipped item is named in
the JSON); `plan` in the JSON counts the work before it starts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from highwaybp.bench.launchmodel import TABLE6
from highwaybp.bench.opcount import (
    build_counted,
    count_methods,
    method_paths,
    module_class,
    paths,
)
from highwaybp.train.cli_types import nonneg_int, nonneg_int_list, out_dir, positive_int

SECTIONS = ("selftest", "timing", "counts", "training", "predictions")


class Clock:
    """Step timing on `device`: CUDA events on a GPU (the GPU's own timeline, synchronised
    once per step), perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.source = "cuda events" if self.cuda else "perf_counter"

    def step(self, fn: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor,
             gy: Tensor) -> tuple[float, float]:
        """(forward, backward) seconds of one step."""
        for p in params:
            p.grad = None
        if self.cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            y = fn(x)
            marks[1].record()
            y.backward(gy)
            marks[2].record()
            marks[2].synchronize()
            return marks[0].elapsed_time(marks[1]) / 1e3, marks[1].elapsed_time(marks[2]) / 1e3
        t0 = time.perf_counter()
        y = fn(x)
        t1 = time.perf_counter()
        y.backward(gy)
        return t1 - t0, time.perf_counter() - t1


def peak_step_bytes(fn: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor,
                    gy: Tensor, device: torch.device) -> int:
    """Memory one step adds at its peak: the CUDA allocator's peak above what was allocated
    before it, or on a CPU the tensors created in the step (`TensorMemory`)."""
    for p in params:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(x).backward(gy)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from highwaybp.bench.tensor_memory import TensorMemory

    with TensorMemory() as mem:
        fn(x).backward(gy)
    return mem.peak_bytes


class Budget:
    """Seconds left of --budget-s; `skipped` names the work not started for want of it."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds
        self.skipped: list[str] = []

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str) -> bool:
        if self.elapsed < self.seconds:
            return True
        self.skipped.append(what)
        return False


def settings(tiny: bool) -> list[dict[str, Any]]:
    """Table 6 settings, or (--tiny) the same cells and layer counts at toy sizes."""
    if not tiny:
        return [dict(s) for s in TABLE6]
    return [{**s, "label": s["label"] + " (tiny)", "seq_len": 8, "batch": 2, "hidden": 4,
             "input_size": min(s["input_size"], 3)} for s in TABLE6]


def method_names(ks: list[int]) -> list[str]:
    return ["torch", "hbp-exact", *(f"highway(k={k})" for k in ks)]


def _args(setting: dict[str, Any]) -> argparse.Namespace:
    return argparse.Namespace(**{k: v for k, v in setting.items() if k != "label"}, seed=0)


def time_setting(setting: dict[str, Any], ks: list[int], device: torch.device, repeats: int,
                 warmup: int, budget: Budget) -> list[dict[str, Any]]:
    """Every method on every path at one setting, interleaved round-robin."""
    from highwaybp.bench.rnn import _reference

    args = _args(setting)
    torch.manual_seed(0)
    ref = _reference(args).to(device)
    x = torch.randn(args.seq_len, args.batch, args.input_size, device=device)
    gy = torch.randn(args.seq_len, args.batch, args.hidden, device=device)
    fns: dict[tuple[str, str], tuple[Callable, list[Tensor]]] = {}
    for name, path, label in method_paths(args.cell, method_names(ks)):
        fns[(name, label)] = build_counted(args, name, ref, path)
    clock = Clock(device)
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in fns}
    for fn, params in fns.values():
        for _ in range(warmup):
            clock.step(fn, params, x, gy)
    for i in range(repeats):
        if i and not budget.allows(f"timing {setting['label']} round {i + 1}"):
            break
        for key, (fn, params) in fns.items():
            runs[key].append(clock.step(fn, params, x, gy))
    records = []
    for (name, label), (fn, params) in fns.items():
        fwd = [r[0] for r in runs[(name, label)]]
        bwd = [r[1] for r in runs[(name, label)]]
        records.append({
            "setting": setting["label"], "method": name, "path": label,
            "fwd_ms": 1e3 * statistics.median(fwd), "bwd_ms": 1e3 * statistics.median(bwd),
            "total_ms": 1e3 * statistics.median([a + b for a, b in zip(fwd, bwd)]),
            "runs": len(fwd), "timer": clock.source,
            "peak_mb": peak_step_bytes(fn, params, x, gy, device) / 2**20,
        })
    torch_ms = next(r["total_ms"] for r in records if r["method"] == "torch")
    exact_ms = {r["path"]: r["total_ms"] for r in records if r["method"] == "hbp-exact"}
    for r in records:
        r["speedup_vs_torch"] = torch_ms / r["total_ms"]
        if r["method"] != "torch" and r["path"] in exact_ms:
            r["speedup_vs_hbp_exact"] = exact_ms[r["path"]] / r["total_ms"]
    return records


def count_setting(setting: dict[str, Any], ks: list[int], device: torch.device
                  ) -> list[dict[str, Any]]:
    """Dispatch counts of torch.nn, Exact and Highway at the two smallest k (no signatures:
    the totals, by kind and by name)."""
    recs = count_methods(_args(setting), setting["seq_len"], method_names(sorted(ks)[:2]),
                         device=str(device))
    out = []
    for r in recs:
        out.append({"setting": setting["label"], "method": r["method"], "path": r["path"],
                    "forward": {k: v for k, v in r["forward"].items()
                                if k in ("ops", "by_kind", "by_name")},
                    "backward": {k: v for k, v in r["backward"].items()
                                 if k in ("ops", "by_kind", "by_name")}})
    return out


class PixelGRU(nn.Module):
    """Pixels read one per step: x [B, T, 1] -> logits [B, classes] from the last state."""

    def __init__(self, rnn: nn.Module, hidden: int, classes: int) -> None:
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def train_pixel_gru(ks: list[int], steps: int, side: int, hidden: int, batch: int,
                    device: torch.device, data_dir: Optional[Path], budget: Budget
                    ) -> dict[str, Any]:
    """`steps` Adam steps (lr 1e-3) of the pixel GRU per arm (Exact, Highway(k)), arms
    interleaved step by step from the same initialisation on the same batches."""
    from highwaybp.core.methods import Exact, Highway
    from highwaybp.models.rnn import GRU
    from highwaybp.train.data import pixel_sequences

    data, described = pixel_sequences(side, data_dir)
    arms = {"exact": Exact(), **{f"highway(k={k})": Highway(k=k) for k in ks}}
    torch.manual_seed(0)
    first = PixelGRU(GRU(1, hidden, batch_first=True), hidden, data.num_classes)
    models = {}
    for name, method in arms.items():
        m = PixelGRU(GRU(1, hidden, batch_first=True, method=method), hidden, data.num_classes)
        m.load_state_dict(first.state_dict())
        models[name] = m.to(device)
    opts = {n: torch.optim.Adam(m.parameters(), lr=1e-3) for n, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    losses: dict[str, list[float]] = {n: [] for n in models}
    seconds: dict[str, list[float]] = {n: [] for n in models}
    done = 0
    for step in range(steps):
        if step and step % 10 == 0 and not budget.allows(f"training from step {step}"):
            break
        idx = torch.randint(0, len(data.y_train), (batch,), generator=gen)
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        for name, model in models.items():
            _sync(device)
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            _sync(device)
            seconds[name].append(time.perf_counter() - t0)
            losses[name].append(float(loss.detach()))
        done = step + 1
    out = {"data": described, "seq_len": side * side, "hidden": hidden, "batch": batch,
           "steps_done": done, "steps_asked": steps, "optimizer": "Adam lr 1e-3", "arms": {}}
    for name, model in models.items():
        tail = losses[name][-max(1, done // 10):] if done else []
        out["arms"][name] = {
            "losses": losses[name],
            "final_loss_mean_last10pct": sum(tail) / len(tail) if tail else None,
            "median_step_ms": 1e3 * statistics.median(seconds[name]) if done else None,
            "test_accuracy": _accuracy(model, data.x_test, data.y_test, device),
        }
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 256].to(device)).argmax(1).cpu() == y[i:i + 256]).sum())
                      for i in range(0, len(y), 256))
    return 100.0 * correct / max(1, len(y))


def plan(args: argparse.Namespace, todo: list[dict[str, Any]]) -> dict[str, Any]:
    """The work counted before it starts (what the 8-minute budget is made of)."""
    per_setting = []
    for s in todo:
        n_paths = len(paths(module_class(s["cell"])))
        methods = 1 + n_paths * (1 + len(args.ks))
        per_setting.append({"setting": s["label"], "timed_methods": methods,
                            "timed_steps": methods * (args.warmup + args.repeats + 1),
                            "counted_steps": 2 * (1 + n_paths * 3)})
    return {"settings": per_setting,
            "training_steps": args.train_steps * (1 + len(args.train_ks)),
            "budget_s": args.budget_s}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gpu", help="the one-command GPU suite: selftest, Table 6 timings, counts, training",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--out", type=out_dir, default="results/gpu")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes, 2 repeats, 5 training steps at T=16 (the CI run)")
    p.add_argument("--ks", type=nonneg_int_list, default=[0, 1, 5, 10, 20])
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--warmup", type=nonneg_int, default=1)
    p.add_argument("--train-steps", type=nonneg_int, default=300)
    p.add_argument("--train-ks", type=nonneg_int_list, default=[0, 1, 10])
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with CIFAR-10's python batches for pixel-CIFAR (default: "
                        "scikit-learn's digits upsampled to 32x32)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="start no new work after this many seconds (default 450: the suite "
                        "must end within 8 minutes)")
    p.add_argument("--sections", type=lambda s: s.split(","), default=list(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from highwaybp import selftest
    from highwaybp.bench.launchmodel import H100, count_table6, predict_table6
    from highwaybp.bench.timing import machine_info
    from highwaybp.train.io import atomic_write_json

    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        print(f"bench gpu: unknown sections {unknown}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    try:
        device = selftest.resolve_device(args.device)
    except ValueError as err:
        print(f"bench gpu: {err}", file=sys.stderr)
        return 2
    if args.tiny:
        args.repeats, args.warmup, args.train_steps = min(args.repeats, 2), 1, 5
        args.ks, args.train_ks = [k for k in args.ks if k <= 1] or [0], [0, 1]
    todo = settings(args.tiny)
    budget = Budget(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_suite.json"
    result: dict[str, Any] = {
        "bench": "gpu_suite", "command": "highwaybp " + " ".join(sys.argv[1:]),
        "device": str(device), "tiny": args.tiny, "machine": machine_info(),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "plan": plan(args, todo), "sections": {}, "skipped": budget.skipped}

    def save() -> None:
        result["elapsed_s"] = budget.elapsed
        atomic_write_json(path, result)

    failed = False
    if "selftest" in args.sections and budget.allows("selftest"):
        checks = selftest.run(str(device), quick=True)
        result["sections"]["selftest"] = {
            "quick": True, "summary": selftest.summary(checks),
            "failed": [c.name for c in checks if c.status == "FAIL"]}
        failed = bool(result["sections"]["selftest"]["failed"])
        print(result["sections"]["selftest"]["summary"], flush=True)
        save()
    if "timing" in args.sections:
        records = result["sections"].setdefault("timing", [])
        for s in todo:
            if budget.allows(f"timing {s['label']}"):
                records += time_setting(s, args.ks, device, args.repeats, args.warmup, budget)
                print(f"timed {s['label']} ({budget.elapsed:.0f} s)", flush=True)
                save()
    if "counts" in args.sections:
        records = result["sections"].setdefault("counts", [])
        for s in todo:
            if budget.allows(f"counts {s['label']}"):
                records += count_setting(s, args.ks, device)
                save()
    if "training" in args.sections and args.train_steps and budget.allows("training"):
        side = 4 if args.tiny else 32
        hidden, batch = (8, 16) if args.tiny else (64, 128)
        result["sections"]["training"] = train_pixel_gru(
            args.train_ks, args.train_steps, side, hidden, batch, device, args.data_dir, budget)
        save()
    if "predictions" in args.sections and budget.allows("predictions"):
        ks = tuple(k for k in args.ks if k <= 10) or (0,)
        result["sections"]["predictions"] = {
            "gpu": H100.to_json(),
            "rows": predict_table6(count_table6(ks, tuple(todo)), H100, tuple(todo))}
        save()
    save()
    print(f"wrote {path} ({budget.elapsed:.0f} s)")
    return 1 if failed else 0


# ---- rendering (`highwaybp report`) -------------------------------------------------------------


def render(path: Any, d: dict[str, Any]) -> list[str]:
    """docs/benchmarks.md's section of a GPU suite JSON: the measured steps beside the
    launch model's predictions, the counts, the training run."""
    from highwaybp.bench.launchmodel import prediction_table
    from highwaybp.bench.report import _command_line, _table

    sec = d["sections"]
    lines = [f"### GPU suite on {d.get('gpu_name') or d['device']}: `{path}`", "",
             f"{'TINY (CI) sizes, ' if d.get('tiny') else ''}{d['elapsed_s']:.0f} s in all."
             + (f" Not run for want of time: {', '.join(d['skipped'])}." if d["skipped"] else ""),
             *_command_line(d.get("command"))]
    if "selftest" in sec:
        st = sec["selftest"]
        lines += [f"Selftest (--quick) on the device: {st['summary']}"
                  + (f"; FAILED: {', '.join(st['failed'])}" if st["failed"] else "") + ".", ""]
    timing = sec.get("timing", [])
    if timing:
        head = ["setting", "method", "path", "fwd ms", "bwd ms", "step ms", "x torch.nn",
                "x our Exact", "peak MB"]
        rows = [[r["setting"], r["method"], r["path"], f"{r['fwd_ms']:.2f}",
                 f"{r['bwd_ms']:.2f}", f"{r['total_ms']:.2f}", f"{r['speedup_vs_torch']:.2f}",
                 f"{r['speedup_vs_hbp_exact']:.2f}" if "speedup_vs_hbp_exact" in r else "-",
                 f"{r['peak_mb']:.1f}"] for r in timing]
        lines += [f"Measured steps ({timing[0]['timer']}, median of up to {timing[0]['runs']} "
                  "interleaved rounds):", "", *_table(head, rows), ""]
    counts = sec.get("counts", [])
    if counts:
        rows = [[r["setting"], r["method"], r["path"], f"{r['forward']['ops']:,}",
                 f"{r['backward']['ops']:,}"] for r in counts]
        lines += ["Dispatched ops per step on the device:", "",
                  *_table(["setting", "method", "path", "forward ops", "backward ops"], rows), ""]
    if "predictions" in sec:
        measured = {(r["setting"], "torch" if r["method"] == "torch"
                     else f"{r['method']} [{r['path']}]"): r for r in timing}
        by_label = {}
        for (label, row_label), r in measured.items():
            torch_ms = next(t["total_ms"] for t in timing
                            if t["setting"] == label and t["method"] == "torch")
            by_label[(label, row_label)] = (r["total_ms"], torch_ms / r["total_ms"])
        lines += ["The launch model's predictions beside the measurements:", "",
                  *prediction_table(sec["predictions"]["rows"], by_label)]
    if "training" in sec:
        tr = sec["training"]
        head = ["arm", "loss (last 10% of steps)", "test accuracy %", "median step ms"]
        rows = [[name, f"{a['final_loss_mean_last10pct']:.4f}"
                 if a["final_loss_mean_last10pct"] is not None else "-",
                 f"{a['test_accuracy']:.1f}",
                 f"{a['median_step_ms']:.1f}" if a["median_step_ms"] is not None else "-"]
                for name, a in tr["arms"].items()]
        lines += [f"Pixel GRU training: {tr['data']}, hidden {tr['hidden']}, batch "
                  f"{tr['batch']}, {tr['steps_done']} of {tr['steps_asked']} steps "
                  f"({tr['optimizer']}), arms interleaved from the same initialisation:", "",
                  *_table(head, rows), ""]
    return lines
