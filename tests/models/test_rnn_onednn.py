"""The oneDNN matmul path of the RNN engines (f32 on CPU) against the torch.mm path and f64.

The engines route their f32 matmuls through oneDNN (`engine.onednn_applies`), and the loops'
per-step matmuls through a prepacked oneDNN weight when a step is large enough
(`STEP_ONEDNN_MIN_FLOPS`; forced on here at test sizes). Both paths must give the same
forward and gradients up to f32 rounding, and f64 never takes it.
"""

from __future__ import annotations

import pytest
import torch

import highwaybp as hbp
import highwaybp.models.rnn.engine as engine_mod
from highwaybp.models.rnn import GRU, LSTM

T, B, IN, H = 9, 4, 3, 8
CELLS = {"gru": (GRU, torch.nn.GRU), "lstm": (LSTM, torch.nn.LSTM)}
needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


def _run(cell: str, method, dtype, h0: bool = True):
    torch.manual_seed(0)
    ours, theirs = CELLS[cell]
    ref = theirs(IN, H, num_layers=2).to(dtype)
    m = ours(IN, H, num_layers=2, method=method).to(dtype)
    m.load_state_dict(ref.state_dict())
    # drawn in f32 and converted: the f64 run sees the same numbers
    x = torch.randn(T, B, IN).to(dtype).requires_grad_()
    hx = torch.randn(2, B, H).to(dtype).requires_grad_() if h0 else None
    if cell == "lstm" and hx is not None:
        hx = (hx, torch.randn(2, B, H).to(dtype))
    y, _ = m(x, hx)
    leaves = [x, *m.parameters()]
    grads = torch.autograd.grad((y * torch.cos(y.detach() * 3)).sum(), leaves)
    return y.detach(), grads


@needs_onednn
def test_f32_takes_onednn_and_f64_does_not():
    assert engine_mod.onednn_applies(torch.zeros(1))
    assert not engine_mod.onednn_applies(torch.zeros(1, dtype=torch.float64))
    assert engine_mod.packed_linear(torch.zeros(4, 4), 2) is None  # below the step threshold
    assert engine_mod.packed_linear(torch.zeros(512, 512), 64) is not None


@needs_onednn
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("method", [hbp.Exact(), hbp.Highway(k=1), hbp.FixedPoint(k=2),
                                    hbp.Highway(tol=1e-4, max_k=T)], ids=repr)  # fmt: skip
@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("chunks", [False, True])
def test_onednn_path_equals_mm_path_and_f64(cell, method, per_step, chunks, monkeypatch):
    if per_step:  # also the loops' prepacked per-step matmuls (off at these tiny sizes)
        monkeypatch.setattr(engine_mod, "STEP_ONEDNN_MIN_FLOPS", 0)
    if chunks:  # sweeps and weight gradients by chunks of 4, 4 and 1 steps (GRU: 5 and 4)
        monkeypatch.setattr(engine_mod.Engine, "chunk_bytes", 4 * B * 4 * H * 4)
    y_dnn, g_dnn = _run(cell, method, torch.float32)
    monkeypatch.setattr(engine_mod, "USE_ONEDNN", False)
    y_mm, g_mm = _run(cell, method, torch.float32)
    y64, g64 = _run(cell, method, torch.float64)
    torch.testing.assert_close(y_dnn, y_mm, rtol=0, atol=1e-6)
    torch.testing.assert_close(y_dnn.double(), y64, rtol=0, atol=1e-6)
    for a, b, c in zip(g_dnn, g_mm, g64):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_onednn_per_step_forward_equals_torch_nn(cell, monkeypatch):
    monkeypatch.setattr(engine_mod, "STEP_ONEDNN_MIN_FLOPS", 0)
    torch.manual_seed(1)
    ours, theirs = CELLS[cell]
    ref = theirs(IN, H)
    m = ours(IN, H, bias=True)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, IN)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=0, atol=1e-6)


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's, harmless
def test_onednn_disabled_by_torch_flag_uses_mm():
    """torch.backends.mkldnn.flags(enabled=False) is honoured: torch.mm path, same result."""
    y_dnn, g_dnn = _run("lstm", hbp.Highway(k=1), torch.float32)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not engine_mod.onednn_applies(torch.zeros(1))
        y_mm, g_mm = _run("lstm", hbp.Highway(k=1), torch.float32)
    torch.testing.assert_close(y_dnn, y_mm, rtol=0, atol=1e-6)
    for a, b in zip(g_dnn, g_mm):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
