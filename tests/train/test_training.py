"""Training with torch.optim through a chain; Exact is bit-for-bit plain autograd."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.cli import main
from highwaybp.models.mlp import MLPBlock, ResidualMLP
from highwaybp.train.data import load_mnist1d


@pytest.fixture(scope="module")
def mnist1d():
    return load_mnist1d(num_samples=1200, seed=0)


def test_highway_k2_training_reduces_the_loss(mnist1d):
    torch.manual_seed(0)
    model = ResidualMLP(40, 10, width=32, depth=8, method=hbp.Highway(k=2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    x_eval, y_eval = mnist1d.x_train[:512], mnist1d.y_train[:512]
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(x_eval), y_eval).item()
    for _ in range(80):
        idx = torch.randint(0, len(mnist1d.y_train), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(mnist1d.x_train[idx]), mnist1d.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.chain.last_diagnostics.iterations == 2
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(x_eval), y_eval).item()
    assert after < 0.8 * before, (before, after)


class PlainResidual(nn.Module):
    """What a user writes without this library: x + block(x)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def test_exact_is_bit_for_bit_a_plain_sequential_model(mnist1d):
    torch.manual_seed(0)
    model = ResidualMLP(40, 10, width=32, depth=6, method=hbp.Exact(), dropout=0.1)
    blocks = [MLPBlock(32, 64, 0.1) for _ in range(6)]
    plain = nn.Sequential(
        nn.Linear(40, 32),
        *[PlainResidual(b) for b in blocks],
        nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 10)),
    )
    plain[0].load_state_dict(model.stem.state_dict())
    for layer, wrapper in zip(model.chain.layers, plain[1:-1]):
        wrapper.block.load_state_dict(layer.block.state_dict())
    plain[-1].load_state_dict(model.head.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, plain)]
    x, y = mnist1d.x_train[:64], mnist1d.y_train[:64]
    for step in range(3):
        grads = []
        for m, opt in zip((model, plain), opts):
            torch.manual_seed(100 + step)  # same dropout masks
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in m.parameters()])
            opt.step()
        assert len(grads[0]) == len(grads[1])
        for a, b in zip(*grads):
            assert torch.equal(a, b)


def test_demo_command_runs_writes_json_and_resumes(tmp_path, capsys):
    """Replaces `-1 <= cos <= 1` and `0 <= acc <= 1` (true of any value): on a depth-3 net
    Highway(k=3) is exact (cosine 1 to float rounding), k=0 is visibly not, and 40 Adam
    steps bring exact backprop's train loss below chance level (ln 10) and its test
    accuracy above chance (0.1)."""
    args = [
        "demo",
        "--steps",
        "40",
        "--depth",
        "3",
        "--width",
        "8",
        "--samples",
        "500",
        "--methods",
        "exact",
        "highway:k=0",
        "highway:k=3",
        "--rnn-steps",
        "3",
        "--rnn-side",
        "6",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    state = json.loads((tmp_path / "results.json").read_text())
    results = state["results"]
    assert set(results) == {"Exact()", "Highway(k=0)", "Highway(k=3)"}
    assert results["Exact()"]["grad_cosine_to_exact"] == 1.0
    assert results["Highway(k=3)"]["grad_cosine_to_exact"] > 1 - 1e-5
    assert results["Highway(k=0)"]["grad_cosine_to_exact"] < 0.99
    assert results["Exact()"]["train_loss"] < math.log(10) - 0.2
    assert results["Exact()"]["test_accuracy"] > 0.15
    # The cosine-vs-k curve on the exactly-trained model: exact at k = L = 3 for Highway
    # and FixedPoint, visibly not at k = 0.
    curve = state["fidelity_curve"]
    assert curve["k"] == [0, 1, 2, 3]
    assert curve["highway"][-1] > 1 - 1e-5 and curve["fixedpoint"][-1] > 1 - 1e-5
    assert curve["highway"][0] < 0.99 and curve["fixedpoint"][0] < curve["highway"][0]
    # Part 2: the four GRUs start from the same weights and see the same batches, so their
    # first losses agree (same forward); each variant's time is measured.
    rnn = state["rnn"]["variants"]
    assert list(rnn) == ["torch.nn.GRU", "hbp Exact()", "hbp Highway(k=0)", "hbp Highway(k=1)"]
    first = [r["losses"][0] for r in rnn.values()]
    assert max(first) - min(first) < 1e-5
    assert rnn["hbp Exact()"]["losses"][1] == pytest.approx(rnn["torch.nn.GRU"]["losses"][1],
                                                            abs=1e-5)
    assert rnn["hbp Highway(k=0)"]["losses"][2] != rnn["hbp Exact()"]["losses"][2]
    assert all(len(r["losses"]) == 3 and r["ms_per_step"] > 0 for r in rnn.values())
    assert (tmp_path / "table.md").read_text().count("|") > 20
    assert (tmp_path / "demo.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(args) == 0
    assert "done in an earlier run (resumed)" in capsys.readouterr().out


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert hbp.__version__ in capsys.readouterr().out
