"""Residual maps: how a layer f(x) = r(x, g(x)) splits into a cheap residual part and a block.

A residual map says three things about r:

- `combine(x, z)`: the value r(x, z), where z = block(x);
- `k_context(x, z, y)`: whatever K = dr/dx at this point needs later (a mask, a gate), kept
  by the backward instead of re-deriving it;
- `combine_for_backward(x, z)`: the backward's re-run of r, returning the value (without
  K's part of its derivative) and the K-context; the default calls `combine` on a detached
  x and `k_context`;
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


def _detached(z: Any) -> Any:
    if isinstance(z, Tensor):
        return z.detach()
    if isinstance(z, (tuple, list)):
        return type(z)(_detached(t) for t in z)
    return z


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

    def combine_for_backward(self, x: Tensor, z: Any) -> tuple[Tensor, Any]:
        """The backward's re-run of r: (r(stop_grad(x), z), K's context).

        Called under the forward's replayed state with x the layer input (requiring grad)
        and z the block's output (with its graph). The value must carry no derivative
        w.r.t. x through K's part: autograd w.r.t. x of it is the block VJP, w @ J.
        """
        x_const = x.detach()
        y = self.combine(x_const, z)
        return y, self.k_context(x_const, _detached(z), y.detach())

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

    Shapes: x [*S_in] -> f(x) [*S_out], with S_out = S_in unless the map is a LinearShortcut
    or a ModuleShortcut.
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
                f"ReLUResidual(), Gated(), LinearShortcut(...), ModuleShortcut(m)), "
                f"got {type(residual).__name__}"
            )
        self.block = block
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        return self.residual.combine(x, self.block(x))


class _CutGradient(torch.autograd.Function):
    """Identity whose backward passes nothing on: marks where K's part of the graph starts.

    The backward's re-run asks autograd for the gradient *at* this node's output (K's VJP)
    and for the gradient w.r.t. the layer input through the block only (J's VJP); cutting
    here keeps K out of the latter without evaluating the shortcut a second time.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> None:
        return None


class ModuleShortcut(ResidualMap):
    """r(x, z) = S(x) + z, or ReLU(S(x) + z) with `relu=True`, for a shortcut module S.

    For projection shortcuts (torchvision's `downsample`: 1x1 conv + BatchNorm, stride 2):
    S may change the shape and may have parameters and buffers. K = dr/dx is applied in the
    backward's scans as the VJP of S (autograd through it, once per scan step; BatchNorm in
    training mode included, whose batch statistics make K couple the whole batch), masked by
    ReLU'(S(x) + z) in the post-activation form. S is re-run with the block in the backward
    under the same replay rules (RNG, autocast, train/eval modes, buffers restored), so its
    BatchNorm running statistics are updated once per step, as with exact backprop.

    Args:
        shortcut: the module S ([*S_in] -> [*S_out]); its parameters get gradients.
        relu: apply ReLU after the sum (post-activation ResNet block).
    """

    kind = "linear"

    def __init__(self, shortcut: nn.Module, relu: bool = False) -> None:
        super().__init__()
        if not isinstance(shortcut, nn.Module):
            raise TypeError(
                f"ModuleShortcut needs an nn.Module shortcut, got {type(shortcut).__name__}; "
                "for a plain linear function with a known adjoint use LinearShortcut"
            )
        self.shortcut = shortcut
        self.relu = bool(relu)

    def check_shapes(self, x: Tensor, z: Any) -> None:
        if not isinstance(z, Tensor):
            raise TypeError(
                f"ModuleShortcut expects the block to return one tensor, got {type(z).__name__}"
            )

    def _sum(self, s: Tensor, z: Tensor) -> Tensor:
        if s.shape != z.shape:
            raise ValueError(
                f"ModuleShortcut: shortcut output shape {tuple(s.shape)} does not match the "
                f"block output shape {tuple(z.shape)}; they must match to be added"
            )
        # z + s, the order torchvision's blocks use (`out += identity`).
        y = z + s
        return torch.relu(y) if self.relu else y

    def combine(self, x: Tensor, z: Tensor) -> Tensor:
        self.check_shapes(x, z)
        return self._sum(self.shortcut(x), z)

    def combine_for_backward(self, x: Tensor, z: Any) -> tuple[Tensor, Any]:
        self.check_shapes(x, z)
        x_k = _CutGradient.apply(x)
        s = self.shortcut(x_k)
        y = self._sum(s, z)
        mask = (y.detach() > 0).to(y.dtype) if self.relu else None
        return y, (x_k, s, mask)

    def k_context(self, x: Tensor, z: Any, y: Tensor) -> Any:
        raise TypeError(
            "ModuleShortcut's K is the VJP of its shortcut module: its context comes from "
            "combine_for_backward (the per-layer 'loop' VJP backend), not k_context"
        )

    def apply_kt(self, v: Tensor, ctx: Any) -> Tensor:
        x_k, s, mask = ctx
        grad_s = v if mask is None else v * mask
        if not s.requires_grad:
            return torch.zeros_like(x_k)
        (g,) = torch.autograd.grad(s, x_k, grad_s, retain_graph=True, allow_unused=True)
        return torch.zeros_like(x_k) if g is None else g

    def extra_repr(self) -> str:
        return f"relu={self.relu}"
