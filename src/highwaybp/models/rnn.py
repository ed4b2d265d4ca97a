"""`highwaybp.GRU` and `highwaybp.LSTM`: drop-in torch.nn.GRU / torch.nn.LSTM with Highway-BP
through time.

Each time step is a layer of the chain: h_t = f(x_t, h_{t-1}) with K_t = diag(z_t) for the
GRU (torch's z is the fraction of h kept) and K_t = diag(f_t) on the cell state for the LSTM.
The forward runs without an autograd tape and stores the gates; the backward runs the
Highway-BP iteration in which every block VJP of all T steps is one batched call (one
elementwise multiply and one [T*B, G*H] x [G*H, H] matmul) and the scan is a sequential
in-place multiply-add. Losses on the outputs at every step are per-layer losses. Stacked
layers run the iteration layer by layer from the top (autograd does that ordering): the
gradient reaching a layer's inputs is the per-step loss of the layer below.

    rnn = highwaybp.GRU(32, 128, num_layers=2, method=highwaybp.Highway(k=1))
    rnn.load_state_dict(torch.nn.GRU(32, 128, num_layers=2).state_dict())
    out, h_n = rnn(x)            # x [T, B, 32] (or [B, T, 32] with batch_first=True)
    loss(out).backward()         # Highway-BP; rnn.last_diagnostics says what it did

`CellRNN` runs the same iteration for any cell module that declares its residual gate, with
autograd VJPs (the reference the fast GRU/LSTM engines are tested against).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from highwaybp.core.iteration import Diagnostics, StopRule, highway_iterate, raise_if_nonfinite
from highwaybp.core.methods import Exact, FixedPoint, Highway, Method, check_method
from highwaybp.core.scan import reverse_scan_sequential
from highwaybp.models.rnn_cells import BufferPool, GRUEngine, LSTMEngine

Engine = Union[GRUEngine, LSTMEngine]
ITERATE_MODES = ("fast", "reference")
# Old name of "reference" (it clashed with the `core` package's name): accepted, warned.
_DEPRECATED_ITERATE = {"core": "reference"}


# ---- the iteration on an engine ------------------------------------------------------------


def fast_iterate(eng: Engine, method: Highway | FixedPoint) -> tuple[Tensor, Diagnostics]:
    """`highway_iterate` specialised to an engine: same estimate and diagnostics, no allocations.

    Uses w^{j+1} = w^0 + scan(v^j) = scan(g + v^j) (the scan is linear) and two preallocated
    state buffers swapped each iteration; each iteration is one chunked sweep (gate adjoints,
    matmul, losses, scan and step norm per chunk of time steps while it is in cache).
    The per-layer losses g are the engine's (`set_loss`), added in place. NaN/Inf: checked by
    the step norms and once on the returned estimate.
    """
    rule = StopRule(method, eng.T)
    full = isinstance(method, FixedPoint)
    w = eng.init_loss_(eng.new_state())
    if not full:
        eng.scan_(w)
    best = eng.new_state().copy_(w) if rule.keep_best else None
    nxt = eng.new_state()
    for j in rule.iterations():
        diff, norm = eng.sweep(w, nxt, full, with_loss=True, scan=not full, norms=True)
        step = 0.0 if diff == 0.0 else diff / max(norm, 1e-300)
        if not (math.isfinite(step) and math.isfinite(norm)):
            _check_finite(eng, nxt, j)
        w, nxt = nxt, w
        if rule.record(j, step):
            best.copy_(w)
        if rule.should_stop(j, step):
            break
    diag = rule.finish()
    if diag.fallback == "exact":
        w = eng.exact_backward(nxt)
    elif diag.fallback == "best":
        w = best
    _check_finite(eng, w, diag.iterations)
    return w, diag


def _check_finite(eng: Engine, w: Tensor, iteration: int) -> None:
    # One reduction instead of isfinite (several passes and temporaries); a non-finite sum
    # (NaN/Inf somewhere, or an overflow) triggers the detailed check, which names the state.
    if not math.isfinite(float(w.sum())):
        raise_if_nonfinite(eng.layer_major(w), iteration)


def reference_iterate(eng: Engine, method: Highway | FixedPoint) -> tuple[Tensor, Diagnostics]:
    """The same estimate through the core's generic `highway_iterate` (fresh tensors per step)."""
    full = isinstance(method, FixedPoint)

    def fresh() -> Tensor:
        return torch.empty(eng.state_shape(), dtype=eng.x.dtype, device=eng.x.device)

    def block_vjp(w_lm: Tensor) -> Tensor:
        return eng.layer_major(eng.block_vjp(eng.from_layer_major(w_lm), fresh(), full))

    def scan(x_lm: Tensor) -> Tensor:
        return eng.layer_major(eng.scan_(eng.from_layer_major(x_lm).clone()))

    def exact(g_lm: Tensor) -> Tensor:  # g_lm is always the engine's own loss here
        return eng.layer_major(eng.exact_backward(fresh()))

    g_lm = eng.layer_major(eng.loss_state())
    if full:
        w, diag = highway_iterate(g_lm, block_vjp, lambda s: s, method, eng.T)
    else:
        w, diag = highway_iterate(g_lm, block_vjp, scan, method, eng.T, exact_backward=exact)
    return eng.from_layer_major(w), diag


