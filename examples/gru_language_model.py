"""highwaybp.GRU dropping in for torch.nn.GRU in a character-level language model.

    python examples/gru_language_model.py [--threads N]   (default: torch's; it prints the count)

Same parameter names and shapes as torch.nn.GRU: the two models below start from the same
weights; only the backward through time differs (Highway-BP with k = 1 against autograd).
The text is this file's own source, so nothing is downloaded.
"""

from pathlib import Path

import torch
from torch import nn

import highwaybp as hbp
from highwaybp.train.threads import example_threads

example_threads()  # torch's default thread count unless --threads N; printed

text = Path(__file__).read_text() * 4
vocab = sorted(set(text))
ids = torch.tensor([vocab.index(c) for c in text])
seq_len, batch, hidden = 64, 16, 96


class CharLM(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(vocab), 32)
        self.rnn = rnn                                   # nn.GRU or hbp.GRU, batch_first
        self.head = nn.Linear(hidden, len(vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T] -> logits [B, T, V]
        out, _ = self.rnn(self.embed(x))                 # out [B, T, H]
        return self.head(out)


torch.manual_seed(0)
reference = CharLM(nn.GRU(32, hidden, batch_first=True))
highway = CharLM(hbp.GRU(32, hidden, batch_first=True, method=hbp.Highway(k=1)))
highway.load_state_dict(reference.state_dict())          # interchangeable state_dicts

gen = torch.Generator().manual_seed(1)
models = {"torch.nn.GRU": reference, "hbp.GRU Highway(k=1)": highway}
opts = {name: torch.optim.Adam(m.parameters(), lr=3e-3) for name, m in models.items()}
for step in range(60):
    start = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
    window = torch.stack([ids[s:s + seq_len + 1] for s in start])   # [B, T + 1]
    for name, model in models.items():
        logits = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)),
                                           window[:, 1:].reshape(-1))
        opts[name].zero_grad()
        loss.backward()            # per-step losses flow into the Highway iteration
        opts[name].step()
        if step % 20 == 0 or step == 59:
            print(f"step {step:2d}  {name:22s} loss {loss.item():.3f}")
print("last backward:", highway.rnn.last_diagnostics)
