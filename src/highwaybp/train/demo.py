"""`highwaybp demo`: a short, real demonstration on MNIST-1D (generated locally, no download).

Trains the same deep residual MLP (same init, same batches) with exact backprop and with
Highway-BP at k = 0, 1, 3, then prints final loss / test accuracy / wall time per method
and the cosine of each method's gradient to the exact gradient on the model it trained.
Results are written atomically to --out; a rerun with the same --out and settings resumes
after the last finished method (another setting is refused: see `check_resume_config`).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from highwaybp.core.fidelity import gradient_fidelity
from highwaybp.core.methods import Exact, Method, method_from_string
from highwaybp.models.mlp import ResidualMLP
from highwaybp.train.cli_types import (
    method_spec,
    mnist1d_size,
    nonneg_int,
    out_dir,
    positive_float,
    positive_int,
)
from highwaybp.train.data import TensorSplit, load_mnist1d
from highwaybp.train.io import (
    atomic_write_json,
    check_resume_config,
    load_checkpoint,
    save_checkpoint,
)
from highwaybp.train.loop import StopGuard

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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a deep residual MLP with Exact vs Highway-BP")
    defaults = DemoConfig()
    p.add_argument("--steps", type=positive_int, default=defaults.steps)
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    p.add_argument("--depth", type=positive_int, default=defaults.depth)
    p.add_argument("--width", type=positive_int, default=defaults.width)
    p.add_argument("--lr", type=positive_float, default=defaults.lr)
    p.add_argument("--seed", type=nonneg_int, default=defaults.seed)
    p.add_argument("--samples", type=mnist1d_size, default=defaults.samples, help="MNIST-1D size")
    p.add_argument("--methods", nargs="+", type=method_spec, default=list(DEFAULT_METHODS),
                   help="e.g. exact highway:k=2 fixedpoint:k=2 'highway:tol=1e-3,max_k=8'")
    p.add_argument("--out", type=out_dir, default="runs/demo",
                   help="folder for results.json (a rerun with the same settings resumes; "
                        "another method list adds or reuses methods)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads (1: this model's matmuls are too small to "
                        "gain from more, and extra threads spin on a busy machine)")
    p.set_defaults(func=run)


def train_one(model: nn.Module, data: TensorSplit, cfg: DemoConfig,
              guard: StopGuard | None = None) -> dict | None:
    """Adam on shuffled minibatches; batches depend only on cfg.seed (same for every method).

    None when `guard` asks to stop (a method is short: it is not checkpointed mid-way)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = len(data.y_train)
    losses = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        if guard is not None and guard.should_stop(step):
            return None
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    tail = losses[-max(1, cfg.steps // 10):]
    return {"train_loss": sum(tail) / len(tail), "seconds": seconds,
            "test_accuracy": accuracy(model, data)}


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorSplit) -> float:
    model.eval()
    pred = model(data.x_test).argmax(-1)
    model.train()
    return float((pred == data.y_test).float().mean())


def fidelity_on_trained(model: nn.Module, method: Method, data: TensorSplit) -> float:
    """Cosine of `method`'s gradient to the exact one, on the model `method` trained."""
    if isinstance(method, Exact):
        return 1.0
    x, y = data.x_test[:512], data.y_test[:512]
    report = gradient_fidelity(
        model, lambda m: nn.functional.cross_entropy(m(x), y), {"m": method}
    )
    return report["m"]["cosine"]


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(args.steps, args.batch_size, args.depth, args.width, args.lr, args.seed,
                     args.samples)
    methods = [method_from_string(m) for m in args.methods]
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    data = load_mnist1d(num_samples=cfg.samples, seed=cfg.seed)
    ckpt_path = f"{args.out}/checkpoint.pt"
    # The methods are not part of the configuration: each one's result is kept on its own,
    # so a rerun may add methods; everything that changes a result must match.
    check_resume_config(args.out, asdict(cfg))
    state = load_checkpoint(ckpt_path)
    if state is None:
        state = {"config": asdict(cfg), "results": {}}
    with StopGuard() as guard:
        print(f"MNIST-1D: {len(data.y_train)} train / {len(data.y_test)} test, residual MLP "
              f"depth {cfg.depth} width {cfg.width}, {cfg.steps} Adam steps per method",
              flush=True)
        for method in methods:
            key = repr(method)
            if key in state["results"]:
                print(f"  {key}: done in an earlier run (resumed)", flush=True)
                continue
            torch.manual_seed(cfg.seed)  # the same initial weights for every method
            model = ResidualMLP(40, data.num_classes, cfg.width, cfg.depth, method=method)
            result = train_one(model, data, cfg, guard)
            if result is None:
                print(f"  {key}: stopped ({guard.reason()}); the methods finished before it "
                      f"are saved in {ckpt_path}; rerun the same command to continue (this "
                      "method starts again)", file=sys.stderr, flush=True)
                return guard.exit_code()
            result["grad_cosine_to_exact"] = fidelity_on_trained(model, method, data)
            state["results"][key] = result
            save_checkpoint(ckpt_path, state)
            print(f"  {key}: loss {result['train_loss']:.3f}, test acc "
                  f"{result['test_accuracy']:.3f}, {result['seconds']:.1f}s", flush=True)
    print_table(state["results"])
    atomic_write_json(f"{args.out}/results.json", state)
    print(f"wrote {args.out}/results.json")
    return 0


def print_table(results: dict) -> None:
    print()
    print(f"{'method':<22} {'train loss':>10} {'test acc':>9} {'grad cos':>9} {'time s':>7}")
    for key, r in results.items():
        print(f"{key:<22} {r['train_loss']:>10.3f} {r['test_accuracy']:>9.3f} "
              f"{r['grad_cosine_to_exact']:>9.4f} {r['seconds']:>7.1f}")
    print("grad cos: cosine of the method's parameter gradient to exact backprop's, on the "
          "model that method trained (test batch of 512).")



