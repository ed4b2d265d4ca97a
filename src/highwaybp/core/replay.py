"""Re-running a layer for its VJPs must evaluate the same function as the forward did.

As torch.utils.checkpoint does: keep the RNG state each layer saw (dropout masks) and the
autocast state, and replay them. Re-running a layer must also not change module state, so
buffers (BatchNorm running statistics, num_batches_tracked) are restored afterwards.

Python state. The scalar attributes (int, float, complex, bool, str, None, tuples of them)
of every module of the layer are saved with its forward state and replayed like buffers: a
hyper-parameter changed between forward and backward (a scale, an epsilon) does not change
the function the backward differentiates. A forward that itself changes such an attribute
(a call counter used as a warm-up scale, a flag flipped on first call) would compute another
function when re-run and change the state twice: the re-run's change is an error (the value
is put back first). Not seen: containers changed in place (a list appended to), attributes
that are not scalars (a function or tensor rebound after the forward), attributes of
non-module objects, globals, closures of hooks. A block whose output depends on such state
gets the gradient of the function the re-run computes; keep such state outside the block
(pass it in as a buffer, or as part of the input) or use method=Exact() for that chain.
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
    """What one layer's forward saw: RNG (if preserved), autocast, train/eval flags, buffers,
    the modules' Python scalar attributes ((module, name, value) triples).

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
    scalars: list = field(default_factory=list)


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
        state.scalars = python_scalars(layer)
        state.buffers = [
            (sub, name, buf.detach().clone())
            for sub in layer.modules()
            for name, buf in sub._buffers.items()
            if buf is not None
        ]
    return state


@contextmanager
def modes_and_buffers_replayed(layer: nn.Module, state: ForwardState) -> Iterator[None]:
    """Run the body with `layer` in the train/eval modes, with copies of the buffers and
    with the Python scalar attributes its forward saw; the module's own modes, buffers and
    scalars are put back afterwards. Raise if the body changed a scalar (module docstring)."""
    modules = list(layer.modules())
    current_modes = [m.training for m in modules]
    if state.training and len(state.training) == len(modules):
        for m, mode in zip(modules, state.training):
            m.training = mode
    current_scalars = python_scalars(layer)
    for m, key, value in state.scalars:
        vars(m)[key] = value
    try:
        with _buffer_copies_swapped_in(state.buffers):
            yield
        changed = _changed_scalars(state.scalars)
    finally:
        for m, mode in zip(modules, current_modes):
            m.training = mode
        for m, key, value in current_scalars:
            vars(m)[key] = value
    if changed:
        m, key, value, now = changed[0]
        raise RuntimeError(
            f"{type(m).__name__}.{key} changed from {value!r} to {now!r} when the backward "
            "re-ran the layer: a forward that updates Python state computes another function "
            "when re-run (and updates it twice). Keep that state outside the block (e.g. pass "
            "a step count in as a buffer or input, update it in the training loop), or use "
            "method=Exact() for this chain. The attribute was put back to its value before "
            "the backward."
        )


_MODULE_BOOKKEEPING = frozenset(vars(nn.Module())) - {"training"}
_SCALARS = (int, float, complex, bool, str, type(None))


def is_python_scalar(value: Any) -> bool:
    """int, float, complex, bool, str, None, or a tuple of them (nested)."""
    if isinstance(value, tuple):
        return all(is_python_scalar(v) for v in value)
    return isinstance(value, _SCALARS)


def module_attributes(module: nn.Module) -> dict[str, Any]:
    """The module's own attributes: its __dict__ without nn.Module's bookkeeping (parameter,
    buffer, submodule and hook dicts) and without `training` (replayed separately)."""
    return {
        key: value
        for key, value in vars(module).items()
        if key not in _MODULE_BOOKKEEPING and key != "training"
    }


def python_scalars(layer: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """(module, name, value) for each scalar attribute of each module of `layer`."""
    return [
        (m, key, value)
        for m in layer.modules()
        for key, value in module_attributes(m).items()
        if is_python_scalar(value)
    ]


def _changed_scalars(saved: list) -> list[tuple[nn.Module, str, Any, Any]]:
    """(module, name, saved value, current value) for each saved scalar that changed."""
    changed = []
    for m, key, value in saved:
        now = vars(m).get(key, _MISSING)
        if not same_scalar(now, value):
            changed.append((m, key, value, now))
    return changed


_MISSING = object()


def same_scalar(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):  # 1 -> 1.0 or True is a change
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same_scalar(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN stays NaN


@contextmanager
def replayed(state: ForwardState) -> Iterator[None]:
    """Run the body under the captured RNG and autocast state; the caller's RNG is untouched."""
    with rng_forked(state.cpu_rng, state.device_ids, state.device_rng, state.device_type), \
            _autocast(state.autocast):
        yield


# The RNG save/restore of every re-run (the chain's VJP re-runs above, DDG's recomputed
# forwards and per-stage streams in highwaybp.ddg.stage): one owner.


@contextmanager
def rng_forked(cpu_rng: Optional[Tensor], device_ids: list, device_rng: list,
               device_type: str = "cuda") -> Iterator[None]:
    """Run the body with the CPU RNG set to `cpu_rng` and each device in `device_ids` set to
    its state in `device_rng`; the caller's RNG states are restored afterwards. With
    `cpu_rng` None the body runs under the caller's RNG, untouched."""
    devices = device_ids if cpu_rng is not None else []
    # device_type only with devices: torch < 2.5 refuses device_type=None, and its default
    # ("cuda" there, the current accelerator in newer releases) forks nothing without them.
    kind = {"device_type": device_type} if devices else {}
    with torch.random.fork_rng(devices=devices, enabled=cpu_rng is not None, **kind):
        if cpu_rng is not None:
            torch.set_rng_state(cpu_rng)
            if devices:
                set_device_states(devices, device_rng, device_type=device_type)
        yield


def rng_states(device: torch.device) -> list[Tensor]:
    """The RNG states a forward on `device` draws from: [CPU] or [CPU, that CUDA device]."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


@contextmanager
def rng_states_used(states: list[Tensor], device: torch.device) -> Iterator[None]:
    """Run the body with the RNG set to `states` (from `rng_states(device)`), then restore
    the caller's RNG."""
    with rng_forked(states[0], [device] if device.type == "cuda" else [], states[1:]):
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
