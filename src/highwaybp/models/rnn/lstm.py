"""The LSTM engine (torch gate order i, f, g, o), state (c, h):

    c' = f * c + i * g,   h' = o * tanh(c');   K_t = diag(f_t) on c, 0 on h.

Adjoint states are [2, T+1, B, H] (index 0: the cell state c, 1: h); `layer_major` views
them as [T+1, ...]. `reference.LSTMCellRef` is the same math in plain autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from highwaybp.models.rnn.engine import Engine, _sum_or_none, matmul_into, packed_linear


class LSTMEngine(Engine):
    """LSTM forward with stored gates, and the Highway-BP operators on them."""

    num_gates = 4
    state_parts = 2

    def __init__(self, pool, x, h0, c0, w_ih, w_hh, b_ih, b_hh, scan="sequential",
                 split="gate") -> None:
        super().__init__(pool, x, h0, w_ih, w_hh, b_ih, b_hh, scan, split)
        self.c0 = c0

    def forward(self) -> tuple[Tensor, Tensor]:
        """Run the recurrence; returns (h_0..h_T [T+1, B, H] fresh, c_T [B, H] fresh)."""
        T, B, H = self.T, self.B, self.H
        x = self.x
        states = x.new_empty((T + 1, B, H))
        states[0] = self.h0
        C = self.take(T + 1, B, H)
        C[0] = self.c0
        TC = self.take(T, B, H)
        A = self._input_projection()
        w_t = self.w_hh.t()
        linear = packed_linear(self.w_hh, B)
        hs, cs, tcs, rows = states.unbind(0), C.unbind(0), TC.unbind(0), A.unbind(0)
        h2, h3 = 2 * H, 3 * H
        for t in range(T):
            a = rows[t]
            if linear is None:
                a.addmm_(hs[t], w_t)
                a[:, :h2].sigmoid_()
                g = a[:, h2:h3].tanh_()
                o = a[:, h3:].sigmoid_()
            else:  # the pre-activations come fresh from oneDNN (add fused): gates into a
                pre = linear.plus(hs[t], a)
                torch.sigmoid(pre[:, :h2], out=a[:, :h2])
                g = torch.tanh(pre[:, h2:h3], out=a[:, h2:h3])
                o = torch.sigmoid(pre[:, h3:], out=a[:, h3:])
            c = cs[t + 1]
            torch.mul(a[:, H:h2], cs[t], out=c)
            c.addcmul_(a[:, :H], g)
            torch.tanh(c, out=tcs[t])
            torch.mul(o, tcs[t], out=hs[t + 1])
        self.states, self.C, self.TC, self.A = states, C, TC, A
        return states, C[-1].clone()

    def _input_projection(self) -> Tensor:
        """A [T, B, 4H] <- x W_ih^T + b_ih + b_hh for every step (one matmul, pooled)."""
        T, B, H = self.T, self.B, self.H
        A = self.take(T, B, 4 * H)  # x W_ih^T + b_ih + b_hh, then + h W_hh^T, then the gates
        bias = _sum_or_none(self.b_ih, self.b_hh)
        matmul_into(self.x.reshape(T * B, self.In), self.w_ih, A.view(T * B, 4 * H), bias,
                    self.onednn)  # fmt: skip
        return A

    def _recompute_gates(self) -> None:
        """The fused forward's backward: the gates of all T steps at once from x and the
        kernel's outputs (one [T*B, In] and one [T*B, H] matmul, three activations), then
        the cell states c_t = f_t c_{t-1} + i_t g_t, which the fused kernel does not return,
        by the engine's time scan (log-depth with scan="log"), and tanh(c)."""
        T, B, H = self.T, self.B, self.H
        self.states = self._states_from_fused()
        A = self._input_projection()
        A.view(T * B, 4 * H).addmm_(self.states[:T].reshape(T * B, H), self.w_hh.t())
        A[..., : 2 * H].sigmoid_()
        A[..., 2 * H : 3 * H].tanh_()
        A[..., 3 * H :].sigmoid_()
        C = self.take(T + 1, B, H)
        C[0].copy_(self.c0)
        torch.mul(A[..., :H], A[..., 2 * H : 3 * H], out=C[1:])  # i g
        self._forward_scan_(C, A[..., H : 2 * H])  # c_t = i_t g_t + f_t c_{t-1}
        TC = torch.tanh(C[1:], out=self.take(T, B, H))
        self.C, self.TC, self.A = C, TC, A

    @property
    def f(self) -> Tensor:
        """Forget gates f_1..f_T [T, B, H] (K_t = diag(f_t) on c): in the gates until
        `prepare`, which moves them into the c_0..c_{T-1} rows it no longer needs."""
        if self.prepared:
            return self.C[: self.T]
        return self.A[..., self.H : 2 * self.H]

    def prepare(self) -> None:
        """Gates -> P = [g i(1-i), c_prev f(1-f), i(1-g^2), tanh(c) o(1-o)], Q = o(1-tanh(c)^2),
        in place: P over the gates A, Q over tanh(c), and f over c_0..c_{T-1} (row t of C is
        read only by step t+1's P_f). No [T, B, 4H] buffer of its own: torch.nn.LSTM keeps
        about as much (its workspace), so the engine's memory stays below it.

        With (wc, wh) the adjoints of (c_t, h_t): dc = wc + wh Q and the pre-activation
        adjoint is [dc P_i, dc P_f, dc P_g, wh P_o]; dLoss/dc_{t-1} = dc f.
        """
        if self.prepared:
            return
        if self.fused_y is not None:
            self._recompute_gates()
        H = self.H
        self._chunk_buffers()
        for c0, c1 in self.chunks():  # by chunks of time steps: the ops run in cache
            A, tc, c_prev = self.A[c0:c1], self.TC[c0:c1], self.C[c0:c1]
            i, f, g, o = A[..., :H], A[..., H : 2 * H], A[..., 2 * H : 3 * H], A[..., 3 * H :]
            s = self.chunk_scratch[: c1 - c0]
            s.copy_(f)
            torch.addcmul(f, f, f, value=-1.0, out=f)  # f (1 - f)
            f.mul_(c_prev)  # P_f
            c_prev.copy_(s)  # f, where `self.f` reads it from now on
            torch.mul(g, g, out=s)
            torch.addcmul(i, i, s, value=-1.0, out=s)  # i (1 - g^2) = P_g
            torch.addcmul(i, i, i, value=-1.0, out=i)
            i.mul_(g)  # P_i
            g.copy_(s)
            torch.mul(tc, tc, out=s)
            torch.addcmul(o, o, s, value=-1.0, out=s)  # o (1 - tanh(c)^2) = Q
            torch.addcmul(o, o, o, value=-1.0, out=o)
            o.mul_(tc)  # P_o
            tc.copy_(s)
        self.Q = self.TC
        self.coeff_by_gate = self.A.view(self.T, self.B, 4, H)  # [T, B, 4, H]: P_i, P_f, P_g, P_o
        self.cell_adj = self.take(self.chunk, self.B, H)  # [chunk, B, H] adjoint of c
        self.prepared = True

    def _gate_adjoints(self, w: Tensor, s: int, e: int) -> Tensor:
        """gc[:e-s] <- pre-activation adjoints of steps s+1..e from w [2, T+1, B, H];
        returns dc = dLoss/dc_t (before the forget gate) for those steps."""
        n = e - s
        wc, wh = w[0, s + 1 : e + 1], w[1, s + 1 : e + 1]
        dc = torch.addcmul(wc, wh, self.Q[s:e], out=self.cell_adj[:n])
        gate_adj_g = self.gate_adj_by_gate[:n]
        torch.mul(dc.unsqueeze(2), self.coeff_by_gate[s:e, :, :3], out=gate_adj_g[:, :, :3])
        torch.mul(wh, self.coeff_by_gate[s:e, :, 3], out=gate_adj_g[:, :, 3])
        return dc

    def sweep(
        self,
        w: Tensor,
        out: Tensor,
        full: bool,
        with_loss: bool = False,
        scan: bool = False,
        norms: bool = False,
    ) -> Optional[tuple[float, float]]:
        """As GRUEngine.sweep on the (c, h) adjoints [2, T+1, B, H]."""
        T = self.T
        if with_loss:
            out[1, T].copy_(self.grad_y[T - 1])
            if self.grad_c is None:
                out[0, T].zero_()
            else:
                out[0, T].copy_(self.grad_c)
        else:
            out[:, T].zero_()
        acc: list[Tensor] = []
        if norms:
            self._sq(out[0, T:], w[0, T:], acc)
            self._sq(out[1, T:], w[1, T:], acc)
        rows, fs = out[0].unbind(0), self.f.unbind(0)
        for s, e in self.chunks():
            n = e - s
            dc = self._gate_adjoints(w, s, e)
            oh, oc = out[1, s:e], out[0, s:e]
            self._block_matmul(n, oh)
            if full:
                torch.mul(dc, self.f[s:e], out=oc)
            else:  # c part of J: dc f - wc f = wh Q f
                torch.mul(w[1, s + 1 : e + 1], self.Q[s:e], out=oc)
                oc.mul_(self.f[s:e])
            if with_loss:
                self._add_loss_rows_(oh, s, e)
            if scan and self.log_scan:  # one chunk: s = 0, e = T
                self._reverse_scan_(out[0, s : e + 1], self.f[s:e])
            elif scan:
                for i in range(e - 1, s - 1, -1):
                    rows[i].addcmul_(fs[i], rows[i + 1])
            if norms:
                self._sq(oc, w[0, s:e], acc)
                self._sq(oh, w[1, s:e], acc)
        return self._norms(acc) if norms else None

    def block_vjp(self, w: Tensor, out: Tensor, full: bool) -> Tensor:
        """out[:, i] = w_{i+1} J_{i+1} (full: the whole layer VJP) for i < T, 0 at i = T."""
        self.sweep(w, out, full)
        return out

    def scan_(self, x: Tensor) -> Tensor:
        """In place on the c part: x_i += f_{i+1} x_{i+1}; the h part has K = 0."""
        self._reverse_scan_(x[0], self.f)
        return x

    def exact_backward(self, out: Tensor) -> Tensor:
        """Sequential BPTT on the stored gates."""
        ghs = self._loss_rows()
        out[1, -1].copy_(ghs[-1])
        if self.grad_c is None:
            out[0, -1].zero_()
        else:
            out[0, -1].copy_(self.grad_c)
        wcs, whs = out[0].unbind(0), out[1].unbind(0)
        qs, fs, coeffs_t = self.Q.unbind(0), self.f.unbind(0), self.coeff_by_gate.unbind(0)
        dc, gate_adj_g, g2 = self.cell_adj[0], self.gate_adj_by_gate[0], self.gate_adj[0]
        w_hh = self.w_hh
        linear = packed_linear(w_hh.t(), self.B)
        for t in range(self.T, 0, -1):
            torch.addcmul(wcs[t], whs[t], qs[t - 1], out=dc)
            torch.mul(dc.unsqueeze(1), coeffs_t[t - 1][:, :3], out=gate_adj_g[:, :3])
            torch.mul(whs[t], coeffs_t[t - 1][:, 3], out=gate_adj_g[:, 3])
            if linear is None:
                torch.addmm(ghs[t - 1], g2, w_hh, out=whs[t - 1])
            else:
                torch.add(ghs[t - 1], linear(g2), out=whs[t - 1])
            torch.mul(dc, fs[t - 1], out=wcs[t - 1])  # no loss on c_{t-1} for t - 1 < T
        return out

    def param_grads(self, w: Tensor, need_x: bool):
        """(dx, dW_ih, dW_hh, db_ih, db_hh) from the adjoints w [2, T+1, B, H], by chunks.

        Both biases see the same adjoint, so one sum serves both.
        """
        B, H = self.B, self.H
        acc = self._param_accumulators(need_x)
        shared_bias = acc["b_ih"] is not None and acc["b_hh"] is not None
        if shared_bias:
            acc["b_ih"] = None
        for s, e in self.chunks():
            n = e - s
            self._gate_adjoints(w, s, e)
            g2 = self.gate_adj[:n].view(n * B, 4 * H)
            self._accumulate(acc, "hh", g2, s, e)
            self._accumulate(acc, "ih", g2, s, e)
        if shared_bias:
            acc["b_ih"] = acc["b_hh"].clone()
        return self._result(acc)
