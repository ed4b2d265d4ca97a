"""How close is a method's gradient to exact backprop? Measure it, don't assume it.

`use_method(model, method)` switches every `ResidualChain` inside a model for a block;
`gradient_fidelity(model, loss_fn, methods)` computes the parameter gradient of each method
on the same inputs and compares it with exact backprop's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import Tensor, nn

from highwaybp.core.chain import ResidualChain
from highwaybp.core.methods import METHOD_FUNCTIONS, Exact, Method
from highwaybp.core.replay import buffers_restored


def chains_in(model: nn.Module) -> list[nn.Module]:
    """Every module in `model` with a switchable `method` (ResidualChain and RNN adapters)."""
    return [m for m in model.modules() if isinstance(m, ResidualChain) or _has_method(m)]


def _has_method(module: nn.Module) -> bool:
    return isinstance(getattr(module, "method", None), Method)


@contextmanager
def use_method(model: nn.Module, method: Method) -> Iterator[nn.Module]:
    """Within the block, every chain in `model` uses `method`; restored afterwards."""
    if not isinstance(method, Method):
        raise TypeError(f"use_method needs a highwaybp method, got {method!r}")
    chains = chains_in(model)
    if not chains:
        raise ValueError("use_method: the model contains no ResidualChain (nothing to switch)")
    saved = [c.method for c in chains]
    try:
        for c in chains:
            c.method = method
        yield model
    finally:
        for c, m in zip(chains, saved):
            c.method = m


def set_step_norm_recording(model: nn.Module, on: bool) -> list[tuple[nn.Module, bool]]:
    """Set `record_step_norms` on every chain in `model` that has that switch (see
    `ResidualChain`); returns [(chain, previous value)] for restoring."""
    chains = [c for c in chains_in(model) if hasattr(c, "record_step_norms")]
    saved = [(c, bool(c.record_step_norms)) for c in chains]
    for c in chains:
        c.record_step_norms = on
    return saved


@contextmanager
def step_norms_recorded(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every chain in `model` records its iterations' relative steps
    (`last_diagnostics.step_norms`) even for a fixed k; restored afterwards."""
    saved = set_step_norm_recording(model, True)
    try:
        yield model
    finally:
        for c, value in saved:
            c.record_step_norms = value


def _flat_grad(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def compare_gradients(estimate: list[Tensor], exact: list[Tensor]) -> dict[str, float]:
    """Cosine similarity and relative L2 error ||est - exact|| / ||exact|| of two gradients."""
    e = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in estimate])
    x = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in exact])
    x_norm = torch.linalg.vector_norm(x)
    cos = torch.nn.functional.cosine_similarity(e, x, dim=0, eps=1e-300)
    rel = torch.linalg.vector_norm(e - x) / x_norm.clamp_min(1e-300)
    return {"cosine": float(cos), "rel_error": float(rel)}


def gradient_fidelity(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
    methods: Union[Iterable[Method], Mapping[str, Method]],
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Compare each method's parameter gradient with exact backprop's on the same inputs.

    Args:
        model: a module containing one or more ResidualChains (or method-switchable RNNs).
        loss_fn: `model -> scalar loss`, evaluated once per method on the same data.
        methods: the methods to compare (a mapping gives them names).
        seed: the RNG seed set before each evaluation (same dropout masks for every method).

    Returns {name: {"cosine", "rel_error", "iterations", "step_norms"}} (step norms recorded
    for every method, fixed k included); `.grad` is untouched.
    """
    named = dict(methods) if isinstance(methods, Mapping) else {repr(m): m for m in methods}
    # The caller's RNG stream and the model's buffers (BatchNorm statistics) are left as
    # they were: measuring must not perturb training.
    with torch.random.fork_rng(devices=_cuda_devices(model)), buffers_restored(model):
        return _fidelity_report(model, loss_fn, named, seed)


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _fidelity_report(
    model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], named: dict, seed: int
) -> dict[str, dict[str, Any]]:
    with use_method(model, Exact()):
        torch.manual_seed(seed)
        exact = _flat_grad(model, loss_fn)
    report: dict[str, dict[str, Any]] = {}
    for name, method in named.items():
        for c in chains_in(model):
            c.last_diagnostics = None  # report only what this evaluation ran
        with use_method(model, method), step_norms_recorded(model):
            torch.manual_seed(seed)
            grad = _flat_grad(model, loss_fn)
        entry: dict[str, Any] = compare_gradients(grad, exact)
        diags = [getattr(c, "last_diagnostics", None) for c in chains_in(model)]
        diags = [d for d in diags if d is not None]
        entry["iterations"] = [d.iterations for d in diags]
        entry["step_norms"] = [d.step_norms for d in diags]
        report[name] = entry
    return report


def changed_parameters(loss: Tensor, params: Iterable[Tensor]) -> list[bool]:
    """For each of `params`, whether its gradient in `loss` flows through a gradient
    method's backward (a chain's or an RNN layer's): the parameters of the chains/RNNs and
    everything upstream of them (an embedding), not those only downstream (a decoder, whose
    gradient is the same under every method). Read from `loss`'s autograd graph, which must
    have been built with an iterative method (under Exact() a chain is plain autograd)."""
    params = list(params)
    index = {_leaf_key(p): i for i, p in enumerate(params)}
    flags = [False] * len(params)
    # Some torch releases (2.5) hand out a fresh Python wrapper per access to a graph node
    # or to AccumulateGrad.variable: leaves are matched by their storage, not by id(), and
    # every visited wrapper is kept alive so that no id() is reused while walking.
    visited: list[Any] = []
    seen: set[tuple[int, bool]] = set()
    stack = [(loss.grad_fn, False)]
    while stack:
        node, below = stack.pop()
        if node is None or (id(node), below) in seen:
            continue
        visited.append(node)
        seen.add((id(node), below))
        below = below or getattr(node, "_forward_cls", None) in METHOD_FUNCTIONS
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if below and variable is not None and _leaf_key(variable) in index:
            flags[index[_leaf_key(variable)]] = True
        stack.extend((nxt, below) for nxt, _ in node.next_functions)
    return flags


def _leaf_key(t: Tensor) -> tuple:
    """What identifies a leaf tensor whatever Python object wraps it."""
    return (t.device, t.dtype, t.data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()))
