"""`ResidualChain`: a stack of residual layers whose backward is Highway-BP (or a baseline).

With `Exact()` the chain is an ordinary module (autograd through each layer, bit-identical to
`nn.Sequential(*layers)`). With `Highway`/`FixedPoint` the forward runs without an autograd
tape and saves only the layer inputs h_0..h_{L-1} (plus RNG states for dropout replay); the
backward is a `torch.autograd.Function` that runs the iteration, so `loss.backward()` fills
every parameter's `.grad` (accumulating as autograd does) and passes dLoss/dx on to
whatever precedes the chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module  # its global hook registries

from highwaybp.core.backends import VJP_BACKENDS, LoopVJP
from highwaybp.core.iteration import Diagnostics, highway_iterate, raise_if_nonfinite
from highwaybp.core.methods import Exact, Method, check_method, register_method_function
from highwaybp.core.replay import ForwardState, capture_forward_state
from highwaybp.core.residual import ResidualLayer
from highwaybp.core.scan import DEFAULT_SCAN, get_scan, reverse_scan_list_


class ResidualChain(nn.Module):
    """A chain of L residual layers h_i = f_i(h_{i-1}) trained with a chosen gradient method.

    Args:
        layers: `ResidualLayer`s (each declares its residual map, hence its K).
        method: `Exact()` (default), `Highway(k)`, `Highway(tol=, max_k=)` or `FixedPoint(k)`.
        scan: "sequential" (default, fastest on CPU) or "hillis_steele" (log depth).
        vjp: per-layer VJP backend, "loop" (reference) or another registered backend.
        preserve_rng_state: replay each layer's RNG state when it is re-run in the backward
            (needed for dropout; costs one RNG-state copy per layer and forward).
        recompute: True (default): the forward keeps only the layer inputs and the backward
            re-runs each layer once under autograd. False: the forward records each layer's
            autograd graph (the memory of ordinary backprop) and the backward uses it, which
            saves that re-run (about a third of a Highway step at k = 1 on the demo model).
            Needs vjp="loop"; allows one backward per forward.
        layerwise_sweeps: take each sweep's VJPs layer by layer from the top (L autograd
            calls instead of two), releasing each row of the old estimate as soon as its
            VJP is taken: about 1 extra state-sized tensor per layer over exact backprop
            instead of 1.5 (not when the step norms or the "best" fallback keep the old
            estimate), and for every loss, also on most states (return_states=True,
            otherwise w^0 + scan(v), ~3). Same estimate: bit for bit with a loss on few
            states, to rounding otherwise. Needs vjp="loop" and the sequential scan.
        record_step_norms: compute each iteration's relative step into
            `last_diagnostics.step_norms` for a fixed k too (adaptive methods always do).
            Off by default: it is a full pass over two estimates per iteration that nothing
            reads unless asked. Also an attribute, read at each forward.

    Call: `chain(x, method=None, return_states=False)`; x: [*S] floating point. Returns
    h_L [*S_L]; with `return_states=(i, j, ...)` the tuple (h_i, h_j, ...) of those states
    (1-based, increasing, any shapes); with `return_states=True` the stacked states
    h_1..h_L [L, *S] (all layers must then keep the shape). Losses on returned intermediate
    states become per-layer losses of the iteration.

    After a backward through a Highway/FixedPoint chain, `chain.last_diagnostics` tells the
    iterations used and the relative step of each (see `Diagnostics`).

    All parameters the layers use must be registered in them (a tensor captured from
    outside the chain gets no gradient from the Highway backward).

    Hooks: a parameter's hooks (register_hook, register_post_accumulate_grad_hook) run once
    per backward on its total gradient, as under autograd. Module backward hooks inside the
    layers are refused under Highway/FixedPoint; forward hooks belong on the block.

    Highway/FixedPoint backwards are first-order only: double backward (create_graph=True)
    and torch.func transforms (grad, vmap, jacrev...) over the chain are refused with an
    error; use method=Exact() for them. The backward re-runs each layer: see
    highwaybp.core.replay for what the re-run replays and what a block must not do.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        method: Method | None = None,
        *,
        scan: str | None = None,
        vjp: str = "loop",
        preserve_rng_state: bool = True,
        recompute: bool = True,
        record_step_norms: bool = False,
        layerwise_sweeps: bool = False,
    ) -> None:
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("ResidualChain needs at least one layer, got an empty list")
        for index, layer in enumerate(layers):
            _check_layer(index, layer)
        self.layers = nn.ModuleList(layers)
        self.method = check_method(Exact() if method is None else method)
        self.scan_name = scan
        get_scan(scan)  # fail now on an unknown name
        if vjp not in VJP_BACKENDS:
            raise ValueError(f"unknown vjp backend {vjp!r}; choose from {sorted(VJP_BACKENDS)}")
        if not recompute and vjp != "loop":
            raise ValueError("recompute=False records per-layer graphs: it needs vjp='loop'")
        self.vjp = vjp
        self.preserve_rng_state = preserve_rng_state
        self.recompute = recompute
        self.record_step_norms = record_step_norms
        self.layerwise_sweeps = layerwise_sweeps
        if layerwise_sweeps:
            _check_layerwise(self)
        self.last_diagnostics: Optional[Diagnostics] = None

    def __len__(self) -> int:
        return len(self.layers)

    def forward(
        self, x: Tensor, method: Method | None = None,
        return_states: bool | Sequence[int] = False,
    ) -> Tensor | tuple[Tensor, ...]:
        _check_input(x)
        method = self.method if method is None else check_method(method)
        return_states = _check_return_states(return_states, len(self.layers))
        if method.exact or not self._needs_backward(x):
            if self._needs_backward(x):  # an evaluation under no_grad keeps the last report
                self.last_diagnostics = Diagnostics(method=repr(method), stop_reason="exact")
            return self._forward_autograd(x, return_states)
        run = _Run(self, method, return_states, self.record_step_norms)
        params = [p for p in self.parameters() if p.requires_grad]
        try:
            return _HighwayFunction.apply(x, run, *params)
        except RuntimeError as err:
            if "functorch transforms" not in str(err):
                raise
            raise RuntimeError(
                f"torch.func transforms (grad, vmap, jacrev, ...) over a ResidualChain with "
                f"method={method!r} are unsupported: its backward is the Highway iteration, "
                "not a differentiable function. Use method=Exact() inside the transform "
                "(e.g. with highwaybp.use_method(model, highwaybp.Exact()))."
            ) from err

    def state_gradients(
        self,
        x: Tensor,
        grad_out: Tensor,
        method: Method | None = None,
        return_states: bool = False,
    ) -> list[Tensor]:
        """The method's estimates w_0..w_L of dLoss/dh_i, for a given upstream gradient.

        `grad_out` is dLoss/d(output): shaped like h_L, or [L, ...] with `return_states`.
        Exact() gives exact backprop (the sequential reference). Parameters' `.grad` is
        untouched. For studying the estimate layer by layer (e.g. against the path sum).
        """
        _check_input(x)
        method = self.method if method is None else check_method(method)
        run = _Run(self, method, return_states, self.record_step_norms)
        inputs: list[Tensor] = []
        run.forward_states = []
        with torch.no_grad():
            h = x
            for index, layer in enumerate(self.layers):
                state = capture_forward_state(h, self.preserve_rng_state, layer)
                run.forward_states.append(state)
                inputs.append(h)
                h = _apply_layer(index, layer, h)
        expected = (len(self.layers), *h.shape) if return_states else tuple(h.shape)
        if tuple(grad_out.shape) != expected:
            what = "the stacked states" if return_states else "h_L"
            raise ValueError(
                f"grad_out must have shape {expected} (dLoss/d of {what}), "
                f"got {tuple(grad_out.shape)}"
            )
        grad_out = grad_out.clone()  # the returned w_L would otherwise be the caller's tensor
        backend = VJP_BACKENDS[self.vjp](self.layers, inputs, run.forward_states)
        if method.exact:
            g = _upstream_grads(inputs, grad_out, return_states)
            return _ChainOps(self, backend, uniform=False).exact_backward(g)
        w0, rest, diag = _backward(self, run, backend, inputs, grad_out)
        self.last_diagnostics = diag
        return [w0, *rest]

    def _needs_backward(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _forward_autograd(self, x: Tensor, return_states: bool | tuple[int, ...]):
        states = []
        h = x
        for layer in self.layers:
            h = layer(h)
            states.append(h)
        return _select_states(states, return_states)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, scan={self.scan_name or 'default'}, vjp={self.vjp}"


@dataclass
class _Run:
    """Non-tensor arguments of one forward, handed to the autograd Function."""

    chain: ResidualChain
    method: Method
    return_states: bool | tuple[int, ...]
    record_step_norms: bool = False  # the chain's setting at this forward
    forward_states: Optional[list[ForwardState]] = None
    last_state: Optional[Tensor] = None  # an empty tensor shaped like h_L (dtype, device)


def _check_layerwise(chain: ResidualChain) -> None:
    """layerwise_sweeps takes one VJP per layer and scans sequentially as it goes: another
    VJP backend or scan would be ignored, so it is refused (at construction and at each
    backward, since both are attributes)."""
    if chain.vjp != "loop":
        raise ValueError("layerwise_sweeps=True takes per-layer VJPs: it needs vjp='loop', "
                         f"got vjp={chain.vjp!r}")
    if chain.scan_name not in (None, "sequential"):
        raise ValueError("layerwise_sweeps=True scans sequentially, layer by layer: it "
                         f"cannot use scan={chain.scan_name!r}; pass scan=None or "
                         "'sequential', or layerwise_sweeps=False")


def _check_layer(index: int, layer: Any) -> None:
    if not isinstance(layer, ResidualLayer):
        raise TypeError(
            f"layer {index} ({type(layer).__name__}) has no residual decomposition: wrap it as "
            f"highwaybp.ResidualLayer(block, residual=highwaybp.Identity()) (or Scaled(c), "
            f"ReLUResidual(), Gated(), LinearShortcut(...)) so the chain knows its K"
        )
    if type(layer).forward is not ResidualLayer.forward:
        raise TypeError(
            f"layer {index} ({type(layer).__name__}) overrides forward(): the chain computes "
            "each layer as residual.combine(x, block(x)) in both its forward and its backward, "
            "so extra computation (a layer scale, a pre-norm) belongs inside the block"
        )


def _apply_layer(index: int, layer: ResidualLayer, h: Tensor) -> Tensor:
    """residual.combine(h, block(h)): the function the backward re-runs, checked for
    what would make the two differ (hooks on the layer, a block writing into its input)."""
    _check_layer_hooks(index, layer)
    version = h._version
    out = layer.residual.combine(h, layer.block(h))
    if h._version != version:
        raise RuntimeError(
            f"layer {index + 1} modified its input in place (e.g. ReLU(inplace=True) as the "
            "block's first op); the Highway backward needs that input unchanged: use "
            "inplace=False there"
        )
    return out


def _check_layer_hooks(index: int, layer: ResidualLayer) -> None:
    """Refuse hooks the Highway backward would run differently from autograd."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        raise RuntimeError(
            f"layer {index + 1} has forward hooks, which the Highway backward does not re-run; "
            "register them on the block (layer.block) instead, or use method=Exact()"
        )
    if getattr(torch_module, "_global_backward_hooks", None) or getattr(
        torch_module, "_global_backward_pre_hooks", None
    ):
        raise RuntimeError(
            "a global module backward hook is registered (register_module_full_backward_"
            "hook): under autograd it sees each module's exact gradient once, but the Highway "
            "backward takes each block's VJP at every iteration with an estimate. Use "
            "method=Exact(), or remove the global hook."
        )
    for name, module in layer.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            raise RuntimeError(
                f"layer {index + 1} has a module backward hook (on {name or 'the layer'}): "
                "under autograd it sees the exact gradient once, but the Highway backward "
                "takes each block's VJP at every iteration with an estimate. Use "
                "method=Exact() for this chain, or hook the parameters or the chain's output."
            )


def _check_input(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"ResidualChain input must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"ResidualChain input must be floating point (gradients need it), got {x.dtype}; "
            "embed integer ids first or call x.float()"
        )


def _check_return_states(value: Any, num_layers: int) -> bool | tuple[int, ...]:
    if isinstance(value, bool):
        return value
    try:
        indices = tuple(int(i) for i in value)
    except TypeError:
        raise TypeError(f"return_states must be a bool or a sequence of state indices, got "
                        f"{value!r}") from None
    if not indices or list(indices) != sorted(set(indices)) or not (
            indices[0] >= 1 and indices[-1] <= num_layers):
        raise ValueError(f"return_states must list increasing state indices in 1..{num_layers} "
                         f"(h_i is layer i's output), got {value!r}")
    return indices


def _select_states(states: list[Tensor], return_states: bool | tuple[int, ...]):
    """What the chain returns: h_L, the stacked states, or the chosen states as a tuple."""
    if return_states is True:
        return _stack_states(states)
    if return_states is False:
        return states[-1]
    return tuple(states[i - 1] for i in return_states)


def _stack_states(states: list[Tensor]) -> Tensor:
    shapes = {tuple(s.shape) for s in states}
    if len(shapes) != 1:
        raise ValueError(
            f"return_states=True needs every layer to keep the state's shape, got {sorted(shapes)}"
        )
    return torch.stack(states)


@register_method_function
class _HighwayFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, run: _Run, *params: Tensor) -> Tensor:
        chain = run.chain
        ctx.run = run
        ctx.params = params
        if chain.recompute:
            inputs, states = _forward_saving_inputs(chain, x, run)
            # Parameters too, frozen ones included (the re-run reads them): autograd's
            # version counter then catches a parameter changed in place between this
            # forward and the backward, as it does for Exact().
            frozen = [p for p in chain.parameters() if not p.requires_grad]
            ctx.save_for_backward(*inputs, *params, *frozen)
            ctx.num_inputs = len(inputs)
            ctx.backend = None
        else:
            ctx.backend, states = _forward_recording_graphs(chain, x)
        # shape, dtype and device of h_L without its memory (zeros_like of it is dense)
        run.last_state = states[-1].new_empty(()).expand(states[-1].shape)
        return _select_states(states, run.return_states)

    @staticmethod
    def backward(ctx: Any, *grad_outs: Tensor) -> tuple[Optional[Tensor], ...]:
        if torch.is_grad_enabled():  # the engine runs backward in grad mode iff create_graph
            raise RuntimeError(
                f"backward(create_graph=True) (double backward) through a ResidualChain with "
                f"method={ctx.run.method!r} is unsupported: the Highway backward is not "
                "differentiable. Use method=Exact() for higher-order gradients."
            )
        run: _Run = ctx.run
        chain = run.chain
        backend = ctx.backend if not chain.recompute else _rebuild_backend(ctx, run)
        if backend is None:
            raise RuntimeError(_SECOND_BACKWARD)
        ctx.backend = None  # recompute=False: the recorded graphs serve one backward
        inputs = [x.detach() for x in backend.xs]
        grad_out = grad_outs if isinstance(run.return_states, tuple) else grad_outs[0]
        grad_x, ws, diag = _backward(chain, run, backend, inputs, grad_out)
        param_grads = _none_above_the_losses(chain, run, ctx.params,
                                             backend.param_vjps(ws, ctx.params))
        chain.last_diagnostics = diag
        return (grad_x if ctx.needs_input_grad[0] else None, None, *param_grads)


_SECOND_BACKWARD = (
    "backward through a ResidualChain a second time: its saved states were freed by the "
    "first backward. Pass retain_graph=True to the first backward (recompute=True chains "
    "only), or run the forward again."
)


def _forward_saving_inputs(chain: ResidualChain, x: Tensor, run: _Run):
    """No-tape forward: keep h_0..h_{L-1} and each layer's RNG/autocast state."""
    inputs, run.forward_states, states = [], [], []
    h = x
    for index, layer in enumerate(chain.layers):
        run.forward_states.append(capture_forward_state(h, chain.preserve_rng_state, layer))
        inputs.append(h)
        h = _apply_layer(index, layer, h)
        states.append(h)
    return inputs, states


def _forward_recording_graphs(chain: ResidualChain, x: Tensor):
    """Forward that records each layer's own autograd graph (recompute=False)."""
    backend = LoopVJP(chain.layers)
    states, h = [], x
    for index, layer in enumerate(chain.layers):
        _check_layer_hooks(index, layer)
        try:
            h = backend.record(layer, h).detach()
        except RuntimeError as err:
            if "leaf Variable" not in str(err):
                raise
            raise RuntimeError(
                f"layer {index + 1} modified its input in place (e.g. ReLU(inplace=True) as "
                "the block's first op); use inplace=False there"
            ) from err
        states.append(h)
    return backend, states


def _rebuild_backend(ctx: Any, run: _Run) -> Any:
    try:
        saved = ctx.saved_tensors
    except RuntimeError as err:
        if "inplace operation" in str(err):
            raise RuntimeError(
                "a parameter (or the chain input) of a ResidualChain was modified in place "
                "between its forward and backward (e.g. optimizer.step() before backward()); "
                "the gradient would be that of another model. Run backward first."
            ) from err
        raise RuntimeError(_SECOND_BACKWARD) from err
    inputs = saved[: ctx.num_inputs]
    return VJP_BACKENDS[run.chain.vjp](run.chain.layers, inputs, run.forward_states)


def _backward(
    chain: ResidualChain, run: _Run, backend: Any, inputs: list[Tensor], grad_out: Tensor
) -> tuple[Tensor, list[Tensor], Diagnostics]:
    """Run the iteration; return (dLoss/dh_0, [w_1..w_L], diagnostics)."""
    g = _upstream_grads(inputs, grad_out, run.return_states, run.last_state)
    raise_if_nonfinite(g, 0, "the gradient flowing into the chain")
    ops = _ChainOps(chain, backend, _is_uniform(chain, g))
    method = run.method
    num_layers = len(chain.layers)
    full = not method.keeps_residual  # K = 0: the whole layer's VJP, no scan
    sweep, chunk = None, 0
    if chain.layerwise_sweeps:
        _check_layerwise(chain)
        chunk = 1  # one autograd call per layer: about one extra estimate alive
    elif isinstance(backend, LoopVJP) and ops.stacked_scan is None:
        # Sparse losses, per-layer VJPs and the sequential scan: the sweep in two autograd
        # calls (top half, bottom half) releases the old estimate's top rows before the
        # bottom half's VJPs: 1.5 estimates alive at the VJPs' peak instead of 2, for one
        # autograd call more per iteration. Same estimate, bit for bit.
        chunk = (num_layers + 1) // 2
    if chunk:
        def sweep(w: list, g_rows: dict) -> list:
            return ops.layerwise_sweep(w, g_rows, full, chunk)
    options = dict(inplace=True, record_steps=run.record_step_norms,
                   loss_rows=_loss_rows(run.return_states, num_layers),
                   layerwise_sweep=sweep, always_sweep=chain.layerwise_sweeps)
    if full:
        w, diag = highway_iterate(g, ops.full_vjp, lambda s: s, method, num_layers, **options)
    else:
        w, diag = highway_iterate(g, ops.block_vjp, ops.scan, method, num_layers,
                                  exact_backward=ops.exact_backward, **options)
    return w[0], w[1:], diag


def _none_above_the_losses(
    chain: ResidualChain, run: _Run, params: Sequence[Tensor], grads: list[Optional[Tensor]]
) -> list[Optional[Tensor]]:
    """None for the parameters used only by layers above the highest returned state, as
    autograd leaves them (their VJPs are zero): a zero .grad would still be updated by an
    optimizer with weight decay or momentum. A parameter tied to a lower layer keeps its
    gradient."""
    top = max(_loss_rows(run.return_states, len(chain.layers)))
    if top == len(chain.layers):
        return grads
    reaching = {id(p) for layer in chain.layers[:top] for p in layer.parameters()}
    return [g if id(p) in reaching else None for p, g in zip(params, grads)]


def _loss_rows(return_states: bool | tuple[int, ...], num_layers: int) -> list[int]:
    """The states with a loss of their own (g_i possibly nonzero): the returned ones."""
    if return_states is True:
        return list(range(1, num_layers + 1))
    if return_states is False:
        return [num_layers]
    return list(return_states)


def _is_uniform(chain: ResidualChain, g: list[Tensor]) -> bool:
    """All states share one shape and every K is diagonal: states can stack into one tensor."""
    return all(t.shape == g[0].shape for t in g) and all(
        layer.residual.kind != "linear" for layer in chain.layers
    )


def _upstream_grads(inputs: list[Tensor], grad_out: Any, return_states: Any,
                    last_state: Optional[Tensor] = None) -> list[Tensor]:
    """g_i = dLoss/dh_i for i = 0..L (g_0 = 0: the chain input has no loss of its own).

    `grad_out`: dLoss/dh_L, the stacked [L, ...] gradients (`return_states=True`), or one
    gradient per selected state (a tuple of indices). Rows 0..L-1 are fresh tensors (the
    iteration overwrites them in place); row L is the incoming dLoss/dh_L itself when it
    arrives alone, not a copy: the iteration never writes into g_L (the scan leaves y_L =
    x_L, and every later sum is formed in a fresh VJP), so a copy would only be one more
    state-sized tensor alive through the whole backward.
    """
    if return_states is True:
        return [torch.zeros_like(inputs[0]), *grad_out.clone().unbind(0)]
    if return_states is False:
        return [*(torch.zeros_like(h) for h in inputs), grad_out]
    num_layers = len(inputs)
    like = inputs[1:]  # h_1..h_{L-1}
    g = [torch.zeros_like(inputs[0]), *(torch.zeros_like(h) for h in like), None]
    for i, grad in zip(return_states, grad_out):
        if i == num_layers and grad is not None:
            g[i] = grad
        elif grad is not None:
            g[i].add_(grad)
    if g[-1] is None:  # no gradient reached h_L
        g[-1] = torch.zeros_like(last_state)
    return g


class _ChainOps:
    """The iteration's operators on a chain, on lists of L+1 per-state tensors.

    scan: in place, sequential, applying each layer's K (reverse_scan_list_); with
    scan="hillis_steele" and all-diagonal K, the states are stacked and the chosen stacked
    scan runs on them. block_vjp/full_vjp return fresh tensors (the iteration owns them).
    """

    def __init__(self, chain: ResidualChain, backend: Any, uniform: bool) -> None:
        self.backend = backend
        self.layers = chain.layers
        stacked = uniform and (chain.scan_name or DEFAULT_SCAN) != "sequential"
        self.stacked_scan = get_scan(chain.scan_name) if stacked else None
        self.coeff = self._coefficients(backend.xs[0]) if stacked else None

    def _apply_k(self, j: int, w_j: Tensor) -> Tensor:
        """w_j @ K_j (1-based layer j)."""
        return self.layers[j - 1].residual.apply_kt(w_j, self.backend.contexts[j - 1])

    def _k_map(self, j: int):
        return lambda v: self._apply_k(j, v)

    def scan(self, xs: list[Tensor]) -> list[Tensor]:
        if self.stacked_scan is not None:
            return list(self.stacked_scan(torch.stack(xs), self.coeff).unbind(0))
        maps = [self._k_map(j) for j in range(1, len(self.layers) + 1)]
        return reverse_scan_list_(xs, [*maps, None])

    def _coefficients(self, like: Tensor) -> Optional[Tensor]:
        """a_i = coefficient of K_{i+1} for i < L and a_L = 0, stacked to [L+1, ...]."""
        pairs = zip(self.layers, self.backend.contexts)
        coeffs = [layer.residual.coefficient(ctx) for layer, ctx in pairs]
        if all(c is None for c in coeffs):
            return None
        if all(c is None or isinstance(c, float) for c in coeffs):
            values = [1.0 if c is None else c for c in coeffs] + [0.0]
            shape = (len(values),) + (1,) * like.dim()
            return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(shape)
        full = [_as_tensor(c, like) for c in coeffs]
        return torch.stack([*full, torch.zeros_like(like)])

    def block_vjp(self, w: list[Any]) -> list[Tensor]:
        """v_i = w_{i+1} J_{i+1}, v_L = 0; w_0 is not read (the iteration may free it)."""
        v = _unaliased(self.backend.block_vjps(w[1:]), [t for t in w if t is not None])
        return [*v, torch.zeros_like(w[-1])]

    def full_vjp(self, w: list[Tensor]) -> list[Tensor]:
        v = self.block_vjp(w)
        for j in range(1, len(self.layers) + 1):
            v[j - 1].add_(self._apply_k(j, w[j]))
        return v

    def layerwise_sweep(self, w: list[Any], g_rows: dict[int, Tensor],
                        full: bool = False, chunk: int = 1) -> list[Tensor]:
        """scan(g + block_vjp(w)) from the top layer down (full: g + full_vjp(w), no scan).

        The VJPs are taken `chunk` layers per autograd call (1: one call per layer), and
        w[j] is set to None as soon as layer j's VJP is taken: the old estimate is released
        chunk by chunk while the new one grows, so about (1 + chunk / L) estimates are
        alive instead of two (the caller passes a copy of the list when it needs the old
        rows). Each chunk's rows get their g rows, then the chain's sequential scan
        (`reverse_scan_list_`, continuing from the row above the chunk): each row is summed
        in the same order as with block_vjp, the g rows and one scan over all rows, so the
        estimate is the same bit for bit.
        """
        num_layers = len(self.layers)
        new: list[Any] = [None] * (num_layers + 1)
        last = g_rows.get(num_layers)
        new[-1] = torch.zeros_like(w[-1]) if last is None else last  # v_L = 0
        w[0] = None  # no VJP reads w_0
        for top in range(num_layers, 0, -chunk):
            js = list(range(top, max(top - chunk, 0), -1))  # this chunk's layers, top first
            vs = self.backend.layers_block_vjps(js, [w[j] for j in js])
            if full:
                vs = [v + self._apply_k(j, w[j]) for j, v in zip(js, vs)]
            # a VJP may be its own grad_output (a pass-through block) or the row above
            vs = _unaliased(vs, [w[j] for j in js] + [new[top]])
            for j, v in zip(js, vs):
                w[j] = None
                if j - 1 in g_rows:
                    v.add_(g_rows[j - 1])
                new[j - 1] = v
            del vs
            if not full:  # the chain's sequential scan on this chunk's rows, from new[top]
                low = js[-1] - 1
                maps = [self._k_map(j) for j in range(low + 1, top + 1)]
                reverse_scan_list_(new[low : top + 1], [*maps, None])
        return new

    def exact_backward(self, g: list[Tensor]) -> list[Tensor]:
        w = list(g)
        for j in range(len(self.layers), 0, -1):
            w[j - 1] = g[j - 1] + self.backend.layer_block_vjp(j, w[j]) + self._apply_k(j, w[j])
        return w


def _unaliased(vs: list[Tensor], ws: list[Tensor]) -> list[Tensor]:
    """Copy any VJP that the iteration could not safely overwrite in place.

    Autograd may hand back the grad_output tensor itself (a block that passes its input
    through), a view of another VJP, or an expanded tensor (the VJP of a sum): any VJP whose
    memory overlaps an estimate or another VJP, or that is not dense, is copied.
    """
    out = [v if _is_dense(v) else v.clone() for v in vs]
    ranges = sorted(
        [(*_memory_range(t), "w", i) for i, t in enumerate(ws) if t.numel()]
        + [(*_memory_range(t), "v", i) for i, t in enumerate(out) if t.numel()]
    )
    reach, reach_owner = -1, None
    for start, end, kind, i in ranges:
        if start < reach:
            # Overlaps the range that reaches furthest so far: copy whichever is a VJP.
            if kind == "v":
                out[i] = out[i].clone()
                continue
            if reach_owner is not None and reach_owner[0] == "v":
                out[reach_owner[1]] = out[reach_owner[1]].clone()
        if end > reach:
            reach, reach_owner = end, (kind, i)
    return out


def _is_dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    )


def _memory_range(t: Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] that `t` can touch."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + span * t.element_size()


def _as_tensor(c: Any, like: Tensor) -> Tensor:
    if c is None:
        return torch.ones_like(like)
    if isinstance(c, float):
        return torch.full_like(like, c)
    return c.expand_as(like)
