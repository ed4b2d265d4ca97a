"""The paper's experiments on the paper's data, one command each (nothing downloads).

    highwaybp experiment pixel-gru --data-dir DATA --device cuda --out results/paper/pixel_gru
    highwaybp experiment resnet32-cifar10 --data-dir DATA --device cuda \
        --out results/paper/resnet32

- `pixel-gru`: the paper's pixel-CIFAR GRU (one GRU layer, hidden 64, a linear head on the
  last state): CIFAR-10 images (python batches under DATA) in grey, read one pixel per step
  (T = 1024); MNIST IDX files under DATA work too (T = 784 at --side 28). Adam.
- `resnet32-cifar10`: the paper's pre-activation ResNet32 (L = 15 residual layers, the
  paper's full-resolution "updown" form, K = I) on CIFAR-10 (python batches under DATA),
  random crop (pad 4) and horizontal flip, SGD with Nesterov momentum 0.9, weight decay
  5e-4, warm-up + cosine learning rate.

Each trains Exact, Highway(k) for k in --ks and FixedPoint(--fixedpoint-k) from the same
initialisation, records the test accuracy at 0/25/50/75/100% of training and, along the
Exact run, the cosine of each method's gradient to the exact one (the paper's Fig. 6),
through `experiment deep`'s loop: results JSON after every run, table.md and plots, resume
from checkpoints. docs/paper-experiments.md lists the paper's numbers beside each command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from highwaybp.train.cli_types import (
    nonneg_int,
    nonneg_int_list,
    out_dir,
    positive_float,
    positive_int,
)
from highwaybp.train.data import TensorSplit, load_cifar, pixel_sequences, pixel_source_in
from highwaybp.train.deep_experiment import (
    Task,
    method_name,
    methods_of,
    start_results,
    train_arms,
    write_report,
)
from highwaybp.train.io import check_resume_config
from highwaybp.train.loop import echo
from highwaybp.train.threads import use_threads


def _evaluate(x_test: Tensor, y_test: Tensor, device: torch.device, rows: int = 500):
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(x_test[i:i + rows].to(device)).argmax(1).cpu()
                     == y_test[i:i + rows]).sum())
                for i in range(0, len(y_test), rows))
        model.train(was)
        return 100.0 * correct / len(y_test)

    return evaluate


def _limit(data: TensorSplit, n: int) -> TensorSplit:
    if not n:
        return data
    return TensorSplit(data.x_train[:n], data.y_train[:n], data.x_test[:n], data.y_test[:n],
                       data.num_classes)


def _epoch_batches(n: int, batch: int, seed: int):
    """step -> indices of that step's batch: a fresh permutation per epoch, a pure function
    of the step (the runs resume exactly)."""
    per_epoch = max(1, n // batch)

    def indices(step: int) -> Tensor:
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return perm[i * batch:(i + 1) * batch]

    return per_epoch, indices


class PixelGRUModel(nn.Module):
    """Pixels read one per step: x [B, T, 1] -> logits [B, classes] from the last state."""

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        from highwaybp.models.rnn import GRU

        self.rnn = GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def pixel_gru_task(args: argparse.Namespace) -> Task:
    device = torch.device(args.device)
    source = pixel_source_in(args.data_dir) if args.source == "auto" else args.source
    if source == "digits":
        raise FileNotFoundError(
            f"pixel-gru: {args.data_dir} holds neither CIFAR-10's python batches "
            "(cifar-10-batches-py/data_batch_1 ...) nor MNIST's IDX files "
            "(train-images-idx3-ubyte[.gz] ...): point --data-dir at one")
    data, described = pixel_sequences(args.side, args.data_dir, source)
    data = _limit(data, args.train_limit)
    n, bsz = len(data.y_train), min(args.batch, len(data.y_train))
    per_epoch, indices = _epoch_batches(n, bsz, args.seed)

    def make_model() -> nn.Module:
        torch.manual_seed(args.seed)
        return PixelGRUModel(args.hidden, data.num_classes).to(device)

    def batch(step: int) -> tuple[Tensor, Tensor]:
        idx = indices(step)
        return data.x_train[idx].to(device), data.y_train[idx].to(device)

    def loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    diag = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 7))[:min(128, n)]
    return Task(
        "pixel_gru", "test_acc", args.epochs * per_epoch, args.lr, make_model, batch, loss,
        _evaluate(data.x_test, data.y_test, device),
        (data.x_train[diag].to(device), data.y_train[diag].to(device)), args.side ** 2,
        {"model": f"GRU hidden {args.hidden} + linear head on the last state (T = "
                  f"{args.side ** 2})", "data": described, "epochs": args.epochs,
         "batch": bsz, "steps": args.epochs * per_epoch, "optimizer": f"Adam lr {args.lr} "
         "warm-up + cosine", "L": args.side ** 2, "device": str(device)},
        optimizer=lambda params: torch.optim.Adam(params, lr=args.lr))


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """CIFAR's standard augmentation: a random crop of the image padded by `pad` (zeros)
    and a random horizontal flip, per image, drawn from `generator`."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    crops = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def resnet32_task(args: argparse.Namespace) -> Task:
    from highwaybp.models.resnet import CifarResNet

    device = torch.device(args.device)
    data = _limit(load_cifar(args.data_dir, 10), args.train_limit)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x_train, x_test = (data.x_train - mean) / std, (data.x_test - mean) / std
    n, bsz = len(data.y_train), min(args.batch, len(data.y_train))
    per_epoch, indices = _epoch_batches(n, bsz, args.seed)

    def make_model() -> nn.Module:
        torch.manual_seed(args.seed)
        return CifarResNet(args.depth, form="pre", downsample="updown", in_channels=3,
                           width=args.width).to(device)

    def batch(step: int) -> tuple[Tensor, Tensor]:
        idx = indices(step)
        g = torch.Generator().manual_seed(args.seed * 7_919 + step)
        return augment(x_train[idx], g).to(device), data.y_train[idx].to(device)

    def loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    layers = 3 * ((args.depth - 2) // 6)
    diag = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 7))[:min(128, n)]
    return Task(
        "resnet32_cifar10", "test_acc", args.epochs * per_epoch, args.lr, make_model, batch,
        loss, _evaluate(x_test, data.y_test, device),
        (x_train[diag].to(device), data.y_train[diag].to(device)), layers,
        {"model": f"pre-act ResNet{args.depth} (updown, K=I), width {args.width}",
         "data": f"CIFAR-10 from {args.data_dir}, {n} train / {len(data.y_test)} test, crop+flip",
         "epochs": args.epochs, "batch": bsz, "steps": args.epochs * per_epoch,
         "optimizer": f"SGD Nesterov 0.9, wd {args.weight_decay}, lr {args.lr} warm-up + cosine",
         "L": layers, "device": str(device)},
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9,
                                                 nesterov=True, weight_decay=args.weight_decay))


