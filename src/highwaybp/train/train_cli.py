"""`highwaybp train`: classification on offline data with a chosen gradient method.

    highwaybp train --method exact            --steps 2000 --out runs/bp
    highwaybp train --method highway --k 3    --steps 2000 --out runs/hbp3
    highwaybp train --method fixedpoint --k 3 --steps 2000 --out runs/fp3
    highwaybp train --method ddg --splits 3 --semantics stash --out runs/ddg3
    highwaybp train --method ddg --splits 3 --launcher spawn --out runs/ddg3mp   # 3 procs
    torchrun --nproc-per-node 3 -m highwaybp train --method ddg --splits 3 --out runs/t3

Model: the 1-D ResNet of `highwaybp.models.resnet1d` (stem, residual blocks, pooled
linear head). Data: MNIST-1D generated locally (default) or scikit-learn's 8x8 digits
read as 64-sample signals. Optimizer: SGD with momentum (or Adam) with a cosine or
constant learning rate, stepped once per training step.

Writes to --out (atomically): config.json, metrics.csv (one row per evaluation),
result.json (final figures) and checkpoint.pt; a rerun with the same --out resumes from
the checkpoint (the configuration must match). Multi-process DDG writes per-rank
checkpoints ddg_rank{r}.ckpt instead and resumes from them.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

import highwaybp as hbp
from highwaybp.ddg import SEMANTICS, DDGTrainer
from highwaybp.models.resnet1d import build_resnet1d
from highwaybp.train.cli_types import (
    mnist1d_size,
    momentum_value,
    nonneg_float,
    nonneg_int,
    out_dir,
    positive_float,
    positive_int,
    schedule_spec,
)
from highwaybp.train.data import TensorSplit, load_digits, load_mnist1d
from highwaybp.train.io import (
    atomic_write_json,
    atomic_write_text,
    check_resume_config,
)
from highwaybp.train.loop import StopGuard, TrainLoop, echo, method_label
from highwaybp.train.threads import use_threads

METHODS = ("exact", "highway", "fixedpoint", "ddg")
# Settings that change the run: a resumed run must have the same ones.
_RUN_KEYS = (
    "data", "num_samples", "data_seed", "method", "k", "splits", "semantics", "steps",
    "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "seed",
    "channels", "blocks", "residual",
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the 1-D ResNet classifier with exact BP, Highway-BP, fixed point or DDG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("mnist1d", "digits"), default="mnist1d")
    g.add_argument(
        "--num-samples", type=mnist1d_size, default=4000, help="mnist1d: train+test size"
    )
    g.add_argument("--data-seed", type=nonneg_int, default=42, help="mnist1d generation seed")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="exact")
    g.add_argument("--k", type=nonneg_int, default=3, help="highway/fixedpoint iterations")
    g.add_argument(
        "--k-schedule",
        type=schedule_spec,
        default=None,
        metavar="SPEC",
        help="choose the method per step (overrides --method/--k): 'linear:0,4,2000', "
        "'steps:0=highway:k=1,1000=exact', 'finish:N:<spec>', 'adaptive:target=0.99,every=100'"
        " (see highwaybp.schedules); per-step method and VJP sweeps go to k_schedule.csv",
    )
    g.add_argument("--splits", type=positive_int, default=2, help="ddg: number of modules K")
    g.add_argument("--semantics", choices=SEMANTICS, default="stash", help="ddg stale grads")
    g.add_argument(
        "--launcher",
        choices=("auto", "none", "spawn"),
        default="auto",
        help="ddg: 'none' = single-process oracle, 'spawn' = one local process per module "
        "(gloo), 'auto' = one rank per module when run under torchrun, else none",
    )
    g.add_argument("--timeout", type=float, default=120.0, help="ddg multi-process: seconds")
    g.add_argument("--threads", type=positive_int, default=None, help="torch threads (per rank)")
    g = p.add_argument_group("model")
    g.add_argument("--channels", type=positive_int, default=32)
    g.add_argument("--blocks", type=positive_int, default=4)
    g.add_argument("--residual", choices=("relu", "identity"), default="relu")
    g = p.add_argument_group("optimisation")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=None, help="training steps")
    length.add_argument("--epochs", type=positive_float, default=None, help="epochs (default 10)")
    g.add_argument("--batch-size", type=positive_int, default=64)
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    g.add_argument("--lr", type=positive_float, default=0.05)
    g.add_argument("--momentum", type=momentum_value, default=0.9, help="sgd, in [0, 1)")
    g.add_argument("--weight-decay", type=nonneg_float, default=5e-4)
    g.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g = p.add_argument_group("output")
    g.add_argument(
        "--out", type=out_dir, default=None, help="result folder (resumes from its checkpoint)"
    )
    g.add_argument("--eval-every", type=positive_int, default=None,
                   help="steps between evaluations (default: ~10 per run)")
    g.add_argument(
        "--stop-after",
        type=positive_int,
        default=None,
        help="stop this invocation after N more steps and save a checkpoint there (rerun "
        "the same command to continue; SIGINT/SIGTERM stop the same way)",
    )
    g.add_argument("--quiet", action="store_true")


# ----------------------------------------------------------------------------- pieces


def load_data(args: argparse.Namespace) -> TensorSplit:
    """The dataset as 1-D signals: x [N, T] float32, y [N]."""
    if args.data == "mnist1d":
        return load_mnist1d(args.num_samples, args.data_seed)
    d = load_digits(seed=args.data_seed)
    return TensorSplit(
        d.x_train.flatten(1), d.y_train, d.x_test.flatten(1), d.y_test, d.num_classes
    )


def total_steps(args: argparse.Namespace, n_train: int) -> int:
    if args.steps is not None:
        return args.steps
    per_epoch = max(1, n_train // args.batch_size)
    return max(1, math.ceil((args.epochs if args.epochs is not None else 10) * per_epoch))


def optimizer_factory(args: argparse.Namespace):
    if args.optimizer == "sgd":
        return functools.partial(
            torch.optim.SGD, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    return functools.partial(torch.optim.Adam, lr=args.lr, weight_decay=args.weight_decay)


def scheduler_factory(args: argparse.Namespace, steps: int):
    if args.schedule == "constant":
        return None
    return functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=steps)


def chain_method(args: argparse.Namespace) -> hbp.Method:
    if args.method == "highway":
        return hbp.Highway(k=args.k)
    if args.method == "fixedpoint":
        return hbp.FixedPoint(k=args.k)
    return hbp.Exact()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024):
    """(mean cross-entropy, accuracy) of `model` in eval mode on x [N, T], y [N]."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), chunk):
        logits = model(x[i : i + chunk])
        loss += float(F.cross_entropy(logits, y[i : i + chunk], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + chunk]).sum())
    model.train(was_training)
    return loss / len(x), correct / len(x)


