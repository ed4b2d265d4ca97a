"""Recurrent networks trained with Highway-BP through time.

- `modules.py`: `GRU`, `LSTM`, drop-in torch.nn.GRU / torch.nn.LSTM (the public API).
- `function.py`: the autograd Function of one layer (tape-free forward, chosen backward).
- `engine.py`, `gru.py`, `lstm.py`: the engine base and one engine per cell (stored gates,
  batched block VJPs, in-place scan, exact BPTT, parameter VJPs).
- `fused.py`: torch's fused kernel for one layer (forward="fused") and the choice of
  forward path and time scan ("auto": fused + log-depth scans on CUDA, loop + sequential
  on CPU).
- `loop.py`: the iteration on an engine, fast and reference.
- `reference.py`: `CellRNN`, the reference cells and the autograd-loop baseline: what the
  fast path is tested against.

Each time step is a layer: h_t = f(x_t, h_{t-1}) with K_t = diag(z_t) for the GRU (torch's
z is the fraction of h kept) and K_t = diag(f_t) on the cell state for the LSTM.

    rnn = highwaybp.GRU(32, 128, num_layers=2, method=highwaybp.Highway(k=1))
    rnn.load_state_dict(torch.nn.GRU(32, 128, num_layers=2).state_dict())
    out, h_n = rnn(x)            # x [T, B, 32] (or [B, T, 32] with batch_first=True)
    loss(out).backward()         # Highway-BP; rnn.last_diagnostics says what it did
"""

from highwaybp.models.rnn.engine import BufferPool, Engine
from highwaybp.models.rnn.gru import GRUEngine
from highwaybp.models.rnn.loop import fast_iterate, reference_iterate
from highwaybp.models.rnn.lstm import LSTMEngine
from highwaybp.models.rnn.modules import GRU, ITERATE_MODES, LSTM
from highwaybp.models.rnn.reference import AutogradLoopRNN, CellRNN, GRUCellRef, LSTMCellRef

__all__ = [
    "GRU",
    "ITERATE_MODES",
    "LSTM",
    "AutogradLoopRNN",
    "BufferPool",
    "CellRNN",
    "Engine",
    "GRUCellRef",
    "GRUEngine",
    "LSTMCellRef",
    "LSTMEngine",
    "fast_iterate",
    "reference_iterate",
]
