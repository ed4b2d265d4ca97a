"""Per-layer VJPs for the chain's backward.

A backend is built once per backward from the forward's saved layer inputs; it re-runs
every layer once with autograd (under the replayed RNG/autocast state) and keeps those L
small graphs (their roots as autograd edges, not the re-run outputs) for the k iterations
and the final parameter sweep, so each iteration is pure VJPs (no re-forward). Each
layer's graph is built on r(stop_grad(x), g(x)):

    autograd VJP w.r.t. x       = w @ J       (K's part is excluded, not subtracted)
    autograd VJP w.r.t. theta   = w @ df/dtheta

The re-run sees hook-free aliases of the parameters (`p.detach()`, sharing storage and
version counter), not the parameters themselves: autograd.grad on a parameter would run its
tensor hooks, and the chain's autograd.Function hands the result on to the parameter's
AccumulateGrad, which runs them again. With aliases, every parameter hook (register_hook,
register_post_accumulate_grad_hook) runs once, on the total gradient, as under autograd.

`LoopVJP` is the reference: one autograd graph per layer, all layers' VJPs requested in one
`torch.autograd.grad` call per iteration. Other backends (the batched torch.func path in
`backends/batched.py`) implement the same `VJPBackend` protocol and are registered in
`highwaybp.core.backends.VJP_BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from highwaybp.core.replay import ForwardState, modes_and_buffers_replayed, replayed


class LoopVJP:
    """Reference backend: layer i's graph is built on its own, VJPs requested all at once.

    Args:
        layers: the chain's L `ResidualLayer`s.
        inputs: h_0..h_{L-1}, the saved input of each layer.
        states: the `ForwardState` of each layer's forward (RNG/autocast replay).

    Attributes after construction:
        contexts: L K-contexts (what each residual map's K needs), from the re-run.
        xs: the L re-run inputs (leaves requiring grad, sharing the saved inputs' memory).
        roots: each layer's graph root, the autograd edge of its output (None when the
            output depends on neither its input nor a parameter). The outputs themselves
            are not kept: the VJPs need only their graph, and keeping the last one would
            cost a state-sized tensor nobody reads (the others share the next layer's
            saved input, see `share_equal_values`).
    """

    def __init__(
        self, layers: Sequence[nn.Module], inputs: Sequence[Tensor] = (),
        states: Sequence[ForwardState] = (),
    ) -> None:
        self.layers = list(layers)
        # id(parameter) -> (parameter, its alias); one alias per parameter, so a parameter
        # shared by several layers gets one gradient summed over them.
        self._aliases: dict[int, tuple[Tensor, Tensor]] = {}
        self.xs: list[Tensor] = []
        self.roots: list[GradientEdge | None] = []
        self.contexts: list[Any] = []
        inputs = list(inputs)
        for index, (layer, h, state) in enumerate(zip(self.layers, inputs, states)):
            y = self.record(layer, h, state)
            if index + 1 < len(inputs):
                share_equal_values(y, inputs[index + 1])

    def record(self, layer: nn.Module, h: Tensor, state: ForwardState | None = None) -> Tensor:
        """Run `layer` on h under autograd, keep its graph, return its output (with graph).

        With `state` this is a re-run: the forward's RNG/autocast state is replayed and
        buffers are left as they were. Without it, this *is* the forward (recompute=False).
        """
        x = h.detach().requires_grad_(True)
        with torch.enable_grad(), _rerun_guard(layer, state), parameters_aliased(
            layer, self._aliases
        ):
            z = layer.block(x)
            # K's part is the derivative through the residual's first argument: the map
            # cuts it (and builds K's context under the same replayed state).
            y, context = layer.residual.combine_for_backward(x, z)
        self.contexts.append(context)
        self.xs.append(x)
        self.roots.append(get_gradient_edge(y) if y.requires_grad else None)
        return y

    def _live(self, ws: Sequence[Tensor]) -> tuple[list[int], list[GradientEdge], list[Tensor]]:
        # A layer whose output depends on neither its input nor a parameter has no graph.
        live = self.live_layers()
        return live, [self.roots[i] for i in live], [ws[i] for i in live]  # type: ignore

    def live_layers(self) -> list[int]:
        """Indices of the layers whose output has a graph (depends on its input or a
        parameter); the others' VJPs are zero."""
        return [i for i, root in enumerate(self.roots) if root is not None]

    def block_vjps(self, ws: Sequence[Tensor]) -> list[Tensor]:
        """[w_j @ J_j for j = 1..L] given ws = [w_1..w_L] (each of layer j's output shape)."""
        return self.layers_block_vjps(range(1, len(self.xs) + 1), ws)

    def layer_block_vjp(self, j: int, w: Tensor) -> Tensor:
        """w @ J_j for one layer (1-based j), for the sequential exact backward."""
        return self.layers_block_vjps([j], [w])[0]

    def layers_block_vjps(self, js: Sequence[int], ws: Sequence[Tensor]) -> list[Tensor]:
        """[w @ J_j for j, w in zip(js, ws)] (1-based layers j) in one autograd call."""
        js = list(js)
        out: list[Any] = [None] * len(js)
        live = [n for n, j in enumerate(js) if self.roots[j - 1] is not None]
        if live:
            grads = torch.autograd.grad(
                [self.roots[js[n] - 1] for n in live], [self.xs[js[n] - 1] for n in live],
                grad_outputs=[ws[n] for n in live], retain_graph=True, allow_unused=True,
            )
            for n, g in zip(live, grads):
                out[n] = g
        # zeros only where no gradient flows (allocated after the call: not all at once
        # with the VJPs, which would be a whole state-sized tensor per layer more)
        return [torch.zeros_like(self.xs[j - 1]) if g is None else g for g, j in zip(out, js)]

    def param_vjps(self, ws: Sequence[Tensor], params: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """sum_j w_j @ df_j/dtheta for each parameter (None if unused); frees the graphs.

        The gradients are taken w.r.t. the parameters' aliases (hooks not run: the caller
        hands them to autograd, which runs each parameter's hooks once).
        """
        _, roots, live_ws = self._live(ws)
        aliases = [self._aliases[id(p)][1] if id(p) in self._aliases else p for p in params]
        direct = check_no_foreign_leaves(roots, [*aliases, *self.xs], params)
        if not params or not roots:
            return [None] * len(params)
        targets = [*aliases, *(params[i] for i in direct)]
        grads = torch.autograd.grad(roots, targets, grad_outputs=live_ws, allow_unused=True)
        out = list(grads[: len(params)])
        for i, g in zip(direct, grads[len(params):]):
            if g is not None:
                out[i] = g if out[i] is None else out[i] + g
        return out


@contextmanager
def parameters_aliased(
    layer: nn.Module, aliases: dict[int, tuple[Tensor, Tensor]]
) -> Iterator[None]:
    """Run the body with every parameter of `layer` replaced by its alias in `aliases`
    (created on first use: `p.detach()`, requiring grad like p); put back afterwards."""
    swapped = []
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            entry = aliases.get(id(p))
            if entry is None:
                entry = aliases[id(p)] = (p, p.detach().requires_grad_(p.requires_grad))
            swapped.append((module, name, p))
            module._parameters[name] = entry[1]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def check_no_foreign_leaves(
    outputs: Sequence[Tensor | GradientEdge], allowed: Sequence[Tensor],
    params: Sequence[Tensor] = (),
) -> list[int]:
    """Raise if the layers' graphs reach a tensor requiring grad that the chain does not own.

    Such a tensor (a parameter captured in a closure, e.g. a LinearShortcut's lambda over
    an unregistered module, or an activation from outside the chain) would silently get
    no gradient from the Highway backward.

    Returns the indices in `params` of the chain's parameters that the graphs reach
    directly rather than through their aliases (a module holding its own reference to a
    parameter, as nn.LSTM's flat weights do): their gradient must be taken on the parameter
    itself, which runs its tensor hooks, so a parameter with hooks is refused there.
    """
    allowed_ids = {id(t) for t in allowed}
    param_index = {id(p): i for i, p in enumerate(params)}
    direct: list[int] = []
    stack = [y.node if isinstance(y, GradientEdge) else y.grad_fn for y in outputs]
    stack = [node for node in stack if node is not None]
    # The nodes are kept alive by `seen`: a node's Python object can be a temporary wrapper
    # (torch 2.5 makes a new one per `next_functions` access), so once freed its id is
    # reused by the next node, which would be skipped as seen (a foreign leaf missed).
    seen: dict[int, Any] = {}
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) in param_index and id(variable) not in allowed_ids:
                if variable._backward_hooks:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(variable.shape)} with a tensor hook is "
                        "used through a reference its module keeps outside _parameters (e.g. "
                        "nn.LSTM's flat weights): the Highway backward cannot keep its hook "
                        "from running twice. Remove the hook (register_post_accumulate_grad_"
                        "hook runs once) or use method=Exact() for this chain."
                    )
                direct.append(param_index[id(variable)])
            elif id(variable) not in allowed_ids:
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
    return direct


def share_equal_values(y: Tensor, h: Tensor) -> None:
    """Point a re-run's output y at the forward's saved copy h of the same values.

    The backward needs y only as the root of its graph (`LoopVJP` keeps its autograd edge,
    not y); its values are the next layer's saved input h, recomputed. y itself is then
    freed with the re-run, unless something else holds it: a custom autograd Function
    keeping its output as a ctx attribute, a module caching its last output. Keeping both
    would cost a state-sized tensor per layer over exact backprop, so when they are
    bit-for-bit equal (a deterministic re-run: always on CPU), y's data becomes h's and
    y's own memory is freed (a node that saved y through save_for_backward keeps its own
    copy: ReLU saves its output). Anything reading y afterwards reads the same values.
    """
    if (y.shape == h.shape and y.dtype == h.dtype and y.device == h.device
            and y.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
            and torch.equal(y, h)):
        y.data = h


@contextmanager
def _rerun_guard(layer: nn.Module, state: ForwardState | None) -> Iterator[None]:
    if state is None:
        yield
        return
    with replayed(state), modes_and_buffers_replayed(layer, state):
        yield

