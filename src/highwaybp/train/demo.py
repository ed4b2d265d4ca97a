"""`highwaybp demo`: both faces of Highway-BP in about two minutes, offline.

1. A deep residual MLP on MNIST-1D (generated locally): exact backprop and Highway-BP at
   k = 0, 1, 3 from the same initial weights and batches (train loss, test accuracy, the
   cosine of each method's gradient to the exact one on the model it trained, wall time),
   and the cosine against k on the exactly-trained model. On one CPU process every
   Highway step is slower than an exact one: this is the face where it does not pay here.
2. A GRU on a long sequence (scikit-learn's digits read pixel by pixel, T = 1024):
   torch.nn.GRU, our exact BPTT and our GRU at Highway k = 0 and 1, trained round-robin
   from the same weights on the same batches: median wall-clock per step and loss after
   the same steps. This is the face where the T per-step VJPs become one batched call.

Writes results.json, table.md and demo.png to --out and prints where they are. A rerun
with the same --out and settings resumes (finished methods and parts are kept; another
setting is refused: see `check_resume_config`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from highwaybp.core.fidelity import gradient_fidelity
from highwaybp.core.methods import Exact, FixedPoint, Highway, Method, method_from_string
from highwaybp.models.mlp import ResidualMLP
from highwaybp.models.rnn import GRU
from highwaybp.train.cli_types import (
    method_spec,
    mnist1d_size,
    nonneg_int,
    out_dir,
    positive_float,
    positive_int,
)
from highwaybp.train.data import TensorSplit, load_digits, load_mnist1d
from highwaybp.train.io import (
    atomic_write_json,
    atomic_write_text,
    check_resume_config,
    load_checkpoint,
    save_checkpoint,
    save_figure,
)
from highwaybp.train.loop import StopGuard, TrainLoop, method_label
from highwaybp.train.threads import use_threads

DEFAULT_METHODS = ("exact", "highway:k=0", "highway:k=1", "highway:k=3")


@dataclass
class DemoConfig:
    steps: int = 250
    batch_size: int = 128
    depth: int = 16
    width: int = 64
    lr: float = 3e-3
    seed: int = 0
    samples: int = 5000
    # Part 2, the recurrent model: digits upsampled to rnn_side x rnn_side, read pixel by
    # pixel (T = rnn_side ** 2); 0 steps skips it.
    rnn_steps: int = 120
    rnn_side: int = 32
    rnn_hidden: int = 64
    rnn_batch: int = 32
    rnn_lr: float = 1e-2


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="where Highway-BP pays and where it does not: a deep MLP and a long GRU",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DemoConfig()
    p.add_argument("--steps", type=positive_int, default=defaults.steps)
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    p.add_argument("--depth", type=positive_int, default=defaults.depth)
    p.add_argument("--width", type=positive_int, default=defaults.width)
    p.add_argument("--lr", type=positive_float, default=defaults.lr)
    p.add_argument("--seed", type=nonneg_int, default=defaults.seed)
    p.add_argument("--samples", type=mnist1d_size, default=defaults.samples, help="MNIST-1D size")
    p.add_argument("--rnn-steps", type=nonneg_int, default=defaults.rnn_steps,
                   help="training steps of each GRU in part 2 (0: skip part 2)")
    p.add_argument("--rnn-side", type=positive_int, default=defaults.rnn_side,
                   help="digits are upsampled to SIDE x SIDE and read pixel by pixel "
                        "(sequence length SIDE^2)")
    p.add_argument("--rnn-hidden", type=positive_int, default=defaults.rnn_hidden)
    p.add_argument("--rnn-batch", type=positive_int, default=defaults.rnn_batch)
    p.add_argument("--rnn-lr", type=positive_float, default=defaults.rnn_lr)
    p.add_argument("--methods", nargs="+", type=method_spec, default=list(DEFAULT_METHODS),
                   help="e.g. exact highway:k=2 fixedpoint:k=2 'highway:tol=1e-3,max_k=8'")
    p.add_argument("--out", type=out_dir, default="runs/demo",
                   help="folder for results.json (a rerun with the same settings resumes; "
                        "another method list adds or reuses methods)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads (1: this model's matmuls are too small to "
                        "gain from more, and extra threads spin on a busy machine)")
    p.set_defaults(func=run)


def train_one(model: ResidualMLP, data: TensorSplit, cfg: DemoConfig,
              guard: StopGuard | None = None, name: str = "") -> dict | None:
    """Adam on shuffled minibatches; batches depend only on cfg.seed (same for every method).

    None when `guard` asks to stop (a method is short: it is not checkpointed mid-way)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = len(data.y_train)

    def step(t: int) -> float:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    losses: list[float] = []
    loop = TrainLoop(step, cfg.steps, after_step=lambda t, loss: losses.append(loss),
                     guard=guard, name=name, k_label=lambda: method_label(model.chain.method),
                     log=lambda msg: None)  # the caller says what a stop keeps
    if loop.run() is not None:
        return None
    tail = losses[-max(1, cfg.steps // 10):]
    return {"train_loss": sum(tail) / len(tail), "seconds": loop.train_seconds,
            "test_accuracy": accuracy(model, data)}


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorSplit) -> float:
    model.eval()
    pred = model(data.x_test).argmax(-1)
    model.train()
    return float((pred == data.y_test).float().mean())


def fidelity_on_trained(model: nn.Module, method: Method, data: TensorSplit) -> float:
    """Cosine of `method`'s gradient to the exact one, on the model `method` trained."""
    if method.exact:
        return 1.0
    x, y = data.x_test[:512], data.y_test[:512]
    report = gradient_fidelity(
        model, lambda m: nn.functional.cross_entropy(m(x), y), {"m": method}
    )
    return report["m"]["cosine"]


def fidelity_curve(model: nn.Module, data: TensorSplit, depth: int) -> dict[str, list]:
    """Cosine to the exact gradient against k, Highway and FixedPoint, on `model`."""
    ks = sorted({0, 1, 2, 3, 4, 6, 8, depth} & set(range(depth + 1)))
    x, y = data.x_test[:512], data.y_test[:512]
    methods = {**{f"highway:k={k}": Highway(k=k) for k in ks},
               **{f"fixedpoint:k={k}": FixedPoint(k=k) for k in ks}}
    report = gradient_fidelity(model, lambda m: F.cross_entropy(m(x), y), methods)
    return {"k": ks,
            "highway": [report[f"highway:k={k}"]["cosine"] for k in ks],
            "fixedpoint": [report[f"fixedpoint:k={k}"]["cosine"] for k in ks]}


# ---- part 2: a GRU on a long sequence ------------------------------------------------------


class PixelGRU(nn.Module):
    """Digits read pixel by pixel: x [B, T, 1] -> logits [B, 10] from the last hidden state."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)            # [B, T, H]
        return self.head(out[:, -1])    # [B, 10]


def pixel_sequences(side: int) -> TensorSplit:
    """scikit-learn's digits upsampled to side x side: x [N, side * side, 1]."""
    data = load_digits()

    def seq(x: torch.Tensor) -> torch.Tensor:  # [N, 1, 8, 8] -> [N, T, 1]
        up = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return up.reshape(len(x), side * side, 1)

    return TensorSplit(seq(data.x_train), data.y_train, seq(data.x_test), data.y_test, 10)


RNN_VARIANTS = ("torch.nn.GRU", "hbp Exact()", "hbp Highway(k=0)", "hbp Highway(k=1)")


def _rnn(name: str, hidden: int) -> nn.Module:
    if name == "torch.nn.GRU":
        return nn.GRU(1, hidden, batch_first=True)
    method = {"hbp Exact()": Exact(), "hbp Highway(k=0)": Highway(k=0),
              "hbp Highway(k=1)": Highway(k=1)}[name]
    return GRU(1, hidden, batch_first=True, method=method)


def train_rnns(cfg: DemoConfig, guard: StopGuard) -> dict[str, Any] | None:
    """The four GRUs trained round-robin (one step each in turn, so that a shared machine's
    load hits their wall-clock alike) from the same weights on the same batches."""
    data = pixel_sequences(cfg.rnn_side)
    torch.manual_seed(cfg.seed)
    reference = PixelGRU(_rnn(RNN_VARIANTS[0], cfg.rnn_hidden), cfg.rnn_hidden)
    models = {}
    for name in RNN_VARIANTS:
        model = PixelGRU(_rnn(name, cfg.rnn_hidden), cfg.rnn_hidden)
        model.load_state_dict(reference.state_dict())      # same parameter names as torch.nn
        models[name] = model
    opts = {n: torch.optim.Adam(m.parameters(), lr=cfg.rnn_lr) for n, m in models.items()}
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    seconds: dict[str, list[float]] = {n: [] for n in models}
    losses: dict[str, list[float]] = {n: [] for n in models}

    def step(t: int) -> float:
        idx = torch.randint(0, len(data.y_train), (cfg.rnn_batch,), generator=gen)
        x, y = data.x_train[idx], data.y_train[idx]
        for name, model in models.items():
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            seconds[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())
        return losses["torch.nn.GRU"][-1]

    loop = TrainLoop(step, cfg.rnn_steps, guard=guard, name="4 GRUs round-robin",
                     log=lambda msg: None)
    if loop.run() is not None:
        return None
    tail = max(1, cfg.rnn_steps // 4)
    out: dict[str, Any] = {"sequence_length": cfg.rnn_side ** 2, "variants": {}}
    for name, model in models.items():
        out["variants"][name] = {
            "ms_per_step": 1000 * statistics.median(seconds[name]),
            "train_loss": sum(losses[name][-tail:]) / tail,
            "test_accuracy": accuracy(model, data),
            "losses": losses[name],
        }
    base = out["variants"]
    for r in base.values():
        r["speedup_vs_torch"] = base["torch.nn.GRU"]["ms_per_step"] / r["ms_per_step"]
        r["speedup_vs_hbp_exact"] = base["hbp Exact()"]["ms_per_step"] / r["ms_per_step"]
    return out


# ---- the command ----------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(args.steps, args.batch_size, args.depth, args.width, args.lr, args.seed,
                     args.samples, args.rnn_steps, args.rnn_side, args.rnn_hidden,
                     args.rnn_batch, args.rnn_lr)
    methods = [method_from_string(m) for m in args.methods]
    use_threads(args.threads, "highwaybp demo")
    torch.manual_seed(cfg.seed)
    data = load_mnist1d(num_samples=cfg.samples, seed=cfg.seed)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    # The methods are not part of the configuration: each one's result is kept on its own,
    # so a rerun may add methods; everything that changes a result must match.
    check_resume_config(out, asdict(cfg))
    state = load_checkpoint(ckpt_path)
    if state is None:
        state = {"config": asdict(cfg), "results": {}}
    with StopGuard() as guard:
        print(f"1. MNIST-1D: {len(data.y_train)} train / {len(data.y_test)} test, residual MLP "
              f"depth {cfg.depth} width {cfg.width}, {cfg.steps} Adam steps per method",
              flush=True)
        for method in methods:
            key = repr(method)
            if key in state["results"]:
                print(f"  {key}: done in an earlier run (resumed)", flush=True)
                continue
            torch.manual_seed(cfg.seed)  # the same initial weights for every method
            model = ResidualMLP(40, data.num_classes, cfg.width, cfg.depth, method=method)
            result = train_one(model, data, cfg, guard, name=key)
            if result is None:
                return _stopped(guard, key, ckpt_path)
            result["grad_cosine_to_exact"] = fidelity_on_trained(model, method, data)
            if method.exact:
                state["fidelity_curve"] = fidelity_curve(model, data, cfg.depth)
            state["results"][key] = result
            save_checkpoint(ckpt_path, state)
            print(f"  {key}: loss {result['train_loss']:.3f}, test acc "
                  f"{result['test_accuracy']:.3f}, {result['seconds']:.1f}s", flush=True)
        if cfg.rnn_steps and "rnn" not in state:
            print(f"2. digits read pixel by pixel (T = {cfg.rnn_side ** 2}), GRU hidden "
                  f"{cfg.rnn_hidden}, batch {cfg.rnn_batch}, {cfg.rnn_steps} Adam steps each, "
                  "round-robin", flush=True)
            rnn = train_rnns(cfg, guard)
            if rnn is None:
                return _stopped(guard, "the GRU part", ckpt_path)
            state["rnn"] = rnn
            save_checkpoint(ckpt_path, state)
    table = make_table(state)
    print("\n" + table)
    atomic_write_json(out / "results.json", state)
    atomic_write_text(out / "table.md", table + "\n")
    written = [out / "results.json", out / "table.md"]
    plot = make_plot(state, out / "demo.png")
    written += [plot] if plot else []
    print("results: " + ", ".join(str(p) for p in written))
    return 0


def _stopped(guard: StopGuard, what: str, ckpt_path: Path) -> int:
    print(f"  {what}: stopped ({guard.reason()}); what finished before it is saved in "
          f"{ckpt_path}; rerun the same command to continue (this part starts again)",
          file=sys.stderr, flush=True)
    return guard.exit_code()


def make_table(state: dict[str, Any]) -> str:
    """Markdown tables of both parts, from the saved state alone."""
    lines = ["Part 1, deep residual MLP (one CPU process): per method", "",
             "| method | train loss | test acc | grad cosine to exact | seconds |",
             "|---|---|---|---|---|"]
    for key, r in state["results"].items():
        lines.append(f"| {key} | {r['train_loss']:.3f} | {r['test_accuracy']:.3f} | "
                     f"{r['grad_cosine_to_exact']:.4f} | {r['seconds']:.1f} |")
    lines += ["", "grad cosine: of the method's parameter gradient to exact backprop's, on the "
              "model that method trained (test batch of 512)."]
    curve = state.get("fidelity_curve")
    if curve:
        lines += ["", "Cosine to the exact gradient against k, on the exactly-trained model:", "",
                  "| k | " + " | ".join(str(k) for k in curve["k"]) + " |",
                  "|---|" + "---|" * len(curve["k"]),
                  "| Highway | " + " | ".join(f"{c:.4f}" for c in curve["highway"]) + " |",
                  "| FixedPoint | " + " | ".join(f"{c:.4f}" for c in curve["fixedpoint"]) + " |"]
    rnn = state.get("rnn")
    if rnn:
        lines += ["", f"Part 2, GRU on digits read pixel by pixel (T = {rnn['sequence_length']}):"
                  " same weights, same batches", "",
                  "| variant | ms per step (median) | vs torch.nn.GRU | vs our exact BPTT | "
                  "train loss (last quarter) | test acc |", "|---|---|---|---|---|---|"]
        for name, r in rnn["variants"].items():
            lines.append(f"| {name} | {r['ms_per_step']:.1f} | {r['speedup_vs_torch']:.2f}x | "
                         f"{r['speedup_vs_hbp_exact']:.2f}x | {r['train_loss']:.3f} | "
                         f"{r['test_accuracy']:.3f} |")
    return "\n".join(lines)


def make_plot(state: dict[str, Any], path: Path) -> Path | None:
    """demo.png: cosine against k (part 1) and GRU training loss per step (part 2)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'highway-bp[experiments]')",
              file=sys.stderr)
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    curve = state.get("fidelity_curve")
    if curve:
        left.plot(curve["k"], curve["highway"], "o-", label="Highway(k)")
        left.plot(curve["k"], curve["fixedpoint"], "s--", label="FixedPoint(k)")
        left.set(xlabel="k", ylabel="cosine to the exact gradient",
                 title="deep MLP, on the exactly-trained model")
        left.legend()
        left.grid(alpha=0.3)
    rnn = state.get("rnn")
    if rnn:
        window = max(1, len(next(iter(rnn["variants"].values()))["losses"]) // 12)
        for name, r in rnn["variants"].items():
            smooth = torch.tensor(r["losses"]).unfold(0, window, 1).mean(1).tolist()
            right.plot(range(window - 1, window - 1 + len(smooth)), smooth,
                       label=f"{name} ({r['ms_per_step']:.0f} ms/step)")
        right.set(xlabel="step", ylabel=f"train loss (mean of {window} steps)",
                  title=f"GRU, T = {rnn['sequence_length']}, same batches")
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