TASKS = {"pixel-gru": pixel_gru_task, "resnet32-cifar10": resnet32_task}
_NOT_CONFIG = ("func", "threads", "checkpoint_every", "quiet", "record_argv", "out", "device",
               "experiment", "command")


def run(args: argparse.Namespace) -> int:
    if args.experiment == "pixel-gru":
        use_threads(args.threads, "highwaybp experiment pixel-gru")
    else:
        use_threads(args.threads, "highwaybp experiment resnet32-cifar10")
    if args.tiny:
        apply_tiny(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in _NOT_CONFIG}
    check_resume_config(out, config)
    log = (lambda s: None) if args.quiet else (lambda s: echo(s, sys.stderr))
    results_path = out / "paper_results.json"
    results = start_results(results_path, config, args.record_argv)
    task = TASKS[args.paper_task](args)
    name = f"{args.paper_task}_seed{args.seed}"
    entry = results["tasks"].setdefault(name, {"runs": {}})
    entry.update(metric=task.metric, config=task.config)
    arms = [(method_name(m), m, None) for m in methods_of(args)]
    stopped = train_arms(task, name, arms, entry, results, results_path, args, log)
    if stopped is not None:
        return stopped
    write_report(results, results_path, "paper_", args.quiet)
    return 0


def apply_tiny(args: argparse.Namespace) -> None:
    """The CI setting: a few images, a tiny model, one epoch, k in {0, 1}."""
    args.epochs, args.train_limit, args.batch, args.ks, args.fixedpoint_k = 1, 16, 8, [0, 1], 1
    if args.paper_task == "pixel-gru":
        args.side, args.hidden = 4, 8
    else:
        args.depth, args.width = 8, 4


def _common(p: argparse.ArgumentParser, task: str, ks: list[int], fixedpoint_k: int,
            epochs: int, batch: int, lr: float) -> None:
    p.add_argument("--data-dir", type=Path, required=True,
                   help="folder holding the dataset's files (see docs/paper-experiments.md)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--ks", type=nonneg_int_list, default=ks)
    p.add_argument("--fixedpoint-k", type=nonneg_int, default=fixedpoint_k)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--epochs", type=positive_int, default=epochs)
    p.add_argument("--batch", type=positive_int, default=batch)
    p.add_argument("--lr", type=positive_float, default=lr)
    p.add_argument("--train-limit", type=nonneg_int, default=0,
                   help="use only the first N train (and test) images")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    p.add_argument("--out", type=out_dir, default=f"results/paper/{task.replace('-', '_')}")
    p.add_argument("--checkpoint-every", type=positive_int, default=200)
    p.add_argument("--tiny", action="store_true", help="tiny CI setting (seconds)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-record-argv", dest="record_argv", action="store_false")
    p.set_defaults(func=run, paper_task=task)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pixel-gru", help="the paper's pixel-CIFAR GRU (T=1024, hidden 64) from --data-dir")
    _common(p, "pixel-gru", [0, 1, 5, 10], 10, 20, 128, 1e-3)
    p.add_argument("--hidden", type=positive_int, default=64)
    p.add_argument("--side", type=positive_int, default=32, help="images resized to SIDE^2 "
                   "pixels (T = SIDE^2)")
    p.add_argument("--source", choices=("auto", "cifar10", "mnist"), default="auto",
                   help="auto: CIFAR-10 if --data-dir holds its batches, else MNIST IDX")
    p = subparsers.add_parser(
        "resnet32-cifar10", help="the paper's pre-act ResNet32 on CIFAR-10 from --data-dir")
    _common(p, "resnet32-cifar10", [0, 1, 2, 3, 4, 5], 5, 160, 128, 0.1)
    p.add_argument("--depth", type=positive_int, default=32, help="6n+2")
    p.add_argument("--width", type=positive_int, default=16)
    p.add_argument("--weight-decay", type=positive_float, default=5e-4)
