"""The scan across ranks (highwaybp.distributed.dscan) equals core.scan's reverse scan.

The same exchange code the pipeline runs, on threads in one process (queues as links):
1 to 6 ranks, uneven splits, identity / scalar / diagonal (full and broadcast
coefficients, zeros included) / general linear K, every strategy, 1 and 2 micro-batches.
"""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from highwaybp.core.scan import reverse_scan_list
from highwaybp.distributed import dscan


class QueueComm:
    def __init__(self, rank: int, boxes: dict) -> None:
        self.rank, self.boxes = rank, boxes
        self.sent = 0

    def send(self, dst, tensors, what):
        self.sent += 1
        self.boxes[(self.rank, dst)].put([t.clone() for t in tensors])

    def recv(self, src, likes, what):
        got = self.boxes[(src, self.rank)].get(timeout=10)
        assert [t.shape for t in got] == [t.shape for t in likes], what
        return got


def _coefficient(kind: str, g: torch.Generator, shape):
    if kind == "identity":
        return None
    if kind == "scalar":
        return float(torch.rand((), generator=g, dtype=torch.float64)) + 0.2
    if kind == "diagonal":
        if torch.rand((), generator=g) < 0.5:  # a broadcast (per-row) coefficient
            return torch.rand(shape[0], 1, generator=g, dtype=torch.float64)
        c = torch.rand(shape, generator=g, dtype=torch.float64)
        return c * (c > 0.2)  # zeros too (a ReLU mask)
    return torch.randn(shape[-1], shape[-1], generator=g, dtype=torch.float64) / 3  # linear


def run_case(world: int, num_layers: int, kind: str, strategy: str, mb: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 4)
    cuts = sorted(torch.randperm(num_layers - 1, generator=g)[: world - 1].add(1).tolist())
    bounds = [0, *cuts, num_layers]
    coeffs = [[_coefficient(kind, g, shape) for _ in range(num_layers)] for _ in range(mb)]

    def apply(a, v):
        if kind == "linear":
            return v @ a
        return dscan.mul(v, a)

    xs = [[torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(num_layers + 1)]
          for _ in range(mb)]
    expected = [reverse_scan_list(x, [(lambda v, a=a: apply(a, v)) for a in c] + [None])
                for x, c in zip(xs, coeffs)]
    # Each shared boundary state is split between the two ranks that hold it.
    shares = [[torch.rand(shape, generator=g, dtype=torch.float64) for _ in range(num_layers + 1)]
              for _ in range(mb)]
    entries, kmaps, local_coeffs = [], [], []
    for r in range(world):
        a, b = bounds[r], bounds[r + 1]
        rows = []
        for m in range(mb):
            row = [xs[m][i].clone() for i in range(a, b + 1)]
            if r > 0:
                row[0] = xs[m][a] * shares[m][a]
            if r < world - 1:
                row[-1] = xs[m][b] * (1 - shares[m][b])
            rows.append(row)
        entries.append(rows)
        kmaps.append([[(None if c is None else (lambda v, c=c: apply(c, v)))
                       for c in coeffs[m][a:b]] for m in range(mb)])
        local_coeffs.append([coeffs[m][a:b] for m in range(mb)])
    boxes = {(s, d): queue.Queue() for s in range(world) for d in range(world)}
    comms = [QueueComm(r, boxes) for r in range(world)]
    errors = []

    def rank_main(r):
        try:
            dscan.scan_across_ranks_(strategy, comms[r], r, world, entries[r], kmaps[r],
                                     local_coeffs[r], kind)
        except Exception as err:  # surfaced by the assert below
            errors.append((r, err))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    for r in range(world):
        a, b = bounds[r], bounds[r + 1]
        for m in range(mb):
            for e in range(0 if r == 0 else 1, b - a + 1):
                torch.testing.assert_close(entries[r][m][e], expected[m][a + e], rtol=0,
                                           atol=1e-12)
    return comms


CASES = [
    (world, layers, kind, strategy, mb)
    for world, layers in [(1, 3), (2, 2), (2, 5), (3, 7), (4, 9), (5, 6), (6, 11)]
    for kind, strategies in [("identity", ("distributed", "centralized", "sequential")),
                             ("scalar", ("distributed", "centralized")),
                             ("diagonal", ("distributed", "centralized", "sequential")),
                             ("linear", ("sequential",))]
    for strategy in strategies
    for mb in (1, 2)
]


@pytest.mark.parametrize("world,layers,kind,strategy,mb", CASES)
def test_scan_across_ranks_equals_the_reverse_scan(world, layers, kind, strategy, mb):
    for seed in range(3):
        run_case(world, layers, kind, strategy, mb, seed)


def test_distributed_strategy_has_log_depth_and_centralized_two_hops():
    # Messages per rank: distributed <= 1 + ceil(log2(P-1)) sends; centralized: rank 0
    # sends P-2 carries, every other rank one.
    world = 6
    comms = run_case(world, 12, "diagonal", "distributed", 1, 0)
    assert max(c.sent for c in comms) <= 1 + 3
    comms = run_case(world, 12, "diagonal", "centralized", 1, 0)
    assert [c.sent for c in comms] == [world - 2, 1, 1, 1, 1, 1]


def test_linear_k_refuses_product_strategies():
    with pytest.raises(ValueError, match="sequential"):
        dscan.scan_across_ranks_("distributed", None, 0, 2, [[torch.zeros(1)] * 2],
                                 [[None]], [[None]], "linear")