# ---- one layer as an autograd Function --------------------------------------------------


@dataclass
class _LayerRun:
    """Non-tensor arguments of one layer's forward, handed to the autograd Function."""

    owner: Any
    layer: int
    method: Method
    pool: BufferPool
    iterate: str = "fast"
    engine: Optional[Engine] = field(default=None, repr=False)


def _make_engine(run: _LayerRun, x, h0, c0, w_ih, w_hh, b_ih, b_hh) -> Engine:
    if c0 is None:
        return GRUEngine(run.pool, x, h0, w_ih, w_hh, b_ih, b_hh)
    return LSTMEngine(run.pool, x, h0, c0, w_ih, w_hh, b_ih, b_hh)


class _LayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        h0: Tensor,
        c0: Optional[Tensor],
        run: _LayerRun,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Optional[Tensor],
        b_hh: Optional[Tensor],
    ):
        eng = _make_engine(run, x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        result = eng.forward()
        ctx.run, ctx.eng = run, eng
        # The backward reads W_hh (block VJPs) and W_ih (dx) again; the gates it needs are
        # stored, so the biases, h0 and c0 are not read. x and the output are saved below.
        ctx.weight_versions = (w_ih._version, w_hh._version)
        if c0 is None:
            y = result[1:]
            ctx.save_for_backward(x, y)
            return y
        states, c_last = result
        y = states[1:]
        ctx.save_for_backward(x, y)
        return y, c_last

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_c: Optional[Tensor] = None):
        eng: Optional[Engine] = ctx.eng
        if eng is None:
            raise RuntimeError(
                "backward through a highwaybp RNN a second time: its stored gates were released "
                "by the first backward. Run the forward again (retain_graph is not supported)."
            )
        run: _LayerRun = ctx.run
        try:
            ctx.saved_tensors  # noqa: B018 -- raises if x or the output was modified in place
            _check_weight_versions(run, eng, ctx.weight_versions, need_x=ctx.needs_input_grad[0])
            grads = _layer_backward(eng, run, grad_y, grad_c, ctx.needs_input_grad)
        finally:
            eng.release()
            ctx.eng = None
        return grads


def _check_weight_versions(
    run: _LayerRun, eng: Engine, versions: tuple[int, int], need_x: bool
) -> None:
    """Refuse a backward whose weights changed in place since the forward, as torch.nn does.

    The backward multiplies by W_hh (and by W_ih for dx): after e.g. an optimizer.step()
    between the forward and this backward it would silently mix the new weights with the old
    gates, a gradient of no model. W_ih is read only when x needs a gradient (as in torch.nn).
    """
    checks = [("weight_hh", eng.w_hh, versions[1])]
    if need_x:
        checks.insert(0, ("weight_ih", eng.w_ih, versions[0]))
    for name, weight, saved in checks:
        if weight._version != saved:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: parameter {name}_l{run.layer} of highwaybp."
                f"{run.owner.mode} {list(weight.shape)} is at version {weight._version}; "
                f"expected version {saved} (its value at the forward). The backward reads "
                "this weight, so the gradient would mix the old and the new values. Call "
                "backward before optimizer.step() (or any in-place change of the parameters), "
                "or run the forward again."
            )