def _validate(args: argparse.Namespace, n_train: int) -> None:
    if args.batch_size < 1 or args.batch_size > n_train:
        raise SystemExit(f"--batch-size must be in 1..{n_train} (training set size)")
    if args.method in ("highway", "fixedpoint") and args.k < 0:
        raise SystemExit("--k must be >= 0")
    if args.method == "ddg" and not 1 <= args.splits <= args.blocks + 2:
        raise SystemExit(
            f"--splits must be in 1..{args.blocks + 2} (stem + {args.blocks} blocks + head)"
        )
    if args.steps is not None and args.steps < 1:
        raise SystemExit("--steps must be >= 1")


def _config(args: argparse.Namespace, steps: int) -> dict[str, Any]:
    cfg = {k: getattr(args, k) for k in _RUN_KEYS}
    cfg["steps"] = steps
    if getattr(args, "k_schedule", None):
        cfg["k_schedule"] = args.k_schedule
    return cfg


def _log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        echo(msg)


def _write_metrics(out: Optional[Path], rows: list[dict[str, Any]]) -> None:
    if out is None or not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    use_threads(args.threads, "highwaybp train")  # DDG ranks: --threads or cores // ranks
    _check_k_schedule(args)  # before the data: a refusal must not wait for it
    data = load_data(args)
    _validate(args, len(data.x_train))
    steps = total_steps(args, len(data.x_train))
    out = Path(args.out) if args.out else None
    config = _config(args, steps)
    distributed = args.method == "ddg" and (
        args.launcher == "spawn"
        or (args.launcher == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    )
    if out is not None and (out / "result.json").exists():
        done = json.loads((out / "result.json").read_text())
        if done.get("config") == config:
            _log(args, f"{out} already holds the finished run: {done['final_test_acc']:.4f}")
            return 0
    if distributed:
        return _run_distributed(args, data, steps, out, config)
    return _run_single(args, data, steps, out, config)


def _run_single(args, data: TensorSplit, steps: int, out: Optional[Path], config) -> int:
    from highwaybp.ddg import EpochBatches

    model = build_resnet1d(
        args.seed, args.channels, args.blocks, data.num_classes, args.residual, sequential=False
    )
    model.chain.method = chain_method(args)
    ctl = _k_controller(args, model, steps)
    batches = EpochBatches(data.x_train, data.y_train, args.batch_size, seed=args.seed)
    if args.method == "ddg":
        trainer = DDGTrainer(
            model.as_sequential(),
            args.splits,
            optimizer_factory(args),
            semantics=args.semantics,
            scheduler_factory=scheduler_factory(args, steps),
            rng_seed=args.seed,
        )
        opt = sched = None
    else:
        trainer = None
        opt = optimizer_factory(args)(model.parameters())
        make_sched = scheduler_factory(args, steps)
        sched = make_sched(opt) if make_sched is not None else None
    rows: list[dict[str, Any]] = []
    window: list[float] = []  # train losses since the last evaluation
    every = args.eval_every or max(1, steps // 10)
    if out is not None:
        check_resume_config(out, config)

    def state() -> dict[str, Any]:
        return {
            "rows": rows,
            "window": window,
            "rng": torch.get_rng_state(),
            "trainer": None if trainer is None else trainer.state_dict(),
            "model": model.state_dict() if trainer is None else None,
            "optimizer": None if opt is None else opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "k_controller": None if ctl is None else ctl.state_dict(),
        }

    def load_state(saved: dict[str, Any]) -> None:
        rows[:], window[:] = saved["rows"], saved.get("window", [])
        if trainer is not None:
            trainer.load_state_dict(saved["trainer"])
        else:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if sched is not None:
                sched.load_state_dict(saved["scheduler"])
            if ctl is not None:
                ctl.load_state_dict(saved["k_controller"])
        torch.set_rng_state(saved["rng"])

    def step(t: int) -> float:
        x, y = batches(t)
        if trainer is not None:
            loss = trainer.step(x, y).loss
        else:
            if ctl is not None:  # the schedule's method for this step (probes call the loss)
                ctl.step(t, loss_fn=lambda x=x, y=y: F.cross_entropy(model(x), y))
            opt.zero_grad(set_to_none=True)
            loss_t = F.cross_entropy(model(x), y)
            loss_t.backward()
            opt.step()
            if sched is not None:
                sched.step()
            loss = float(loss_t.detach())
        if not math.isfinite(loss):
            raise SystemExit(f"training diverged at step {t} (loss {loss}); lower --lr")
        return loss

    def after_step(t: int, loss: float) -> bool:
        """Metrics: an evaluation row every `every` steps (and at the end); checkpoint there."""
        window.append(loss)
        if (t + 1) % every != 0 and t + 1 != steps:
            return False
        now = loop.wall_seconds
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
        rows.append(
            {
                "step": t + 1,
                "epoch": round((t + 1) / batches.steps_per_epoch, 3),
                "train_loss": sum(window) / len(window),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "time_s": round(now, 3),
            }
        )
        window.clear()
        if ctl is not None:
            rows[-1].update(method=repr(ctl.method), sweeps=ctl.total_sweeps())
        _log(args, f"step {t + 1}/{steps} train {rows[-1]['train_loss']:.4f} "
                   f"test {test_loss:.4f} acc {test_acc:.4f} ({now:.1f}s)"
                   + _k_progress(ctl))  # fmt: skip
        _write_metrics(out, rows)
        if out is not None:
            _write_k_history(out, ctl)
        return True

    loop = TrainLoop(
        step, steps, state=state, load_state=load_state,
        checkpoint_path=None if out is None else out / "checkpoint.pt", config=config,
        after_step=after_step,
        k_label=None if ctl is None else lambda: method_label(ctl.method),
        progress=not args.quiet, log=lambda msg: _log(args, msg),
    )  # fmt: skip
    torch.manual_seed(args.seed)  # global RNG of plain runs (DDG stages own theirs)
    loop.resume()  # (restores the global RNG too)
    with StopGuard(None if args.stop_after is None else loop.step + args.stop_after) as guard:
        loop.guard = guard
        stopped = loop.run()
    if stopped is not None:
        if out is not None:
            _write_k_history(out, ctl)
        return stopped
    extra = None if ctl is None else {"k_schedule_sweeps": ctl.total_sweeps()}
    result = _final(args, config, rows, model, data, launcher="single-process", extra=extra)
    if out is not None:
        atomic_write_json(out / "result.json", result)
    return 0


def _check_k_schedule(args: argparse.Namespace) -> None:
    """Refuse --k-schedule with ddg, which it cannot drive (argparse checked its text)."""
    if getattr(args, "k_schedule", None) and args.method == "ddg":
        raise SystemExit("--k-schedule chooses Exact/Highway/FixedPoint per step: not with ddg")


def _k_controller(args: argparse.Namespace, model: nn.Module, steps: int):
    """The KController for --k-schedule (None without one)."""
    if not getattr(args, "k_schedule", None):
        return None
    return hbp.KController(model, args.k_schedule, total_steps=steps)


def _k_progress(ctl) -> str:
    if ctl is None:
        return ""
    return f" | {ctl.method!r}, {ctl.total_sweeps():.0f} VJP sweeps"


def _write_k_history(out: Path, ctl) -> None:
    """k_schedule.csv: per step the method, the backward's VJP sweeps, probe sweeps and
    probed cosine (see highwaybp.control for the sweep count)."""
    if ctl is None:
        return
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "method", "sweeps", "probe_sweeps", "cosine"])
    for h in ctl.history:
        writer.writerow([h["step"], h["method"], h["sweeps"], h["probe_sweeps"], h["cosine"]])
    atomic_write_text(out / "k_schedule.csv", buf.getvalue())


