"""`highwaybp experiment deep`: accuracy vs k for deep nets (the paper's Table 2 / Fig. 6 trend).

Two CPU-scale tasks, each trained from the same initialisation with Exact, Highway(k) for
every k in `--ks` and FixedPoint(`--fixedpoint-k`):

- resnet: pre-activation ResNet (paper's up/down form, K = I) on scikit-learn's 8x8 digits
  upsampled to 16x16 (bilinear); metric: test accuracy (%).
- gpt: GPT-2-style pre-LN char-level LM (gamma = 0.2) on a local text corpus (default: the
  Python standard library's sources); metric: validation loss (nats/char).

Also the paper's Fig. 6 diagnostic: along the Exact run, at 0/25/50/75/100% of training,
the cosine between each method's parameter gradient and the exact one on a fixed batch
(Highway k in --ks and FixedPoint with the same k). Every run also records the cosine of
its own gradient at those points.

Writes `<out>/deep_results.json` (atomically, after every finished run), `<out>/table.md`,
and PNG plots; runs resume from `<out>/checkpoints/` (a killed run restarts from its last
checkpoint, finished runs are skipped; SIGINT/SIGTERM save a checkpoint at the current step
first). A rerun with other settings (other than --tasks, --threads, --checkpoint-every) is
refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from highwaybp.control import KController
from highwaybp.core.fidelity import compare_gradients, use_method
from highwaybp.core.methods import Exact, FixedPoint, Highway, Method
from highwaybp.core.replay import buffers_restored
from highwaybp.train.cli_types import (
    nonneg_int,
    nonneg_int_list,
    out_dir,
    positive_float,
    positive_int,
    schedule_spec,
)
from highwaybp.train.io import (
    atomic_write_json,
    atomic_write_text,
    check_resume_config,
    save_figure,
)
from highwaybp.train.loop import StopGuard, TrainLoop, echo, method_label, warmup_cosine_lr
from highwaybp.train.threads import use_threads

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Task:
    """What a training run needs; batches are a pure function of the step (resumable)."""

    name: str
    metric: str  # "test_acc" (higher is better) or "valid_loss" (lower is better)
    steps: int
    lr: float
    make_model: Callable[[], nn.Module]
    batch: Callable[[int], tuple[Tensor, Tensor]]
    loss: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]
    evaluate: Callable[[nn.Module], float]
    diag_batch: tuple[Tensor, Tensor]
    num_layers: int
    config: dict
    # the optimizer for a model's parameters (default: Adam for "resnet", AdamW otherwise);
    # its learning rate is set at every step by the warm-up + cosine schedule from `lr`
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None


# ---------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------


@dataclass
class DigitsTask:
    """scikit-learn's digits upsampled to side x side and normalised, with the functions a
    `Task` needs; the ResNet tasks of `experiment deep` and `experiment vision` share it.
    Batches are a pure function of the step (the runs resume exactly)."""

    x_train: Tensor  # [N, 1, side, side]
    y_train: Tensor  # [N]
    x_test: Tensor
    y_test: Tensor
    batch_size: int
    steps: int
    batch: Callable[[int], tuple[Tensor, Tensor]]
    loss: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]
    evaluate: Callable[[nn.Module], float]  # test accuracy, %
    diag_batch: tuple[Tensor, Tensor]  # a fixed batch of 128 for the Fig. 6 cosines

    def describe(self, side: int) -> str:
        return (f"sklearn digits {len(self.y_train)} train / {len(self.y_test)} test, "
                f"upsampled to {side}x{side}")


def digits_task(side: int, batch: int, epochs: int, seed: int, train_limit: int = 0
                ) -> DigitsTask:
    from highwaybp.train.data import load_digits

    data = load_digits(seed=seed)

    def prep(x: Tensor) -> Tensor:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return (x - 0.5) / 0.5

    x_train, x_test = prep(data.x_train), prep(data.x_test)
    y_train, y_test = data.y_train, data.y_test
    if train_limit:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
        x_test, y_test = x_test[:train_limit], y_test[:train_limit]
    n, bsz = len(y_train), min(batch, len(y_train))
    per_epoch = n // bsz

    def batch_of(step: int) -> tuple[Tensor, Tensor]:
        epoch, i = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        idx = torch.randperm(n, generator=g)[i * bsz : (i + 1) * bsz]
        return x_train[idx], y_train[idx]

    def loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(x_test[i : i + 256]).argmax(1) == y_test[i : i + 256]).sum())
                for i in range(0, len(y_test), 256)
            )
        model.train(was)
        return 100.0 * correct / len(y_test)

    g = torch.Generator().manual_seed(seed + 7)
    diag_idx = torch.randperm(n, generator=g)[: min(128, n)]
    return DigitsTask(x_train, y_train, x_test, y_test, bsz, epochs * per_epoch, batch_of,
                      loss, evaluate, (x_train[diag_idx], y_train[diag_idx]))


def resnet_task(args: argparse.Namespace) -> Task:
    from highwaybp.models.resnet import CifarResNet

    side = args.image
    digits = digits_task(side, args.batch, args.epochs, args.seed, args.train_limit)
    steps, bsz = digits.steps, digits.batch_size

    def make_model() -> nn.Module:
        torch.manual_seed(args.seed)
        return CifarResNet(
            args.depth, form="pre", downsample="updown", in_channels=1, width=args.width
        )

    depth_layers = 3 * ((args.depth - 2) // 6)
    return Task(
        "resnet",
        "test_acc",
        steps,
        args.lr,
        make_model,
        digits.batch,
        digits.loss,
        digits.evaluate,
        digits.diag_batch,
        depth_layers,
        {
            "model": f"pre-act ResNet{args.depth} (updown, K=I), width {args.width}",
            "data": digits.describe(side),
            "epochs": args.epochs,
            "batch": bsz,
            "steps": steps,
            "optimizer": f"Adam lr {args.lr} cosine",
            "L": depth_layers,
        },
    )


def gpt_task(args: argparse.Namespace) -> Task:
    from highwaybp.models.transformer import GPT
    from highwaybp.train.data import char_corpus

    corpus = char_corpus(args.corpus, max_chars=args.corpus_chars)
    bsz, seq = args.gpt_batch, args.seq

    def make_model() -> nn.Module:
        torch.manual_seed(args.seed)
        return GPT(
            corpus.vocab_size,
            block_size=seq,
            d_model=args.d_model,
            n_layer=args.n_layer,
            n_head=args.n_head,
            gamma=args.gamma,
        )

    def batch(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        return corpus.batch("train", bsz, seq, g)

    def loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return model.loss(*b)

    g_val = torch.Generator().manual_seed(12345)
    val = [corpus.batch("valid", bsz, seq, g_val) for _ in range(args.eval_batches)]

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return sum(float(model.loss(x, y)) for x, y in val) / len(val)

    diag = corpus.batch("train", 2 * bsz, seq, torch.Generator().manual_seed(args.seed + 7))
    layers = 2 * args.n_layer
    return Task(
        "gpt",
        "valid_loss",
        args.steps,
        args.gpt_lr,
        make_model,
        batch,
        loss,
        evaluate,
        diag,
        layers,
        {
            "model": f"GPT pre-LN d={args.d_model} blocks={args.n_layer} heads={args.n_head} "
            f"gamma={args.gamma}",
            "data": f"{args.corpus or 'Python stdlib sources'} "
            f"({len(corpus.train)} train chars, vocab {corpus.vocab_size})",
            "steps": args.steps,
            "batch": f"{bsz}x{seq}",
            "optimizer": f"AdamW lr {args.gpt_lr} cosine",
            "L": layers,
        },
    )


TASKS = {"resnet": resnet_task, "gpt": gpt_task}


# ---------------------------------------------------------------------------------------
# Training with checkpoints
# ---------------------------------------------------------------------------------------


def method_name(m: Method) -> str:
    return "exact" if m.exact else f"{m.name}_k{m.k}"


def _grad_of(model: nn.Module, task: Task, method: Method) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    with use_method(model, method), buffers_restored(model):
        loss = task.loss(model, task.diag_batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def gradient_cosines(model: nn.Module, task: Task, methods: list[Method]) -> dict[str, dict]:
    """Cosine / relative error of each method's gradient to the exact one, diag batch."""
    exact = _grad_of(model, task, Exact())
    return {method_name(m): compare_gradients(_grad_of(model, task, m), exact) for m in methods}


