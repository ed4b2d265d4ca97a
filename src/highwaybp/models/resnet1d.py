"""A small 1-D ResNet for MNIST-1D (40-sample signals), in two interchangeable forms.

    x [B, 40] -> stem: unsqueeze, Conv1d(1, C, 5), BN, ReLU        -> [B, C, 40]
              -> L residual layers h = r(h, Conv1d-BN-ReLU-Conv1d-BN(h)) -> [B, C, 40]
              -> head: global average pool, Linear(C, classes)  -> [B, classes]

r is `ReLUResidual` (relu(h + z), the classic ResNet block) or `Identity` (h + z).

- `ResNet1d(...)` is stem + `ResidualChain` + head: the chain's method (Exact, Highway,
  FixedPoint) decides how the gradient crosses the residual layers.
- `model.as_sequential()` is `nn.Sequential(stem, *layers, head)` over the *same*
  parameter objects: the plain backprop model, and what DDG splits into modules.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from highwaybp.core.chain import ResidualChain
from highwaybp.core.methods import Method
from highwaybp.core.residual import Identity, ReLUResidual, ResidualLayer


class Unsqueeze1d(nn.Module):
    """[B, T] -> [B, 1, T] (a channel axis for Conv1d); [B, C, T] passes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 2 else x


def residual_block(channels: int, kernel: int = 3) -> nn.Sequential:
    """Conv1d-BN-ReLU-Conv1d-BN, length-preserving: [B, C, T] -> [B, C, T]."""
    pad = kernel // 2
    return nn.Sequential(
        nn.Conv1d(channels, channels, kernel, padding=pad, bias=False),
        nn.BatchNorm1d(channels),
        nn.ReLU(),
        nn.Conv1d(channels, channels, kernel, padding=pad, bias=False),
        nn.BatchNorm1d(channels),
    )


_RESIDUALS = {"relu": ReLUResidual, "identity": Identity}


class ResNet1d(nn.Module):
    """stem + ResidualChain of `blocks` residual layers + pooled linear head.

    Args:
        channels: width C of the residual stream.
        blocks: number L of residual layers.
        num_classes: outputs of the head.
        residual: "relu" (relu(h + block(h)), K = diag(relu')) or "identity" (h + block(h)).
        method: gradient method of the chain (default Exact: plain autograd).
        zero_init: start each block's last BN at gamma = 0 (every layer starts as the
            identity map up to the ReLU; common ResNet practice, keeps deep stacks stable).
    """

    def __init__(
        self,
        channels: int = 32,
        blocks: int = 4,
        num_classes: int = 10,
        residual: str = "relu",
        method: Optional[Method] = None,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if residual not in _RESIDUALS:
            raise ValueError(f"residual must be one of {sorted(_RESIDUALS)}, got {residual!r}")
        if channels < 1 or blocks < 1:
            raise ValueError(f"channels and blocks must be >= 1, got {channels}, {blocks}")
        self.stem = nn.Sequential(
            Unsqueeze1d(),
            nn.Conv1d(1, channels, 5, padding=2, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
        )
        layers = []
        for _ in range(blocks):
            block = residual_block(channels)
            if zero_init:
                nn.init.zeros_(block[-1].weight)
            layers.append(ResidualLayer(block, residual=_RESIDUALS[residual]()))
        self.chain = ResidualChain(layers, method=method)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 40] (or [B, 1, 40]) -> logits [B, num_classes]."""
        return self.head(self.chain(self.stem(x)))

    def as_sequential(self) -> nn.Sequential:
        """nn.Sequential(stem, layer_1, ..., layer_L, head) sharing this model's parameters."""
        return nn.Sequential(self.stem, *self.chain.layers, self.head)


def build_resnet1d(
    seed: int = 0,
    channels: int = 32,
    blocks: int = 4,
    num_classes: int = 10,
    residual: str = "relu",
    sequential: bool = True,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A freshly initialised ResNet1d from `seed` (picklable builder for DDG ranks).

    sequential=True returns `as_sequential()` (what DDG splits), else the ResNet1d.
    """
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = ResNet1d(channels, blocks, num_classes, residual).to(dtype)
    finally:
        torch.set_rng_state(gen_state)  # building a model does not move the caller's RNG
    return model.as_sequential() if sequential else model
