"""Layer-parallel Highway-BP: a residual MLP split over 2 processes, one stage per rank.

    python examples/layer_parallel.py                           # spawns 2 local processes
    torchrun --nproc-per-node 2 examples/layer_parallel.py      # or under torchrun

Every rank builds the same chain (same seed) and keeps its half; the stem (digits -> width)
runs on the first rank before the chain, the head and the loss on the last rank, inside
loss_fn. The backward is Highway(k=1): both ranks take their layers' VJPs at the same time.
The first step's gradients are checked against the single-process chain, then the model
trains on scikit-learn's digits (offline).
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import highwaybp as hbp
from highwaybp.distributed import HighwayPipeline, init_from_env, spawn, under_torchrun

WIDTH, LAYERS, STEPS, BATCH = 64, 8, 40, 128


def build():
    """Stem, chain and head, identical on every rank (same seed), in float64."""
    torch.manual_seed(0)
    stem = nn.Linear(64, WIDTH)
    blocks = [nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.GELU(),
                            nn.Linear(WIDTH, WIDTH)) for _ in range(LAYERS)]
    chain = hbp.ResidualChain([hbp.ResidualLayer(b) for b in blocks])
    head = nn.Linear(WIDTH, 10)
    return stem.double(), chain.double(), head.double()


def data():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    return x, torch.tensor(digits.target)


def train(ctx) -> dict:
    stem, chain, head = build()
    loss_fn = lambda h, y: nn.functional.cross_entropy(head(h), y)
    pipe = HighwayPipeline(chain, ctx.world, ctx.rank, hbp.Highway(k=1), loss_fn)
    params = pipe.parameters() + list(stem.parameters() if pipe.is_first else []) + list(
        head.parameters() if pipe.is_last else [])
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    x, y = data()
    losses, first_grads = [], None
    for step in range(STEPS):
        batch = torch.arange(step * BATCH, (step + 1) * BATCH) % len(x)
        opt.zero_grad()
        if pipe.is_first:
            pipe.step(stem(x[batch]))       # dLoss/dh_0 flows on into the stem
        else:
            losses.append(float(pipe.step(target=y[batch])))
        if step == 0:
            first_grads = {id_: p.grad.clone() for id_, p in enumerate(params)}
        opt.step()
    return {"losses": losses, "first_grads": [first_grads[i] for i in sorted(first_grads)]}


def single_process_first_grads() -> list[torch.Tensor]:
    stem, chain, head = build()
    chain.method = hbp.Highway(k=1)
    x, y = data()
    batch = torch.arange(BATCH)
    nn.functional.cross_entropy(head(chain(stem(x[batch]))), y[batch]).backward()
    half = LAYERS // 2
    first = [*(p for layer in chain.layers[:half] for p in layer.parameters()),
             *stem.parameters()]
    last = [*(p for layer in chain.layers[half:] for p in layer.parameters()),
            *head.parameters()]
    return [p.grad for p in first + last]


def main() -> None:
    if under_torchrun():  # this process is one rank
        ctx = init_from_env()
        out = train(ctx)
        if out["losses"]:
            print(f"rank {ctx.rank}: loss {out['losses'][0]:.3f} -> {out['losses'][-1]:.3f}")
        return
    results = spawn(train, 2, timeout=120.0)
    grads = results[0]["first_grads"] + results[1]["first_grads"]
    reference = single_process_first_grads()
    diff = max(float((g - r).abs().max()) for g, r in zip(grads, reference))
    print(f"first step: max |gradient - single-process Highway(k=1)| = {diff:.2e}")
    losses = results[1]["losses"]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {STEPS} steps on 2 processes")


if __name__ == "__main__":
    main()
