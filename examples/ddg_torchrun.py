"""DDG (delayed gradients) across processes: one rank per module.

    python examples/ddg_torchrun.py                           # spawns 2 local processes
    torchrun --nproc-per-node 2 examples/ddg_torchrun.py      # or under torchrun

Each rank builds the same model, keeps its own part (a module), and trains it with
gradients delayed by the number of modules after it (Huo et al. 2018); activations go
forward and errors backward between ranks (gloo on CPU, NCCL on GPU). Rank 0 then
assembles the trained model and evaluates it. Data: scikit-learn's digits (offline).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

import torch
from sklearn.datasets import load_digits
from torch import nn

from highwaybp.ddg import DDGRunConfig, EpochBatches, assemble_model, run_from_env, spawn_ddg
from highwaybp.distributed import under_torchrun


def build_model() -> nn.Sequential:
    torch.manual_seed(0)                    # every rank builds the same initial weights
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0   # [1797, 64]
    y = torch.tensor(digits.target)
    cfg = DDGRunConfig(
        build_model=build_model,
        batches=EpochBatches(x[:1400], y[:1400], batch_size=64, seed=0),
        steps=200,
        optimizer_factory=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        semantics="stash",
        threads=1,
        timeout=120.0,
    )
    if under_torchrun():  # this process is one rank; rank 0 evaluates every rank's module
        results = _results_under_torchrun(cfg)
        if results is None:
            return
    else:
        results = spawn_ddg(cfg, 2)
    model = assemble_model(cfg, results)
    with torch.no_grad():
        accuracy = (model(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    print(f"DDG on {len(results)} ranks: test accuracy {accuracy:.3f}")


def _results_under_torchrun(cfg: DDGRunConfig) -> list[dict] | None:
    """Every rank's result on rank 0 (None on the others). Every rank writes its trained
    module into one folder for the whole job (torchrun gives every rank the same run id);
    rank 0 reads them after the ranks' barrier, then removes the folder."""
    result_dir = os.path.join(tempfile.gettempdir(),
                              f"ddg-example-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    try:
        result = run_from_env(cfg, result_dir=result_dir)   # every rank runs its module
        if result["rank"] != 0:
            return None
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(result["world"])]
    finally:
        if int(os.environ["RANK"]) == 0:  # the others are done with it: they wrote before
            shutil.rmtree(result_dir, ignore_errors=True)  # the barrier rank 0 passed


if __name__ == "__main__":
    main()
