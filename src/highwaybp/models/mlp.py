"""A deep residual MLP: stem -> ResidualChain of MLP blocks -> head. The demo's model."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from highwaybp.core.chain import ResidualChain
from highwaybp.core.methods import Method
from highwaybp.core.residual import Identity, ResidualLayer, ResidualMap


class MLPBlock(nn.Sequential):
    """LayerNorm -> Linear(width, hidden) -> GELU -> [Dropout] -> Linear(hidden, width)."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0, out_scale: float = 1.0):
        layers: list[nn.Module] = [nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, width))
        super().__init__(*layers)
        # Scaled output init (GPT-2 style): keeps each block's Jacobian small at depth.
        self[-1].weight.data.mul_(out_scale)


class ResidualMLP(nn.Module):
    """Classifier x [B, in_dim] -> logits [B, num_classes] with `depth` residual blocks.

    The blocks live in `self.chain` (a ResidualChain), so `method=` picks how they are
    differentiated; stem and head are ordinary autograd. `residual` makes each layer's map
    (a class or a factory: `lambda: hbp.Scaled(0.8)`).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        width: int = 64,
        depth: int = 16,
        hidden: int | None = None,
        method: Method | None = None,
        dropout: float = 0.0,
        residual: Callable[[], ResidualMap] = Identity,
    ) -> None:
        super().__init__()
        hidden = 2 * width if hidden is None else hidden
        scale = 1.0 / math.sqrt(2 * depth)
        self.stem = nn.Linear(in_dim, width)
        blocks = [MLPBlock(width, hidden, dropout, scale) for _ in range(depth)]
        self.chain = ResidualChain([ResidualLayer(b, residual()) for b in blocks], method=method)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, x: Tensor, method: Method | None = None) -> Tensor:
        return self.head(self.chain(self.stem(x), method=method))
