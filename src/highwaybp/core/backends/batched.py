"""Batched VJP backend: the L per-layer VJPs of an iteration as one call (torch.func).

For a stack of layers that compute the same function (see below), the parameters are
stacked along a new leading dim ([L, *p.shape], as `torch.func.stack_module_state` does) and
the layer function is `torch.func.vmap`-ed over (stacked parameters, stacked buffers, stacked
inputs): the first layer's block runs with its parameter and buffer slots filled from the
stacks. That batched forward is run once per backward under autograd; each Highway
iteration is then ONE autograd VJP through the batched graph (w.r.t. the stacked inputs),
and the final parameter sweep one more (w.r.t. the stacked parameters). `LoopVJP`
(backends/loop.py) is the per-layer reference; this backend equals it to rounding (tested to
1e-12 in float64).

Why autograd over a vmapped forward, not `torch.func.vjp` inside vmap: vjp closures cannot
leave a vmap, so a functional version re-runs the forward in every iteration; the retained
graph does that work once.

Layers are grouped only when they provably compute the same function of (parameters,
buffers, input): the same classes and module tree, equal attributes (hyper-parameters,
activation functions by identity, plain tensors and dicts by value), the same parameter and
buffer layout and tying, input shape and train/eval modes (`same_function`); each group is
one vmapped call on its first layer's modules (a stack of identical blocks: 1 group; a
transformer: 2, attention and MLP; the paper-form ResNet: 3, one per stage). A layer that
differs runs in its own group; a layer with module hooks runs on its own, unbatched, so its
hooks run on its own block as with vjp="loop".

Limits (a clear error says so): no general linear K (shape-changing
LinearShortcut layers: which function a closure computes cannot be compared, and their
shapes differ); no random ops inside the blocks in training mode (dropout masks are drawn per
layer in the forward and a single vmapped call cannot replay L separate RNG states: use
`vjp="loop"` or dropout 0); residual maps without parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.modules import module as torch_module  # its global hook registries

from highwaybp.core.backends.loop import LoopVJP, check_no_foreign_leaves
from highwaybp.core.replay import (
    ForwardState,
    is_python_scalar,
    modes_and_buffers_replayed,
    module_attributes,
    replayed,
    same_scalar,
)


def _has_hooks(layer: nn.Module) -> bool:
    """Module hooks anywhere in the layer, or global ones (register_module_forward_hook):
    running a group on its first block would run that block's hooks for every layer of the
    group (and inside vmap)."""
    if getattr(torch_module, "_global_forward_hooks", None) or getattr(
        torch_module, "_global_forward_pre_hooks", None
    ):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in layer.modules()
    )


def _same_value(a: Any, b: Any) -> bool:
    """a and b provably interchangeable in a forward: the same object, equal Python scalars,
    equal tensors, or containers of such. Anything else (functions, other objects) only by
    identity: equal-looking lambdas may compute different things."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if is_python_scalar(a):
        return same_scalar(a, b)
    if isinstance(a, Tensor):
        return (
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.requires_grad == b.requires_grad and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (set, frozenset)):
        return a == b and all(is_python_scalar(v) for v in a)
    return False


def _tensor_layout(named: Any) -> list:
    """Names, shapes, dtypes, devices and the tying pattern (which names share a tensor)."""
    first: dict[int, int] = {}
    out = []
    for pos, (name, t) in enumerate(named):
        out.append((name, tuple(t.shape), t.dtype, t.device, first.setdefault(id(t), pos)))
    return out


def same_function(a: nn.Module, b: nn.Module) -> bool:
    """Whether running module a's code with b's parameters and buffers in a's slots
    provably computes b: the same classes, module tree, attributes (see `_same_value`),
    parameter/buffer layout and tying. False when in doubt: the layer then runs apart."""
    mods_a = list(a.named_modules(remove_duplicate=False))
    mods_b = list(b.named_modules(remove_duplicate=False))
    if len(mods_a) != len(mods_b):
        return False
    for (name_a, ma), (name_b, mb) in zip(mods_a, mods_b):
        if name_a != name_b or type(ma) is not type(mb) or ma.training != mb.training:
            return False
        attrs_a, attrs_b = module_attributes(ma), module_attributes(mb)
        if list(attrs_a) != list(attrs_b):
            return False
        if not all(_same_value(attrs_a[k], attrs_b[k]) for k in attrs_a):
            return False
    return _tensor_layout(a.named_parameters(remove_duplicate=False)) == _tensor_layout(
        b.named_parameters(remove_duplicate=False)
    ) and _tensor_layout(a.named_buffers(remove_duplicate=False)) == _tensor_layout(
        b.named_buffers(remove_duplicate=False)
    )