def _checkpoints(steps: int) -> dict[int, float]:
    """Step -> fraction of training for the evaluation points."""
    marks: dict[int, float] = {0: 0.0, steps: 1.0}  # the ends always; others if distinct
    for f in FRACTIONS:
        marks.setdefault(round(f * steps), f)
    return dict(sorted(marks.items()))


def _lr(task: Task, step: int) -> float:
    return warmup_cosine_lr(task.lr, step, task.steps)


def train_run(
    task: Task,
    method: Method,
    diag_methods: list[Method],
    ckpt_path: Path,
    checkpoint_every: int,
    log: Callable[[str], None],
    guard: StopGuard | None = None,
    schedule: str | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Train one model with `method`, or with the method a k `schedule` sets at each step
    (a KController; the arm is then named "schedule:<spec>"); resume from `ckpt_path`.

    Returns None when `guard` asked to stop: the checkpoint then holds the current step.
    `progress`: draw the `TrainLoop` bar (on a terminal only)."""
    model = task.make_model()
    model.train()
    ctl = None if schedule is None else KController(model, schedule, total_steps=task.steps)
    if task.optimizer is not None:
        opt = task.optimizer(model.parameters())
    else:
        opt_cls = torch.optim.Adam if task.name == "resnet" else torch.optim.AdamW
        opt = opt_cls(model.parameters(), lr=task.lr)
    run: dict[str, Any] = {
        "method": method_name(method) if ctl is None else SCHEDULE_ARM + schedule,
        "history": [],
        "checkpoints": [],
        "seconds": 0.0,
    }
    marks = _checkpoints(task.steps)
    is_exact = method.exact and ctl is None

    def state() -> dict[str, Any]:
        run["seconds"] = loop.wall_seconds
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "run": run,
                "k_controller": None if ctl is None else ctl.state_dict()}

    def load_state(saved: dict[str, Any]) -> None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        run.update(saved["run"])
        if ctl is not None:
            ctl.load_state_dict(saved["k_controller"])

    def at_boundary(step: int) -> None:
        if ctl is not None and step < task.steps:
            # This step's method, set before the evaluation so that the cosine recorded
            # at a checkpoint is that of the method this step trains with.
            ctl.step(step, loss_fn=lambda: task.loss(model, task.batch(step)))
        if step not in marks or any(c["step"] == step for c in run["checkpoints"]):
            return
        entry: dict[str, Any] = {
            "step": step,
            "fraction": marks[step],
            task.metric: task.evaluate(model),
        }
        if is_exact:
            entry["cosines"] = gradient_cosines(model, task, diag_methods)
        else:
            own = method if ctl is None else ctl.method
            entry["own_cosine"] = (
                {"cosine": 1.0, "rel_error": 0.0} if own.exact
                else gradient_cosines(model, task, [own])[method_name(own)])
        if ctl is not None:
            entry.update(k_method=repr(ctl.method), vjp_sweeps=ctl.total_sweeps())
        run["checkpoints"].append(entry)
        log(
            f"  {task.name}/{run['method']} step {step}/{task.steps}: "
            f"{task.metric} {entry[task.metric]:.4g}"
        )

    def step_fn(step: int) -> float:
        batch = task.batch(step)
        for group in opt.param_groups:
            group["lr"] = _lr(task, step)
        if ctl is not None:
            loss = task.loss(model, batch)
        else:
            with use_method(model, method):
                loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        run["history"].append([step, value])
        return value

    loop = TrainLoop(
        step_fn, task.steps, state=state, load_state=load_state, checkpoint_path=ckpt_path,
        checkpoint_every=checkpoint_every, at_boundary=at_boundary, guard=guard,
        name=f"{task.name}/{run['method']}", progress=progress, log=log,
        k_label=lambda: method_label(method if ctl is None else ctl.method),
    )  # fmt: skip
    loop.resume()
    if loop.run() is not None:
        return None
    run["seconds"] = loop.wall_seconds
    run["final"] = run["checkpoints"][-1][task.metric]
    run["train_loss_last10pct"] = _tail_mean(run["history"])
    return run


def _tail_mean(history: list) -> float:
    tail = history[-max(1, len(history) // 10) :]
    return sum(v for _, v in tail) / len(tail)


# ---------------------------------------------------------------------------------------
# Report: table and plots
# ---------------------------------------------------------------------------------------


def methods_of(args: argparse.Namespace) -> list[Method]:
    """The method arms: Exact, Highway(k) for k in --ks, FixedPoint(--fixedpoint-k)."""
    return [Exact(), *(Highway(k=k) for k in args.ks), FixedPoint(k=args.fixedpoint_k)]


def diag_methods_of(args: argparse.Namespace) -> list[Method]:
    """The methods of the Fig. 6 cosines: Highway(k) and FixedPoint(k) for k in --ks."""
    return [*(Highway(k=k) for k in args.ks), *(FixedPoint(k=k) for k in args.ks)]


def make_table(results: dict[str, Any]) -> str:
    lines = []
    for name, task in results["tasks"].items():
        runs = task["runs"]
        metric = task["metric"]
        label = "test accuracy %" if metric == "test_acc" else "validation loss"
        lines += [
            f"### {name}: {task['config']['model']}",
            "",
            f"{task['config']['data']}; "
            + ", ".join(
                f"{k} {v}" for k, v in task["config"].items() if k not in ("model", "data")
            ),
            "",
            f"| method | final {label} | train loss (last 10%) | cosine to exact at "
            "0/25/50/75/100% (own gradient) | wall s |",
            "|---|---|---|---|---|",
        ]
        for mname, run in runs.items():
            own = (
                " / ".join(
                    f"{c['own_cosine']['cosine']:.3f}"
                    for c in run["checkpoints"]
                    if "own_cosine" in c
                )
                or "1 (exact)"
            )
            lines.append(
                f"| {mname} | {run['final']:.4g} | {run['train_loss_last10pct']:.4f} | "
                f"{own} | {run['seconds']:.0f} |"
            )
        exact = runs.get("exact")
        if exact:
            names = list(exact["checkpoints"][0].get("cosines", {}))
            lines += [
                "",
                f"Fig. 6 diagnostic ({name}, along the Exact run): cosine of each "
                "method's gradient to the exact gradient",
                "",
                "| method | "
                + " | ".join(f"{int(100 * c['fraction'])}%" for c in exact["checkpoints"])
                + " |",
                "|---|" + "---|" * len(exact["checkpoints"]),
            ]
            for n in names:
                lines.append(
                    f"| {n} | "
                    + " | ".join(f"{c['cosines'][n]['cosine']:.4f}" for c in exact["checkpoints"])
                    + " |"
                )
        lines.append("")
    return "\n".join(lines)


def _cosines_by_k(checkpoint: dict[str, Any], family: str) -> list[tuple[int, float]]:
    """[(k, cosine)] of the `family` methods ("highway", "fixedpoint") at a checkpoint."""
    return sorted((int(n.split("_k")[1]), v["cosine"])
                  for n, v in checkpoint["cosines"].items() if n.startswith(family))


def make_plots(results: dict[str, Any], out: Path, prefix: str = "deep_") -> list[str]:
    """PNG plots of `results` in `out`, named `<prefix>final_vs_k.png`, `<prefix>fig6_cosine.png`
    and `<prefix>training_curves.png`; their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib not installed: no plots (pip install 'highway-bp[experiments]')",
            file=sys.stderr,
        )
        return []
    tasks = results["tasks"]
    written = []
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items()):
        runs = task["runs"]
        ks = sorted(int(m.split("_k")[1]) for m in runs if m.startswith("highway"))
        ax.plot(ks, [runs[f"highway_k{k}"]["final"] for k in ks], "o-", label="Highway-BP(k)")
        if "exact" in runs:
            ax.axhline(runs["exact"]["final"], color="k", ls="--", label="exact backprop")
        for m, run in runs.items():
            if m.startswith("fixedpoint"):
                k = int(m.split("_k")[1])
                ax.plot([k], [run["final"]], "s", color="C3", label=f"FixedPoint(k={k})")
        ax.set_xlabel("k (iterations)")
        ax.set_ylabel("test accuracy (%)" if task["metric"] == "test_acc" else "validation loss")
        ax.set_title(f"{name}: L = {task['config']['L']}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(str(save_figure(fig, out / f"{prefix}final_vs_k.png", 120)))

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items()):
        exact = task["runs"].get("exact")
        if not exact:
            continue
        for i, c in enumerate(exact["checkpoints"]):
            hw, fp = _cosines_by_k(c, "highway"), _cosines_by_k(c, "fixedpoint")
            color = plt.cm.viridis(i / max(1, len(exact["checkpoints"]) - 1))
            ax.plot(*zip(*hw), "o-", color=color, label=f"Highway {int(100 * c['fraction'])}%")
            if fp:
                ax.plot(*zip(*fp), "x--", color=color, alpha=0.6)
        ax.set_xlabel("k")
        ax.set_ylabel("cosine to exact gradient")
        ax.set_title(f"{name}: along exact training (dashed: FixedPoint)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(str(save_figure(fig, out / f"{prefix}fig6_cosine.png", 120)))

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items()):
        for m, run in task["runs"].items():
            hist = run["history"]
            if not hist:
                continue
            w = max(1, len(hist) // 20)
            vals = [v for _, v in hist]
            smooth = [
                sum(vals[max(0, i - w + 1) : i + 1]) / len(vals[max(0, i - w + 1) : i + 1])
                for i in range(len(vals))
            ]
            style = "k--" if m == "exact" else ("r:" if m.startswith("fixed") else "-")
            ax.plot([s for s, _ in hist], smooth, style, label=m, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (smoothed)")
        ax.set_title(name)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(str(save_figure(fig, out / f"{prefix}training_curves.png", 120)))
    return written


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def apply_tiny(args: argparse.Namespace) -> None:
    """The CI setting: ResNet8 of width 4 on 64 digits, a 1-block GPT, k in {0, 1}."""
    args.depth, args.width, args.epochs, args.train_limit, args.batch = 8, 4, 1, 64, 32
    args.d_model, args.n_layer, args.n_head, args.steps, args.seq = 16, 1, 2, 4, 16
    args.gpt_batch, args.eval_batches, args.corpus_chars = 4, 2, 50_000
    args.ks, args.fixedpoint_k = [0, 1], 1


# Options that do not change a result: the rest must match to resume into --out (a rerun
# may run other --tasks; each task's runs are kept on their own).
SCHEDULE_ARM = "schedule:"
_NOT_CONFIG = ("func", "threads", "tasks", "checkpoint_every", "quiet", "record_argv", "tiny",
               "k_schedule",
               "out")


def start_results(results_path: Path, config: dict[str, Any], record_argv: bool
                  ) -> dict[str, Any]:
    """The results file of `experiment deep`/`vision` as a rerun finds it (its finished
    runs kept), with this invocation's command and configuration."""
    results: dict[str, Any] = (
        json.loads(results_path.read_text()) if results_path.exists() else {"tasks": {}}
    )
    results["command"] = "highwaybp " + " ".join(sys.argv[1:]) if record_argv else None
    results["config"] = config
    return results


def write_report(results: dict[str, Any], results_path: Path, plot_prefix: str,
                 quiet: bool) -> None:
    """Write `results`, its table.md and plots beside it; print the table and the paths."""
    out = results_path.parent
    atomic_write_json(results_path, results)
    table = make_table(results)
    atomic_write_text(out / "table.md", table + "\n")
    plots = make_plots(results, out, plot_prefix)
    if not quiet:
        print(table)
        for p in [results_path, out / "table.md", *plots]:
            print(f"wrote {p}")


def train_arms(task: Task, name: str, arms: list[tuple[str, Method, str | None]],
               entry: dict[str, Any], results: dict[str, Any], results_path: Path,
               args: argparse.Namespace, log: Callable[[str], None]) -> int | None:
    """Train each arm (name, method, k schedule or None) of `task` not yet in
    `entry["runs"]`, writing `results` after each; checkpoints under
    `results_path.parent / "checkpoints"`. The stop's exit code if SIGINT/SIGTERM stopped
    a run (its checkpoint holds the step), else None (`experiment deep` and `vision`)."""
    out = results_path.parent
    for mname, method, schedule in arms:
        if mname in entry["runs"]:
            log(f"{name}/{mname}: done already, skipped")
            continue
        log(f"{name}/{mname}: training {task.steps} steps")
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in mname)
        ckpt = out / "checkpoints" / f"{name}_{safe}.pt"
        with StopGuard() as guard:  # SIGINT/SIGTERM: checkpoint this step, then exit
            result = train_run(task, method, diag_methods_of(args), ckpt,
                               args.checkpoint_every, log, guard, schedule=schedule,
                               progress=not args.quiet)
        if result is None:
            return guard.exit_code()
        entry["runs"][mname] = result
        atomic_write_json(results_path, results)
        ckpt.unlink(missing_ok=True)
    return None


def run(args: argparse.Namespace) -> int:
    use_threads(args.threads, "highwaybp experiment deep")
    if args.tiny:
        apply_tiny(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_resume_config(out, {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG})
    log = (lambda s: None) if args.quiet else (lambda s: echo(s, sys.stderr))
    results_path = out / "deep_results.json"
    results = start_results(results_path, {k: v for k, v in vars(args).items() if k != "func"},
                            args.record_argv)
    for name in args.tasks:
        task = TASKS[name](args)
        entry = results["tasks"].setdefault(name, {"runs": {}})
        entry.update(metric=task.metric, config=task.config)
        arms = [(method_name(m), m, None) for m in methods_of(args)]
        arms += [(SCHEDULE_ARM + spec, Exact(), spec) for spec in args.k_schedule]
        stopped = train_arms(task, name, arms, entry, results, results_path, args, log)
        if stopped is not None:
            return stopped
    write_report(results, results_path, "deep_", args.quiet)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("deep", help="ResNet/GPT accuracy vs k (Exact, Highway, FixedPoint)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["resnet", "gpt"])
    p.add_argument("--ks", type=nonneg_int_list, default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--fixedpoint-k", type=nonneg_int, default=5)
    p.add_argument("--k-schedule", type=schedule_spec, action="append", default=[],
                   metavar="SPEC",
                   help="also train an arm whose method follows this k schedule (repeatable), "
                        "e.g. 'linear:0,4,80' or 'adaptive:target=0.99,every=20'; its method "
                        "and VJP sweeps are recorded at each evaluation")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads (1 is kind to a shared box)"
    )
    p.add_argument("--out", type=out_dir, default="results/deep")
    p.add_argument("--checkpoint-every", type=positive_int, default=25,
                   help="steps between checkpoints")
    g = p.add_argument_group("resnet (sklearn digits)")
    g.add_argument("--depth", type=positive_int, default=20, help="6n+2")
    g.add_argument("--width", type=positive_int, default=16)
    g.add_argument("--image", type=positive_int, default=16,
                   help="upsampled side (divisible by 4)")
    g.add_argument("--epochs", type=positive_int, default=4)
    g.add_argument("--batch", type=positive_int, default=64)
    g.add_argument("--lr", type=positive_float, default=2e-3)
    g.add_argument("--train-limit", type=nonneg_int, default=0,
                   help="use only the first N images")
    g = p.add_argument_group("gpt (char LM)")
    g.add_argument("--corpus", default=None, help="text file (default: Python stdlib sources)")
    g.add_argument("--corpus-chars", type=positive_int, default=1_000_000)
    g.add_argument("--d-model", type=positive_int, default=64)
    g.add_argument("--n-layer", type=positive_int, default=4, help="blocks (L = 2 x blocks)")
    g.add_argument("--n-head", type=positive_int, default=4)
    g.add_argument("--gamma", type=positive_float, default=0.2)
    g.add_argument("--seq", type=positive_int, default=64)
    g.add_argument("--gpt-batch", type=positive_int, default=16)
    g.add_argument("--steps", type=positive_int, default=200)
    g.add_argument("--gpt-lr", type=positive_float, default=3e-3)
    g.add_argument("--eval-batches", type=positive_int, default=20)
    p.add_argument("--tiny", action="store_true", help="tiny CI setting (seconds)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-record-argv", dest="record_argv", action="store_false")
    p.set_defaults(func=run)
