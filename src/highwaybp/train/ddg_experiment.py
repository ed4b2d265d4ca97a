"""`highwaybp experiment ddg`: convergence of BP, DDG (K = 2, 3, 4; stash and recompute)
and Highway-BP on MNIST-1D with the 1-D ResNet, at CPU scale.

Each arm is one `highwaybp train ...` run (same seed, same data order, same model init,
same optimizer and schedule) in its own folder under --out/runs/<arm>/, so an interrupted
experiment resumes arm by arm. --out/config.json holds the settings every run shares
(sizes, length, --lr); a rerun with other ones is refused with the difference (use
another --out), while --seeds, --splits, --semantics and --highway-k may change: new
seeds or arms are added and the finished runs kept. Arms run as subprocesses, `--jobs`
at a time, one torch thread each. Then it writes:

- summary.json: per arm the mean and std over `--seeds` of the final and best test
  accuracy, final test loss and train loss, plus every run and the exact command;
  summary.csv: one line per run;
- curves.png: test accuracy and train loss against the step for every arm;
- table.md: the markdown table for the docs.

`--tiny` is a seconds-long setting for CI (400 samples, 2 blocks, 30 steps).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from highwaybp.train.io import (
    atomic_write_json,
    atomic_write_text,
    check_resume_config,
    save_figure,
)
from highwaybp.train.stats import mean_std


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ddg",
        help="BP vs DDG (K=2,3,4, stash/recompute) vs Highway-BP on MNIST-1D",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="results/ddg")
    p.add_argument("--splits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--semantics", nargs="+", default=["stash", "recompute"])
    p.add_argument("--highway-k", type=int, nargs="*", default=[1, 2])
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per arm and seed")
    p.add_argument("--jobs", type=int, default=2, help="arms run at the same time")
    p.add_argument("--tiny", action="store_true", help="seconds-long CI setting")
    p.set_defaults(func=run)


def arms(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, method arguments of `highwaybp train`) of every arm."""
    out = [("bp", ["--method", "exact"])]
    for k in args.splits:
        for sem in args.semantics:
            out.append((f"ddg-k{k}-{sem}", ["--method", "ddg", "--splits", str(k),
                                             "--semantics", sem]))  # fmt: skip
    for k in args.highway_k:
        out.append((f"highway-k{k}", ["--method", "highway", "--k", str(k)]))
    return out


def run_settings(args: argparse.Namespace) -> dict[str, str]:
    """The `highwaybp train` options shared by every run of the experiment (all but the
    method and --seed): what the run folders under --out were made with, so a rerun must
    give the same ones. --seeds, --splits, --semantics and --highway-k only choose which
    runs exist, so they may change (added seeds or arms reuse the finished runs)."""
    if args.tiny:
        sizes = {"num-samples": "400", "channels": "8", "blocks": "2", "steps": "30",
                 "batch-size": "16", "eval-every": "10"}  # fmt: skip
    else:
        sizes = {"num-samples": str(args.num_samples), "channels": str(args.channels),
                 "blocks": str(args.blocks), "epochs": _number(args.epochs),
                 "batch-size": str(args.batch_size)}  # fmt: skip
    return {**sizes, "lr": str(args.lr), "threads": "1"}


