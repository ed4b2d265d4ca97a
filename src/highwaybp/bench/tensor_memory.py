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

To find out what makes a peak, `TensorMemory(record_peak=True)` also keeps, for the
storages alive at the peak, which op allocated each and from where (the innermost frame
outside torch): `mem.peak_allocations`, largest first. Slower (a stack walk per storage).
"""

from __future__ import annotations

import functools
import traceback
import weakref
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@functools.cache
def onednn_aliases_unfollowed() -> str | None:
    """Why this torch keeps `TensorMemory` from following an alias of a oneDNN tensor, or
    None. A oneDNN tensor has no storage, so its aliases are followed through the tensor
    objects the dispatch mode sees; older torch releases (2.5) hand the mode another Python
    object than the one `detach` returns to its caller, whose weak reference dies at once
    (the buffer would count as freed while an alias lives: refused instead)."""
    if not torch.backends.mkldnn.is_available():
        return None
    seen: list[torch.Tensor] = []

    class _Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            out = func(*args, **(kwargs or {}))
            seen.append(out)
            return out

    base = torch.zeros(1, 1).to_mkldnn()
    with _Probe():
        alias = base.detach()
    if seen and seen[-1] is alias:
        return None
    return (f"torch {torch.__version__} hands a dispatch mode another object than the "
            f"alias `detach` returns (a newer torch keeps them one object)")


class TensorMemory(TorchDispatchMode):
    """Counts the bytes of tensor storages created in the block; see the module docstring.

    Args:
        record_peak: also record what is alive at the peak (`peak_allocations`).

    Attributes:
        live_bytes: bytes of counted storages alive now.
        peak_bytes: the largest `live_bytes` seen in the block.
        peak_allocations: with `record_peak`, the storages alive at the peak grouped by
            (bytes, op, where): a list of (count, bytes each, op, where), largest total
            first. `where` is "function (file:line)" of the innermost frame outside torch.
    """

    def __init__(self, record_peak: bool = False) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, list[Any]] = {}  # data address -> weak references to its owners
        self.record_peak = record_peak
        self.peak_allocations: list[tuple[int, int, str, str]] = []
        self._origin: dict[int, tuple[str, str]] = {}  # address -> (op, where)
        self._op = ""

    def _count(self, tensor: torch.Tensor, input_addresses: set[int]) -> None:
        if tensor.device.type == "meta":
            return
        owner = _owner(tensor)
        address, size = _address(tensor), _nbytes(owner)
        if size == 0:
            return
        if address in self._refs:  # a view or in-place result of a counted allocation
            if tensor.is_mkldnn:  # an alias of a counted oneDNN tensor keeps it alive too
                reason = onednn_aliases_unfollowed()
                if reason is not None:
                    raise RuntimeError(f"TensorMemory cannot count an alias of a oneDNN "
                                       f"tensor here: {reason}")
                self._refs[address].append(weakref.ref(owner, self._freed(address)))
            return
        if address in input_addresses:  # shares the storage of a tensor from before the block
            return
        self._refs[address] = [weakref.ref(owner, self._freed(address))]
        if self.record_peak:
            self._origin[address] = (self._op, _caller())

    def _freed(self, address: int) -> Any:
        def freed(ref: Any) -> None:  # the allocation is gone when its last owner is
            refs = self._refs.get(address)
            if refs is not None:
                refs[:] = [r for r in refs if r is not ref]
                if not refs:
                    self._refs.pop(address, None)

        return freed

    def _live_owners(self) -> list[tuple[int, Any]]:
        owners = []
        for address, refs in list(self._refs.items()):
            owner = next((o for o in (r() for r in refs) if o is not None), None)
            if owner is not None:
                owners.append((address, owner))
        return owners

    def _update(self) -> None:
        # Summed afresh (not kept as a running total): a storage can also be resized
        # without being freed (an out= op growing it, storage.resize_).
        owners = self._live_owners()
        self.live_bytes = sum(_nbytes(o) for _, o in owners)
        if self.record_peak and self.live_bytes > self.peak_bytes:
            groups: Counter = Counter()
            for address, owner in owners:
                op, where = self._origin.get(address, ("?", "?"))
                groups[(_nbytes(owner), op, where)] += 1
            self.peak_allocations = sorted(
                ((n, size, op, where) for (size, op, where), n in groups.items()),
                key=lambda row: -row[0] * row[1])
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        input_addresses = {_address(t) for t in inputs if t.device.type != "meta"}
        self._update()  # what was freed or shrunk since the last op
        self._op = str(func)
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._count(item, input_addresses)
        self._update()
        return out


def _caller() -> str:
    """The innermost frame outside torch (and this module): where an op was called from."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("tensor_memory.py"):
            return f"{frame.name} ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
    return "?"


# oneDNN's opaque tensors (e.g. a weight packed for its matmuls) have no storage to read:
# they are identified by their data pointer and sized by oneDNN; the tensor objects are the
# owners (an alias, e.g. a detach, is another owner of the same allocation).
def _owner(tensor: torch.Tensor) -> Any:
    return tensor if tensor.is_mkldnn else tensor.untyped_storage()


def _address(tensor: torch.Tensor) -> int:
    if tensor.is_mkldnn:
        return torch.ops.mkldnn.data_ptr(tensor)
    return tensor.untyped_storage().data_ptr()


def _nbytes(owner: Any) -> int:
    if isinstance(owner, torch.Tensor):
        return torch.ops.mkldnn._nbytes(owner)
    return owner.nbytes()
