"""Deterministic tensor-memory accounting: the bytes of tensor storages alive, and their peak.

`TensorMemory` is a torch dispatch mode: every storage that an op returns while the mode is
active is counted once (views share their base's storage) until it is freed (a weak
reference on the storage fires when its memory is released). The peak is therefore the
largest total size of tensors created inside the block and alive at the same time, exact
to the byte and the same on every run: what the Highway-BP memory claim is about, without
the resident-set noise of an allocator (see `highwaybp.bench.memory` for that measure).

    with TensorMemory() as mem:
        loss = model(x).sum(); loss.backward()
    mem.peak_bytes  # tensors allocated in the block (activations, graphs, gradients...)

Tensors that existed before the block (parameters, the input) are not counted. The totals
are summed afresh at each op (a storage freed or resized between two ops counts from the
next). The autograd engine runs a CPU backward on the calling thread, so the backward's
tensors are seen too.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Counts the bytes of tensor storages created in the block; see the module docstring.

    Attributes:
        live_bytes: bytes of counted storages alive now.
        peak_bytes: the largest `live_bytes` seen in the block.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, Any] = {}  # storage address (or id) -> weak reference

    def _count(self, tensor: torch.Tensor, input_addresses: set[int]) -> None:
        if tensor.device.type == "meta":
            return
        owner = _owner(tensor)
        address, size = _address(tensor), _nbytes(owner)
        # a view or an in-place result shares an input's storage: not a new allocation
        if size == 0 or address in self._refs or address in input_addresses:
            return
        def freed(_: Any, address: int = address) -> None:
            self._refs.pop(address, None)

        self._refs[address] = weakref.ref(owner, freed)

    def _update(self) -> None:
        # Summed afresh (not kept as a running total): a storage can also be resized
        # without being freed (an out= op growing it, storage.resize_).
        owners = [ref() for ref in list(self._refs.values())]
        self.live_bytes = sum(_nbytes(o) for o in owners if o is not None)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        input_addresses = {_address(t) for t in inputs if t.device.type != "meta"}
        self._update()  # what was freed or shrunk since the last op
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._count(item, input_addresses)
        self._update()
        return out


# oneDNN's opaque tensors (e.g. a weight packed for its matmuls, torch.nn.LSTM's CPU
# workspace) have no storage to read: they are counted by their size, the tensor itself
# being the object whose release frees them.
def _owner(tensor: torch.Tensor) -> Any:
    return tensor if tensor.is_mkldnn else tensor.untyped_storage()


def _address(tensor: torch.Tensor) -> int:
    return id(tensor) if tensor.is_mkldnn else tensor.untyped_storage().data_ptr()


def _nbytes(owner: Any) -> int:
    if isinstance(owner, torch.Tensor):
        return owner.numel() * owner.element_size()
    return owner.nbytes()