def _layer_backward(
    eng: Engine, run: _LayerRun, grad_y: Tensor, grad_c: Optional[Tensor], needs: tuple[bool, ...]
):
    lstm = isinstance(eng, LSTMEngine)
    eng.set_loss(grad_y, grad_c if lstm else None)
    eng.prepare()
    method = run.method
    if isinstance(method, Exact):
        w = eng.exact_backward(eng.new_state())
        _check_finite(eng, w, 0)
        diag = Diagnostics(method=repr(method), stop_reason="exact")
    elif run.iterate == "reference":
        w, diag = reference_iterate(eng, method)
    else:
        w, diag = fast_iterate(eng, method)
    dx, d_w_ih, d_w_hh, d_b_ih, d_b_hh = eng.param_grads(w, need_x=needs[0])
    dh0 = (w[1, 0] if lstm else w[0]).clone() if needs[1] else None
    dc0 = w[0, 0].clone() if lstm and needs[2] else None
    run.owner._record_diagnostics(run.layer, diag)
    return (
        dx,
        dh0,
        dc0,
        None,
        d_w_ih,
        d_w_hh,
        d_b_ih if needs[6] else None,
        d_b_hh if needs[7] else None,
    )


# ---- the modules ------------------------------------------------------------------------


class _HighwayRNNBase(nn.Module):
    """Shared by GRU and LSTM: torch.nn's constructor, parameters and input conventions."""

    mode = ""
    gates = 0

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int | None = None,
        *,
        method: Method | None = None,
        residual: bool = False,
        iterate: str = "fast",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.mode}: {name} must be an int >= 1, got {value!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1):
            raise ValueError(f"{self.mode}: dropout must be a number in [0, 1], got {dropout!r}")
        if bidirectional:
            raise NotImplementedError(
                f"highwaybp.{self.mode}: bidirectional=True is not supported (Highway-BP runs "
                "through time in one direction); use two modules, one on the flipped sequence"
            )
        self._check_proj_size(proj_size, hidden_size)
        if iterate in _DEPRECATED_ITERATE:
            warnings.warn(f"iterate={iterate!r} is deprecated: use "
                          f"iterate={_DEPRECATED_ITERATE[iterate]!r}", FutureWarning,
                          stacklevel=3)
            iterate = _DEPRECATED_ITERATE[iterate]
        if iterate not in ITERATE_MODES:
            raise ValueError(f"iterate must be one of {ITERATE_MODES}, got {iterate!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = False
        self.proj_size = 0  # torch.nn.RNNBase's attribute: no projection
        self.residual = residual
        self.method = check_method(Exact() if method is None else method)
        self.iterate = iterate
        self.last_diagnostics: Optional[Diagnostics] = None
        self.layer_diagnostics: list[Optional[Diagnostics]] = [None] * num_layers
        self._pools = [BufferPool() for _ in range(num_layers)]
        factory = {"device": device, "dtype": dtype}
        width = self.gates * hidden_size
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size
            setattr(
                self, f"weight_ih_l{layer}", nn.Parameter(torch.empty(width, in_size, **factory))
            )
            setattr(
                self,
                f"weight_hh_l{layer}",
                nn.Parameter(torch.empty(width, hidden_size, **factory)),
            )
            if bias:
                setattr(self, f"bias_ih_l{layer}", nn.Parameter(torch.empty(width, **factory)))
                setattr(self, f"bias_hh_l{layer}", nn.Parameter(torch.empty(width, **factory)))
        self.reset_parameters()

    def _check_proj_size(self, proj_size: int | None, hidden_size: int) -> None:
        """torch.nn.LSTM's proj_size: 0 (no projection) works, > 0 is refused (GRU: see GRU)."""
        if proj_size is None:
            return
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(
                f"{self.mode}: proj_size should be a positive integer or zero to disable "
                f"projections, got {proj_size!r}"
            )
        if proj_size >= hidden_size:
            raise ValueError(
                f"{self.mode}: proj_size has to be smaller than hidden_size, got proj_size="
                f"{proj_size} and hidden_size={hidden_size}"
            )
        if proj_size > 0:
            raise NotImplementedError(
                f"highwaybp.{self.mode}: proj_size={proj_size} (an LSTM with projections, "
                "h_t = W_hr (o * tanh(c_t))) is not supported: the Highway-BP engine runs the "
                "plain LSTM cell. Use torch.nn.LSTM(..., proj_size=...) for it, or "
                "highwaybp.LSTM without projections followed by an nn.Linear on the outputs "
                "(a different model: the projection is then outside the recurrence)"
            )

    def reset_parameters(self) -> None:
        """torch.nn's init: every parameter ~ U(-1/sqrt(hidden), 1/sqrt(hidden))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """torch.nn.RNNBase.all_weights: per layer [weight_ih, weight_hh, bias_ih, bias_hh]
        (the biases only with bias=True)."""
        return [
            [p for p in self.layer_params(layer) if p is not None]
            for layer in range(self.num_layers)
        ]

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch.nn.GRU/LSTM (DataParallel, after .to(), ...).

        torch.nn's version packs the weights into one contiguous buffer for cuDNN; the
        highwaybp engines use each parameter as it is (one matmul per weight), so there is
        nothing to pack.
        """

    def layer_params(self, layer: int) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        get = lambda name: getattr(self, f"{name}_l{layer}", None)
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")

    def _record_diagnostics(self, layer: int, diag: Diagnostics) -> None:
        self.layer_diagnostics[layer] = diag
        self.last_diagnostics = diag  # layer 0 finishes last in a backward

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.residual:
            text += ", residual=True"
        return text + f", method={self.method!r}"

    # ---- input checks -------------------------------------------------------------------
    def _prepare_input(self, x: Any) -> tuple[Tensor, bool]:
        """-> (time-major x [T, B, In], batched?)."""
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise TypeError(
                f"highwaybp.{self.mode} does not support PackedSequence: pass a padded tensor "
                "[T, B, features] (or [B, T, features] with batch_first=True) and mask the "
                "per-step losses of the padding instead"
            )
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.mode} input must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self.mode} input must be floating point, got {x.dtype}")
        layout = "[B, T, features]" if self.batch_first else "[T, B, features]"
        if x.dim() not in (2, 3):
            raise ValueError(
                f"{self.mode} input must be 3-D {layout} (or 2-D [T, features] unbatched), got "
                f"shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"{self.mode} input has {x.shape[-1]} features in its last dim, expected "
                f"input_size={self.input_size} (shape {tuple(x.shape)}, layout {layout})"
            )
        self._check_dtype_and_device(x)
        batched = x.dim() == 3
        xt = x.unsqueeze(1) if not batched else x.transpose(0, 1) if self.batch_first else x
        if xt.shape[0] == 0:  # torch.nn's RuntimeError, with the shape and the layout
            raise RuntimeError(
                f"Expected sequence length to be larger than 0 in RNN: highwaybp.{self.mode} "
                f"got input of shape {tuple(x.shape)} (layout "
                f"{layout if batched else '[T, features] unbatched'}); pass at least one time step"
            )
        if xt.shape[1] == 0:
            raise ValueError(
                f"highwaybp.{self.mode}: batch size 0 (input shape {tuple(x.shape)}, layout "
                f"{layout}) is not supported (torch.nn returns an empty output here): skip "
                "empty batches"
            )
        return xt.contiguous(), batched

    def _check_dtype_and_device(self, x: Tensor) -> None:
        """The input must have the weights' dtype and device (torch.nn's errors, same fix)."""
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype:
            raise ValueError(
                f"{self.mode} input dtype ({x.dtype}) does not match weight dtype "
                f"({weight.dtype}). Convert input: input.to({weight.dtype}), or convert model: "
                f"model.to({x.dtype})"
            )
        if x.device != weight.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{x.device} and parameter tensor at {weight.device}: move one of them "
                f"(input.to({str(weight.device)!r}) or model.to({str(x.device)!r}))"
            )

    def _check_state(self, h: Any, name: str, x: Tensor, batched: bool) -> Tensor:
        batch = x.shape[1]
        want = (
            (self.num_layers, batch, self.hidden_size)
            if batched
            else (self.num_layers, self.hidden_size)
        )
        if not isinstance(h, Tensor):
            raise TypeError(
                f"{self.mode}: {name} must be a tensor of shape {want}, got {type(h).__name__}"
            )
        if tuple(h.shape) != want:
            hint = ""
            if batched and h.dim() == 3 and h.shape[1] == x.shape[0] and x.shape[0] != batch:
                hint = (
                    f" Its batch size matches the input's dim {1 if self.batch_first else 0}:"
                    f" is batch_first={not self.batch_first} what you meant? The module has"
                    f" batch_first={self.batch_first}."
                )
            raise ValueError(
                f"{self.mode}: {name} must have shape (num_layers, batch, hidden_size) = {want}, "
                f"got {tuple(h.shape)}.{hint}"
            )
        if h.dtype != x.dtype:
            raise TypeError(
                f"{self.mode}: {name} dtype {h.dtype} differs from input {x.dtype}: convert it, "
                f"{name}.to({x.dtype})"
            )
        return h if batched else h.unsqueeze(1)

    # ---- forward ------------------------------------------------------------------------
    def _run_layers(self, x: Tensor, h0: Tensor, c0: Optional[Tensor], method: Method):
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or h0.requires_grad
            or (c0 is not None and c0.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )
        inp = x
        h_last, c_last = [], []
        for layer in range(self.num_layers):
            params = self.layer_params(layer)
            c_init = None if c0 is None else c0[layer]
            run = _LayerRun(self, layer, method, self._pools[layer], self.iterate)
            if needs_grad:
                out = _LayerFunction.apply(inp, h0[layer], c_init, run, *params)
            else:
                out = self._forward_no_grad(run, inp, h0[layer], c_init, params)
            y, c_t = (out, None) if c0 is None else out
            h_last.append(y[-1])
            c_last.append(c_t)
            if self.residual and layer > 0:
                y = y + inp
            if self.dropout and self.training and layer < self.num_layers - 1:
                y = nn.functional.dropout(y, self.dropout, training=True)
            inp = y
        return inp, torch.stack(h_last), (None if c0 is None else torch.stack(c_last))

    @staticmethod
    def _forward_no_grad(run: _LayerRun, x, h0, c0, params):
        with torch.no_grad():
            eng = _make_engine(run, x, h0, c0, *params)
            try:
                result = eng.forward()
            finally:
                eng.release()
        if c0 is None:
            return result[1:]
        return result[0][1:], result[1]

    def _finish_output(self, y: Tensor, batched: bool) -> Tensor:
        if not batched:
            return y.squeeze(1)
        return y.transpose(0, 1) if self.batch_first else y