def _number(value: float) -> str:
    """20 and 20.0 spelled alike (the default is an int, --epochs parses a float)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def common_args(args: argparse.Namespace, seed: int) -> list[str]:
    settings = run_settings(args)
    lr_threads = ["--lr", settings.pop("lr"), "--threads", settings.pop("threads")]
    sizes = [item for key, value in settings.items() for item in (f"--{key}", value)]
    return [*sizes, "--seed", str(seed), *lr_threads, "--quiet"]


def _run_arms(jobs: list[tuple[str, list[str]]], parallel: int) -> dict[str, float]:
    """Run `highwaybp train` commands, `parallel` at a time; wall seconds per arm."""
    pending, running, walls = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < max(1, parallel):
            name, cmd = pending.pop(0)
            print(f"[ddg experiment] start {name}: {shlex.join(cmd)}", flush=True)
            running[name] = (subprocess.Popen(cmd), time.perf_counter())
        time.sleep(0.5)
        for name, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode != 0:
                    for other, _ in running.values():
                        other.terminate()
                    raise SystemExit(f"arm {name} failed (exit {proc.returncode})")
                walls[name] = time.perf_counter() - start
                print(f"[ddg experiment] done {name} in {walls[name]:.0f}s", flush=True)
    return walls


def run(args: argparse.Namespace) -> int:
    bad = [s for s in args.semantics if s not in ("stash", "recompute")]
    if bad:
        raise SystemExit(f"--semantics takes stash and/or recompute, got {bad}")
    out = Path(args.out)
    # Before any marker is written or run started: the run folders under --out must have
    # been made with these settings (else each arm would fail on its own, less clearly).
    check_resume_config(out, run_settings(args))
    jobs = []  # (run name, arm, seed, command)
    for seed in args.seeds:
        base = [sys.executable, "-m", "highwaybp", "train", *common_args(args, seed)]
        for name, method in arms(args):
            folder = out / "runs" / f"seed{seed}" / name
            jobs.append((f"{name}/seed{seed}", name, seed, [*base, *method, "--out", str(folder)]))
    todo = []
    for run_name, _, _, cmd in jobs:  # a finished run made by the same command is kept
        folder = Path(cmd[-1])
        marker = folder / "command.json"
        done = (folder / "result.json").exists() and marker.exists()
        if done and json.loads(marker.read_text()) == cmd[1:]:
            print(f"[ddg experiment] {run_name}: finished run found in {folder}", flush=True)
            continue
        atomic_write_json(marker, cmd[1:])
        todo.append((run_name, cmd))
    _run_arms(todo, args.jobs)
    runs = []
    for _, arm, seed, cmd in jobs:
        res = json.loads((Path(cmd[-1]) / "result.json").read_text())
        cfg = res["config"]
        runs.append(
            {
                "arm": arm,
                "seed": seed,
                "method": cfg["method"],
                "splits": cfg["splits"] if cfg["method"] == "ddg" else "",
                "semantics": cfg["semantics"] if cfg["method"] == "ddg" else "",
                "k": cfg["k"] if cfg["method"] == "highway" else "",
                "final_test_acc": res["final_test_acc"],
                "best_test_acc": res["best_test_acc"],
                "final_test_loss": res["final_test_loss"],
                "final_train_loss": res["history"][-1]["train_loss"],
                "train_time_s": res["train_time_s"],
                "command": "highwaybp train " + shlex.join(cmd[4:]),
                "history": res["history"],
            }
        )
    rows = aggregate(runs)
    command = "highwaybp experiment ddg " + shlex.join(sys.argv[3:] if len(sys.argv) > 3 else [])
    summary = {
        "experiment": "ddg",
        "command": command.strip(),
        "seeds": args.seeds,
        "setting": common_args(args, args.seeds[0]),
        "note": "DDG arms run the single-process oracle (same arithmetic as the "
        "multi-process runtime); shared, noisy 2-core machine, so train_time_s is "
        "indicative only",
        "rows": rows,
        "runs": runs,
    }
    atomic_write_json(out / "summary.json", summary)
    buf = io.StringIO()
    fields = [k for k in runs[0] if k != "history"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(runs)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    table = format_table(rows)
    atomic_write_text(out / "table.md", table + "\n")
    plot(rows, out / "curves.png")
    print(table)
    print(f"wrote {out}/summary.json, summary.csv, table.md, curves.png")
    return 0


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm: mean and sample std over seeds, mean curves."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        row = {k: mine[0][k] for k in ("arm", "method", "splits", "semantics", "k")}
        row["seeds"] = [r["seed"] for r in mine]
        for key in ("final_test_acc", "best_test_acc", "final_test_loss", "final_train_loss"):
            row[key], row[key + "_std"] = mean_std([r[key] for r in mine])
        row["final_test_acc_per_seed"] = [r["final_test_acc"] for r in mine]
        times = [r["train_time_s"] for r in mine if r["train_time_s"] is not None]
        row["train_time_s"] = sum(times) / len(times) if times else None
        row["history"] = [
            {
                "step": h["step"],
                "test_acc": sum(r["history"][i]["test_acc"] for r in mine) / len(mine),
                "train_loss": sum(r["history"][i]["train_loss"] for r in mine) / len(mine),
            }
            for i, h in enumerate(mine[0]["history"])
        ]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| arm | final test acc (mean ± std) | per seed | best test acc | final test loss "
        "| final train loss | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["train_time_s"]
        per_seed = " / ".join(f"{a:.4f}" for a in r["final_test_acc_per_seed"])
        lines.append(
            f"| {r['arm']} | {r['final_test_acc']:.4f} ± {r['final_test_acc_std']:.4f} "
            f"| {per_seed} | {r['best_test_acc']:.4f} | {r['final_test_loss']:.4f} "
            f"| {r['final_train_loss']:.4f} | {'' if t is None else f'{t:.0f}'} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        steps = [h["step"] for h in r["history"]]
        style = "-" if r["method"] != "ddg" else ("--" if r["semantics"] == "stash" else ":")
        ax_acc.plot(steps, [h["test_acc"] for h in r["history"]], style, label=r["arm"])
        ax_loss.plot(steps, [h["train_loss"] for h in r["history"]], style, label=r["arm"])
    ax_acc.set(xlabel="step", ylabel="test accuracy (mean over seeds)",
               title="MNIST-1D, 1-D ResNet")  # fmt: skip
    ax_loss.set(xlabel="step", ylabel="train loss (mean since last eval)", yscale="log")
    ax_acc.legend(fontsize=7)
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
