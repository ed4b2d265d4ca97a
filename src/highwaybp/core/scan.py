"""Reverse linear-recurrence scans (the paper's CumSumProd).

All stacked scans share one signature and one definition:

    reverse_scan(x, a) -> y,   y_{N-1} = x_{N-1},   y_i = x_i + a_i * y_{i+1}

x: [N, *S]; a: [N, *S'] with S' broadcastable to S (a_{N-1} is never read), or None for
a_i = 1 (K = I: a reverse cumulative sum). In Highway-BP, index i is the state h_i and
a_i is the coefficient of K_{i+1}: the multiplier of y_{i+1} is the *next* layer's K. (The
paper's Algorithm 1 read literally starts from P_i = K_i; the correct start is K_{i+1}.)

- `reverse_scan_sequential`: the reference, O(N) work, N dependent steps. On a CPU the scan
  is memory-bound, so this is also the fastest (see `highwaybp bench scan`); it is the default.
- `reverse_scan_hillis_steele`: the paper's log-depth scan (O(N log N) work, log N steps),
  the one to use where many cores or a GPU are idle during the scan.
- `reverse_scan_blocked`: work-efficient log-depth scan (O(N) work, about 2 log2 N steps):
  sequential inside blocks of ~log2 N rows, all blocks at once, Hillis-Steele over the
  block carries, one fix-up. What the RNN engines run with scan="log" (a GPU's path:
  O(log N) kernel launches instead of N).

Never compute a scan as cumsum(x / cumprod(a)) * cumprod(a): the products underflow (NaN
for gates near 0). Both scans here are recurrence forms, stable for |a| <= 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

ScanFn = Callable[[Tensor, "Tensor | None"], Tensor]


def _check(x: Tensor, a: Tensor | None) -> None:
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"scan input needs a non-empty leading (layer) dim, got {tuple(x.shape)}")
    if a is not None:
        if a.shape[0] != x.shape[0]:
            raise ValueError(
                f"scan coefficients have {a.shape[0]} entries along dim 0, inputs {x.shape[0]}"
            )
        torch.broadcast_shapes(a.shape[1:], x.shape[1:])


def reverse_scan_sequential(x: Tensor, a: Tensor | None = None) -> Tensor:
    """Reference scan: y_i = x_i + a_i * y_{i+1}, one step per index. Shapes as module doc."""
    _check(x, a)
    if torch.is_grad_enabled() and (x.requires_grad or (a is not None and a.requires_grad)):
        if a is None:
            return x.flip(0).cumsum(0).flip(0)
        # Differentiable form (out= does not support autograd).
        ys = [x[-1]]
        for i in range(x.shape[0] - 2, -1, -1):
            ys.append(torch.addcmul(x[i], a[i], ys[-1]))
        return torch.stack(ys[::-1])
    # K = I too runs as a loop of row adds: torch.cumsum along dim 0 is 5-100x slower
    # than N row-wise adds on CPU (torch 2.13; `highwaybp bench scan` measures both).
    y = torch.empty_like(x)
    y[-1] = x[-1]
    for i in range(x.shape[0] - 2, -1, -1):
        if a is None:
            torch.add(x[i], y[i + 1], out=y[i])
        else:
            torch.addcmul(x[i], a[i], y[i + 1], out=y[i])
    return y


def reverse_scan_hillis_steele(x: Tensor, a: Tensor | None = None) -> Tensor:
    """Log-depth Hillis-Steele scan with the same result as `reverse_scan_sequential`.

    Keeps (A_i, B_i) with y_i = B_i + A_i * y_{i+d}; each round doubles d by substituting
    y_{i+d}: B_i <- B_i + A_i B_{i+d}, A_i <- A_i A_{i+d} for i < N - d. Entries with
    i + d >= N already hold y_i (y beyond the end is 0) and are never touched again.

    Work per round: one fused multiply-add over the N - d live rows into a second,
    preallocated buffer (the rows read and written overlap, so one buffer cannot be updated
    in place), one copy of the d finished rows, and the coefficient product only over the
    rows the next round reads, in the coefficients' own (broadcast) shape; no coefficients
    at all for K = I. About N log N element updates in ceil(log2 N) dependent steps.
    """
    _check(x, a)
    if torch.is_grad_enabled() and (x.requires_grad or (a is not None and a.requires_grad)):
        return _hillis_steele_differentiable(x, a)
    n = x.shape[0]
    acc = x.clone(memory_format=torch.contiguous_format)
    spare = torch.empty_like(acc)
    coeff = spare_coeff = None
    if a is not None:
        coeff = a.clone(memory_format=torch.contiguous_format)
        coeff[-1] = 0  # a_{N-1} is never read: y_{N-1} = x_{N-1}
        # zeros: rows the rounds below leave unwritten stay finite (they are never read)
        spare_coeff = torch.zeros_like(coeff)
    d = 1
    while d < n:
        live = n - d  # rows i with i + d < N
        if coeff is None:
            torch.add(acc[:live], acc[d:], out=spare[:live])
        else:
            torch.addcmul(acc[:live], coeff[:live], acc[d:], out=spare[:live])
        spare[live:].copy_(acc[live:])  # finished rows
        acc, spare = spare, acc
        next_live = n - 2 * d  # the rows the next round updates read A_i there
        if coeff is not None and next_live > 0:
            torch.mul(coeff[:next_live], coeff[d : d + next_live], out=spare_coeff[:next_live])
            coeff, spare_coeff = spare_coeff, coeff
        d *= 2
    return acc


def _hillis_steele_differentiable(x: Tensor, a: Tensor | None) -> Tensor:
    """The same rounds without out= (autograd cannot record into preallocated buffers)."""
    n = x.shape[0]
    acc = x
    coeff = None
    if a is not None:
        coeff = torch.cat([a[:-1], torch.zeros_like(a[-1:])])
    d = 1
    while d < n:
        live = n - d
        head = acc[:live] + acc[d:] if coeff is None else torch.addcmul(
            acc[:live], coeff[:live], acc[d:])
        acc = torch.cat([head, acc[live:]])
        if coeff is not None:
            coeff = torch.cat([coeff[:live] * coeff[d:], coeff[live:]])
        d *= 2
    return acc


def reverse_scan_blocked(x: Tensor, a: Tensor | None = None, block: int | None = None) -> Tensor:
    """Work-efficient log-depth scan with the same result as `reverse_scan_sequential`.

    Rows are cut into nb blocks of L = `block` rows (default ceil(log2 N), so the depth is
    about L + log2(N / L) ~ 2 log2 N dependent steps and the work O(N)); the last block is
    padded with zero rows. Three phases, each op over all blocks at once:
    1. in each block, from its end: local_i = x_i + a_i local_{i+1} and the products
       P_i = a_i a_{i+1} ... a_{end} (L - 1 steps), so that y_i = local_i + P_i Y_{b+1}
       with Y_b = y at block b's first row;
    2. the carries Y_b = local_{first of b} + P_{first of b} Y_{b+1}: a reverse scan over
       nb rows (`reverse_scan_hillis_steele`, the one owner of that rule);
    3. fix-up: y_i = local_i + P_i Y_{b+1} (Y_nb = 0), one fused multiply-add.
    Out of place (x and a are not modified) and differentiable as written.
    """
    _check(x, a)
    return reverse_scan_blocked_rows(x, None if a is None else a[:-1], block)


def reverse_scan_blocked_rows(
    x: Tensor, a_head: Tensor | None, block: int | None = None
) -> Tensor:
    """`reverse_scan_blocked` given only the coefficients that are read, a_head = a[:N-1]
    ([N-1, *S']): what the RNN engines hold (the gates of steps 1..T for states 0..T)."""
    n = x.shape[0]
    if a_head is not None and a_head.shape[0] != n - 1:
        raise ValueError(f"scan needs {n - 1} coefficients for {n} rows, got {a_head.shape[0]}")
    size = max(1, math.ceil(math.log2(n))) if block is None else int(block)
    if size < 1:
        raise ValueError(f"scan block must be >= 1, got {block!r}")
    nb = -(-n // size)
    pad = nb * size - n
    xb = x if pad == 0 else torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    xb = xb.reshape(nb, size, *x.shape[1:])
    ab = None
    if a_head is not None:  # a_{N-1} is never read: zero (and the padding) so P stays finite
        ab = torch.cat([a_head, a_head.new_zeros((pad + 1, *a_head.shape[1:]))])
        ab = ab.reshape(nb, size, *a_head.shape[1:])
    local: list = [None] * size
    prod: list = [None] * size
    local[-1] = xb[:, -1]
    prod[-1] = None if ab is None else ab[:, -1]
    for j in range(size - 2, -1, -1):
        if ab is None:
            local[j] = xb[:, j] + local[j + 1]
        else:
            local[j] = torch.addcmul(xb[:, j], ab[:, j], local[j + 1])
            prod[j] = ab[:, j] * prod[j + 1]
    carry = reverse_scan_hillis_steele(local[0], prod[0])  # Y_b, b = 0..nb-1
    after = torch.cat([carry[1:], torch.zeros_like(carry[:1])]).unsqueeze(1)  # Y_{b+1}
    local_all = torch.stack(local, 1)
    y = local_all + after if ab is None else torch.addcmul(local_all, torch.stack(prod, 1), after)
    return y.reshape(nb * size, *y.shape[2:])[:n]


SCANS: dict[str, ScanFn] = {
    "sequential": reverse_scan_sequential,
    "hillis_steele": reverse_scan_hillis_steele,
    "blocked": reverse_scan_blocked,
}
DEFAULT_SCAN = "sequential"


def get_scan(name: str | None) -> ScanFn:
    """The scan registered under `name` (None: the default, the faster one on CPU)."""
    name = DEFAULT_SCAN if name is None else name
    if name not in SCANS:
        raise ValueError(f"unknown scan {name!r}; choose from {sorted(SCANS)}")
    return SCANS[name]


def reverse_scan(x: Tensor, a: Tensor | None = None) -> Tensor:
    """The default stacked scan (see module docstring)."""
    return SCANS[DEFAULT_SCAN](x, a)


def reverse_scan_list(
    xs: Sequence[Tensor], apply_kt: Sequence[Callable[[Tensor], Tensor] | None]
) -> list[Tensor]:
    """Sequential scan over per-index tensors of different shapes, for general linear K.

    y_{N-1} = xs[N-1]; y_i = xs[i] + apply_kt[i](y_{i+1}) where apply_kt[i] maps a tensor of
    y_{i+1}'s shape to xs[i]'s shape (None means identity). apply_kt[N-1] is never called.
    """
    if len(xs) != len(apply_kt):
        raise ValueError(f"{len(xs)} inputs but {len(apply_kt)} K maps")
    ys: list[Any] = [None] * len(xs)
    ys[-1] = xs[-1]
    for i in range(len(xs) - 2, -1, -1):
        fn = apply_kt[i]
        carried = ys[i + 1] if fn is None else fn(ys[i + 1])
        ys[i] = xs[i] + carried
    return ys


def reverse_scan_list_(
    xs: list[Tensor], apply_kt: Sequence[Callable[[Tensor], Tensor] | None]
) -> list[Tensor]:
    """In-place `reverse_scan_list`: overwrites xs[i] with y_i and returns xs.

    The fast path of the chain's sequential scan (no second buffer for the result);
    tested equal to `reverse_scan_list`. xs[i] must not share memory with xs[j].
    """
    if len(xs) != len(apply_kt):
        raise ValueError(f"{len(xs)} inputs but {len(apply_kt)} K maps")
    for i in range(len(xs) - 2, -1, -1):
        fn = apply_kt[i]
        xs[i].add_(xs[i + 1] if fn is None else fn(xs[i + 1]))
    return xs
