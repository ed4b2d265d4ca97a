"""Per-layer VJP backends of the chain's backward: one protocol, a registry of names.

A backend is built once per backward from the layers, their saved inputs h_0..h_{L-1}
and the forward's replay states; it re-runs the layers under autograd and then answers the
iteration's three questions. `loop` (`LoopVJP`) is the reference, one autograd graph per
layer; `batched` (`BatchedVJP`) runs groups of layers that provably compute the same
function as one vmapped call and equals the loop to rounding. A new backend is one class
implementing `VJPBackend` and one entry in `VJP_BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Protocol

from torch import Tensor, nn

from highwaybp.core.backends.batched import BatchedVJP
from highwaybp.core.backends.loop import LoopVJP
from highwaybp.core.replay import ForwardState


class VJPBackend(Protocol):
    """What the chain's backward asks of a backend (states indexed as in `core.iteration`).

    `contexts[j-1]` is what layer j's residual map needs to apply K_j^T in the scan.
    """

    contexts: list[Any]

    def __init__(self, layers: Sequence[nn.Module], inputs: Sequence[Tensor] = (),
                 states: Sequence[ForwardState] = ()) -> None: ...

    def block_vjps(self, ws: Sequence[Tensor]) -> list[Tensor]:
        """[w_j @ J_j for j = 1..L] given ws = [w_1..w_L], each of layer j's output shape."""
        ...

    def layer_block_vjp(self, j: int, w: Tensor) -> Tensor:
        """w @ J_j for one layer (1-based j), for the sequential exact backward."""
        ...

    def param_vjps(self, ws: Sequence[Tensor], params: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """sum_j w_j @ df_j/dtheta for each parameter (None if unused); frees the graphs."""
        ...


VJP_BACKENDS: dict[str, type[VJPBackend]] = {"loop": LoopVJP, "batched": BatchedVJP}

__all__ = ["VJP_BACKENDS", "BatchedVJP", "LoopVJP", "VJPBackend"]
