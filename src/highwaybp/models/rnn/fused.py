"""torch's own fused RNN kernel for one layer, and the choice of forward path and time scan.

`fused_layer` calls what torch.nn.GRU/LSTM call (`torch._VF.gru` / `torch._VF.lstm`: cuDNN
on CUDA; on CPU oneDNN's LSTM for float32, otherwise torch's native per-step loop) for one
layer, one direction, no dropout. With forward="fused" the engine adopts its outputs and
recomputes the gates in the backward (`Engine.use_fused_outputs`); `Exact()` is torch's own
autograd through this call. This function is the only place that calls the kernel, so a
dispatch counter can count it as one op (on a GPU it is one cuDNN call).
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import Tensor

FORWARD_MODES = ("auto", "fused", "loop")
SCAN_CHOICES = ("auto", "sequential", "log")


def resolve_paths(forward: str, scan: str, device: torch.device) -> tuple[str, str]:
    """("fused" | "loop", "sequential" | "log") for a module's settings on `device`.

    "auto": the fused kernel and the log-depth scan on CUDA, where every op is a kernel
    launch; the loop and the sequential scan on CPU, where an op costs about its own work
    and loop + sequential is the fastest path of every Highway method at the four committed
    bench settings (`bench rnn --paths`, results/rnn/paths_*.json; docs/rnn.md, "Fused
    forward and log-depth scans").
    """
    cuda = device.type == "cuda"
    path = ("fused" if cuda else "loop") if forward == "auto" else forward
    scan_mode = ("log" if cuda else "sequential") if scan == "auto" else scan
    return path, scan_mode


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def fused_layer(
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """One layer through torch's fused kernel: x [T, B, In], h0 (and c0, LSTM) [B, H] ->
    y [T, B, H] (GRU) or (y, c_T [B, H]) (LSTM). Records an autograd graph iff grad mode
    is on (the Exact path); the Highway path calls it inside its Function (no tape)."""
    if (b_ih is None) != (b_hh is None):  # the modules hold both or neither
        raise ValueError("fused_layer needs both biases or neither")
    params = [w_ih, w_hh] if b_ih is None else [w_ih, w_hh, b_ih, b_hh]
    has_bias = b_ih is not None
    with warnings.catch_warnings():
        # cuDNN copies per-parameter weights into its packed layout on every call (one
        # layer's weights, a small copy); torch warns about it once per process
        warnings.filterwarnings("ignore", message="RNN module weights are not part")
        if c0 is None:
            y, _ = torch._VF.gru(x, h0.unsqueeze(0), params, has_bias, 1, 0.0, False, False,
                                 False)  # fmt: skip
            return y
        y, _, c_n = torch._VF.lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)), params, has_bias, 1,
                                   0.0, False, False, False)  # fmt: skip
        return y, c_n[0]
