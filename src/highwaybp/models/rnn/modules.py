"""`highwaybp.GRU` and `highwaybp.LSTM`: drop-in torch.nn.GRU / torch.nn.LSTM with Highway-BP
through time (same parameter names, shapes and gate order; `load_state_dict` either way)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from highwaybp.core.iteration import Diagnostics
from highwaybp.core.methods import Exact, Method, check_method
from highwaybp.models.rnn.engine import SPLITS, BufferPool, Engine
from highwaybp.models.rnn.function import _LayerRun, _make_engine, apply_layer
from highwaybp.models.rnn.fused import (
    FORWARD_MODES,
    SCAN_CHOICES,
    check_choice,
    fused_layer,
    resolve_paths,
)
from highwaybp.models.rnn.gru import GRUEngine
from highwaybp.models.rnn.lstm import LSTMEngine

ITERATE_MODES = ("fast", "reference")
# Old name of "reference" (it clashed with the `core` package's name): accepted, warned.
_DEPRECATED_ITERATE = {"core": "reference"}


class _HighwayRNNBase(nn.Module):
    """Shared by GRU and LSTM: torch.nn's constructor, parameters and input conventions."""

    mode = ""
    gates = 0
    engine_class: type[Engine] = Engine  # the cell's engine (its `splits`)

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
        record_step_norms: bool = False,
        forward: str = "auto",
        scan: str = "auto",
        split: str = "gate",
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
        self.forward_path = check_choice("forward", forward, FORWARD_MODES)
        self.scan = check_choice("scan", scan, SCAN_CHOICES)
        self.split = self._check_split(split)
        self.record_step_norms = record_step_norms
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

    def _check_split(self, split: str) -> str:
        """One of `engine.SPLITS` that this cell's engine implements (its `splits`)."""
        split = check_choice("split", split, tuple(SPLITS))
        if split not in self.engine_class.splits:
            cells = [c.mode for c in (GRU, LSTM) if split in c.engine_class.splits]
            raise ValueError(
                f"{self.mode}: split={split!r} is implemented for highwaybp."
                f"{'/'.join(cells)} only; this cell's splits are {self.engine_class.splits} "
                f"(default {self.engine_class.splits[0]!r})"
            )
        return split

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
        if getattr(self, "forward_path", "auto") != "auto":
            text += f", forward={self.forward_path!r}"
        if getattr(self, "scan", "auto") != "auto":
            text += f", scan={self.scan!r}"
        if getattr(self, "split", "gate") != "gate":
            text += f", split={self.split!r}"
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
        path, scan = resolve_paths(getattr(self, "forward_path", "auto"),
                                   getattr(self, "scan", "auto"), x.device)  # fmt: skip
        # an attribute set after construction is checked here, whatever path runs
        split = self._check_split(getattr(self, "split", "gate"))
        for layer in range(self.num_layers):
            params = self.layer_params(layer)
            c_init = None if c0 is None else c0[layer]
            run = _LayerRun(self, layer, method, self._pools[layer], self.iterate,
                            bool(getattr(self, "record_step_norms", False)),
                            forward_path=path, scan=scan, split=split)  # fmt: skip
            if path == "fused" and (method.exact or not needs_grad):
                # Exact() on the fused path is torch's own autograd through its kernel
                # (cuDNN's backward on a GPU); without grad, the kernel alone
                out = fused_layer(inp, h0[layer], c_init, *params)
                if needs_grad:
                    self._record_exact_at_backward(layer, method, out)
            elif needs_grad:
                out = apply_layer(inp, h0[layer], c_init, run, *params)
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

    def _record_exact_at_backward(self, layer: int, method: Method, out: Any) -> None:
        """Diagnostics for an Exact() layer run by autograd: recorded when the backward
        reaches the layer's outputs, as the engine's backward records its own."""
        diag = Diagnostics(method=repr(method), stop_reason="exact")

        def hook(grad: Tensor) -> None:
            self._record_diagnostics(layer, diag)

        for t in out if isinstance(out, tuple) else (out,):
            if t.requires_grad:
                t.register_hook(hook)

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
        forward: "auto" (default: "fused" on CUDA, "loop" on CPU), "fused" (per layer
            torch's own fused kernel, cuDNN on CUDA, computes the outputs with no tape; the
            backward recomputes all T steps' gates at once from the stored inputs and
            outputs; Exact() is then torch's autograd through the kernel) or "loop" (our
            tape-free loop, one matmul and four elementwise ops per step, gates stored).
        scan: "auto" (default: "log" on CUDA, "sequential" on CPU), "sequential" (T row
            ops per scan, sweeps by cache-sized chunks of time steps) or "log" (every
            sweep's ops over all T at once, the scans work-efficient log-depth:
            O(log T) ops per iteration instead of O(T), for a GPU's kernel launches).
            Both are exact; the estimates agree to rounding.
        split: what K_t, the part of the step Jacobian J_t = dh_t/dh_{t-1} the iteration's
            scan applies exactly, is: "gate" (default, the paper's: K_t = diag(z_t), the
            update gate) or "diagonal" (K_t = diag(J_t), the gate plus the diagonal of the
            reset and candidate paths, W_hh's three block diagonals, clipped to [-1, 1] so
            that the scan cannot grow: the iteration's VJPs then carry J_t - K_t). One more
            elementwise pass per iteration; exact at k >= T
            either way; on a trained SGD word LM "diagonal" gives a much better gradient at
            small k (docs/rnn.md#the-split-split-what-k_t-is). Exact() does not depend on it.
        record_step_norms: compute each iteration's relative step ||w^j - w^(j-1)|| /
            ||w^j|| into `last_diagnostics.step_norms` for a fixed k too (adaptive methods
            always compute them: their stop test reads them). Off by default: they cost a
            full read of two estimates per iteration. An attribute, read at each forward;
            `core.fidelity.step_norms_recorded(model)` and the k controllers switch it on.

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
    engine_class = GRUEngine

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
    engine_class = LSTMEngine

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
