"""Cell math for `highwaybp.GRU` / `highwaybp.LSTM`, in torch.nn's conventions.

GRU (torch gate order r, z, n):

    r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)
    z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
    h' = (1 - z) * n + z * h

  Highway split: K_t = diag(z_t). torch's z is the *kept* fraction (the paper writes the
  GRU with the roles swapped, K = diag(1 - z)); the code follows torch.

LSTM (torch gate order i, f, g, o), state (c, h):

    c' = f * c + i * g,   h' = o * tanh(c');   K_t = diag(f_t) on c, 0 on h.

Each cell has one "engine" (`GRUEngine`, `LSTMEngine`) that

- runs the forward without an autograd tape into preallocated buffers: the input
  projection x W_ih^T for all steps is one matmul before the time loop; the loop only does
  h W_hh^T and the gates, which it stores;
- turns the stored gates into a few coefficient tensors once per backward, after which a
  block VJP for all T steps is one elementwise multiply and one [T*B, G*H] x [G*H, H] matmul
  (no re-run of the cell, no autograd graph);
- does the reverse scan in place, the exact sequential backward (BPTT on the same stored
  gates) and the batched parameter VJPs.

Adjoint states ("w") are stacked over the T + 1 states h_0..h_T: GRU [T+1, B, H]; LSTM
[2, T+1, B, H] (index 0: the cell state c, 1: h). `layer_major` views them as [T+1, ...].

`GRUCellRef` and `LSTMCellRef` are plain autograd cells with the same math; the tests check
the engines against them (and against torch.nn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn


class BufferPool:
    """Reusable scratch tensors keyed by (shape, dtype, device).

    Fresh multi-MB allocations cost 2-3x on this kind of machine (page faults on every new
    mapping), so buffers that do not escape to the caller are returned here after a backward
    and reused by the next forward.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[Tensor]] = {}

    def take(self, shape: Sequence[int], like: Tensor) -> Tensor:
        key = (tuple(shape), like.dtype, like.device)
        free = self._free.get(key)
        if free:
            return free.pop()
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)

    def give(self, *tensors: Optional[Tensor]) -> None:
        for t in tensors:
            if t is not None:
                key = (tuple(t.shape), t.dtype, t.device)
                self._free.setdefault(key, []).append(t)

    def clear(self) -> None:
        self._free.clear()

    def __deepcopy__(self, memo: dict) -> BufferPool:
        return BufferPool()

    def __getstate__(self) -> dict:  # pickling a module never saves scratch buffers
        return {"_free": {}}


def _addmm_or_mm(bias: Optional[Tensor], a: Tensor, b: Tensor, out: Tensor) -> None:
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


