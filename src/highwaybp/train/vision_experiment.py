"""`highwaybp experiment vision`: a torchvision-shaped ResNet-18 trained through `from_torchvision`.

What projection shortcuts do to the k Highway-BP needs. The model is the ResNet-18 of
torchvision as users have it (stages `layer1`..`layer4` of two BasicBlocks each, the first
block of stages 2-4 with a 1x1-conv + BatchNorm stride-2 `downsample`), narrow (widths
8-16-32-64 by default) and with the usual small-image stem (3x3 conv, no max-pool), on
scikit-learn's 8x8 digits upsampled to 16x16 as in `experiment deep`. It is adapted with
`highwaybp.from_torchvision`, so L = 8 blocks run as one `ResidualChain` (K = diag(ReLU')
on identity blocks, the VJP of the downsample on the three projection blocks).

Trained from the same initialisation with Exact, Highway(k) for k in `--ks` and
FixedPoint(`--fixedpoint-k`), per seed; along the Exact run, at 0/25/50/75/100% of training,
the paper's Fig. 6 cosine between each method's gradient and the exact one on a fixed batch.
The training loop, cosine and report helpers are `experiment deep`'s.

Writes `<out>/vision_results.json` (after every finished run), `<out>/table.md` and PNG
plots; `<out>/config.json` holds the configuration (a rerun with other options into the same
folder is refused) and runs resume from `<out>/checkpoints/`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from highwaybp.models.torchvision import from_torchvision
from highwaybp.train.cli_types import (
    nonneg_int,
    nonneg_int_list,
    out_dir,
    positive_float,
    positive_int,
    positive_int_list,
)
from highwaybp.train.deep_experiment import (
    Task,
    digits_task,
    method_name,
    methods_of,
    start_results,
    train_arms,
    write_report,
)
from highwaybp.train.io import check_resume_config
from highwaybp.train.loop import echo
from highwaybp.train.threads import use_threads

# ---------------------------------------------------------------------------------------
# The model: torchvision's ResNet-18 layout with narrow widths and a small-image stem
# ---------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: ReLU(bn2(conv2(ReLU(bn1(conv1(x))))) + downsample(x))."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class SmallResNet18(nn.Module):
    """ResNet-18 (2 BasicBlocks per stage, torchvision module names) for small images.

    x [B, in_channels, H, W] -> logits [B, num_classes]; H, W divisible by 8.
    """

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64), in_channels: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths needs 4 stage widths, got {widths}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride),
                                                         BasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


# ---------------------------------------------------------------------------------------
# Task (deep_experiment's Task: batches are a pure function of the step, so runs resume)
# ---------------------------------------------------------------------------------------


def vision_task(args: argparse.Namespace, seed: int) -> Task:
    side = args.image
    digits = digits_task(side, args.batch, args.epochs, seed, args.train_limit)
    widths = tuple(args.widths)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return from_torchvision(SmallResNet18(widths, in_channels=1, num_classes=10))

    return Task(
        "resnet",  # deep_experiment's name for an Adam-trained image task
        "test_acc",
        digits.steps,
        args.lr,
        make_model,
        digits.batch,
        digits.loss,
        digits.evaluate,
        digits.diag_batch,
        8,
        {
            "model": f"torchvision-style ResNet-18 (BasicBlock x 2 per stage, 1x1-conv+BN "
            f"projection shortcuts), widths {'-'.join(map(str, widths))}, 3x3 stem, "
            "via from_torchvision",
            "data": digits.describe(side),
            "seed": seed,
            "epochs": args.epochs,
            "batch": digits.batch_size,
            "steps": digits.steps,
            "optimizer": f"Adam lr {args.lr} cosine",
            "L": 8,
        },
    )


def apply_tiny(args: argparse.Namespace) -> None:
    """The CI setting: widths 4 on 64 digits of 8x8, one epoch, k in {0, 1}."""
    args.widths, args.image, args.epochs, args.train_limit, args.batch = [4, 4, 4, 4], 8, 1, 64, 32
    args.ks, args.fixedpoint_k, args.seeds = [0, 1], 1, [0]


def _config(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("ks", "fixedpoint_k", "seeds", "widths", "image", "epochs", "batch", "lr",
            "train_limit", "tiny")
    return {k: getattr(args, k) for k in keys}


def run(args: argparse.Namespace) -> int:
    use_threads(args.threads, "highwaybp experiment vision")
    if args.tiny:
        apply_tiny(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_resume_config(out, _config(args))
    log = (lambda s: None) if args.quiet else (lambda s: echo(s, sys.stderr))
    results_path = out / "vision_results.json"
    results = start_results(results_path, _config(args), args.record_argv)
    for seed in args.seeds:
        task = vision_task(args, seed)
        name = f"resnet18_seed{seed}"
        entry = results["tasks"].setdefault(name, {"runs": {}})
        entry.update(metric=task.metric, config=task.config)
        arms = [(method_name(m), m, None) for m in methods_of(args)]
        stopped = train_arms(task, name, arms, entry, results, results_path, args, log)
        if stopped is not None:
            return stopped
    write_report(results, results_path, "vision_", args.quiet)
    return 0



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "vision",
        help="torchvision-style ResNet-18 via from_torchvision: accuracy and gradient cosine vs k",
    )
    p.add_argument("--ks", type=nonneg_int_list, default=[0, 1, 2, 3, 4])
    p.add_argument("--fixedpoint-k", type=nonneg_int, default=4)
    p.add_argument("--seeds", type=nonneg_int_list, default=[0])
    p.add_argument("--widths", type=positive_int_list, default=[8, 16, 32, 64])
    p.add_argument("--image", type=positive_int, default=16, help="upsampled side (divisible by 8)")
    p.add_argument("--epochs", type=positive_int, default=4)
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--train-limit", type=nonneg_int, default=0, help="use only the first N images")
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads (1 is kind to a shared box)"
    )
    p.add_argument("--out", type=out_dir, default="results/vision")
    p.add_argument("--checkpoint-every", type=positive_int, default=25,
                   help="steps between checkpoints")
    p.add_argument("--tiny", action="store_true", help="tiny CI setting (seconds)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-record-argv", dest="record_argv", action="store_false")
    p.set_defaults(func=run)
