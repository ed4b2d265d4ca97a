"""The GRU engine (torch gate order r, z, n):

    r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)
    z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
    h' = (1 - z) * n + z * h

Highway split (`split="gate"`, the paper's): K_t = diag(z_t). torch's z is the *kept*
fraction (the paper writes the GRU with the roles swapped, K = diag(1 - z)); the code follows
torch. `split="diagonal"`: K_t = diag(J_t), the whole diagonal of the step Jacobian
dh_t/dh_{t-1}: z_t + Pr diag(W_hr) + Pz diag(W_hz) + Pn r diag(W_hn) (the coefficients of
`prepare`), clipped to [-1, 1]; the sweeps then multiply by W_hh with those diagonals zeroed
and add back the clipped excess (`_jacobian_diagonal`). Adjoint states are
[T+1, B, H]. `reference.GRUCellRef` is the same math in plain autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from highwaybp.models.rnn.engine import Engine, _sum_or_none, matmul_into, packed_linear


class GRUEngine(Engine):
    """GRU forward with stored gates, and the Highway-BP operators on them."""

    num_gates = 3
    state_parts = 1
    splits = ("gate", "diagonal")
    _keep: Optional[Tensor] = None  # K_t, set by prepare (gate) or `keep` (diagonal)
    _excess: Optional[Tensor] = None  # diag(J_t) - K_t where the diagonal split clips

    def forward(self) -> Tensor:
        """Run the recurrence; returns the states h_0..h_T [T+1, B, H] (a fresh tensor).

        The loop does only what the recurrence needs, in one matmul and four elementwise ops
        per step (each small op costs several microseconds at these sizes, as much as a
        third of the matmul): G_t = [x W_ir^T + b_ir + b_hr, x W_iz^T + b_iz + b_hz, b_hn]
        is precomputed for all t, so one in-place addmm gives [pre_r, pre_z, hn] with
        hn = h W_hn^T + b_hn; one sigmoid gives r and z; n = tanh(N_t + r hn) with
        N_t = x W_in^T + b_in in place; h' = lerp(n, h, z) = n + z (h - n). What only the
        backward needs (h - n, the coefficients) is computed by `prepare`, batched over T.
        """
        T, B, H = self.T, self.B, self.H
        h2 = 2 * H
        states = self.x.new_empty((T + 1, B, H))
        states[0] = self.h0
        G, N = self._input_projections()
        w_t = self.w_hh.t()
        step_linear = packed_linear(self.w_hh, B)
        hs, rows_g, rows_n = states.unbind(0), G.unbind(0), N.unbind(0)
        for t in range(T):
            g, n, h = rows_g[t], rows_n[t], hs[t]
            if step_linear is None:
                g.addmm_(h, w_t)
            else:
                g.add_(step_linear(h))
            g[:, :h2].sigmoid_()
            n.addcmul_(g[:, :H], g[:, h2:]).tanh_()
            torch.lerp(n, h, g[:, H:h2], out=hs[t + 1])
        self.states, self.G, self.N = states, G, N
        self.Z = None
        return states

    def _input_projections(self) -> tuple[Tensor, Tensor]:
        """G [T, B, 3H] <- [x W_ir^T + b_ir + b_hr, x W_iz^T + b_iz + b_hz, b_hn] and
        N [T, B, H] <- x W_in^T + b_in: every step's input side, two matmuls (pooled)."""
        T, B, H = self.T, self.B, self.H
        h2 = 2 * H
        x2 = self.x.reshape(T * B, self.In)
        G = self.take(T, B, 3 * H)  # [pre_r, pre_z, hn] -> [r, z, hn] -> (prepare) coefficients
        N = self.take(T, B, H)  # x W_in^T + b_in -> n -> (prepare) Pn
        G2 = G.view(T * B, 3 * H)
        w_ih, b_ih, b_hh = self.w_ih, self.b_ih, self.b_hh
        bias_rz = _sum_or_none(None if b_ih is None else b_ih[:h2],
                               None if b_hh is None else b_hh[:h2])  # fmt: skip
        matmul_into(x2, w_ih[:h2], G2[:, :h2], bias_rz, self.onednn)
        if b_hh is None:
            G2[:, h2:].zero_()
        else:
            G2[:, h2:].copy_(b_hh[h2:].expand(T * B, H))
        matmul_into(x2, w_ih[h2:], N.view(T * B, H), None if b_ih is None else b_ih[h2:],
                    self.onednn)  # fmt: skip
        return G, N

    def _recompute_gates(self) -> None:
        """The fused forward's backward: the gates of all T steps at once from x and the
        kernel's outputs (h_{t-1} is the previous output), into the buffers `forward` fills:
        the input side (`_input_projections`), one [T*B, H] x [H, 3H] matmul for h W_hh^T,
        one sigmoid, n = tanh(N + r hn)."""
        T, B, H = self.T, self.B, self.H
        self.states = self._states_from_fused()
        G, N = self._input_projections()
        G.view(T * B, 3 * H).addmm_(self.states[:T].reshape(T * B, H), self.w_hh.t())
        G[..., : 2 * H].sigmoid_()
        N.addcmul_(G[..., :H], G[..., 2 * H :]).tanh_()
        self.G, self.N, self.Z = G, N, None

    @property
    def z(self) -> Tensor:
        """Update gates z_1..z_T [T, B, H] (K_t = diag(z_t)); valid before and after prepare."""
        return self.G[..., self.H : 2 * self.H] if self.Z is None else self.Z

    def prepare(self) -> None:
        """Gates -> coefficients, in place: G <- [Pr, Pz, Pn r], N <- Pn, z into its own buffer.

        Pz = (h - n) z (1 - z), Pn = (1 - z)(1 - n^2), Pr = Pn hn r (1 - r). With
        w = dLoss/dh_t the hh-side pre-activation adjoint is w * [Pr, Pz, Pn r] (so the
        block VJP is that @ W_hh) and the x-side one is [w Pr, w Pz, w Pn]. Eleven memory
        passes, by chunks of time steps so that they run in cache.
        """
        if self.prepared:
            return
        if self.fused_y is not None:
            self._recompute_gates()
        H = self.H
        self._chunk_buffers()
        Z = self.take(self.T, self.B, H)
        s2 = self.take(self.chunk, self.B, H)
        for c0, c1 in self.chunks():
            G = self.G[c0:c1]
            r, z, hn = G[..., :H], G[..., H : 2 * H], G[..., 2 * H :]
            n, zc, h = self.N[c0:c1], Z[c0:c1], self.states[c0:c1]
            s, t = self.chunk_scratch[: c1 - c0], s2[: c1 - c0]
            zc.copy_(z)
            torch.sub(h, n, out=s)  # h - n
            torch.addcmul(z, z, z, value=-1.0, out=t)  # z (1 - z)
            torch.mul(s, t, out=z)  # Pz
            torch.sub(self.one, zc, out=t)  # 1 - z
            n.mul_(n)
            torch.addcmul(t, t, n, value=-1.0, out=n)  # Pn
            torch.addcmul(r, r, r, value=-1.0, out=s)  # r (1 - r)
            s.mul_(hn)
            torch.mul(n, r, out=hn)  # Pn r
            torch.mul(s, n, out=r)  # Pr
        self.give_back(s2)
        self.Z = Z
        self.pn = self.N
        self.coeff_by_gate = self.G.view(self.T, self.B, 3, H)  # [T, B, 3, H]: Pr, Pz, Pn r
        # split "diagonal": K_t and the clipped excess, formed when a sweep first needs them
        # (Exact() and FixedPoint never scan by K)
        self._keep, self._excess = (Z, None) if self.split == "gate" else (None, None)
        self.prepared = True

    @property
    def keep(self) -> Tensor:
        """K_t [T, B, H], the scan's coefficients: z_t (split "gate"; valid before and after
        prepare, as `z`) or diag(J_t) clipped to [-1, 1] (split "diagonal"; prepares and
        forms it if needed)."""
        if self.split == "gate":
            return self.z
        if not self.prepared:
            self.prepare()
        if self._keep is None:
            self._keep, self._excess = self._jacobian_diagonal()
        return self._keep

    def _jacobian_diagonal(self) -> tuple[Tensor, Tensor]:
        """(K, E) [T, B, H]: K = diag(J_t) clipped to [-1, 1] and E = diag(J_t) - K.

        diag(J_t) = z_t + sum over the gates of coefficient * diag(W_h.): the entries of
        w (J_t - diag(z_t)) = (w * [Pr, Pz, Pn r]) @ W_hh where row and column are the same
        unit j. Why the clip: the scan multiplies K along time, which is stable only for
        |K| <= 1 (z always is); a diagonal above 1 (a unit's own recurrent weight large,
        cancelled by its neighbours) would grow the scan like prod |K_t|. The clipped part
        E stays in the sweeps' remainder (J - K = (J - diag J) + E), so the estimate is
        still exact at k >= T."""
        H = self.H
        diag = self.w_hh.reshape(3, H, H).diagonal(dim1=1, dim2=2)  # [3, H]: W_hr, W_hz, W_hn
        keep, excess = self.take(self.T, self.B, H), self.take(self.T, self.B, H)
        c = self.coeff_by_gate
        torch.addcmul(self.Z, c[:, :, 0], diag[0], out=excess)
        excess.addcmul_(c[:, :, 1], diag[1]).addcmul_(c[:, :, 2], diag[2])  # diag(J_t)
        torch.clamp(excess, -1.0, 1.0, out=keep)
        excess.sub_(keep)
        return keep, excess

    def sweep(
        self,
        w: Tensor,
        out: Tensor,
        full: bool,
        with_loss: bool = False,
        scan: bool = False,
        norms: bool = False,
    ) -> Optional[tuple[float, float]]:
        """out <- [scan](v + [g]) with v_i = w_{i+1} (J_{i+1} - K_{i+1}) (full: w_{i+1}
        df_{i+1}/dh_i) for i < T and v_T = 0, chunk by chunk from the end; the scan is by K
        (`self.keep`). With norms, returns (||out - w||, ||out||). One Highway iteration is
        sweep(w, out, False, True, True, True).
        """
        T = self.T
        if with_loss:
            out[T].copy_(self.grad_y[T - 1])
        else:
            out[T].zero_()
        acc: list[Tensor] = []
        if norms:
            self._sq(out[T:], w[T:], acc)
        keep = self.z if full else self.keep  # forms the diagonal split's K and E if needed
        rows, keeps = out.unbind(0), keep.unbind(0)
        for s, e in self.chunks():
            n = e - s
            gate_adj_g = self.gate_adj_by_gate[:n]
            torch.mul(w[s + 1 : e + 1].unsqueeze(2), self.coeff_by_gate[s:e], out=gate_adj_g)
            oc = out[s:e]
            self._block_matmul(n, oc, full)
            if full:
                oc.addcmul_(self.z[s:e], w[s + 1 : e + 1])
            elif self._excess is not None:  # split "diagonal": the clipped part of diag(J)
                oc.addcmul_(self._excess[s:e], w[s + 1 : e + 1])
            if with_loss:
                self._add_loss_rows_(oc, s, e)
            if scan and self.log_scan:  # one chunk: s = 0, e = T
                self._reverse_scan_(out[s : e + 1], keep[s:e])
            elif scan:
                for i in range(e - 1, s - 1, -1):
                    rows[i].addcmul_(keeps[i], rows[i + 1])
            if norms:
                self._sq(oc, w[s:e], acc)
        return self._norms(acc) if norms else None

    def block_vjp(self, w: Tensor, out: Tensor, full: bool) -> Tensor:
        """out_i = w_{i+1} (J_{i+1} - K_{i+1}) (full: w_{i+1} df_{i+1}/dh_i) for i < T,
        out_T = 0."""
        self.sweep(w, out, full)
        return out

    def scan_(self, x: Tensor) -> Tensor:
        """In place: x_i += K_{i+1} * x_{i+1}, from i = T-1 down to 0."""
        self._reverse_scan_(x, self.keep)
        return x

    def exact_backward(self, out: Tensor) -> Tensor:
        """Sequential BPTT on the stored gates (one step's gate adjoints in a scratch row)."""
        gs = self._loss_rows()
        out[-1].copy_(gs[-1])
        ws, zs, coeffs_t = out.unbind(0), self.z.unbind(0), self.coeff_by_gate.unbind(0)
        gate_adj_g, g2 = self.gate_adj_by_gate[0], self.gate_adj[0]
        w_hh = self.w_hh
        linear = packed_linear(w_hh.t(), self.B)
        for t in range(self.T, 0, -1):
            torch.mul(ws[t].unsqueeze(1), coeffs_t[t - 1], out=gate_adj_g)
            if linear is None:
                torch.addmm(gs[t - 1], g2, w_hh, out=ws[t - 1])
            else:
                torch.add(gs[t - 1], linear(g2), out=ws[t - 1])
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
