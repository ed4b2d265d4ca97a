"""The reverse scan u_i = x_i + u_{i+1} K_{i+1} over states split across ranks.

Rank r owns a contiguous segment of layers a+1..b and keeps n+1 entries for the states
h_a..h_b (entry 0 is h_a, entry n is h_b). Entry 0 of rank r > 0 and entry n of rank r-1 are
the same state: each rank puts there what it computed (rank r the VJP of its first layer,
rank r-1 its loss gradient), and the scan adds them, so the VJP never needs its own message.

- local scan (`local_scan_`): the scan of the rank's entries with nothing coming from
  above; afterwards entry 0 of rank r > 0 holds S_r, the segment's contribution to h_a.
- a carry c_r is what reaches h_b from all ranks above (0 on the last rank). The segment
  passes a carry on as out_r = S_r + c_r @ Pi_r, Pi_r = K_b ... K_{a+1} (a product that
  exists when every K is identity, scalar or diagonal: then it is a tensor or a number).
- carries c_r = out_{r+1} (an exclusive scan over ranks, from the top), by:
    "centralized": every rank sends (S_r, Pi_r) to rank 0, which combines them and sends
        each rank its c_r (2 message hops, P - 1 messages into rank 0);
    "distributed": a log-depth (Hillis-Steele) exclusive scan over ranks by point-to-point
        messages: 1 + ceil(log2(P - 1)) hops, at most one message in and out per hop;
    "sequential": rank r waits for c_r from r+1, scans with it and sends out_r to r-1 (P - 1
        dependent hops, no fix-up; the only form for a general linear K such as
        LinearShortcut/ModuleShortcut, whose products cannot be formed).
- fix-up (`fixup_`): u_i = y_i + c_r @ K_b ... K_{i+1} on the rank's own entries.

Everything here works on lists of per-micro-batch tensors and talks to other ranks only
through a `comm` object with `send(dst, tensors, what)` and `recv(src, likes, what)`, so the
unit tests run the same exchange code on threads in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from highwaybp.core.scan import reverse_scan_list_

Coefficient = Any  # None (K = I), a float (K = c I) or a tensor broadcastable to the state
STRATEGIES = ("distributed", "centralized", "sequential")


class Comm(Protocol):
    def send(self, dst: int, tensors: Sequence[Tensor], what: str) -> None: ...

    def recv(self, src: int, likes: Sequence[Tensor], what: str) -> list[Tensor]: ...


def chain_k_kind(residual_kinds: Sequence[str]) -> str:
    """The most general K of a chain: "identity" < "scalar" < "diagonal" < "linear"."""
    order = ("identity", "scalar", "diagonal", "linear")
    return max(residual_kinds, key=order.index) if residual_kinds else "identity"


def mul(x: Tensor, a: Coefficient) -> Tensor:
    """x @ diag(a): x itself for a = None (K = I)."""
    return x if a is None else x * a


def product(coeffs: Sequence[Coefficient], like: Tensor, kind: str) -> Optional[Tensor]:
    """Pi = prod of the coefficients, as the tensor a message carries: None for identity,
    a 0-dim tensor for scalar, a tensor of the state's shape for diagonal."""
    if kind == "identity":
        return None
    if kind == "scalar":
        value = 1.0
        for a in coeffs:
            value *= 1.0 if a is None else float(a)
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    out = torch.ones_like(like)
    for a in coeffs:
        if a is not None:
            out.mul_(a)
    return out


def local_scan_(xs: list[Tensor], kmaps: Sequence[Callable[[Tensor], Tensor] | None]) -> None:
    """In place: xs[i] += kmaps[i](xs[i+1]) from the top (xs[n] unchanged).

    kmaps[i] applies K of the layer between entries i and i+1 (None: identity)."""
    reverse_scan_list_(xs, [*kmaps, None])


def fixup_(xs: list[Tensor], carry: Tensor, coeffs: Sequence[Coefficient], lowest: int) -> None:
    """In place: xs[i] += carry @ K_n ... K_{i+1} for i = n down to `lowest`.

    coeffs[i] is the coefficient of the layer between entries i and i+1."""
    t = carry
    n = len(xs) - 1
    xs[n].add_(t)
    for i in range(n - 1, lowest - 1, -1):
        t = mul(t, coeffs[i])
        xs[i].add_(t)


def combine(lower: tuple[list[Tensor], Optional[list]], upper: tuple[list[Tensor], Optional[list]],
            keep_product: bool) -> tuple[list[Tensor], Optional[list]]:
    """Compose two adjacent segments' (S, Pi): the upper feeds into the lower.

    S = S_lower + S_upper @ Pi_lower; Pi = Pi_upper Pi_lower (only if `keep_product`)."""
    s_lo, p_lo = lower
    s_up, p_up = upper
    p_lo = p_lo if p_lo is not None else [None] * len(s_lo)
    s = [a + mul(b, p) for a, b, p in zip(s_lo, s_up, p_lo)]
    if not keep_product or p_up is None:
        return s, None
    return s, [mul(q, p) for q, p in zip(p_up, p_lo)]


def _message(s: list[Tensor], p: Optional[list], with_product: bool) -> list[Tensor]:
    return [*s, *(p if with_product and p is not None else [])]


