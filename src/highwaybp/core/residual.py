"""Residual maps: how a layer f(x) = r(x, g(x)) splits into a cheap residual part and a block.

A residual map says three things about r:

- `combine(x, z)`: the value r(x, z), where z = block(x);
- `k_context(x, z, y)`: whatever K = dr/dx at this point needs later (a mask, a gate), kept
  by the backward instead of re-deriving it;
- `apply_kt(v, ctx)`: the row-vector product v @ K (v has the layer's output shape, the result
  its input shape). For diagonal or scalar K, `coefficient(ctx)` gives a tensor (or float) `a`
  with v @ K = a * v, which lets the backward run one stacked scan over all layers.

`J = dr/dz dg/dx` is never formed: the backward gets v @ J from autograd on r(stop_grad(x), g(x)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor, nn

Coefficient = Union[Tensor, float, None]


class ResidualMap(nn.Module):
    """Base class of residual maps r(x, z) with a cheap Jacobian K = dr/dx.

    Subclasses set `kind` to one of "identity", "scalar", "diagonal", "linear".
    """

    kind: str = "linear"

    def combine(self, x: Tensor, z: Any) -> Tensor:
        raise NotImplementedError

    def k_context(self, x: Tensor, z: Any, y: Tensor) -> Any:
        """What `apply_kt` needs, computed from the forward values (default: nothing)."""
        return None

    def apply_kt(self, v: Tensor, ctx: Any) -> Tensor:
        """v @ K for a row vector v of the output's shape; returns the input's shape."""
        a = self.coefficient(ctx)
        return v if a is None else v * a

    def coefficient(self, ctx: Any) -> Coefficient:
        """`a` with v @ K = a * v (None for K = I). Only for identity/scalar/diagonal maps."""
        raise TypeError(f"{type(self).__name__} has a general linear K, not a diagonal one")

    def check_shapes(self, x: Tensor, z: Any) -> None:
        if not isinstance(z, Tensor):
            raise TypeError(
                f"{type(self).__name__} expects the block to return one tensor, got "
                f"{type(z).__name__}; a block returning (gate, value) needs residual=Gated()"
            )
        if z.shape != x.shape:
            raise ValueError(
                f"{type(self).__name__}: block output shape {tuple(z.shape)} does not match the "
                f"layer input shape {tuple(x.shape)}. r(x, z) = x + z needs equal shapes; for a "
                f"shape-changing layer declare the shortcut with LinearShortcut(apply, adjoint)."
            )


class Identity(ResidualMap):
    """r(x, z) = x + z, K = I (pre-activation ResNets, pre-LN transformers with gamma = 0)."""

    kind = "identity"

    def combine(self, x: Tensor, z: Tensor) -> Tensor:
        self.check_shapes(x, z)
        return x + z

    def coefficient(self, ctx: Any) -> Coefficient:
        return None


class Scaled(ResidualMap):
    """r(x, z) = c x + z, K = c I (pre-LN transformer with the gamma split: c = 1 - gamma)."""

    kind = "scalar"

    def __init__(self, c: float) -> None:
        super().__init__()
        if not isinstance(c, (int, float)) or isinstance(c, bool):
            raise TypeError(f"Scaled(c) needs a python number, got {type(c).__name__}")
        self.c = float(c)

    def combine(self, x: Tensor, z: Tensor) -> Tensor:
        self.check_shapes(x, z)
        return self.c * x + z

    def k_context(self, x: Tensor, z: Tensor, y: Tensor) -> float:
        return self.c  # the c of the forward (the backward's re-run replays it)

    def coefficient(self, ctx: Any) -> Coefficient:
        return ctx

    def extra_repr(self) -> str:
        return f"c={self.c}"


class ReLUResidual(ResidualMap):
    """r(x, z) = ReLU(x + z), K = diag(ReLU'(x + z)) (the original post-activation ResNet)."""

    kind = "diagonal"

    def combine(self, x: Tensor, z: Tensor) -> Tensor:
        self.check_shapes(x, z)
        return torch.relu(x + z)

    def k_context(self, x: Tensor, z: Tensor, y: Tensor) -> Tensor:
        # ReLU'(s) = 1 where s > 0; y = ReLU(s) > 0 exactly there (autograd's convention at 0).
        return (y > 0).to(y.dtype)

    def coefficient(self, ctx: Tensor) -> Coefficient:
        return ctx


class Gated(ResidualMap):
    """r(x, (a, b)) = a * x + b, K = diag(a): a state-dependent diagonal K.

    The block returns the pair (a, b), each of the input's shape (or broadcastable to it, e.g.
    a per-token scale [..., 1]). GRU: a = 1 - z_t, b = z_t * n_t. Post-LN transformer:
    LN(x + Sub(x)) = x * a(x) + b(x).
    """

    kind = "diagonal"

    def check_shapes(self, x: Tensor, z: Any) -> None:
        if not (isinstance(z, (tuple, list)) and len(z) == 2):
            raise TypeError(
                "Gated() expects the block to return a pair (a, b) with r = a * x + b, got "
                f"{type(z).__name__}"
            )
        a, b = z
        if b.shape != x.shape or torch.broadcast_shapes(a.shape, x.shape) != x.shape:
            raise ValueError(
                f"Gated(): b must have the input's shape {tuple(x.shape)} and a must broadcast "
                f"to it; got a {tuple(a.shape)}, b {tuple(b.shape)}"
            )

    def combine(self, x: Tensor, z: tuple[Tensor, Tensor]) -> Tensor:
        self.check_shapes(x, z)
        a, b = z
        return a * x + b

    def k_context(self, x: Tensor, z: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        return z[0].detach()

    def coefficient(self, ctx: Tensor) -> Coefficient:
        return ctx


class LinearShortcut(ResidualMap):
    """r(x, z) = P(x) + z for a fixed linear map P given with its adjoint, K = P.

    `apply(x)` computes P(x) (it may change the shape, e.g. a stride-2 subsample with zero
    channel padding); `adjoint(v)` computes P^T(v), i.e. v @ K in row-vector form. Use
    `check_adjoint` once to verify the pair: a wrong adjoint gives a wrong gradient.
    """

    kind = "linear"

    def __init__(self, apply: Callable[[Tensor], Tensor], adjoint: Callable[[Tensor], Tensor]):
        super().__init__()
        self.apply_fn = apply
        self.adjoint_fn = adjoint

    def check_shapes(self, x: Tensor, z: Any) -> None:
        if not isinstance(z, Tensor):
            raise TypeError("LinearShortcut expects the block to return one tensor")

    def combine(self, x: Tensor, z: Tensor) -> Tensor:
        self.check_shapes(x, z)
        px = self.apply_fn(x)
        if px.shape != z.shape:
            raise ValueError(
                f"LinearShortcut: P(x) has shape {tuple(px.shape)} but the block returned "
                f"{tuple(z.shape)}; they must match to be added"
            )
        return px + z

    def apply_kt(self, v: Tensor, ctx: Any) -> Tensor:
        return self.adjoint_fn(v)

    def check_adjoint(self, x: Tensor, atol: float = 1e-6) -> None:
        """Raise if <P x, v> != <x, P^T v> on random vectors shaped like `x` and P(x)."""
        u = torch.randn_like(x)
        v = torch.randn_like(self.apply_fn(x))
        lhs = (self.apply_fn(u) * v).sum()
        rhs = (u * self.adjoint_fn(v)).sum()
        if not torch.allclose(lhs, rhs, atol=atol, rtol=1e-5):
            raise ValueError(
                f"LinearShortcut adjoint mismatch: <P u, v> = {lhs.item():.6g} but "
                f"<u, P^T v> = {rhs.item():.6g}; fix the adjoint function"
            )


class ResidualLayer(nn.Module):
    """One layer f(x) = r(x, block(x)) with residual map r (default: Identity, x + block(x)).

    Args:
        block: the expensive part g (any nn.Module); its VJPs come from autograd.
        residual: a `ResidualMap` saying how the block's output joins the residual stream.

    Shapes: x [*S_in] -> f(x) [*S_out], with S_out = S_in unless the map is a LinearShortcut.
    """

    def __init__(self, block: nn.Module, residual: ResidualMap | None = None) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"ResidualLayer needs an nn.Module block, got {type(block).__name__}")
        if residual is None:
            residual = Identity()
        if not isinstance(residual, ResidualMap):
            raise TypeError(
                f"residual must be a highwaybp residual map (Identity(), Scaled(c), "
                f"ReLUResidual(), Gated(), LinearShortcut(...)), got {type(residual).__name__}"
            )
        self.block = block
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        return self.residual.combine(x, self.block(x))