def _final(args, config, rows, model, data, launcher: str, extra=None) -> dict[str, Any]:
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    result = {
        "config": config,
        "launcher": launcher,
        "final_test_loss": test_loss,
        "final_test_acc": test_acc,
        "best_test_acc": max([r["test_acc"] for r in rows], default=test_acc),
        "train_time_s": rows[-1].get("time_s") if rows else None,
        "torch_threads": torch.get_num_threads(),
        "history": rows,
    }
    result.update(extra or {})
    _log(args, f"final test acc {test_acc:.4f} loss {test_loss:.4f}")
    return result


def _run_distributed(args, data: TensorSplit, steps: int, out: Optional[Path], config) -> int:
    from highwaybp import ddg as ddist

    if args.stop_after is not None:
        raise SystemExit("--stop-after is for single-process runs")
    cfg = ddist.DDGRunConfig(
        build_model=functools.partial(
            build_resnet1d,
            args.seed,
            args.channels,
            args.blocks,
            data.num_classes,
            args.residual,
        ),
        batches=ddist.EpochBatches(data.x_train, data.y_train, args.batch_size, seed=args.seed),
        steps=steps,
        optimizer_factory=optimizer_factory(args),
        scheduler_factory=scheduler_factory(args, steps),
        semantics=args.semantics,
        rng_seed=args.seed,
        timeout=args.timeout,
        threads=args.threads,
        checkpoint_dir=None if out is None else str(out),
        checkpoint_every=args.eval_every or max(1, steps // 10),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1: this process is a torchrun rank
    if world > 1 and world != args.splits:
        raise SystemExit(f"torchrun started {world} ranks but --splits is {args.splits}")
    if world > 1 and out is None:
        raise SystemExit("multi-process DDG under torchrun needs --out (per-rank results)")
    if out is not None:
        # Before any rank starts or writes: per-rank checkpoints of another configuration
        # must not be resumed. Under torchrun every rank checks (all read the same file).
        check_resume_config(out, config)
    tic = time.perf_counter()
    if world > 1:
        result_dir = str(out / "ranks")
        ddist.run_from_env(cfg, result_dir)
        if int(os.environ["RANK"]) != 0:
            return 0
        results = [
            torch.load(Path(result_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)
        ]
        launcher = "torchrun"
    else:
        _log(args, f"spawning {args.splits} local processes (gloo)")
        results = ddist.spawn_ddg(cfg, args.splits)
        launcher = "spawn"
    wall = time.perf_counter() - tic
    model = ddist.assemble_model(cfg, results)
    last = results[-1]
    per_epoch = cfg.batches.steps_per_epoch
    rows = []
    every = cfg.checkpoint_every
    for s in range(every, steps + 1, every):  # train loss per window, test only at the end
        window = last["losses"][s - every : s]
        rows.append({"step": s, "epoch": round(s / per_epoch, 3),
                     "train_loss": sum(window) / len(window)})  # fmt: skip
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    if rows:
        rows[-1].update(test_loss=test_loss, test_acc=test_acc, time_s=round(wall, 3))
    result = _final(
        args,
        config,
        [r for r in rows if "test_acc" in r] or [],
        model,
        data,
        launcher,
        {
            "wall_time_s": wall,
            "train_losses_window": rows,
            "ranks": [{"rank": r["rank"], **r["stats"]} for r in results],
        },
    )
    if out is not None:
        atomic_write_json(out / "result.json", result)
        torch.save(model.state_dict(), out / "model.pt")
    return 0
