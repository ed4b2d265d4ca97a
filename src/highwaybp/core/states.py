"""Operations on a state sequence, the iteration's unit of data: the adjoints of states
i = 0..L, either one tensor stacked along dim 0 ([L+1, *S], all states the same shape) or a
list of L+1 per-state tensors (states may differ in shape). The one owner of these
operations: `core.iteration` (the plain loop) and `core.anderson` (the mixing) use them.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

States = Union[Tensor, list]


def stack_on_first_device(scalars: list[Tensor]) -> Tensor:
    """Per-state 0-dim results stacked into one tensor on the first one's device (states
    may sit on several devices), so the caller syncs once; empty -> a 0-element tensor."""
    if not scalars:
        return torch.zeros(0)
    return torch.stack([s.to(scalars[0].device) for s in scalars])


def add_states(a: States, b: States) -> States:
    if isinstance(a, Tensor):
        return a + b
    return [x + y for x, y in zip(a, b)]


def add_states_(a: States, b: States) -> States:
    """a += b in place (returns a)."""
    if isinstance(a, Tensor):
        return a.add_(b)
    for x, y in zip(a, b):
        x.add_(y)
    return a


def clone_states(a: States) -> States:
    return a.clone() if isinstance(a, Tensor) else [x.clone() for x in a]


def _norms(rows: Any) -> Tensor:
    # Per-state norms stay on a device (one sync per call, not one per state), in the
    # states' dtype (no float64 on some accelerators).
    return stack_on_first_device([torch.linalg.vector_norm(r) for r in rows])


def states_norm(a: States) -> float:
    if isinstance(a, Tensor):
        return float(torch.linalg.vector_norm(a))
    return float(torch.linalg.vector_norm(_norms(a)))


def states_diff_norm(a: States, b: States) -> float:
    if isinstance(a, Tensor):
        return float(torch.linalg.vector_norm(a - b))
    # One state's difference at a time: no full-size temporary.
    return float(torch.linalg.vector_norm(_norms(x - y for x, y in zip(a, b))))


def empty_like_states(a: States) -> States:
    if isinstance(a, Tensor):
        return torch.empty_like(a)
    return [torch.empty_like(x) for x in a]


def copy_states_(out: States, a: States) -> States:
    if isinstance(out, Tensor):
        return out.copy_(a)
    for o, x in zip(out, a):
        o.copy_(x)
    return out


def sub_states_(out: States, a: States, b: States) -> States:
    """out <- a - b."""
    if isinstance(out, Tensor):
        return torch.sub(a, b, out=out)
    for o, x, y in zip(out, a, b):
        torch.sub(x, y, out=o)
    return out


def combine_states_(out: States, weights: list[float], parts: list[States]) -> States:
    """out <- sum_i weights[i] * parts[i]."""
    if isinstance(out, Tensor):
        torch.mul(parts[0], weights[0], out=out)
        for w, p in zip(weights[1:], parts[1:]):
            out.add_(p, alpha=w)
        return out
    for i, o in enumerate(out):
        torch.mul(parts[0][i], weights[0], out=o)
        for w, p in zip(weights[1:], parts[1:]):
            o.add_(p[i], alpha=w)
    return out


def dot_states(a: States, b: States, dtype: Optional[torch.dtype] = None) -> Tensor:
    """<a, b> over every element of every state: a 0-dim tensor (no host sync), computed in
    `dtype` (default: the states' own)."""
    def dot(x: Tensor, y: Tensor) -> Tensor:
        x, y = x.reshape(-1), y.reshape(-1)
        if dtype is not None and x.dtype != dtype:
            x, y = x.to(dtype), y.to(dtype)
        return torch.dot(x, y)

    if isinstance(a, Tensor):
        return dot(a, b)
    parts = [dot(x, y) for x, y in zip(a, b) if x.numel()]
    return stack_on_first_device(parts).sum()