class GRU(_HighwayRNNBase):
    """torch.nn.GRU with Highway-BP through time.

    Args: as torch.nn.GRU (input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0; bidirectional must stay False), plus
        method: Exact() (default; sequential BPTT on stored gates), Highway(k),
            Highway(tol=, max_k=) or FixedPoint(k).
        residual: add each layer's input to its output for layers 2..num_layers (the paper's
            stacked GRU); False gives torch.nn.GRU's function.
        iterate: "fast" (default, preallocated loop) or "reference" (the generic
            core.highway_iterate, the readable reference the fast loop is tested against;
            "core" is its deprecated old name).

    Parameters: weight_ih_l{k} [3H, In], weight_hh_l{k} [3H, H], bias_ih_l{k}, bias_hh_l{k}
    [3H] (gate order r, z, n), so torch.nn.GRU's state_dict loads as is.

    Call: rnn(x, h0=None, method=None) with x [T, B, In] ([B, T, In] if batch_first, or
    [T, In] unbatched) and h0 [num_layers, B, H] -> (output [T, B, H], h_n [num_layers, B, H]).

    As in torch.nn, a backward after an in-place change of a weight it reads (weight_hh_l{k};
    weight_ih_l{k} when that layer's input needs a gradient), e.g. an optimizer.step()
    between forward and backward, raises RuntimeError; flatten_parameters() (a no-op here)
    and all_weights exist for code written for torch.nn.
    """

    mode = "GRU"
    gates = 3

    def _check_proj_size(self, proj_size: int | None, hidden_size: int) -> None:
        if proj_size is not None:  # as torch.nn.GRU, which refuses the argument, even 0
            raise ValueError(
                "proj_size argument is only supported for LSTM, not RNN or GRU (as in "
                "torch.nn.GRU): remove it"
            )

    def forward(
        self, x: Tensor, hx: Optional[Tensor] = None, method: Method | None = None
    ) -> tuple[Tensor, Tensor]:
        method = self.method if method is None else check_method(method)
        xt, batched = self._prepare_input(x)
        if hx is None:
            h0 = xt.new_zeros((self.num_layers, xt.shape[1], self.hidden_size))
        else:
            h0 = self._check_state(hx, "h0", xt, batched)
        y, h_n, _ = self._run_layers(xt, h0, None, method)
        return self._finish_output(y, batched), (h_n if batched else h_n.squeeze(1))


