"""The single-process DDG oracle: every stage in one process, on the exact schedule of the
multi-process runtime (deterministic; the runtime is tested against it)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from highwaybp.ddg.stage import (
    SEMANTICS,
    LossFn,
    OptimizerFactory,
    SchedulerFactory,
    make_stages,
    split_model,
)


@dataclass
class StepResult:
    """What one DDG step reports: the loss and the output of the *current* batch."""

    step: int
    loss: float
    output: torch.Tensor  # [B, C] detached logits of the batch of this step


class DDGTrainer:
    """Single-process DDG: the exact schedule of the multi-process runtime, in one process.

    model: an nn.Sequential or a list of modules in forward order; it is split into
    `splits` parts that share its parameters, so `model` itself is trained in place.
    optimizer_factory(params) -> torch.optim optimizer, called once per module.
    scheduler_factory(optimizer) -> LR scheduler, stepped once per training step.

    Per step t, for the batch (x_t, target_t):
      1. forward x_t through modules 1..K (module K keeps its graph);
      2. module K: loss, backward, update (no delay); its input error for batch t goes
         to module K-1;
      3. module k < K: backprop the error of batch t-(K-k) that module k+1 sent at the
         previous step, update, pass the input error on.
    Nothing is drained at the end: after N steps module k has applied N-(K-k) updates,
    exactly like the multi-process runtime.
    """

    def __init__(
        self,
        model: Union[nn.Module, Sequence[nn.Module]],
        splits: int,
        optimizer_factory: OptimizerFactory,
        loss_fn: LossFn = F.cross_entropy,
        semantics: str = "stash",
        scheduler_factory: Optional[SchedulerFactory] = None,
        boundaries: Optional[Sequence[int]] = None,
        rng_seed: Optional[int] = None,
        balance: Literal["layers", "params"] = "params",
    ) -> None:
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        self.modules = split_model(model, splits, boundaries, balance)
        self.stages = make_stages(
            self.modules, optimizer_factory, scheduler_factory, semantics, rng_seed
        )
        self.loss_fn = loss_fn
        self.semantics = semantics
        self.t = 0
        # errors[s][tau]: dLoss/d(output of module s) for the batch of step tau.
        self._errors: list[dict[int, torch.Tensor]] = [{} for _ in self.stages]

    @property
    def splits(self) -> int:
        return len(self.stages)

    @property
    def model(self) -> nn.Sequential:
        """The whole network (shares parameters with the stages), e.g. for evaluation."""
        return nn.Sequential(*self.modules)

    def step(self, x: torch.Tensor, target: torch.Tensor) -> StepResult:
        """One DDG training step on the batch x [B, ...], target [B]."""
        t, k = self.t, self.splits
        h = x
        for stage in self.stages[:-1]:
            h = stage.forward(t, h)
        loss, out, g = self.stages[-1].train_last(t, h, target, self.loss_fn, k > 1)
        if k > 1:
            self._errors[k - 2][t] = g
        for s in range(k - 2, -1, -1):
            stage = self.stages[s]
            tau = t - stage.delay
            if tau < 0:
                continue
            g = stage.backward(t, self._errors[s].pop(tau), need_input_grad=s > 0)
            if s > 0:
                self._errors[s - 1][tau] = g
        for stage in self.stages:
            stage.end_step()
        self.t += 1
        return StepResult(t, float(loss), out)

    def train(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        """Run `step` over an iterable of (x, target); returns the losses."""
        return [self.step(x, y).loss for x, y in batches]

    def in_flight_bytes(self) -> list[int]:
        """Bytes held per stage for delayed batches (inputs + stashed parameters).

        Graph activations saved by autograd (stash) are not counted: torch does not
        expose their size cheaply.
        """
        out = []
        for stage in self.stages:
            total = 0
            for e in stage.pending.values():
                total += e.x.numel() * e.x.element_size()
                if e.params is not None:
                    total += sum(v.numel() * v.element_size() for v in e.params.values())
            out.append(total)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-run (model parameters included)."""
        return {
            "t": self.t,
            "splits": self.splits,
            "semantics": self.semantics,
            "modules": [m.state_dict() for m in self.modules],
            "stages": [s.state_dict() for s in self.stages],
            "errors": [{tau: g.detach() for tau, g in e.items()} for e in self._errors],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["splits"] != self.splits or state["semantics"] != self.semantics:
            raise ValueError(
                f"checkpoint is for DDG K={state['splits']} ({state['semantics']}), "
                f"this trainer is K={self.splits} ({self.semantics}); use the same "
                "--splits and --semantics to resume"
            )
        for m, sd in zip(self.modules, state["modules"]):
            m.load_state_dict(sd)
        for stage, sd in zip(self.stages, state["stages"]):
            stage.load_state_dict(sd)
        self.t = state["t"]
        self._errors = [dict(e) for e in state["errors"]]
