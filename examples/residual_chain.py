"""A residual MLP trained with Highway-BP: the chain is one argument, the loop is PyTorch.

    python examples/residual_chain.py [--threads N]   (default: torch's; it prints the count)

Trains a 12-block residual MLP on scikit-learn's digits (offline) with Highway(k=2), then
measures how close its gradient is to exact backprop's on the trained model.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import highwaybp as hbp
from highwaybp.train.threads import example_threads

example_threads()  # torch's default thread count unless --threads N; printed

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0      # [1797, 64]
y = torch.tensor(digits.target)                                # [1797]
x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

width, depth = 64, 12
blocks = [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                        nn.Linear(width, width)) for _ in range(depth)]
# f_i(h) = h + block_i(h): the residual map is the identity, K = I.
chain = hbp.ResidualChain([hbp.ResidualLayer(b) for b in blocks], method=hbp.Highway(k=2))
model = nn.Sequential(nn.Linear(64, width), chain, nn.Linear(width, 10))
opt = torch.optim.Adam(model.parameters(), lr=2e-3)

for step in range(120):
    idx = torch.randint(0, len(x_train), (64,))
    loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
    opt.zero_grad()
    loss.backward()                      # Highway-BP inside the chain, autograd outside
    opt.step()
    if step % 40 == 0:
        d = chain.last_diagnostics       # iterations used, stop reason
        print(f"step {step:3d}  loss {loss.item():.3f}  iterations {d.iterations}")

with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {accuracy:.3f}")

# How good is the k = 2 gradient on the trained model? Compare with exact backprop.
fidelity = hbp.gradient_fidelity(
    model, lambda m: nn.functional.cross_entropy(m(x_test), y_test),
    [hbp.Highway(k=0), hbp.Highway(k=2), hbp.FixedPoint(k=2)])
for method, f in fidelity.items():
    print(f"{method}: cosine to exact {f['cosine']:.4f}")