def _same_forward_state(a: ForwardState, b: ForwardState) -> bool:
    """The train/eval modes and Python scalars each forward ran with (the group's first
    layer's are replayed for all its layers)."""
    return a.training == b.training and len(a.scalars) == len(b.scalars) and all(
        key_a == key_b and same_scalar(value_a, value_b)
        for (_, key_a, value_a), (_, key_b, value_b) in zip(a.scalars, b.scalars)
    )


def check_batchable(
    layers: Sequence[nn.Module],
    inputs: Sequence[Tensor],
    states: Sequence[ForwardState] | None = None,
) -> list[list[int]]:
    """Group the layers that provably compute the same function of (parameters, buffers,
    input) and share an input shape: each group runs as one vmapped call on its first
    layer's modules. Layers with module hooks are in no group (the backend runs them one by
    one, as the loop backend does). Raise ValueError for layers that cannot be batched."""
    advice = "use vjp='loop' (the per-layer backend) for this chain"
    groups: list[list[int]] = []
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
        if _has_hooks(layer):
            continue
        for group in groups:
            j = group[0]
            if (
                inputs[j].shape == h.shape and inputs[j].dtype == h.dtype
                and (states is None or _same_forward_state(states[j], states[i]))
                and same_function(layers[j], layer)
            ):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.stride() == b.stride())


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


def _tensor_slots(block: nn.Module) -> list[tuple[nn.Module, str, str, str]]:
    """(module, "_parameters" or "_buffers", key, name) for every tensor slot of `block`;
    name is the tensor's first name in named_parameters/named_buffers, so tied slots (one
    tensor under two names, or one submodule registered twice) share one name."""
    first: dict[int, str] = {}
    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        first.setdefault(id(t), name)
    return [
        (module, kind, key, first[id(t)])
        for module in block.modules()
        for kind in ("_parameters", "_buffers")
        for key, t in getattr(module, kind).items()
        if t is not None
    ]


@contextmanager
def _slots_filled(slots: list, tensors: dict[str, Tensor]) -> Iterator[None]:
    """Run the body with each slot holding tensors[name]; the originals put back after.

    (torch.func.functional_call does this too, but does not put the originals back when a
    submodule is registered under two names.)
    """
    originals = [(module, kind, key, getattr(module, kind)[key]) for module, kind, key, _ in slots]
    for module, kind, key, name in slots:
        getattr(module, kind)[key] = tensors[name]
    try:
        yield
    finally:
        for module, kind, key, t in originals:
            getattr(module, kind)[key] = t


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
        # One spare row after the inputs: a group whose outputs are (but for the last) the
        # inputs of a group shifted by one layer can keep them there (see _share_outputs).
        n = len(inputs)
        self.x_rows = inputs[0].new_empty((n + 1, *inputs[0].shape))
        torch.stack([h.detach() for h in inputs], out=self.x_rows[:n])
        self.x = self.x_rows[:n].detach().requires_grad_(True)
        self.spare_row_free = True
        block, residual = base.block, base.residual
        slots = _tensor_slots(block)

        def layer_fn(params: dict, bufs: dict, x: Tensor, x_const: Tensor) -> Any:
            with _slots_filled(slots, {**params, **bufs}):
                z = block(x)
            # K's part goes through the residual's first argument: feed it the constant.
            return residual.combine(x_const, z), z

        try:
            with torch.enable_grad(), replayed(state), modes_and_buffers_replayed(base, state):
                self.y, z = vmap(layer_fn, randomness="error")(
                    self.params, buffers, self.x, self.x.detach()
                )
                # Under the replayed state too (a Scaled map's c is the forward's).
                y_const, z_const = self.y.detach(), _detach(z)
                self.contexts = [
                    residual.k_context(self.x[pos].detach(), _slice(z_const, pos), y_const[pos])
                    for pos in range(len(layers))
                ]
        except RuntimeError as err:
            if "Batching rule not implemented" in str(err):
                raise RuntimeError(
                    f"vjp='batched' cannot vmap {type(block).__name__} (an operation without a "
                    "batching rule); use vjp='loop' for this chain"
                ) from err
            if "random" in str(err):
                raise RuntimeError(
                    "vjp='batched' cannot replay random operations (dropout) inside the "
                    "blocks: each layer drew its own mask in the forward. Use vjp='loop', set "
                    "dropout to 0, or call model.eval()"
                ) from err
            if "vmap" in str(err) or "functorch" in str(err):
                # Any other vmap limit (.item(), data-dependent control flow, BatchNorm with
                # momentum=None updating a cumulative average, ...).
                raise RuntimeError(
                    f"vjp='batched' cannot vmap {type(block).__name__}: {err}. Use "
                    "vjp='loop' for this chain"
                ) from err
            raise