def _parse(msg: list[Tensor], m: int, with_product: bool) -> tuple[list[Tensor], Optional[list]]:
    return msg[:m], (msg[m:] if with_product else None)


def exclusive_carries(
    strategy: str, comm: Comm, rank: int, world: int,
    s: Optional[list[Tensor]], p: Optional[list[Tensor]],
    s_like: list[Tensor], p_like: Optional[list[Tensor]],
) -> Optional[list[Tensor]]:
    """c_r (one tensor per micro-batch) for this rank, None on the last rank (c = 0).

    s, p: this rank's S_r and Pi_r per micro-batch (unused on rank 0; p None for identity
    K). s_like/p_like: tensors shaped like a carry and a product (receive buffers' shapes).
    """
    m = len(s_like)
    has_p = p_like is not None
    if world == 1:
        return None
    if strategy == "centralized":
        last = world - 1
        if rank > 0:  # Pi of the last rank is never used (nothing comes from above it)
            comm.send(0, _message(s, p, has_p and rank < last), "a scan carry")
            if rank == last:
                return None
            return comm.recv(0, s_like, "a scan carry")
        elems = {}
        for r in range(1, world):
            with_p = has_p and r < last
            likes = [*s_like, *(p_like if with_p else [])]
            elems[r] = _parse(comm.recv(r, likes, "a scan carry"), m, with_p)
        carries: dict[int, list[Tensor]] = {last - 1: elems[last][0]}
        for r in range(last - 2, -1, -1):
            s_up, p_up = elems[r + 1]
            p_up = p_up if p_up is not None else [None] * m
            carries[r] = [a + mul(c, q) for a, c, q in zip(s_up, carries[r + 1], p_up)]
        for r in range(1, last):
            comm.send(r, carries[r], "a scan carry")
        return carries[0]
    if strategy == "distributed":
        # Shift: rank r holds E_{r+1}; then a suffix scan over positions 0..P-2 (position
        # q covers E_{q+1..q+d}). A product is sent only if its segment does not reach the
        # top, i.e. only if some carry will still be multiplied by it.
        top = world - 2  # the last position that holds an element
        if rank > 0:
            comm.send(rank - 1, _message(s, p, has_p and rank - 1 < top), "a scan carry")
        if rank > top:
            return None
        with_p = has_p and rank < top
        likes = [*s_like, *(p_like if with_p else [])]
        acc = _parse(comm.recv(rank + 1, likes, "a scan carry"), m, with_p)
        d = 1
        while d <= top:
            if rank - d >= 0:
                comm.send(rank - d, _message(*acc, has_p and rank + d <= top), "a scan carry")
            if rank + d <= top:
                with_p = has_p and rank + 2 * d <= top
                likes = [*s_like, *(p_like if with_p else [])]
                upper = _parse(comm.recv(rank + d, likes, "a scan carry"), m, with_p)
                acc = combine(acc, upper, keep_product=with_p)
            d *= 2
        return acc[0]
    raise ValueError(f"exclusive_carries: strategy must be 'distributed' or 'centralized', "
                     f"got {strategy!r}")


def scan_across_ranks_(
    strategy: str, comm: Comm, rank: int, world: int, entries: list[list[Tensor]],
    kmaps: list[list[Callable[[Tensor], Tensor] | None]], coeffs: Optional[list[list]],
    kind: str, timed: Callable[[], AbstractContextManager] = nullcontext,
) -> list[list[Tensor]]:
    """This rank's part of the reverse scan over all ranks' states, in place.

    entries[m]: entries 0..n of micro-batch m (see the module doc); kmaps[m][i] applies K
    of this rank's layer i+1 (None: identity); coeffs[m][i] its coefficient (strategies
    other than "sequential"); kind: `chain_k_kind` of the whole chain. Afterwards entries
    1..n (and 0 on rank 0) hold u; entry 0 of a rank > 0 holds what it sent down. `timed()`
    wraps the local work (for the trace)."""
    n = len(entries[0]) - 1
    first, last = rank == 0, rank == world - 1
    tops = [row[n] for row in entries]
    if strategy == "sequential":
        if not last:
            carry = comm.recv(rank + 1, tops, "a scan carry")
            for row, c in zip(entries, carry):
                row[n].add_(c)
        with timed():
            for row, maps in zip(entries, kmaps):
                local_scan_(row, maps)
        if not first:
            comm.send(rank - 1, [row[0] for row in entries], "a scan carry")
        return entries
    if kind == "linear":
        raise ValueError("a general linear K has no products: use strategy 'sequential'")
    with timed():
        for row, maps in zip(entries, kmaps):
            local_scan_(row, maps)
        s = p = None
        if not first:
            s = [row[0] for row in entries]
            if kind != "identity" and not last:
                p = [product(c, row[0], kind) for row, c in zip(entries, coeffs)]
    p_like = None
    if kind == "scalar":
        p_like = [torch.empty((), dtype=t.dtype, device=t.device) for t in tops]
    elif kind == "diagonal":
        p_like = tops
    carry = exclusive_carries(strategy, comm, rank, world, s, p, tops, p_like)
    if carry is not None:
        with timed():
            for row, c, cs in zip(entries, carry, coeffs):
                fixup_(row, c, cs, 0 if first else 1)
    return entries
