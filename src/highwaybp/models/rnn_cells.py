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


def _addmm_or_mm(bias: Optional[Tensor], a: Tensor, b: Tensor, out: Tensor) -> None:
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


class _Engine:
    """What the GRU and LSTM engines share: buffers, scan, parameter-gradient plumbing."""

    num_gates: int
    state_parts: int  # 1 (h) or 2 (c, h)

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
        self.G: Optional[Tensor] = None  # [T, B, gates*H]: pre-activation adjoints
        self.g_filled = False
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

    def scratch_like_state(self) -> Tensor:
        """A scratch view of the gate-adjoint buffer, shaped like an adjoint state."""
        n = 1
        for s in self.state_shape():
            n *= s
        flat = self.G.view(-1)
        if flat.numel() >= n:
            return flat[:n].view(self.state_shape())
        return self.new_state()

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
    def _with_ones(self, rows: Tensor, width: int) -> Tensor:
        """[T*B, width + 1] pooled copy of rows [T*B, width] with a ones column appended.

        (rows, 1)^T G gives the weight gradient and the bias gradient in one pass over G.
        """
        ext = self.take(self.T * self.B, width + 1)
        ext[:, :width].copy_(rows)
        ext[:, width].fill_(1.0)
        return ext

    def _weight_and_bias(
        self, rows: Tensor, width: int, g2: Tensor, bias: Optional[Tensor]
    ) -> tuple[Tensor, Optional[Tensor]]:
        """(dW [G*H, width], db [G*H] or None) = (G^T rows, G^T 1) with G = g2 [T*B, G*H]."""
        if bias is None:
            return torch.mm(rows.t(), g2).t(), None
        both = torch.mm(self._with_ones(rows, width).t(), g2)  # [width + 1, G*H]
        return both[:width].t(), both[width]

    def _param_grads_from(
        self, g_h: Tensor, g_x: Optional[Tensor], need_x: bool
    ) -> tuple[Optional[Tensor], Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """(dx, dW_ih, dW_hh, db_ih, db_hh) from the pre-activation adjoints [T*B, G*H].

        g_h feeds the h W_hh^T + b_hh side, g_x the x W_ih^T + b_ih side (None: same as g_h).
        The GRU passes g_x = None and rewrites g_h into g_x in between (`_to_x_side`).
        """
        tb = self.T * self.B
        h_prev = self.states_h()[:-1].reshape(tb, self.H)
        d_w_hh, d_b_hh = self._weight_and_bias(h_prev, self.H, g_h, self.b_hh)
        if g_x is None:
            g_x = self._to_x_side(g_h)
        x2 = self.x.reshape(tb, self.In)
        d_w_ih, d_b_ih = self._weight_and_bias(x2, self.In, g_x, self.b_ih)
        dx = torch.mm(g_x, self.w_ih).view(self.T, self.B, self.In) if need_x else None
        return dx, d_w_ih, d_w_hh, d_b_ih, d_b_hh

    def _to_x_side(self, g_h: Tensor) -> Tensor:
        return g_h

    def states_h(self) -> Tensor:
        raise NotImplementedError


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

    def states_h(self) -> Tensor:
        return self.states

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
        A, HH = self.A, self.HH
        r, z, n = A[..., :H], A[..., H : 2 * H], A[..., 2 * H :]
        pr, pz, pnr = HH[..., :H], HH[..., H : 2 * H], HH[..., 2 * H :]  # pz holds h - n
        s = self.take(self.T, self.B, H)
        torch.addcmul(z, z, z, value=-1.0, out=s)  # z (1 - z)
        pz.mul_(s)
        torch.sub(self.one, z, out=s)  # 1 - z
        n.mul_(n)
        torch.addcmul(s, s, n, value=-1.0, out=n)  # Pn
        torch.addcmul(r, r, r, value=-1.0, out=s)  # r (1 - r)
        torch.mul(n, pnr, out=pr)  # Pn hn (pnr still holds hn)
        pr.mul_(s)
        torch.mul(n, r, out=pnr)
        self.pn = n
        self.ph4 = HH.view(self.T, self.B, 3, H)
        self.G = self.take(self.T, self.B, 3 * H)
        self.g4 = self.G.view(self.T, self.B, 3, H)
        self.give_back(s)
        self.prepared = True

    def block_vjp(self, w: Tensor, out: Tensor, full: bool) -> Tensor:
        """out_i = w_{i+1} J_{i+1} (full: w_{i+1} df_{i+1}/dh_i) for i < T, out_T = 0."""
        T, B, H = self.T, self.B, self.H
        torch.mul(w[1:].unsqueeze(2), self.ph4, out=self.g4)
        torch.mm(self.G.view(T * B, 3 * H), self.w_hh, out=out[:-1].view(T * B, H))
        out[-1].zero_()
        if full:
            out[:-1].addcmul_(self.z, w[1:])
        return out

    def scan_(self, x: Tensor) -> Tensor:
        """In place: x_i += z_{i+1} * x_{i+1}, from i = T-1 down to 0."""
        rows = x.unbind(0)
        zs = self.z.unbind(0)
        for i in range(self.T - 1, -1, -1):
            rows[i].addcmul_(zs[i], rows[i + 1])
        return x

    def exact_backward(self, out: Tensor) -> Tensor:
        """Sequential BPTT on the stored gates; also leaves the hh-side adjoints in G."""
        gs = self._loss_rows()
        out[-1].copy_(gs[-1])
        ws, zs = out.unbind(0), self.z.unbind(0)
        g4, ph4, grows = self.g4.unbind(0), self.ph4.unbind(0), self.G.unbind(0)
        w_hh = self.w_hh
        for t in range(self.T, 0, -1):
            torch.mul(ws[t].unsqueeze(1), ph4[t - 1], out=g4[t - 1])
            torch.addmm(gs[t - 1], grows[t - 1], w_hh, out=ws[t - 1])
            ws[t - 1].addcmul_(zs[t - 1], ws[t])
        self.g_filled = True
        return out

    def param_grads(self, w: Tensor, need_x: bool):
        """(dx, dW_ih, dW_hh, db_ih, db_hh) from the adjoints w [T+1, B, H]."""
        if not self.g_filled:
            torch.mul(w[1:].unsqueeze(2), self.ph4, out=self.g4)
        self._w = w
        g2 = self.G.view(self.T * self.B, 3 * self.H)
        return self._param_grads_from(g2, None, need_x)

    def _to_x_side(self, g_h: Tensor) -> Tensor:
        """The x side differs only in the n block: w Pn instead of w Pn r (in place)."""
        torch.mul(self._w[1:], self.pn, out=self.g4[:, :, 2])
        return g_h


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

    def states_h(self) -> Tensor:
        return self.states

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
        A = self.A
        i, f, g, o = A[..., :H], A[..., H : 2 * H], A[..., 2 * H : 3 * H], A[..., 3 * H :]
        P = self.take(T, B, 4 * H)
        pi, pf, pg, po = P[..., :H], P[..., H : 2 * H], P[..., 2 * H : 3 * H], P[..., 3 * H :]
        torch.mul(i, i, out=pi)
        torch.sub(i, pi, out=pi)
        pi.mul_(g)
        torch.mul(f, f, out=pf)
        torch.sub(f, pf, out=pf)
        pf.mul_(self.C[:-1])
        torch.mul(g, g, out=pg)
        torch.addcmul(i, i, pg, value=-1.0, out=pg)
        torch.mul(o, o, out=po)
        torch.sub(o, po, out=po)
        po.mul_(self.TC)
        q = self.TC
        q.mul_(q)
        torch.addcmul(o, o, q, value=-1.0, out=q)
        self.P, self.Q = P, q
        self.p4 = P.view(T, B, 4, H)
        self.qf = None
        self.G = self.take(T, B, 4 * H)
        self.g4 = self.G.view(T, B, 4, H)
        self.D = self.take(T, B, H)
        self.prepared = True

    def _gate_adjoints(self, w: Tensor) -> Tensor:
        """G <- pre-activation adjoints from w [2, T+1, B, H]; returns dc [T, B, H] (in D)."""
        wc, wh = w[0, 1:], w[1, 1:]
        dc = torch.addcmul(wc, wh, self.Q, out=self.D)
        torch.mul(dc.unsqueeze(2), self.p4[:, :, :3], out=self.g4[:, :, :3])
        torch.mul(wh, self.p4[:, :, 3], out=self.g4[:, :, 3])
        return dc

    def block_vjp(self, w: Tensor, out: Tensor, full: bool) -> Tensor:
        """out[:, i] = w_{i+1} J_{i+1} (full: the whole layer VJP) for i < T, 0 at i = T."""
        T, B, H = self.T, self.B, self.H
        dc = self._gate_adjoints(w)
        torch.mm(self.G.view(T * B, 4 * H), self.w_hh, out=out[1, :-1].view(T * B, H))
        if full:
            torch.mul(dc, self.f, out=out[0, :-1])
        else:
            # c part of J: dc f - wc f = wh Q f.
            if self.qf is None:
                self.qf = self.take(T, B, H)
                torch.mul(self.Q, self.f, out=self.qf)
            torch.mul(w[1, 1:], self.qf, out=out[0, :-1])
        out[:, -1].zero_()
        return out

    def scan_(self, x: Tensor) -> Tensor:
        """In place on the c part: x_i += f_{i+1} x_{i+1}; the h part has K = 0."""
        rows = x[0].unbind(0)
        fs = self.f.unbind(0)
        for i in range(self.T - 1, -1, -1):
            rows[i].addcmul_(fs[i], rows[i + 1])
        return x

    def exact_backward(self, out: Tensor) -> Tensor:
        """Sequential BPTT on the stored gates; fills G."""
        T, H = self.T, self.H
        ghs = self._loss_rows()
        out[1, -1].copy_(ghs[-1])
        if self.grad_c is None:
            out[0, -1].zero_()
        else:
            out[0, -1].copy_(self.grad_c)
        wcs, whs = out[0].unbind(0), out[1].unbind(0)
        qs, fs, ds = self.Q.unbind(0), self.f.unbind(0), self.D.unbind(0)
        p4s, g4s, grows = self.p4.unbind(0), self.g4.unbind(0), self.G.unbind(0)
        w_hh = self.w_hh
        del H
        for t in range(T, 0, -1):
            dc = torch.addcmul(wcs[t], whs[t], qs[t - 1], out=ds[t - 1])
            torch.mul(dc.unsqueeze(1), p4s[t - 1][:, :3], out=g4s[t - 1][:, :3])
            torch.mul(whs[t], p4s[t - 1][:, 3], out=g4s[t - 1][:, 3])
            torch.addmm(ghs[t - 1], grows[t - 1], w_hh, out=whs[t - 1])
            torch.mul(dc, fs[t - 1], out=wcs[t - 1])  # no loss on c_{t-1} for t - 1 < T
        self.g_filled = True
        return out

    def param_grads(self, w: Tensor, need_x: bool):
        """(dx, dW_ih, dW_hh, db_ih, db_hh) from the adjoints w [2, T+1, B, H]."""
        if not self.g_filled:
            self._gate_adjoints(w)
        g2 = self.G.view(self.T * self.B, 4 * self.H)
        if self.b_ih is None or self.b_hh is None:
            return self._param_grads_from(g2, g2, need_x)
        # Both biases see the same adjoint: one sum serves both.
        tb = self.T * self.B
        h_prev = self.states[:-1].reshape(tb, self.H)
        d_w_hh, d_b = self._weight_and_bias(h_prev, self.H, g2, self.b_hh)
        d_w_ih, _ = self._weight_and_bias(self.x.reshape(tb, self.In), self.In, g2, None)
        dx = torch.mm(g2, self.w_ih).view(self.T, self.B, self.In) if need_x else None
        return dx, d_w_ih, d_w_hh, d_b, d_b.clone()


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
