"""Per-layer VJPs for the chain's backward.

A backend is built once per backward from the forward's saved layer inputs; it re-runs
every layer once with autograd (under the replayed RNG/autocast state) and keeps those L
small graphs for the k iterations and the final parameter sweep, so each iteration is
pure VJPs (no re-forward). Each layer's graph is built on r(stop_grad(x), g(x)):

    autograd VJP w.r.t. x       = w @ J       (K's part is excluded, not subtracted)
    autograd VJP w.r.t. theta   = w @ df/dtheta

`LoopVJP` is the reference: one autograd graph per layer, all layers' VJPs requested in one
`torch.autograd.grad` call per iteration. Other backends (a batched torch.func path) share
its interface and are registered in `VJP_BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn

from highwaybp.core.batched import BatchedVJP
from highwaybp.core.replay import ForwardState, modes_and_buffers_replayed, replayed


class LoopVJP:
    """Reference backend: layer i's graph is built on its own, VJPs requested all at once.

    Args:
        layers: the chain's L `ResidualLayer`s.
        inputs: h_0..h_{L-1}, the saved input of each layer.
        states: the `ForwardState` of each layer's forward (RNG/autocast replay).

    Attributes after construction:
        contexts: L K-contexts (what each residual map's K needs), from the re-run.
    """

    def __init__(
        self, layers: Sequence[nn.Module], inputs: Sequence[Tensor] = (),
        states: Sequence[ForwardState] = (),
    ) -> None:
        self.layers = list(layers)
        self.xs: list[Tensor] = []
        self.ys: list[Tensor] = []
        self.contexts: list[Any] = []
        for layer, h, state in zip(self.layers, inputs, states):
            self.record(layer, h, state)

    def record(self, layer: nn.Module, h: Tensor, state: ForwardState | None = None) -> Tensor:
        """Run `layer` on h under autograd, keep its graph, return its output (with graph).

        With `state` this is a re-run: the forward's RNG/autocast state is replayed and
        buffers are left as they were. Without it, this *is* the forward (recompute=False).
        """
        x = h.detach().requires_grad_(True)
        with torch.enable_grad(), _rerun_guard(layer, state):
            z = layer.block(x)
            # K's part is the derivative through the residual's first argument: the map
            # cuts it (and builds K's context under the same replayed state).
            y, context = layer.residual.combine_for_backward(x, z)
        self.contexts.append(context)
        self.xs.append(x)
        self.ys.append(y)
        return y

    def _live(self, ws: Sequence[Tensor]) -> tuple[list[int], list[Tensor], list[Tensor]]:
        # A layer whose output depends on neither its input nor a parameter has no graph.
        live = [i for i, y in enumerate(self.ys) if y.requires_grad]
        return live, [self.ys[i] for i in live], [ws[i] for i in live]

    def block_vjps(self, ws: Sequence[Tensor]) -> list[Tensor]:
        """[w_j @ J_j for j = 1..L] given ws = [w_1..w_L] (each of layer j's output shape)."""
        out = [torch.zeros_like(x) for x in self.xs]
        live, ys, live_ws = self._live(ws)
        if not live:
            return out
        xs = [self.xs[i] for i in live]
        grads = torch.autograd.grad(
            ys, xs, grad_outputs=live_ws, retain_graph=True, allow_unused=True
        )
        for i, g in zip(live, grads):
            if g is not None:
                out[i] = g
        return out

    def layer_block_vjp(self, j: int, w: Tensor) -> Tensor:
        """w @ J_j for one layer (1-based j), for the sequential exact backward."""
        if not self.ys[j - 1].requires_grad:
            return torch.zeros_like(self.xs[j - 1])
        (g,) = torch.autograd.grad(
            self.ys[j - 1], self.xs[j - 1], grad_outputs=w, retain_graph=True, allow_unused=True
        )
        return torch.zeros_like(self.xs[j - 1]) if g is None else g

    def param_vjps(self, ws: Sequence[Tensor], params: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """sum_j w_j @ df_j/dtheta for each parameter (None if unused); frees the graphs."""
        _, ys, live_ws = self._live(ws)
        check_no_foreign_leaves(ys, [*params, *self.xs])
        if not params or not ys:
            return [None] * len(params)
        return list(torch.autograd.grad(ys, list(params), grad_outputs=live_ws, allow_unused=True))


def check_no_foreign_leaves(outputs: Sequence[Tensor], allowed: Sequence[Tensor]) -> None:
    """Raise if the layers' graphs reach a tensor requiring grad that the chain does not own.

    Such a tensor (a parameter captured in a closure, e.g. a LinearShortcut's lambda over
    an unregistered module, or an activation from outside the chain) would silently get
    no gradient from the Highway backward.
    """
    allowed_ids = {id(t) for t in allowed}
    stack = [y.grad_fn for y in outputs if y.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in allowed_ids:
                raise RuntimeError(
                    f"a layer of this ResidualChain uses a tensor of shape "
                    f"{tuple(variable.shape)} that requires grad but is not a parameter of "
                    "the chain's layers (a module captured in a closure, or an activation "
                    "from outside the chain): the Highway backward would leave it without a "
                    "gradient. Register the module inside the layer (e.g. in the block), or "
                    "use method=Exact()."
                )
            continue
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)


@contextmanager
def _rerun_guard(layer: nn.Module, state: ForwardState | None) -> Iterator[None]:
    if state is None:
        yield
        return
    with replayed(state), modes_and_buffers_replayed(layer, state):
        yield


VJP_BACKENDS: dict[str, type] = {"loop": LoopVJP, "batched": BatchedVJP}