class LSTM(_HighwayRNNBase):
    """torch.nn.LSTM with Highway-BP through time (K_t = diag(f_t) on the cell state).

    Args and parameters as `GRU` with 4H gate rows (order i, f, g, o); proj_size=0 (the
    default: no projection) is accepted as in torch.nn.LSTM, proj_size > 0 raises
    NotImplementedError. Call: rnn(x, (h0, c0)=None, method=None) -> (output, (h_n, c_n)).
    """

    mode = "LSTM"
    gates = 4

    def forward(
        self, x: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None, method: Method | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        method = self.method if method is None else check_method(method)
        xt, batched = self._prepare_input(x)
        if hx is None:
            h0 = xt.new_zeros((self.num_layers, xt.shape[1], self.hidden_size))
            c0 = torch.zeros_like(h0)
        else:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError("LSTM: hx must be a tuple (h0, c0), each [num_layers, B, H]")
            h0 = self._check_state(hx[0], "h0", xt, batched)
            c0 = self._check_state(hx[1], "c0", xt, batched)
        y, h_n, c_n = self._run_layers(xt, h0, c0, method)
        if not batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return self._finish_output(y, batched), (h_n, c_n)


# ---- any cell with a declared residual gate (autograd VJPs) -----------------------------


class CellRNN(nn.Module):
    """One recurrent layer h_t = cell(x_t, h_{t-1}) trained with Highway-BP, for any cell.

    The cell is an nn.Module with `forward(x [N, In], h [N, S]) -> h' [N, S]` that works on
    any number of rows N, and, for Highway, `residual_gate(x, h) -> a [N, S]`: the diagonal of
    K = the part of dh'/dh that the iteration treats as the residual path (GRU: z; LSTM on
    [c, h]: [f, 0]). FixedPoint needs no gate. The block VJPs of all T steps are one autograd
    VJP through the cell applied to [T*B] rows; this is the readable reference of the fast
    GRU/LSTM engines, and a way to try Highway-BP on a new cell.

    Call: rnn(x [T, B, In], h0 [B, S]) -> states h_1..h_T [T, B, S].
    """

    def __init__(self, cell: nn.Module, method: Method | None = None) -> None:
        super().__init__()
        self.cell = cell
        self.method = check_method(Exact() if method is None else method)
        self.last_diagnostics: Optional[Diagnostics] = None
        _check_cell(cell, self.method)

    def forward(self, x: Tensor, h0: Tensor, method: Method | None = None) -> Tensor:
        method = self.method if method is None else check_method(method)
        _check_cell(self.cell, method)
        if x.dim() != 3 or h0.dim() != 2 or h0.shape[0] != x.shape[1]:
            raise ValueError(
                f"CellRNN needs x [T, B, In] and h0 [B, S], got {tuple(x.shape)} "
                f"and {tuple(h0.shape)}"
            )
        if isinstance(method, Exact) or not torch.is_grad_enabled():
            h, states = h0, []
            for x_t in x.unbind(0):
                h = self.cell(x_t, h)
                states.append(h)
            self.last_diagnostics = Diagnostics(method=repr(method), stop_reason="exact")
            return torch.stack(states)
        params = [p for p in self.cell.parameters() if p.requires_grad]
        return _CellFunction.apply(x, h0, self, method, *params)


def _check_cell(cell: Any, method: Method) -> None:
    if not isinstance(cell, nn.Module):
        raise TypeError(f"CellRNN needs an nn.Module cell, got {type(cell).__name__}")
    if isinstance(method, Highway) and not callable(getattr(cell, "residual_gate", None)):
        raise TypeError(
            f"cell {type(cell).__name__} declares no residual gate, so Highway-BP does not know "
            "its K: add a method residual_gate(x, h) -> [N, S] returning the diagonal of the "
            "residual part of dh'/dh (GRU: the update gate z), or use method=FixedPoint(k)"
        )


class _CellFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, h0: Tensor, owner: CellRNN, method: Method, *params):
        states = [h0]
        for x_t in x.unbind(0):
            states.append(owner.cell(x_t, states[-1]))
        stacked = torch.stack(states)
        ctx.owner, ctx.method = owner, method
        ctx.save_for_backward(x, stacked, *params)
        # The backward re-runs the cell; frozen parameters and buffers are not saved tensors,
        # so autograd would not notice an in-place change of them: keep their versions.
        ctx.cell_versions = [(name, t, t._version) for name, t in _cell_tensors(owner.cell)]
        return stacked[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor):
        x, stacked, *params = ctx.saved_tensors
        owner, method = ctx.owner, ctx.method
        _check_cell_versions(owner.cell, ctx.cell_versions)
        T, B = x.shape[:2]
        S = stacked.shape[-1]
        with torch.enable_grad():
            hp = stacked[:-1].reshape(T * B, S).detach().requires_grad_(True)
            xs = x.reshape(T * B, -1).detach().requires_grad_(ctx.needs_input_grad[0])
            out = owner.cell(xs, hp)
        _check_rerun(owner.cell, out.detach().reshape(T, B, S), stacked[1:])
        full = isinstance(method, FixedPoint)
        a = None
        if not full:
            with torch.no_grad():
                a = owner.cell.residual_gate(xs, hp).reshape(T, B, S)
        coeff = None if full else torch.cat([a, torch.zeros_like(a[:1])])

        def block_vjp(w: Tensor) -> Tensor:
            (v,) = torch.autograd.grad(out, hp, w[1:].reshape(T * B, S), retain_graph=True)
            v = v.reshape(T, B, S)
            if not full:
                v = v - a * w[1:]
            return torch.cat([v, torch.zeros_like(w[:1])])

        def exact(g: Tensor) -> Tensor:
            w = g.clone()
            for t in range(T, 0, -1):
                w[t - 1] += block_vjp_step(owner.cell, x[t - 1], stacked[t - 1], w[t])
            return w

        g = torch.cat([torch.zeros_like(grad_y[:1]), grad_y])
        if full:
            w, diag = highway_iterate(g, block_vjp, lambda s: s, method, T)
        else:
            w, diag = highway_iterate(
                g,
                block_vjp,
                lambda s: reverse_scan_sequential(s, coeff),
                method,
                T,
                exact_backward=exact,
            )
        owner.last_diagnostics = diag
        inputs = [hp, *params] + ([xs] if ctx.needs_input_grad[0] else [])
        grads = torch.autograd.grad(out, inputs, w[1:].reshape(T * B, S), allow_unused=True)
        param_grads = list(grads[1 : 1 + len(params)])
        dx = grads[-1].reshape(x.shape) if ctx.needs_input_grad[0] else None
        return (dx, w[0], None, None, *param_grads)