class _Engine:
    """What the GRU and LSTM engines share: buffers, losses, chunking, parameter gradients."""

    num_gates: int
    state_parts: int  # 1 (h) or 2 (c, h)
    chunk_bytes = 2 << 20  # target size of one chunk of gate adjoints (fits a CPU's L2/L3)

    def __init__(
        self,
        pool: BufferPool,
        x: Tensor,
        h0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Optional[Tensor],
        b_hh: Optional[Tensor],
    ) -> None:
        self.pool = pool
        self.x, self.h0 = x, h0
        self.w_ih, self.w_hh, self.b_ih, self.b_hh = w_ih, w_hh, b_ih, b_hh
        self.T, self.B, self.In = x.shape
        self.H = h0.shape[-1]
        self.prepared = False
        self.one = x.new_ones(())
        # Backward sweeps run over chunks of `chunk` time steps, newest first: the gate
        # adjoints of a chunk (G, [chunk, B, gates*H]) stay in cache between the elementwise
        # multiply and the matmul, and the scan and the norms read rows still in cache.
        row_bytes = self.B * self.num_gates * self.H * x.element_size()
        self.chunk = max(1, min(self.T, -(-self.chunk_bytes // row_bytes)))
        self._owned: list[Tensor] = []

    # ---- buffers ------------------------------------------------------------------------
    def take(self, *shape: int) -> Tensor:
        t = self.pool.take(shape, self.x)
        self._owned.append(t)
        return t

    def give_back(self, t: Tensor) -> None:
        """Return one buffer taken with `take` to the pool early."""
        self._owned = [o for o in self._owned if o is not t]
        self.pool.give(t)

    def release(self) -> None:
        """Return every pooled buffer (the engine must not be used afterwards)."""
        self.pool.give(*self._owned)
        self._owned = []

    def state_shape(self) -> tuple[int, ...]:
        base = (self.T + 1, self.B, self.H)
        return base if self.state_parts == 1 else (2, *base)

    def new_state(self) -> Tensor:
        return self.take(*self.state_shape())

    def layer_major(self, w: Tensor) -> Tensor:
        """[T+1, ...] view of an adjoint state (what highway_iterate works on)."""
        return w if self.state_parts == 1 else w.transpose(0, 1)

    def from_layer_major(self, w: Tensor) -> Tensor:
        if self.state_parts == 1:
            return w.contiguous()
        return w.transpose(0, 1).contiguous()

    def chunks(self) -> list[tuple[int, int]]:
        """[(s, e)]: time rows s..e-1 in chunks of `chunk`, newest first."""
        return [(max(0, e - self.chunk), e) for e in range(self.T, 0, -self.chunk)]

    def _chunk_buffers(self) -> None:
        c, B, H = self.chunk, self.B, self.H
        self.gc = self.take(c, B, self.num_gates * H)  # gate adjoints of one chunk
        self.gc4 = self.gc.view(c, B, self.num_gates, H)
        self.scr = self.take(c, B, H)  # per-chunk scratch
        self.ones = self.x.new_ones(c * B)

    def _add_loss_rows_(self, out_h: Tensor, s: int, e: int) -> None:
        """out_h (rows s..e-1 of the h part) += g_s..g_{e-1} (g_0 = 0, g_i = grad_y[i-1])."""
        if s == 0:
            if e > 1:
                out_h[1:].add_(self.grad_y[: e - 1])
        else:
            out_h.add_(self.grad_y[s - 1 : e - 1])

    def _sq(self, new: Tensor, old: Tensor, acc: list[Tensor]) -> None:
        """Append ||new - old||^2 and ||new||^2 (0-dim tensors) of one chunk to acc."""
        n = new.shape[0]
        d = self.scr[:n]
        torch.sub(new, old, out=d)
        flat_d, flat_n = d.reshape(-1), new.reshape(-1)
        acc.append(torch.stack([torch.dot(flat_d, flat_d), torch.dot(flat_n, flat_n)]))

    @staticmethod
    def _norms(acc: list[Tensor]) -> tuple[float, float]:
        total = torch.stack(acc).sum(0).sqrt()
        diff, norm = total.tolist()
        return diff, norm

    # ---- per-step losses ----------------------------------------------------------------
    def set_loss(self, grad_y: Tensor, grad_c: Optional[Tensor] = None) -> None:
        """dLoss/dh_t for t = 1..T ([T, B, H]) and, LSTM only, dLoss/dc_T ([B, H] or None).

        These are the per-layer losses g_i of the iteration (g_0 = 0: h_0 has no loss of its
        own). They are read in place, never copied into a [T+1] stack on the fast path.
        """
        self.grad_y = grad_y
        self.grad_c = grad_c
        self.zero_row = grad_y.new_zeros((self.B, self.H))

    def loss_state(self) -> Tensor:
        """The per-layer losses g stacked in the engine layout (a fresh tensor)."""
        g = torch.zeros(self.state_shape(), dtype=self.grad_y.dtype, device=self.grad_y.device)
        self.add_loss_(g)
        return g

    def init_loss_(self, buf: Tensor) -> Tensor:
        """buf <- g (one pass)."""
        if self.state_parts == 1:
            buf[0].zero_()
            buf[1:].copy_(self.grad_y)
        else:
            buf[0].zero_()
            if self.grad_c is not None:
                buf[0, -1].copy_(self.grad_c)
            buf[1, 0].zero_()
            buf[1, 1:].copy_(self.grad_y)
        return buf

    def add_loss_(self, buf: Tensor) -> Tensor:
        """buf += g."""
        if self.state_parts == 1:
            buf[1:].add_(self.grad_y)
        else:
            buf[1, 1:].add_(self.grad_y)
            if self.grad_c is not None:
                buf[0, -1].add_(self.grad_c)
        return buf

    def _loss_rows(self) -> list[Tensor]:
        """g_0..g_T of the h part as a list of [B, H] views (g_0 = 0)."""
        return [self.zero_row, *self.grad_y.unbind(0)]

    # ---- parameter gradients ----------------------------------------------------------
    def _param_accumulators(self, need_x: bool) -> dict:
        gw = self.num_gates * self.H
        new = lambda *shape: self.x.new_zeros(shape)
        acc = {
            "w_hh": new(gw, self.H),
            "w_ih": new(gw, self.In),
            "b_hh": new(gw) if self.b_hh is not None else None,
            "b_ih": new(gw) if self.b_ih is not None else None,
            "dx": self.x.new_empty((self.T, self.B, self.In)) if need_x else None,
        }
        return acc

    def _accumulate(self, acc: dict, side: str, g2: Tensor, s: int, e: int) -> None:
        """Add chunk s..e-1's contribution G^T rows (and G^T 1) to the `side` gradients."""
        n = (e - s) * self.B
        if side == "hh":
            rows = self.states_h()[s:e].reshape(n, self.H)
        else:
            rows = self.x[s:e].reshape(n, self.In)
        acc[f"w_{side}"].addmm_(g2.t(), rows)
        if acc[f"b_{side}"] is not None:
            acc[f"b_{side}"].addmv_(g2.t(), self.ones[:n])
        if side == "ih" and acc["dx"] is not None:
            torch.mm(g2, self.w_ih, out=acc["dx"][s:e].view(n, self.In))

    @staticmethod
    def _result(acc: dict):
        return acc["dx"], acc["w_ih"], acc["w_hh"], acc["b_ih"], acc["b_hh"]

    def states_h(self) -> Tensor:
        """Hidden states h_0..h_T [T+1, B, H] stored by the forward."""
        return self.states


class GRUEngine(_Engine):
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
            s = self.scr[: c1 - c0]
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
        self.ph4 = self.HH.view(self.T, self.B, 3, H)
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
            g4 = self.gc4[:n]
            torch.mul(w[s + 1 : e + 1].unsqueeze(2), self.ph4[s:e], out=g4)
            oc = out[s:e]
            torch.mm(self.gc[:n].view(n * B, 3 * H), self.w_hh, out=oc.view(n * B, H))
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
        ws, zs, ph4 = out.unbind(0), self.z.unbind(0), self.ph4.unbind(0)
        g4, g2 = self.gc4[0], self.gc[0]
        w_hh = self.w_hh
        for t in range(self.T, 0, -1):
            torch.mul(ws[t].unsqueeze(1), ph4[t - 1], out=g4)
            torch.addmm(gs[t - 1], g2, w_hh, out=ws[t - 1])
            ws[t - 1].addcmul_(zs[t - 1], ws[t])
        return out

    def param_grads(self, w: Tensor, need_x: bool):
        """(dx, dW_ih, dW_hh, db_ih, db_hh) from the adjoints w [T+1, B, H], by chunks."""
        B, H = self.B, self.H
        acc = self._param_accumulators(need_x)
        for s, e in self.chunks():
            n = e - s
            g4 = self.gc4[:n]
            g2 = self.gc[:n].view(n * B, 3 * H)
            torch.mul(w[s + 1 : e + 1].unsqueeze(2), self.ph4[s:e], out=g4)
            self._accumulate(acc, "hh", g2, s, e)
            # the x side differs only in the n block: w Pn instead of w Pn r
            torch.mul(w[s + 1 : e + 1], self.pn[s:e], out=g4[:, :, 2])
            self._accumulate(acc, "ih", g2, s, e)
        return self._result(acc)


class LSTMEngine(_Engine):
    """LSTM forward with stored gates, and the Highway-BP operators on them."""

    num_gates = 4
    state_parts = 2

    def __init__(self, pool, x, h0, c0, w_ih, w_hh, b_ih, b_hh) -> None:
        super().__init__(pool, x, h0, w_ih, w_hh, b_ih, b_hh)
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
        A = self.take(T, B, 4 * H)  # x W_ih^T + b_ih + b_hh, then + h W_hh^T, then the gates
        bias = _lstm_bias(self.b_ih, self.b_hh)
        _addmm_or_mm(bias, x.reshape(T * B, self.In), self.w_ih.t(), A.view(T * B, 4 * H))
        w_t = self.w_hh.t()
        hs, cs, tcs, rows = states.unbind(0), C.unbind(0), TC.unbind(0), A.unbind(0)
        h2, h3 = 2 * H, 3 * H
        for t in range(T):
            a = rows[t]
            a.addmm_(hs[t], w_t)
            a[:, :h2].sigmoid_()
            g = a[:, h2:h3].tanh_()
            o = a[:, h3:].sigmoid_()
            c = cs[t + 1]
            torch.mul(a[:, H:h2], cs[t], out=c)
            c.addcmul_(a[:, :H], g)
            torch.tanh(c, out=tcs[t])
            torch.mul(o, tcs[t], out=hs[t + 1])
        self.states, self.C, self.TC, self.A = states, C, TC, A
        return states, C[-1].clone()

    @property
    def f(self) -> Tensor:
        """Forget gates f_1..f_T [T, B, H] (K_t = diag(f_t) on c)."""
        return self.A[..., self.H : 2 * self.H]

    def prepare(self) -> None:
        """Gates -> P = [g i(1-i), c_prev f(1-f), i(1-g^2), tanh(c) o(1-o)], Q = o(1-tanh(c)^2).

        With (wc, wh) the adjoints of (c_t, h_t): dc = wc + wh Q and the pre-activation
        adjoint is [dc P_i, dc P_f, dc P_g, wh P_o]; dLoss/dc_{t-1} = dc f.
        """
        if self.prepared:
            return
        T, B, H = self.T, self.B, self.H
        P = self.take(T, B, 4 * H)
        self._chunk_buffers()
        for c0, c1 in self.chunks():  # by chunks of time steps: the ops run in cache
            A, PC, tc = self.A[c0:c1], P[c0:c1], self.TC[c0:c1]
            i, f, g, o = A[..., :H], A[..., H : 2 * H], A[..., 2 * H : 3 * H], A[..., 3 * H :]
            pi, pf, pg, po = (PC[..., k * H : (k + 1) * H] for k in range(4))
            torch.addcmul(i, i, i, value=-1.0, out=pi)  # i (1 - i)
            pi.mul_(g)
            torch.addcmul(f, f, f, value=-1.0, out=pf)
            pf.mul_(self.C[c0:c1])  # c_{t-1}
            torch.mul(g, g, out=pg)
            torch.addcmul(i, i, pg, value=-1.0, out=pg)
            torch.addcmul(o, o, o, value=-1.0, out=po)
            po.mul_(tc)
            tc.mul_(tc)
            torch.addcmul(o, o, tc, value=-1.0, out=tc)  # Q
        self.P, self.Q = P, self.TC
        self.p4 = P.view(T, B, 4, H)
        self.dcc = self.take(self.chunk, B, H)
        self.prepared = True

    def _gate_adjoints(self, w: Tensor, s: int, e: int) -> Tensor:
        """gc[:e-s] <- pre-activation adjoints of steps s+1..e from w [2, T+1, B, H];
        returns dc = dLoss/dc_t (before the forget gate) for those steps."""
        n = e - s
        wc, wh = w[0, s + 1 : e + 1], w[1, s + 1 : e + 1]
        dc = torch.addcmul(wc, wh, self.Q[s:e], out=self.dcc[:n])
        g4 = self.gc4[:n]
        torch.mul(dc.unsqueeze(2), self.p4[s:e, :, :3], out=g4[:, :, :3])
        torch.mul(wh, self.p4[s:e, :, 3], out=g4[:, :, 3])
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
        T, B, H = self.T, self.B, self.H
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
            torch.mm(self.gc[:n].view(n * B, 4 * H), self.w_hh, out=oh.view(n * B, H))
            if full:
                torch.mul(dc, self.f[s:e], out=oc)
            else:  # c part of J: dc f - wc f = wh Q f
                torch.mul(w[1, s + 1 : e + 1], self.Q[s:e], out=oc)
                oc.mul_(self.f[s:e])
            if with_loss:
                self._add_loss_rows_(oh, s, e)
            if scan:
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
        rows = x[0].unbind(0)
        fs = self.f.unbind(0)
        for i in range(self.T - 1, -1, -1):
            rows[i].addcmul_(fs[i], rows[i + 1])
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
        qs, fs, p4s = self.Q.unbind(0), self.f.unbind(0), self.p4.unbind(0)
        dc, g4, g2 = self.dcc[0], self.gc4[0], self.gc[0]
        w_hh = self.w_hh
        for t in range(self.T, 0, -1):
            torch.addcmul(wcs[t], whs[t], qs[t - 1], out=dc)
            torch.mul(dc.unsqueeze(1), p4s[t - 1][:, :3], out=g4[:, :3])
            torch.mul(whs[t], p4s[t - 1][:, 3], out=g4[:, 3])
            torch.addmm(ghs[t - 1], g2, w_hh, out=whs[t - 1])
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
            g2 = self.gc[:n].view(n * B, 4 * H)
            self._accumulate(acc, "hh", g2, s, e)
            self._accumulate(acc, "ih", g2, s, e)
        if shared_bias:
            acc["b_ih"] = acc["b_hh"].clone()
        return self._result(acc)


def _lstm_bias(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


# ---- reference autograd cells ------------------------------------------------------------


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
