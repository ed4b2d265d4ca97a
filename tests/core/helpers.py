"""Small random chains for the core tests (float64 unless told)."""

from __future__ import annotations

import torch
from torch import nn

import highwaybp as hbp

RESIDUAL_KINDS = ("identity", "scaled", "relu", "gated")


class GatedBlock(nn.Module):
    """Returns (a, b) for r = a * x + b with a in (0, 1): a GRU-like gate."""

    def __init__(self, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Linear(width, width)
        self.value = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout))

    def forward(self, x):
        return torch.sigmoid(self.gate(x)), self.value(x)


def make_block(width: int, dropout: float = 0.0, scale: float = 1.0) -> nn.Module:
    block = nn.Sequential(
        nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, width)
    )
    with torch.no_grad():
        block[-1].weight.mul_(scale)
    return block


def make_layer(kind: str, width: int, dropout: float = 0.0, scale: float = 1.0):
    if kind == "gated":
        return hbp.ResidualLayer(GatedBlock(width, dropout), hbp.Gated())
    residual = {
        "identity": hbp.Identity(),
        "scaled": hbp.Scaled(0.8),
        "relu": hbp.ReLUResidual(),
    }[kind]
    return hbp.ResidualLayer(make_block(width, dropout, scale), residual)


def make_chain(kinds, width: int, dropout: float = 0.0, scale: float = 1.0, **kwargs):
    return hbp.ResidualChain([make_layer(k, width, dropout, scale) for k in kinds], **kwargs)


def grads_of(chain, x, method, per_layer_loss: bool, seed: int = 0, weights=None):
    """(dLoss/dx, dLoss/dparams) with a fixed quadratic-ish loss; same RNG for every method."""
    torch.manual_seed(seed)
    out = chain(x, method=method, return_states=per_layer_loss)
    if weights is None:
        weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = (weights * out).sum() + 0.5 * (out**2).sum()
    params = list(chain.parameters())
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x, *params])]


def max_rel_diff(a_list, b_list) -> float:
    num = max(float((a - b).abs().max()) for a, b in zip(a_list, b_list))
    den = max(float(b.abs().max()) for b in b_list)
    return num / max(den, 1e-300)
