"""`highwaybp experiment kschedule`: does choosing k during training pay?

Three CPU-sized tasks, each trained from the same initialisation and batches per seed with
every arm: exact backprop, constant Highway(k) for k in --ks, a linear ramp of k, a step
schedule ending in exact backprop, and the `Adaptive` controller. The tasks are those of
`highwaybp experiment deep` (ResNet on scikit-learn digits: test accuracy %; char GPT:
validation loss) and a GRU char-LM (`highwaybp.train.charlm.CharRNN`: validation loss),
built by import with smaller settings.

Cost is counted in VJP sweeps (forward-equivalents of work, see `highwaybp.control`):
Highway(k) = k + 1 per step, exact = 2, plus Adaptive's probes. Each run records its
final metric, total sweeps (training + probes), training wall-clock, and the metric at
--evals points against cumulative sweeps.

Writes under --out: runs/<task>_s<seed>_<arm>.json (one per finished run, atomically),
summary.json, table.md and kschedule.png (metric against cumulative sweeps). A rerun with
the same options resumes (finished runs are skipped, a killed run restarts from its last
checkpoint); another configuration in the same --out is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from highwaybp.control import KController
from highwaybp.core.methods import Exact
from highwaybp.train import deep_experiment
from highwaybp.train.cli_types import (
    nonneg_int,
    nonneg_int_list,
    out_dir,
    positive_float,
    positive_int,
)
from highwaybp.train.deep_experiment import Task
from highwaybp.train.io import (
    atomic_write_json,
    atomic_write_text,
    check_resume_config,
    save_figure,
)
from highwaybp.train.loop import StopGuard, TrainLoop, echo, method_label, warmup_cosine_lr
from highwaybp.train.stats import mean_std
from highwaybp.train.threads import use_threads

TASK_NAMES = ("resnet", "gpt", "gru")
SCHEDULE_ARMS = ("linear", "steps", "adaptive", "finish", "adaptive99")


# ---------------------------------------------------------------------------------------
# Tasks (built by the owning modules; only the sizes are set here)
# ---------------------------------------------------------------------------------------


def _deep_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """`highwaybp experiment deep`'s options (its defaults) with this study's sizes."""
    parser = argparse.ArgumentParser()
    deep_experiment.register(parser.add_subparsers())
    deep = parser.parse_args(["deep"])
    deep.seed = seed
    deep.depth, deep.width, deep.image = args.depth, args.width, args.image
    deep.epochs, deep.batch, deep.lr, deep.train_limit = args.epochs, args.batch, args.lr, 0
    deep.d_model, deep.n_layer, deep.n_head = args.d_model, args.n_layer, args.n_head
    deep.seq, deep.gpt_batch, deep.steps = args.seq, args.gpt_batch, args.gpt_steps
    deep.gpt_lr, deep.eval_batches, deep.corpus_chars = args.gpt_lr, args.eval_batches, 300_000
    return deep


def gru_task(args: argparse.Namespace, seed: int) -> Task:
    """GRU char-LM (Embedding -> highwaybp.GRU -> Linear) on the stdlib text corpus."""
    import torch.nn.functional as F

    from highwaybp.train.charlm import CharRNN, evaluate
    from highwaybp.train.data import char_corpus

    corpus = char_corpus(None, max_chars=300_000)
    bsz, seq = args.gru_batch, args.gru_seq

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return CharRNN(corpus.vocab_size, args.gru_embed, args.gru_hidden, 1, "gru", Exact())

    def batch(step: int) -> tuple[Tensor, Tensor]:
        return corpus.batch(
            "train", bsz, seq, torch.Generator().manual_seed(seed * 1_000_003 + step)
        )

    def loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        logits = model(b[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[1].reshape(-1))

    g_val = torch.Generator().manual_seed(12345)
    valid = [corpus.batch("valid", bsz, seq, g_val) for _ in range(args.eval_batches)]
    return Task(
        "gru",
        "valid_loss",
        args.gru_steps,
        args.gru_lr,
        make_model,
        batch,
        loss,
        lambda model: evaluate(model, valid),
        valid[0],
        seq,
        {
            "model": f"GRU char-LM hidden {args.gru_hidden} embed {args.gru_embed}",
            "data": f"Python stdlib sources ({len(corpus.train)} train chars)",
            "steps": args.gru_steps,
            "batch": f"{bsz}x{seq}",
            "optimizer": f"Adam lr {args.gru_lr} cosine, clip 1.0",
            "L": seq,
        },
    )


def make_task(name: str, args: argparse.Namespace, seed: int) -> Task:
    if name == "gru":
        return gru_task(args, seed)
    return deep_experiment.TASKS[name](_deep_args(args, seed))


# ---------------------------------------------------------------------------------------
# Arms: schedules written as text (what --k-schedule takes), fixed before any result
# ---------------------------------------------------------------------------------------


def arms(args: argparse.Namespace, steps: int) -> dict[str, str]:
    """Arm name -> schedule text for a run of `steps` steps."""
    out = {"exact": "exact"}
    out.update({f"k{k}": f"highway:k={k}" for k in args.ks})
    # ramp 0 -> 4 over the first 3/4 of training, then held (paper: k = 3..4 matches BP)
    out["linear"] = f"linear:0,4,{max(1, 3 * steps // 4)}"
    # the reviewer's "k = 1, then more, then backprop": k=1, k=3 from 1/2, exact from 4/5
    out["steps"] = f"steps:0=highway:k=1,{steps // 2}=highway:k=3,{4 * steps // 5}=exact"
    every = max(1, steps // args.probes)
    out["adaptive"] = f"adaptive:target={args.target},every={every},k_max={args.k_max}"
    # the cheapest estimate, then backprop for the last quarter ("learns as fast early,
    # needs more k late"; the reviewers' "finish with backprop")
    out["finish"] = f"finish:{steps // 4}:highway:k=0"
    # the library's default target (added after --target 0.9 was seen to lag on gpt)
    out["adaptive99"] = f"adaptive:target=0.99,every={every},k_max={args.k_max}"
    return out


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------


def _eval_steps(steps: int, evals: int) -> list[int]:
    return sorted({round(i * steps / evals) for i in range(evals + 1)})


def train_run(
    task: Task,
    schedule_text: str,
    ckpt_path: Path | None,
    args: argparse.Namespace,
    log: Any,
    guard: StopGuard | None = None,
) -> dict[str, Any] | None:
    """Train one arm: the method of each step is the one `schedule_text` sets (a
    KController), through the shared `TrainLoop`; resume from `ckpt_path`.

    Returns None when `guard` asked to stop: the checkpoint then holds the current step."""
    model = task.make_model()
    model.train()
    opt_cls = torch.optim.AdamW if task.name == "gpt" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=task.lr)
    ctl = KController(model, schedule_text, total_steps=task.steps)
    run: dict[str, Any] = {"schedule": schedule_text, "evals": [], "losses": [], "seconds": 0.0}
    marks = _eval_steps(task.steps, args.evals)

    def state() -> dict[str, Any]:
        run["seconds"] = loop.train_seconds
        return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "controller": ctl.state_dict(), "run": run}

    def load_state(saved: dict[str, Any]) -> None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        ctl.load_state_dict(saved["controller"])
        run.update(saved["run"])

    def at_boundary(step: int) -> None:
        if step in marks and not any(e["step"] == step for e in run["evals"]):
            run["evals"].append(
                {"step": step, "sweeps": ctl.total_sweeps(), task.metric: task.evaluate(model)}
            )

    def step_fn(step: int) -> float:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(task.lr, step, task.steps)
        batch = task.batch(step)
        ctl.step(step, loss_fn=lambda b=batch: task.loss(model, b))
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if task.name == "gru":
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    def after_step(step: int, value: float) -> None:
        run["losses"].append(value)
        if not math.isfinite(value):
            log(f"    loss {value} at step {step}: run stopped")
            run["diverged_at"] = step
            loop.end_early()

    loop = TrainLoop(
        step_fn, task.steps, state=state, load_state=load_state, checkpoint_path=ckpt_path,
        checkpoint_every=args.checkpoint_every, at_boundary=at_boundary, after_step=after_step,
        guard=guard, name=f"{task.name} {schedule_text}", progress=not args.quiet, log=log,
        k_label=lambda: method_label(ctl.method),
    )  # fmt: skip
    loop.resume()
    if loop.run() is not None:
        return None
    # training wall-clock: the steps (controller and probes included), not the evaluations
    run["seconds"] = loop.train_seconds
    hist = ctl.history
    run["final"] = run["evals"][-1][task.metric] if "diverged_at" not in run else float("nan")
    run["train_sweeps"] = sum(h["sweeps"] or 0.0 for h in hist)
    run["probe_sweeps"] = sum(h["probe_sweeps"] for h in hist)
    run["total_sweeps"] = run["train_sweeps"] + run["probe_sweeps"]
    run["methods"] = [h["method"] for h in hist]
    run["sweeps_per_step"] = [h["sweeps"] for h in hist]
    run["probes"] = [
        {
            "step": h["step"],
            "probed": {str(k): v for k, v in h["probed"].items()},
            "chosen": h["method"],
        }
        for h in hist
        if "probed" in h
    ]
    run["raises"] = [{"step": h["step"], "k": h["raised_to"]} for h in hist if "raised_to" in h]
    return run


# ---------------------------------------------------------------------------------------
# Summary, verdict, plot
# ---------------------------------------------------------------------------------------


def summarise(results: dict[str, dict[str, dict[str, Any]]], metrics: dict[str, str]) -> dict:
    """Per task and arm: mean/std over seeds of final metric, sweeps and seconds; the verdict.

    "Matches exact" = the arm's mean final metric is no worse than exact's by more than
    exact's seed-to-seed standard deviation, over the seeds both finished. The paired
    difference (arm - exact on the same seed: same initialisation and batches) is reported
    beside it.
    """
    summary: dict[str, Any] = {}
    for task, by_arm in results.items():
        higher = metrics[task] == "test_acc"
        exact_runs = by_arm.get("exact", {})
        rows = {}
        for arm, by_seed in by_arm.items():
            seeds = sorted(by_seed)
            finals = [by_seed[s]["final"] for s in seeds]
            mean, std = mean_std(finals)
            sweeps, _ = mean_std([by_seed[s]["total_sweeps"] for s in seeds])
            secs, _ = mean_std([by_seed[s]["seconds"] for s in seeds])
            common = [s for s in seeds if s in exact_runs]
            match, diff = None, (float("nan"), float("nan"))
            if common and arm != "exact":
                em, es = mean_std([exact_runs[s]["final"] for s in common])
                am, _ = mean_std([by_seed[s]["final"] for s in common])
                gap = (em - am) if higher else (am - em)  # > 0: worse than exact
                match = bool(math.isfinite(am) and gap <= es)
                diff = mean_std([by_seed[s]["final"] - exact_runs[s]["final"] for s in common])
            rows[arm] = {
                "seeds": seeds,
                "final_mean": mean,
                "final_std": std,
                "sweeps_mean": sweeps,
                "seconds_mean": secs,
                "matches_exact": match,
                "minus_exact_mean": diff[0],
                "minus_exact_std": diff[1],
            }
        summary[task] = {"metric": metrics[task], "arms": rows, "verdict": _verdict(rows)}
    return summary


def _verdict(rows: dict[str, dict[str, Any]]) -> str:
    consts = sorted(
        (int(a[1:]), r) for a, r in rows.items() if a.startswith("k") and a[1:].isdigit()
    )
    best_const = next(((k, r) for k, r in consts if r["matches_exact"]), None)
    schedules = {a: r for a, r in rows.items() if a in SCHEDULE_ARMS}
    matching = {a: r for a, r in schedules.items() if r["matches_exact"]}
    if best_const is None:
        head = "no constant k in the study matches exact"
        if matching:
            cheapest = min(matching, key=lambda a: matching[a]["sweeps_mean"])
            return f"{head}; {cheapest} does, with {matching[cheapest]['sweeps_mean']:.0f} sweeps"
        return head + "; no schedule does either"
    k, const = best_const
    budget = const["sweeps_mean"] / 2
    lines = [f"smallest constant k matching exact: k={k} ({const['sweeps_mean']:.0f} sweeps)"]
    winners = [a for a, r in matching.items() if r["sweeps_mean"] <= budget]
    if winners:
        lines.append(
            "goal met by "
            + ", ".join(f"{a} ({matching[a]['sweeps_mean']:.0f} sweeps)" for a in winners)
        )
    else:
        near = min(schedules, key=lambda a: schedules[a]["sweeps_mean"], default=None)
        lines.append(
            "goal not met: no schedule matches exact with at most half of those sweeps"
            + (
                ""
                if not matching
                else "; matching: "
                + ", ".join(f"{a} ({r['sweeps_mean']:.0f})" for a, r in matching.items())
            )
            + (
                ""
                if near is None
                else f"; cheapest schedule {near} ({schedules[near]['sweeps_mean']:.0f} sweeps)"
            )
        )
    return "; ".join(lines)


def make_table(summary: dict[str, Any], configs: dict[str, dict], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for task, entry in summary.items():
        label = "test accuracy %" if entry["metric"] == "test_acc" else "validation loss"
        cfg = configs.get(task, {})
        lines += [
            f"### {task}: {cfg.get('model', '')}",
            "",
            ", ".join(f"{k} {v}" for k, v in cfg.items() if k != "model"),
            "",
            f"| arm | seeds | final {label} (mean +- std) | arm - exact, same seed "
            "(mean +- std) | matches exact | VJP sweeps (train + probes) | wall s |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, r in entry["arms"].items():
            match = {None: "-", True: "yes", False: "no"}[r["matches_exact"]]
            diff = "-"
            if math.isfinite(r.get("minus_exact_mean", float("nan"))):
                diff = f"{r['minus_exact_mean']:+.3g} +- {r['minus_exact_std']:.2g}"
            lines.append(
                f"| {arm} | {len(r['seeds'])} | {r['final_mean']:.4g} +- "
                f"{r['final_std']:.2g} | {diff} | {match} | {r['sweeps_mean']:.0f} | "
                f"{r['seconds_mean']:.0f} |"
            )
        lines += ["", f"Verdict: {entry['verdict']}", ""]
    return "\n".join(lines)


def make_plot(results: dict, metrics: dict[str, str], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (task, by_arm) in zip(axes[0], results.items()):
        for i, (arm, by_seed) in enumerate(by_arm.items()):
            runs = list(by_seed.values())
            n = min(len(r["evals"]) for r in runs)
            xs = [statistics.fmean(r["evals"][j]["sweeps"] for r in runs) for j in range(n)]
            ys = [statistics.fmean(r["evals"][j][metrics[task]] for r in runs) for j in range(n)]
            style = "--" if arm == "exact" else ("-" if arm.startswith("k") else "o-")
            ax.plot(
                xs,
                ys,
                style,
                lw=2 if not arm.startswith("k") else 1,
                label=arm,
                color="k" if arm == "exact" else plt.cm.tab20(i % 20),
                markersize=3,
            )
        ax.set_xlabel("cumulative VJP sweeps (train + probes)")
        ax.set_ylabel("test accuracy %" if metrics[task] == "test_acc" else "validation loss")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out / "kschedule.png")


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

_NOT_CONFIG = ("func", "out", "threads", "quiet", "command", "experiment", "report_only")


def apply_tiny(args: argparse.Namespace) -> None:
    """The CI setting: seconds per run."""
    args.depth, args.width, args.image, args.epochs, args.batch = 8, 4, 8, 1, 128
    args.d_model, args.n_layer, args.n_head, args.seq, args.gpt_batch = 16, 1, 2, 16, 4
    args.gpt_steps, args.eval_batches, args.gru_hidden, args.gru_embed = 6, 1, 16, 8
    args.gru_seq, args.gru_batch, args.gru_steps, args.ks, args.probes = 16, 4, 6, [0, 1], 2
    args.evals = 2


def run(args: argparse.Namespace) -> int:
    use_threads(args.threads, "highwaybp experiment kschedule")
    if args.tiny:
        apply_tiny(args)
    out = Path(args.out)
    log = (lambda s: None) if args.quiet else (lambda s: echo(s, sys.stderr))
    config = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    check_resume_config(out, config)
    # the command that trains (a --report-only rerun records the same one)
    command = "highwaybp " + " ".join(a for a in sys.argv[1:] if a not in ("--report-only",))
    results: dict[str, dict[str, dict[int, Any]]] = {}
    metrics: dict[str, str] = {}
    configs: dict[str, dict] = {}
    for seed in args.seeds:
        for name in args.tasks:
            task = make_task(name, args, seed)
            metrics[name], configs[name] = task.metric, task.config
            for arm, text in arms(args, task.steps).items():
                path = out / "runs" / f"{name}_s{seed}_{arm}.json"
                if path.exists():
                    run_result = json.loads(path.read_text())
                elif args.report_only:
                    continue
                else:
                    log(f"{name} seed {seed} {arm} ({text}): {task.steps} steps")
                    ckpt = out / "checkpoints" / f"{name}_s{seed}_{arm}.pt"
                    with StopGuard() as guard:
                        run_result = train_run(task, text, ckpt, args, log, guard)
                    if run_result is None:
                        return guard.exit_code()
                    run_result.update(task=name, seed=seed, arm=arm)
                    atomic_write_json(path, run_result)
                    ckpt.unlink(missing_ok=True)
                    log(
                        f"  -> final {task.metric} {run_result['final']:.4g}, "
                        f"{run_result['total_sweeps']:.0f} sweeps, {run_result['seconds']:.0f} s"
                    )
                results.setdefault(name, {}).setdefault(arm, {})[seed] = run_result
            _report(out, results, metrics, configs, command)
    _report(out, results, metrics, configs, command)
    if not args.quiet:
        print((out / "table.md").read_text())
    return 0


def _report(out: Path, results, metrics, configs, command: str) -> None:
    if not results:
        return
    summary = summarise(results, metrics)
    atomic_write_json(
        out / "summary.json", {"command": command, "configs": configs, "summary": summary}
    )
    atomic_write_text(out / "table.md", make_table(summary, configs, command) + "\n")
    make_plot(results, metrics, out)



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "kschedule",
        help="k schedules and the Adaptive controller against constant k and exact backprop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES))
    p.add_argument("--seeds", type=nonneg_int_list, default=[0, 1, 2])
    p.add_argument("--ks", type=nonneg_int_list, default=[0, 1, 2, 3, 4, 5],
                   help="constant-k arms")
    p.add_argument("--target", type=positive_float, default=0.9, help="Adaptive target cosine")
    p.add_argument("--k-max", type=nonneg_int, default=6, help="Adaptive k_max")
    p.add_argument("--probes", type=positive_int, default=6, help="Adaptive probes per run")
    p.add_argument("--evals", type=positive_int, default=8, help="metric evaluations per run")
    p.add_argument("--checkpoint-every", type=positive_int, default=25)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--out", type=out_dir, default="results/kschedule")
    g = p.add_argument_group("resnet (digits)")
    g.add_argument("--depth", type=positive_int, default=20)
    g.add_argument("--width", type=positive_int, default=8)
    g.add_argument("--image", type=positive_int, default=8)
    g.add_argument("--epochs", type=positive_int, default=6)
    g.add_argument("--batch", type=positive_int, default=64)
    g.add_argument("--lr", type=positive_float, default=3e-3)
    g = p.add_argument_group("gpt (char LM)")
    g.add_argument("--d-model", type=positive_int, default=32)
    g.add_argument("--n-layer", type=positive_int, default=3)
    g.add_argument("--n-head", type=positive_int, default=2)
    g.add_argument("--seq", type=positive_int, default=32)
    g.add_argument("--gpt-batch", type=positive_int, default=16)
    g.add_argument("--gpt-steps", type=positive_int, default=150)
    g.add_argument("--gpt-lr", type=positive_float, default=3e-3)
    g.add_argument("--eval-batches", type=positive_int, default=4)
    g = p.add_argument_group("gru (char LM)")
    g.add_argument("--gru-hidden", type=positive_int, default=64)
    g.add_argument("--gru-embed", type=positive_int, default=16)
    g.add_argument("--gru-seq", type=positive_int, default=32)
    g.add_argument("--gru-batch", type=positive_int, default=16)
    g.add_argument("--gru-steps", type=positive_int, default=150)
    g.add_argument("--gru-lr", type=positive_float, default=5e-3)
    p.add_argument("--tiny", action="store_true", help="tiny CI setting (seconds)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report, train nothing")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
