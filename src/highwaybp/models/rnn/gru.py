"""The GRU engine (torch gate order r, z, n):

    r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)
    z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
    h' = (1 - z) * n + z * h

Highway split: K_t = diag(z_t). torch's z is the *kept* fraction (the paper writes the GRU
with the roles swapped, K = diag(1 - z)); the code follows torch. Adjoint states are
[T+1, B, H]. `reference.GRUCellRef` is the same math in plain autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from highwaybp.models.rnn.engine import Engine, _addmm_or_mm


class GRUEngine(Engine):
    """GRU forward with stored gates, and the Highway-BP operators on them."""

    num_gates = 3
    state_parts = 1

    def forward(self) -> Tensor:
        """Run the recurrence; returns the states h_0..h_T [T+1, B, H] (a fresh tensor)."""
        T, B, H = self.T, self.B, self.H
        x = self.x
        states = x.new_empty((T + 1, B, H))
        states[0] = self.h0
        # A holds x W_ih^T + b_ih, then (in place) the gates [r, z, n]; HH holds h W_hh^T + b_hh.
        A = self.take(T, B, 3 * H)
        HH = self.take(T, B, 3 * H)
        _addmm_or_mm(self.b_ih, x.reshape(T * B, self.In), self.w_ih.t(), A.view(T * B, 3 * H))
        w_t = self.w_hh.t()
        b_hh = self.b_hh
        hs = states.unbind(0)
        rows_a, rows_hh = A.unbind(0), HH.unbind(0)
        h2 = 2 * H
        for t in range(T):
            a, hh, h = rows_a[t], rows_hh[t], hs[t]
            _addmm_or_mm(b_hh, h, w_t, hh)
            rz = a[:, :h2]
            rz.add_(hh[:, :h2]).sigmoid_()
            n = a[:, h2:]
            n.addcmul_(a[:, :H], hh[:, h2:]).tanh_()
            d = hh[:, H:h2]  # h W_hz^T + b_hz is used up: keep h - n there for the backward
            torch.sub(h, n, out=d)
            torch.addcmul(n, a[:, H:h2], d, out=hs[t + 1])
        self.states, self.A, self.HH = states, A, HH
        return states

    @property
    def z(self) -> Tensor:
        """Update gates z_1..z_T [T, B, H] (K_t = diag(z_t)); valid before and after prepare."""
        return self.A[..., self.H : 2 * self.H]

    def prepare(self) -> None:
        """Gates -> coefficients, in place: HH <- Ph = [Pr, Pz, Pn r], A's n slot <- Pn.

        Pz = (h - n) z (1 - z), Pn = (1 - z)(1 - n^2), Pr = Pn hn r (1 - r). With
        w = dLoss/dh_t the hh-side pre-activation adjoint is w * Ph (so the block VJP is
        (w * Ph) @ W_hh) and the x-side one is [w Pr, w Pz, w Pn]. Nine memory passes.
        """
        if self.prepared:
            return
        H = self.H
        self._chunk_buffers()
        for c0, c1 in self.chunks():  # by chunks of time steps: the 9 ops run in cache
            A, HH = self.A[c0:c1], self.HH[c0:c1]
            r, z, n = A[..., :H], A[..., H : 2 * H], A[..., 2 * H :]
            pr, pz, pnr = HH[..., :H], HH[..., H : 2 * H], HH[..., 2 * H :]  # pz: h - n
            s = self.chunk_scratch[: c1 - c0]
            torch.addcmul(z, z, z, value=-1.0, out=s)  # z (1 - z)
            pz.mul_(s)
            torch.sub(self.one, z, out=s)  # 1 - z
            n.mul_(n)
            torch.addcmul(s, s, n, value=-1.0, out=n)  # Pn
            torch.addcmul(r, r, r, value=-1.0, out=s)  # r (1 - r)
            torch.mul(n, pnr, out=pr)  # Pn hn (pnr still holds hn)
            pr.mul_(s)
            torch.mul(n, r, out=pnr)
        self.pn = self.A[..., 2 * H :]
        self.coeff_by_gate = self.HH.view(self.T, self.B, 3, H)  # [T, B, 3, H]: Pr, Pz, Pn r
        self.prepared = True

    def sweep(
        self,
        w: Tensor,
        out: Tensor,
        full: bool,
        with_loss: bool = False,
        scan: bool = False,
        norms: bool = False,
    ) -> Optional[tuple[float, float]]:
        """out <- [scan](v + [g]) with v_i = w_{i+1} J_{i+1} (full: w_{i+1} df_{i+1}/dh_i)
        for i < T and v_T = 0, chunk by chunk from the end. With norms, returns
        (||out - w||, ||out||). One Highway iteration is sweep(w, out, False, True, True, True).
        """
        T, B, H = self.T, self.B, self.H
        if with_loss:
            out[T].copy_(self.grad_y[T - 1])
        else:
            out[T].zero_()
        acc: list[Tensor] = []
        if norms:
            self._sq(out[T:], w[T:], acc)
        rows, zs = out.unbind(0), self.z.unbind(0)
        for s, e in self.chunks():
            n = e - s
            gate_adj_g = self.gate_adj_by_gate[:n]
            torch.mul(w[s + 1 : e + 1].unsqueeze(2), self.coeff_by_gate[s:e], out=gate_adj_g)
            oc = out[s:e]
            torch.mm(self.gate_adj[:n].view(n * B, 3 * H), self.w_hh, out=oc.view(n * B, H))
            if full:
                oc.addcmul_(self.z[s:e], w[s + 1 : e + 1])
            if with_loss:
                self._add_loss_rows_(oc, s, e)
            if scan:
                for i in range(e - 1, s - 1, -1):
                    rows[i].addcmul_(zs[i], rows[i + 1])
            if norms:
                self._sq(oc, w[s:e], acc)
        return self._norms(acc) if norms else None

    def block_vjp(self, w: Tensor, out: Tensor, full: bool) -> Tensor:
        """out_i = w_{i+1} J_{i+1} (full: w_{i+1} df_{i+1}/dh_i) for i < T, out_T = 0."""
        self.sweep(w, out, full)
        return out

    def scan_(self, x: Tensor) -> Tensor:
        """In place: x_i += z_{i+1} * x_{i+1}, from i = T-1 down to 0."""
        rows = x.unbind(0)
        zs = self.z.unbind(0)
        for i in range(self.T - 1, -1, -1):
            rows[i].addcmul_(zs[i], rows[i + 1])
        return x

    def exact_backward(self, out: Tensor) -> Tensor:
        """Sequential BPTT on the stored gates (one step's gate adjoints in a scratch row)."""
        gs = self._loss_rows()
        out[-1].copy_(gs[-1])
        ws, zs, coeffs_t = out.unbind(0), self.z.unbind(0), self.coeff_by_gate.unbind(0)
        gate_adj_g, g2 = self.gate_adj_by_gate[0], self.gate_adj[0]
        w_hh = self.w_hh
        for t in range(self.T, 0, -1):
            torch.mul(ws[t].unsqueeze(1), coeffs_t[t - 1], out=gate_adj_g)
            torch.addmm(gs[t - 1], g2, w_hh, out=ws[t - 1])
            ws[t - 1].addcmul_(zs[t - 1], ws[t])
        return out

    def param_grads(self, w: Tensor, need_x: bool):
        """(dx, dW_ih, dW_hh, db_ih, db_hh) from the adjoints w [T+1, B, H], by chunks."""
        B, H = self.B, self.H
        acc = self._param_accumulators(need_x)
        for s, e in self.chunks():
            n = e - s
            gate_adj_g = self.gate_adj_by_gate[:n]
            g2 = self.gate_adj[:n].view(n * B, 3 * H)
            torch.mul(w[s + 1 : e + 1].unsqueeze(2), self.coeff_by_gate[s:e], out=gate_adj_g)
            self._accumulate(acc, "hh", g2, s, e)
            # the x side differs only in the n block: w Pn instead of w Pn r
            torch.mul(w[s + 1 : e + 1], self.pn[s:e], out=gate_adj_g[:, :, 2])
            self._accumulate(acc, "ih", g2, s, e)
        return self._result(acc)