class BatchedVJP:
    """Batched backend with `LoopVJP`'s interface (see backends/loop.py).

    Layers are grouped when they provably compute the same function (`same_function`: same
    classes and module tree, equal attributes such as gamma or an activation function,
    same parameter/buffer layout, same input shape and train/eval modes): a stack of
    identical blocks is one group; a transformer has two (attention and MLP sub-layers); the
    paper-form ResNet one per stage. Each iteration is one `torch.autograd.grad` call
    through the G vmapped graphs. Layers with module hooks run one by one (a `LoopVJP`
    inside this backend), so their hooks run on their own block as in the loop backend.

    Args:
        layers: the chain's L `ResidualLayer`s.
        inputs: h_0..h_{L-1}.
        states: the `ForwardState` of each layer's forward (autocast replay; RNG states are
            not replayable per layer inside one vmapped call, so random ops raise).

    Attributes: xs (L inputs, views of the stacked group inputs), contexts (L K-contexts),
    groups (lists of layer indices run vmapped), looped (indices run one by one).
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
        self.groups = check_batchable(self.layers, self.inputs, self.states)
        grouped = {i for idx in self.groups for i in idx}
        self.looped = [i for i in range(len(self.layers)) if i not in grouped]
        self._loop: Optional[Any] = None
        self._runs = [
            _Group(
                [self.layers[i] for i in idx],
                [self.inputs[i] for i in idx],
                [self.states[i] for i in idx],
            )
            for idx in self.groups
        ]
        self._apart = LoopVJP(
            [self.layers[i] for i in self.looped],
            [self.inputs[i] for i in self.looped],
            [self.states[i] for i in self.looped],
        )
        self.xs: list[Any] = [None] * len(self.layers)
        self.contexts: list[Any] = [None] * len(self.layers)
        for pos, i in enumerate(self.looped):
            self.xs[i], self.contexts[i] = self._apart.xs[pos], self._apart.contexts[pos]
        self._share_outputs()
        self._owner: dict[int, list[tuple[int, str, int]]] = {}
        for g, (idx, run) in enumerate(zip(self.groups, self._runs)):
            for pos, i in enumerate(idx):
                self.xs[i] = run.x[pos]
                layer = self.layers[i]
                self.contexts[i] = run.contexts[pos]
                for n in run.param_names:
                    self._owner.setdefault(id(layer.block.get_parameter(n)), []).append((g, n, pos))

    def _share_outputs(self) -> None:
        """Point each group's stacked output at the stacked inputs holding the same values.

        A group's outputs are the inputs of the layers one further (an MLP: its own inputs
        shifted by one row; a transformer's attention layers: the MLP layers' inputs). Kept
        apart they would cost one state-sized tensor per layer; when bit-for-bit equal (a
        deterministic re-run), the output's data becomes a view of those inputs (the last
        row, h after the group's last layer, written into the spare row). Its own memory is
        then freed unless a node of the graph saved it (that node keeps its copy).
        """
        by_layers = {tuple(idx): run for idx, run in zip(self.groups, self._runs)}
        for idx, run in zip(self.groups, self._runs):
            target = tuple(i + 1 for i in idx)
            n = len(idx)
            full = by_layers.get(target)
            if full is not None and _same_layout(run.y, full.x):
                if torch.equal(run.y, full.x):
                    run.y.data = full.x.detach()
                continue
            for other_idx, other in zip(self.groups, self._runs):
                if (len(other_idx) == n and tuple(other_idx[1:]) == target[:-1]
                        and other.spare_row_free
                        and _same_layout(run.y, other.x_rows[1:])
                        and torch.equal(run.y[:-1], other.x_rows[1:n])):
                    # through .data (its own version counter): the spare row overlaps no
                    # saved tensor, and the inputs' graph must not see a version change
                    other.x_rows.data[n].copy_(run.y[-1])
                    other.spare_row_free = False
                    run.y.data = other.x_rows[1:].detach()
                    break

    def _live(self) -> list[int]:
        return [g for g, run in enumerate(self._runs) if run.y.requires_grad]

    def _live_apart(self) -> list[int]:
        return self._apart.live_layers()

    def _stacked_ws(self, g: int, ws: Sequence[Tensor]) -> Tensor:
        return torch.stack([ws[i] for i in self.groups[g]])

    def block_vjps(self, ws: Sequence[Tensor]) -> list[Tensor]:
        """[w_j @ J_j for j = 1..L] in one batched VJP call; ws = [w_1..w_L]."""
        out: list[Any] = [None] * len(self.layers)
        live, apart = self._live(), self._live_apart()
        if not live and not apart:
            return [torch.zeros_like(x) for x in self.xs]
        grads = torch.autograd.grad(
            [self._runs[g].y for g in live] + [self._apart.roots[pos] for pos in apart],
            [self._runs[g].x for g in live] + [self._apart.xs[pos] for pos in apart],
            grad_outputs=[self._stacked_ws(g, ws) for g in live]
            + [ws[self.looped[pos]] for pos in apart],
            retain_graph=True,
            allow_unused=True,
        )
        for g, grad in zip(live, grads):
            if grad is not None:
                for pos, i in enumerate(self.groups[g]):
                    out[i] = grad[pos]
        for pos, grad in zip(apart, grads[len(live):]):
            if grad is not None:
                out[self.looped[pos]] = grad
        # zeros only where no gradient flows, allocated after the call (see LoopVJP)
        return [torch.zeros_like(x) if v is None else v for v, x in zip(out, self.xs)]

    def layer_block_vjp(self, j: int, w: Tensor) -> Tensor:
        """w @ J_j for one layer (the sequential exact fallback): the per-layer backend's."""
        if self._loop is None:

            self._loop = LoopVJP(self.layers, self.inputs, self.states)
        return self._loop.layer_block_vjp(j, w)

    def param_vjps(self, ws: Sequence[Tensor], params: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """sum_j w_j @ df_j/dtheta for each parameter (None if unused); frees the graphs."""

        out: list[Optional[Tensor]] = [None] * len(params)
        if self.looped:
            out = self._apart.param_vjps([ws[i] for i in self.looped], params)
        live = self._live()
        stacked = [t for g in live for t in self._runs[g].params.values()]
        direct = check_no_foreign_leaves(
            [self._runs[g].y for g in live], [*stacked, *(self._runs[g].x for g in live)], params
        )
        if direct:
            raise ValueError(
                "vjp='batched': a block uses a parameter through a reference its module keeps "
                "outside _parameters (e.g. nn.LSTM's flat weights), which the vmapped call "
                "cannot swap for the stacked parameters; use vjp='loop' for this chain"
            )
        live = [g for g in live if self._runs[g].param_names]
        if not params or not live:
            return out
        keys = [(g, n) for g in live for n in self._runs[g].param_names]
        outputs = [self._runs[g].y for g in live]
        grads = torch.autograd.grad(
            outputs,
            [self._runs[g].params[n] for g, n in keys],
            grad_outputs=[self._stacked_ws(g, ws) for g in live],
            allow_unused=True,
        )
        by_key = dict(zip(keys, grads))
        for index, p in enumerate(params):
            total = out[index]
            for g, name, pos in self._owner.get(id(p), []):
                grad = by_key.get((g, name))
                if grad is not None:
                    total = grad[pos] if total is None else total + grad[pos]
            out[index] = total
        return out
