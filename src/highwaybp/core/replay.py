"""Re-running a layer for its VJPs must evaluate the same function as the forward did.

As torch.utils.checkpoint does: keep the RNG state each layer saw (dropout masks) and the
autocast state, and replay them. Re-running a layer must also not change module state, so
buffers (BatchNorm running statistics, num_batches_tracked) are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import get_device_states, set_device_states


@dataclass
class ForwardState:
    """What one layer's forward saw: RNG (if preserved), autocast, train/eval flags, buffers.

    `buffers` are copies taken before the forward (a forward may update them: BatchNorm
    statistics, spectral-norm power iterations), so the re-run sees what the forward saw.
    """

    device_type: str
    cpu_rng: Optional[Tensor]
    device_ids: list
    device_rng: list
    autocast: dict[str, Any]
    training: list = field(default_factory=list)
    buffers: list = field(default_factory=list)


def _autocast_state(device_type: str) -> dict[str, Any]:
    state = {
        "cpu": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
    }
    if device_type != "cpu" and torch.amp.is_autocast_available(device_type):
        state[device_type] = (
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
    return state


def capture_forward_state(
    x: Tensor, preserve_rng: bool, layer: Optional[nn.Module] = None
) -> ForwardState:
    """The state to replay later for `layer` about to run on `x`."""
    device_type = x.device.type
    cpu_rng, ids, states = None, [], []
    if preserve_rng:
        cpu_rng = torch.get_rng_state()
        ids, states = get_device_states(x)
    state = ForwardState(device_type, cpu_rng, ids, states, _autocast_state(device_type))
    if layer is not None:
        state.training = [m.training for m in layer.modules()]
        state.buffers = [
            (sub, name, buf.detach().clone())
            for sub in layer.modules()
            for name, buf in sub._buffers.items()
            if buf is not None
        ]
    return state


@contextmanager
def modes_and_buffers_replayed(layer: nn.Module, state: ForwardState) -> Iterator[None]:
    """Run the body with `layer` in the train/eval modes and with copies of the buffers
    its forward saw; the module's own modes and buffers are put back afterwards."""
    modules = list(layer.modules())
    current_modes = [m.training for m in modules]
    if state.training and len(state.training) == len(modules):
        for m, mode in zip(modules, state.training):
            m.training = mode
    try:
        with _buffer_copies_swapped_in(state.buffers):
            yield
    finally:
        for m, mode in zip(modules, current_modes):
            m.training = mode


@contextmanager
def replayed(state: ForwardState) -> Iterator[None]:
    """Run the body under the captured RNG and autocast state; the caller's RNG is untouched."""
    devices = state.device_ids if state.cpu_rng is not None else []
    with torch.random.fork_rng(devices=devices, enabled=state.cpu_rng is not None,
                               device_type=state.device_type if devices else None):
        if state.cpu_rng is not None:
            torch.set_rng_state(state.cpu_rng)
            if devices:
                set_device_states(devices, state.device_rng, device_type=state.device_type)
        with _autocast(state.autocast):
            yield


@contextmanager
def _autocast(state: dict[str, Any]) -> Iterator[None]:
    enabled, dtype = state["cpu"]
    with torch.autocast("cpu", dtype=dtype, enabled=enabled):
        others = [(dev, st) for dev, st in state.items() if dev != "cpu"]
        if not others:
            yield
            return
        dev, (dev_enabled, dev_dtype) = others[0]
        with torch.autocast(dev, dtype=dev_dtype, enabled=dev_enabled):
            yield


@contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Run the body on copies of every buffer of `module`, then put the originals back.

    The re-run must not count twice in BatchNorm's running statistics. The originals are
    swapped out rather than restored in place afterwards: autograd saves the running-stat
    tensors in BatchNorm's graph, and an in-place restore would invalidate that graph.
    """
    current = [
        (sub, name, buf)
        for sub in module.modules()
        for name, buf in sub._buffers.items()
        if buf is not None
    ]
    with _buffer_copies_swapped_in(current):
        yield


@contextmanager
def _buffer_copies_swapped_in(entries: list) -> Iterator[None]:
    """For (module, name, value) entries: module.name = value.clone() during the body."""
    originals = [(sub, name, sub._buffers[name]) for sub, name, _ in entries]
    for sub, name, value in entries:
        sub._buffers[name] = value.clone()
    try:
        yield
    finally:
        for sub, name, buf in originals:
            sub._buffers[name] = buf
