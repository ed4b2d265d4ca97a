"""Property tests of highwaybp.GRU/LSTM over shapes, layers and chunkings (float64).

The backward sweeps run over chunks of time steps; `chunk_bytes` is set so that a chunk is
1..4 steps, i.e. a sequence is split into many chunks (the default keeps small sequences in
one chunk). Exact methods are checked against torch.nn, truncated ones (k < T) against a
stack of `CellRNN`s on the reference cells (autograd VJPs + the core's highway_iterate).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import highwaybp as hbp
from highwaybp.models.rnn import GRU, LSTM, CellRNN, Engine, GRUCellRef, LSTMCellRef

DT = torch.float64
PAIRS = {"gru": (GRU, nn.GRU, GRUCellRef, 3), "lstm": (LSTM, nn.LSTM, LSTMCellRef, 4)}


def _chunk_bytes(cell: str, batch: int, hidden: int, steps: int) -> int:
    """chunk_bytes giving chunks of `steps` time steps (see Engine.__init__)."""
    return steps * batch * PAIRS[cell][3] * hidden * torch.finfo(DT).bits // 8


def _leaves(state):
    return torch.utils._pytree.tree_leaves(state)


@settings(max_examples=30, deadline=None)
@given(
    cell=st.sampled_from(["gru", "lstm"]),
    seq_len=st.integers(1, 12),
    batch=st.integers(1, 3),
    input_size=st.integers(1, 4),
    hidden=st.integers(1, 5),
    layers=st.integers(1, 3),
    chunk_steps=st.integers(1, 4),
    layout=st.sampled_from(["time_first", "batch_first", "unbatched"]),
    seed=st.integers(0, 2**16),
)
def test_exact_methods_equal_torch_nn(
    cell, seq_len, batch, input_size, hidden, layers, chunk_steps, layout, seed
):
    ours, theirs, _, _ = PAIRS[cell]
    if layout == "unbatched":
        batch = 1
    torch.manual_seed(seed)
    batch_first = layout == "batch_first"
    ref = theirs(input_size, hidden, num_layers=layers, batch_first=batch_first).double()
    m = ours(input_size, hidden, num_layers=layers, batch_first=batch_first).double()
    m.load_state_dict(ref.state_dict())
    shape = {
        "time_first": (seq_len, batch, input_size),
        "batch_first": (batch, seq_len, input_size),
        "unbatched": (seq_len, input_size),
    }[layout]
    x = torch.randn(shape, dtype=DT, requires_grad=True)
    state_shape = (layers, hidden) if layout == "unbatched" else (layers, batch, hidden)
    h0 = torch.randn(state_shape, dtype=DT, requires_grad=True)
    c0 = torch.randn(state_shape, dtype=DT, requires_grad=True)
    hx, extra = ((h0, c0), [x, h0, c0]) if cell == "lstm" else (h0, [x, h0])
    w_y = torch.randn((*shape[:-1], hidden), dtype=DT)
    w_s = torch.randn(state_shape, dtype=DT)

    def loss(model):
        y, state = model(x, hx)
        return (y * w_y).sum() + sum((s * w_s).sum() for s in _leaves(state)), y

    loss_ref, y_ref = loss(ref)
    want = torch.autograd.grad(loss_ref, [*ref.parameters(), *extra])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "chunk_bytes", _chunk_bytes(cell, batch, hidden, chunk_steps))
        for method in (hbp.Exact(), hbp.Highway(k=seq_len), hbp.FixedPoint(k=seq_len)):
            m.method = method
            loss_ours, y = loss(m)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
            got = torch.autograd.grad(loss_ours, [*m.parameters(), *extra])
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    cell=st.sampled_from(["gru", "lstm"]),
    seq_len=st.integers(2, 12),
    batch=st.integers(1, 3),
    input_size=st.integers(1, 4),
    hidden=st.integers(1, 5),
    layers=st.integers(1, 3),
    chunk_steps=st.integers(1, 4),
    k=st.integers(0, 12),
    kind=st.sampled_from(["highway", "fixed_point", "adaptive"]),
    iterate=st.sampled_from(["fast", "reference"]),
    dropout=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 2**16),
)
def test_truncated_gradient_equals_stacked_cell_rnn(
    cell, seq_len, batch, input_size, hidden, layers, chunk_steps, k, kind, iterate, dropout, seed
):
    """Layer by layer, the gradient reaching a layer's output is its per-step loss: the
    module must equal CellRNNs stacked by autograd (with the same dropout masks)."""
    ours, _, ref_cls, _ = PAIRS[cell]
    lstm = cell == "lstm"
    k = min(k, seq_len)
    method = {
        "highway": hbp.Highway(k=k),
        "fixed_point": hbp.FixedPoint(k=k),
        "adaptive": hbp.Highway(tol=1e-4, max_k=max(k, 1), fallback="best"),
    }[kind]
    torch.manual_seed(seed)
    m = ours(input_size, hidden, num_layers=layers, dropout=dropout, method=method)
    m = m.double()
    m.iterate = iterate
    cells = [ref_cls(input_size if i == 0 else hidden, hidden).double() for i in range(layers)]
    for i, ref_cell in enumerate(cells):
        ref_cell.load_state_dict({n: getattr(m, f"{n}_l{i}") for n in ref_cell.state_dict()})
    refs = [CellRNN(ref_cell, method) for ref_cell in cells]
    x = torch.randn(seq_len, batch, input_size, dtype=DT, requires_grad=True)
    h0 = torch.randn(layers, batch, hidden, dtype=DT, requires_grad=True)
    c0 = torch.randn(layers, batch, hidden, dtype=DT, requires_grad=True)
    w_y = torch.randn(seq_len, batch, hidden, dtype=DT)
    w_h, w_c = torch.randn(2, layers, batch, hidden, dtype=DT)
    leaves = [x, h0, c0] if lstm else [x, h0]

    def ref_loss():
        inp, h_n, c_n = x, [], []
        for i, rnn in enumerate(refs):
            states = rnn(inp, torch.cat([c0[i], h0[i]], -1) if lstm else h0[i])
            y = states[..., hidden:] if lstm else states
            h_n.append(y[-1])
            c_n.append(states[-1, :, :hidden])
            inp = nn.functional.dropout(y, dropout, training=True) if i < layers - 1 else y
        loss = (inp * w_y).sum() + (torch.stack(h_n) * w_h).sum()
        return loss + (torch.stack(c_n) * w_c).sum() if lstm else loss

    def our_loss():
        y, state = m(x, (h0, c0) if lstm else h0)
        h_n, c_n = state if lstm else (state, None)
        loss = (y * w_y).sum() + (h_n * w_h).sum()
        return loss + (c_n * w_c).sum() if lstm else loss

    torch.manual_seed(seed + 1)
    want = torch.autograd.grad(ref_loss(), [*leaves, *(p for c in cells for p in c.parameters())])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "chunk_bytes", _chunk_bytes(cell, batch, hidden, chunk_steps))
        torch.manual_seed(seed + 1)
        got = torch.autograd.grad(our_loss(), [*leaves, *m.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    for diag, rnn in zip(m.layer_diagnostics, refs):
        assert diag.iterations == rnn.last_diagnostics.iterations
        assert diag.stop_reason == rnn.last_diagnostics.stop_reason
