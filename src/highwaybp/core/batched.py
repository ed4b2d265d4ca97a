"""Batched VJP backend: the L per-layer VJPs of an iteration as one call (torch.func).

For a stack of identically structured layers (same block class, same parameter and buffer
names/shapes, same residual map, same input shape), the parameters are stacked along a
new leading dim ([L, *p.shape], as `torch.func.stack_module_state` does) and the layer
function is `torch.func.vmap`-ed over (stacked parameters, stacked buffers, stacked inputs)
with `torch.func.functional_call` on the first layer's block. That batched forward is run
once per backward under autograd; each Highway iteration is then ONE autograd VJP through
the batched graph (w.r.t. the stacked inputs), and the final parameter sweep one more
(w.r.t. the stacked parameters). `LoopVJP` (core/vjp.py) is the per-layer reference; this
backend equals it to rounding (tested to 1e-12 in float64).

Why autograd over a vmapped forward, not `torch.func.vjp` inside vmap: vjp closures cannot
leave a vmap, so a functional version re-runs the forward in every iteration; the retained
graph does that work once (the prototype in cpu-calibration.md measured the same).

Layers are grouped by identical structure and each group is one vmapped call (a stack of
identical blocks: 1 group; a transformer: 2, attention and MLP; the paper-form ResNet: 3,
one per stage). Limits (a clear error says so): no general linear K (shape-changing
LinearShortcut layers: which function a closure computes cannot be compared, and their
shapes differ); no random ops inside the blocks in training mode (dropout masks are drawn per
layer in the forward and a single vmapped call cannot replay L separate RNG states: use
`vjp="loop"` or dropout 0); residual maps without parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from highwaybp.core.replay import ForwardState, modes_and_buffers_replayed, replayed

_SIMPLE = (int, float, str, bool, type(None))


def _simple_attrs(module: nn.Module) -> tuple:
    """Hyper-parameters a functional_call on layer 0 would silently share (gamma, eps, c...)."""
    items = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _SIMPLE) or (
            isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)
        ):
            items.append((key, value))
    return tuple(items)


def _signature(layer: nn.Module) -> list:
    sig: list[Any] = []
    for name, m in layer.named_modules():
        sig.append(("module", name, type(m).__name__, _simple_attrs(m), m.training))
    for name, p in layer.named_parameters():
        sig.append(("param", name, tuple(p.shape), p.dtype, p.device))
    for name, b in layer.named_buffers():
        sig.append(("buffer", name, tuple(b.shape), b.dtype, b.device))
    return sig


def check_batchable(layers: Sequence[nn.Module], inputs: Sequence[Tensor]) -> list[list[int]]:
    """Group the layers into sets of identical structure and input shape; each group runs as
    one vmapped call. Raise ValueError for layers that cannot be batched at all."""
    advice = "use vjp='loop' (the per-layer backend) for this chain"
    groups: dict[str, list[int]] = {}
    for i, (layer, h) in enumerate(zip(layers, inputs)):
        residual = layer.residual
        if getattr(residual, "kind", "linear") == "linear":
            raise ValueError(
                f"vjp='batched' needs identically shaped layers with identity/scalar/diagonal K; "
                f"layer {i + 1} has {type(residual).__name__} (a general, possibly "
                f"shape-changing linear K): {advice}"
            )
        if any(True for _ in residual.parameters()):
            raise ValueError(
                f"vjp='batched' does not support residual maps with parameters (layer {i + 1}): "
                f"{advice}"
            )
        key = repr((type(layer).__qualname__, _signature(layer), tuple(h.shape), h.dtype))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _slice(tree: Any, i: int) -> Any:
    if isinstance(tree, Tensor):
        return tree[i]
    if isinstance(tree, (tuple, list)):
        return type(tree)(_slice(t, i) for t in tree)
    return tree


def _detach(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, (tuple, list)):
        return type(tree)(_detach(t) for t in tree)
    return tree


def _buffers_before_forward(layer: nn.Module, state: ForwardState) -> dict[str, Tensor]:
    """The block's buffers by name, as saved before the layer's forward (else current)."""
    saved = {(id(sub), name): value for sub, name, value in state.buffers}
    out = {}
    for mod_name, mod in layer.block.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                full = f"{mod_name}.{name}" if mod_name else name
                out[full] = saved.get((id(mod), name), buf).detach()
    return out


class _Group:
    """One set of identically structured layers run as one vmapped call."""

    def __init__(
        self, layers: list[nn.Module], inputs: list[Tensor], states: list[ForwardState]
    ):
        base, state = layers[0], states[0]
        self.param_names = [n for n, _ in base.block.named_parameters()]
        self.params = {
            n: torch.stack(
                [layer.block.get_parameter(n).detach() for layer in layers]
            ).requires_grad_(True)
            for n in self.param_names
        }
        # The buffers each layer's forward saw (copied before it ran), not their current
        # values: a forward may have updated them (BatchNorm statistics).
        snapshots = [_buffers_before_forward(layer, st) for layer, st in zip(layers, states)]
        buffers = {
            n: torch.stack([snap[n] for snap in snapshots])
            for n, _ in base.block.named_buffers()
        }
        self.x = torch.stack([h.detach() for h in inputs]).requires_grad_(True)
        block, residual = base.block, base.residual

        def layer_fn(params: dict, bufs: dict, x: Tensor, x_const: Tensor) -> Any:
            z = functional_call(block, (params, bufs), (x,))
            # K's part goes through the residual's first argument: feed it the constant.
            return residual.combine(x_const, z), z

        try:
            with torch.enable_grad(), replayed(state), modes_and_buffers_replayed(base, state):
                self.y, z = vmap(layer_fn, randomness="error")(
                    self.params, buffers, self.x, self.x.detach()
                )
        except RuntimeError as err:
            if "random" not in str(err):
                raise
            raise RuntimeError(
                "vjp='batched' cannot replay random operations (dropout) inside the blocks: "
                "each layer drew its own mask in the forward. Use vjp='loop', set dropout "
                "to 0, or call model.eval()"
            ) from err
        self.z = _detach(z)


class BatchedVJP:
    """Batched backend with `LoopVJP`'s interface (see core/vjp.py).

    Layers are grouped by identical structure (class, parameter/buffer names and shapes,
    hyper-parameters such as gamma, input shape): a stack of identical blocks is one group;
    a transformer has two (attention and MLP sub-layers); the paper-form ResNet one per
    stage. Each iteration is one `torch.autograd.grad` call through the G vmapped graphs.

    Args:
        layers: the chain's L `ResidualLayer`s.
        inputs: h_0..h_{L-1}.
        states: the `ForwardState` of each layer's forward (autocast replay; RNG states are
            not replayable per layer inside one vmapped call, so random ops raise).

    Attributes: xs (L inputs, views of the stacked group inputs), contexts (L K-contexts),
    groups (lists of layer indices).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        inputs: Sequence[Tensor],
        states: Sequence[ForwardState],
    ) -> None:
        self.layers = list(layers)
        self.inputs = list(inputs)
        self.states = list(states)
        self.groups = check_batchable(self.layers, self.inputs)
        self._loop: Optional[Any] = None
        self._runs = [
            _Group(
                [self.layers[i] for i in idx],
                [self.inputs[i] for i in idx],
                [self.states[i] for i in idx],
            )
            for idx in self.groups
        ]
        self.xs: list[Any] = [None] * len(self.layers)
        self.contexts: list[Any] = [None] * len(self.layers)
        self._owner: dict[int, list[tuple[int, str, int]]] = {}
        for g, (idx, run) in enumerate(zip(self.groups, self._runs)):
            y_const = run.y.detach()
            for pos, i in enumerate(idx):
                self.xs[i] = run.x[pos]
                layer = self.layers[i]
                self.contexts[i] = layer.residual.k_context(
                    run.x[pos].detach(), _slice(run.z, pos), y_const[pos]
                )
                for n in run.param_names:
                    self._owner.setdefault(id(layer.block.get_parameter(n)), []).append((g, n, pos))

    def _live(self) -> list[int]:
        return [g for g, run in enumerate(self._runs) if run.y.requires_grad]

    def _stacked_ws(self, g: int, ws: Sequence[Tensor]) -> Tensor:
        return torch.stack([ws[i] for i in self.groups[g]])

    def block_vjps(self, ws: Sequence[Tensor]) -> list[Tensor]:
        """[w_j @ J_j for j = 1..L] in one batched VJP call; ws = [w_1..w_L]."""
        out = [torch.zeros_like(ws[i]) for i in range(len(self.layers))]
        live = self._live()
        if not live:
            return out
        grads = torch.autograd.grad(
            [self._runs[g].y for g in live],
            [self._runs[g].x for g in live],
            grad_outputs=[self._stacked_ws(g, ws) for g in live],
            retain_graph=True,
            allow_unused=True,
        )
        for g, grad in zip(live, grads):
            if grad is not None:
                for pos, i in enumerate(self.groups[g]):
                    out[i] = grad[pos]
        return out

    def layer_block_vjp(self, j: int, w: Tensor) -> Tensor:
        """w @ J_j for one layer (the sequential exact fallback): the per-layer backend's."""
        if self._loop is None:
            from highwaybp.core.vjp import LoopVJP

            self._loop = LoopVJP(self.layers, self.inputs, self.states)
        return self._loop.layer_block_vjp(j, w)

    def param_vjps(self, ws: Sequence[Tensor], params: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """sum_j w_j @ df_j/dtheta for each parameter (None if unused); frees the graphs."""
        live = [g for g in self._live() if self._runs[g].param_names]
        if not params or not live:
            return [None] * len(params)
        keys = [(g, n) for g in live for n in self._runs[g].param_names]
        outputs = [self._runs[g].y for g in live]
        grads = torch.autograd.grad(
            outputs,
            [self._runs[g].params[n] for g, n in keys],
            grad_outputs=[self._stacked_ws(g, ws) for g in live],
            allow_unused=True,
        )
        by_key = dict(zip(keys, grads))
        out: list[Optional[Tensor]] = []
        for p in params:
            total: Optional[Tensor] = None
            for g, name, pos in self._owner.get(id(p), []):
                grad = by_key.get((g, name))
                if grad is not None:
                    total = grad[pos] if total is None else total + grad[pos]
            out.append(total)
        return out