def _cell_tensors(cell: nn.Module) -> list[tuple[str, Tensor]]:
    return [*cell.named_parameters(), *cell.named_buffers()]


def _check_cell_versions(cell: nn.Module, versions: list[tuple[str, Tensor, int]]) -> None:
    """Refuse a backward after an in-place change of the cell's parameters or buffers."""
    for name, tensor, saved in versions:
        if tensor._version != saved:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: {name} of the CellRNN cell {type(cell).__name__} is at "
                f"version {tensor._version}; expected version {saved} (its value at the "
                "forward). The backward re-runs the cell, so the gradient would be that of "
                "another model. Call backward before optimizer.step() (or any in-place change "
                "of the cell), or run the forward again."
            )


def _check_rerun(cell: nn.Module, rerun: Tensor, states: Tensor) -> None:
    """The backward's batched re-run of the cell must reproduce the forward's states.

    Its VJPs are taken on that re-run: a cell that is not a deterministic function of
    (x, h) and its parameters (dropout inside it, Python state that changed since the
    forward) would give the gradient of outputs that were never computed. The tolerance
    allows for the rounding of a batched matmul against the per-step ones.
    """
    tol = torch.finfo(states.dtype).eps ** 0.5
    if not torch.allclose(rerun, states, rtol=tol, atol=tol):
        worst = float((rerun - states).abs().max())
        raise RuntimeError(
            f"CellRNN: the cell {type(cell).__name__} gave other outputs when re-run in the "
            f"backward than in the forward (max difference {worst:.3g}). The Highway-BP "
            "backward re-runs the cell on all steps at once, so the cell must be a "
            "deterministic function of (x, h) and its parameters: no dropout or other "
            "randomness inside it (apply dropout to its inputs or outputs outside the "
            "CellRNN), no state that changes between forward and backward; or use "
            "method=Exact() (plain autograd)."
        )


def block_vjp_step(cell: nn.Module, x_t: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """w @ dcell(x_t, h)/dh for one step (the exact sequential backward of CellRNN)."""
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        (v,) = torch.autograd.grad(cell(x_t, h), h, w)
    return v
