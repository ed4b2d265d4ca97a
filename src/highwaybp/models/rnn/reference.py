"""Readable references beside the fast path: the cells in plain autograd (`GRUCellRef`,
`LSTMCellRef`, the same math as the engines) and `CellRNN`, the Highway iteration for any
cell that declares its residual gate, with autograd VJPs on [T*B] rows. The fast engines
and `highwaybp.GRU`/`LSTM` are tested against these (and against torch.nn)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from highwaybp.core.iteration import Diagnostics, highway_iterate
from highwaybp.core.methods import Exact, Method, check_method, register_method_function
from highwaybp.core.scan import reverse_scan_sequential


class GRUCellRef(nn.Module):
    """torch.nn.GRUCell's math in plain autograd ops, with its declared residual gate.

    Same parameter names and shapes as torch.nn.GRUCell (load its state_dict).
    forward(x [N, In], h [N, H]) -> h' [N, H]; residual_gate(x, h) -> z [N, H] = diag(K).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        _ref_params(self, input_size, hidden_size, 3, bias)

    def _gates(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gi = nn.functional.linear(x, self.weight_ih, self.bias_ih)
        gh = nn.functional.linear(h, self.weight_hh, self.bias_hh)
        ir, iz, i_n = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * hn)
        return r, z, n

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        _, z, n = self._gates(x, h)
        return (1 - z) * n + z * h

    def residual_gate(self, x: Tensor, h: Tensor) -> Tensor:
        return self._gates(x, h)[1]


def _ref_params(m: nn.Module, input_size: int, hidden_size: int, gates: int, bias: bool) -> None:
    bound = hidden_size**-0.5

    def make(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

    m.weight_ih = make(gates * hidden_size, input_size)
    m.weight_hh = make(gates * hidden_size, hidden_size)
    m.bias_ih = make(gates * hidden_size) if bias else None
    m.bias_hh = make(gates * hidden_size) if bias else None


class LSTMCellRef(nn.Module):
    """torch.nn.LSTMCell's math on a concatenated state s = [c, h] ([N, 2H]).

    Same parameter names and shapes as torch.nn.LSTMCell.
    forward(x, s) -> s'; residual_gate(x, s) -> [f, 0] (K = diag(f) on c, 0 on h).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        _ref_params(self, input_size, hidden_size, 4, bias)

    def _gates(self, x: Tensor, s: Tensor) -> tuple[Tensor, ...]:
        c, h = s.chunk(2, -1)
        a = nn.functional.linear(x, self.weight_ih, self.bias_ih) + nn.functional.linear(
            h, self.weight_hh, self.bias_hh
        )
        ai, af, ag, ao = a.chunk(4, -1)
        return c, torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag), torch.sigmoid(ao)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        c, i, f, g, o = self._gates(x, s)
        c_new = f * c + i * g
        return torch.cat([c_new, o * torch.tanh(c_new)], -1)

    def residual_gate(self, x: Tensor, s: Tensor) -> Tensor:
        _, _, f, _, _ = self._gates(x, s)
        return torch.cat([f, torch.zeros_like(f)], -1)




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

    def __init__(
        self, cell: nn.Module, method: Method | None = None, record_step_norms: bool = False
    ) -> None:
        super().__init__()
        self.cell = cell
        self.method = check_method(Exact() if method is None else method)
        self.record_step_norms = record_step_norms  # as GRU/LSTM: fixed k records on request
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
        if method.exact or not torch.is_grad_enabled():
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
    if (not method.exact and method.keeps_residual
            and not callable(getattr(cell, "residual_gate", None))):
        raise TypeError(
            f"cell {type(cell).__name__} declares no residual gate, so Highway-BP does not know "
            "its K: add a method residual_gate(x, h) -> [N, S] returning the diagonal of the "
            "residual part of dh'/dh (GRU: the update gate z), or use method=FixedPoint(k)"
        )


@register_method_function
class _CellFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, h0: Tensor, owner: CellRNN, method: Method, *params):
        states = [h0]
        for x_t in x.unbind(0):
            states.append(owner.cell(x_t, states[-1]))
        stacked = torch.stack(states)
        ctx.owner, ctx.method = owner, method
        ctx.record_steps = bool(getattr(owner, "record_step_norms", False))
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
        full = not method.keeps_residual
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
            w, diag = highway_iterate(g, block_vjp, lambda s: s, method, T,
                                      record_steps=ctx.record_steps)
        else:
            w, diag = highway_iterate(
                g,
                block_vjp,
                lambda s: reverse_scan_sequential(s, coeff),
                method,
                T,
                exact_backward=exact,
                record_steps=ctx.record_steps,
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


# ---- the autograd-loop baseline ---------------------------------------------------------


class AutogradLoopRNN(nn.Module):
    """torch.nn.GRU/LSTM's math in autograd ops looped over time (the paper's BPTT baseline,
    the one `highwaybp bench rnn` times as "autograd-loop"). Time-major x [T, B, In] ->
    the last layer's outputs [T, B, H], from zero initial states.

    Same parameters as torch.nn.GRU/LSTM (load its state_dict). Written for speed: one input
    projection matmul for all steps, `unbind` over time, fused sigmoids.
    """

    def __init__(self, cell: str, ref: nn.Module) -> None:
        super().__init__()
        self.cell, self.num_layers, self.hidden = cell, ref.num_layers, ref.hidden_size
        for name, p in ref.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, x: Tensor) -> Tensor:
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = (
                getattr(self, f"{n}_l{layer}")
                for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            )
            T, B, _ = x.shape
            gi = torch.addmm(b_ih, x.reshape(T * B, -1), w_ih.t()).view(T, B, -1)
            step = self._gru if self.cell == "gru" else self._lstm
            x = step(gi, w_hh, b_hh, B)
        return x

    def _gru(self, gi: Tensor, w_hh: Tensor, b_hh: Tensor, batch: int) -> Tensor:
        H = self.hidden
        h = gi.new_zeros(batch, H)
        w_t, outs = w_hh.t(), []
        for gi_t in gi.unbind(0):
            gh = torch.addmm(b_hh, h, w_t)
            rz = torch.sigmoid(gi_t[:, : 2 * H] + gh[:, : 2 * H])
            r, z = rz[:, :H], rz[:, H:]
            n = torch.tanh(torch.addcmul(gi_t[:, 2 * H :], r, gh[:, 2 * H :]))
            h = torch.addcmul(n, z, h - n)
            outs.append(h)
        return torch.stack(outs)

    def _lstm(self, gi: Tensor, w_hh: Tensor, b_hh: Tensor, batch: int) -> Tensor:
        H = self.hidden
        h = gi.new_zeros(batch, H)
        c = gi.new_zeros(batch, H)
        gi = gi + b_hh
        w_t, outs = w_hh.t(), []
        for gi_t in gi.unbind(0):
            a = torch.addmm(gi_t, h, w_t)
            ifo = torch.sigmoid(a[:, : 2 * H])
            g = torch.tanh(a[:, 2 * H : 3 * H])
            o = torch.sigmoid(a[:, 3 * H :])
            c = torch.addcmul(ifo[:, H:] * c, ifo[:, :H], g)
            h = o * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs)
