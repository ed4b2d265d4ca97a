"""DDG: decoupled parallel backpropagation with delayed gradients (Huo et al., ICML 2018).

The network is split into K modules of consecutive layers. At step t module k (1-based)
updates with the error of the batch of step t-K+k, so backward locking is gone: module k
does not wait for the error of the current batch. The last module is undelayed and
K = 1 is plain backprop.

    w_k^{t+1} = w_k^t - lr_t * grad_{w_k} f_{x_{t-K+k}}(w^{t-K+k})

This file holds the pieces shared by the single-process oracle and the multi-process
runtime (`highwaybp.ddg.runtime`):

- `split_model`: cut an `nn.Sequential` (or a list of modules) into K `nn.Sequential`
  parts that share the original parameters.
- `DDGStage`: one module with its optimizer, its delay d = K-1-s (s 0-based) and its
  in-flight batches; `forward`, `backward`, `train_last`, `end_step`.
- `DDGTrainer`: the single-process oracle that runs the exact schedule of the
  multi-process runtime with all stages in one process (deterministic).

Stale-gradient semantics (`semantics=`):

- ``"stash"`` (the paper's rule, weight stashing as in PipeDream): the forward of a
  delayed batch runs on a copy of the parameters (`torch.func.functional_call`) and keeps
  its graph; the stale backward differentiates that graph, i.e. at the weights the batch
  saw. Memory per stage: d+1 graphs and d+1 parameter copies.
- ``"recompute"`` (Features Replay, Huo et al. NeurIPS 2018): the forward runs without a
  tape and only the stage input is kept; at backward time the forward is re-run with the
  *current* weights and the stale error is backpropagated through it. One extra forward;
  d+1 inputs of memory.

BatchNorm and other buffers: running statistics are updated exactly once per batch, by
the forward that feeds the next stage (as in plain backprop). The recompute forward
restores the buffers it touches, and a stash graph rebuilt on resume runs on copies of
the buffers. In train mode BatchNorm normalises with the statistics of the batch, so
neither choice changes any output. Dropout masks: the recompute forward replays the RNG
state of the original forward (as `torch.utils.checkpoint` does).

Learning-rate schedulers are stepped once per training step t for every stage (the
paper's lr_t is indexed by the global step), including the first d steps in which a
delayed stage has nothing to apply yet.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import nn
from torch.func import functional_call

from highwaybp.core.replay import rng_states, rng_states_used
from highwaybp.distributed.pipeline import balanced_boundaries as pipeline_split

Semantics = Literal["stash", "recompute"]
SEMANTICS: tuple[str, ...] = ("stash", "recompute")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- splitting


def _as_layers(model: Union[nn.Module, Sequence[nn.Module]]) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return list(model)
    if isinstance(model, (list, tuple, nn.ModuleList)):
        layers = list(model)
        if not all(isinstance(m, nn.Module) for m in layers):
            raise TypeError("DDG: every element of the module list must be an nn.Module")
        return layers
    raise TypeError(
        f"DDG splits an nn.Sequential or a list of modules, got {type(model).__name__}; "
        "wrap your layers in nn.Sequential(...) in forward order"
    )


def balanced_boundaries(costs: Sequence[float], splits: int) -> list[int]:
    """Cut points 0 = b_0 < b_1 < ... < b_K = n of `costs` into `splits` contiguous groups,
    minimising the largest group cost: the layer-parallel runtime's split
    (`highwaybp.distributed.balanced_boundaries`), in DDG's argument order."""
    n = len(costs)
    if not 1 <= splits <= n:
        raise ValueError(f"cannot split {n} layers into {splits} non-empty modules")
    return pipeline_split(n, splits, costs)


def split_model(
    model: Union[nn.Module, Sequence[nn.Module]],
    splits: int,
    boundaries: Optional[Sequence[int]] = None,
    balance: Literal["layers", "params"] = "params",
) -> list[nn.Sequential]:
    """Split `model` (an nn.Sequential or a list of modules, in forward order) into
    `splits` consecutive parts, each an nn.Sequential sharing the original modules.

    boundaries: explicit cut points [0, b_1, ..., n] (n = number of layers); otherwise the
    cut balances the number of parameters (`balance="params"`, +1 per layer so that
    parameter-free layers still count) or the number of layers (`balance="layers"`).
    """
    layers = _as_layers(model)
    n = len(layers)
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    if splits > n:
        raise ValueError(
            f"cannot split a model of {n} layers into {splits} modules; use splits <= {n}"
        )
    if boundaries is None:
        if balance == "params":
            costs = [1 + sum(p.numel() for p in m.parameters()) for m in layers]
        elif balance == "layers":
            costs = [1.0] * n
        else:
            raise ValueError(f"balance must be 'params' or 'layers', got {balance!r}")
        boundaries = balanced_boundaries(costs, splits)
    boundaries = list(boundaries)
    if (
        len(boundaries) != splits + 1
        or boundaries[0] != 0
        or boundaries[-1] != n
        or any(a >= b for a, b in zip(boundaries, boundaries[1:]))
    ):
        raise ValueError(
            f"boundaries must be {splits + 1} increasing cut points from 0 to {n}, got {boundaries}"
        )
    return [nn.Sequential(*layers[a:b]) for a, b in zip(boundaries, boundaries[1:])]


# ----------------------------------------------------------------------------- stage


@dataclass
class _InFlight:
    """A batch that went forward through a delayed stage and waits for its error."""

    x: torch.Tensor  # stage input (detached; requires_grad for stash stages s > 0)
    rng: list[torch.Tensor]  # RNG state before the forward (replayed by recompute)
    params: Optional[dict[str, torch.Tensor]] = None  # stash: parameter copies
    y: Optional[torch.Tensor] = None  # stash: output with its graph on `params`


class DDGStage:
    """Module `index` (0-based) of `num_stages`, with its optimizer and delayed batches.

    Delay d = num_stages - 1 - index: the backward at step t is for the batch of step t-d.
    The stage never talks to other stages; a driver (the oracle or the distributed
    runtime) moves activations and errors between them.

    rng_seed: when given, the stage draws its random numbers (dropout) from its own
    stream seeded with it, so one process holding every stage and one process per stage
    draw the same masks. When None, it uses the global RNG.
    """

    def __init__(
        self,
        module: nn.Module,
        index: int,
        num_stages: int,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        semantics: str = "stash",
        rng_seed: Optional[int] = None,
    ) -> None:
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        if not 0 <= index < num_stages:
            raise ValueError(f"stage index {index} out of range for {num_stages} stages")
        self.module = module
        self.index = index
        self.num_stages = num_stages
        self.delay = num_stages - 1 - index
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.semantics = semantics
        self.steps_done = 0  # training steps t completed by this stage
        self.updates = 0  # optimizer steps applied
        self.pending: dict[int, _InFlight] = {}
        self._rng: Optional[list[torch.Tensor]] = None
        if rng_seed is not None:
            gen = torch.Generator().manual_seed(int(rng_seed))
            self._rng = [gen.get_state()]
            if self.device.type == "cuda":
                with torch.random.fork_rng(devices=[self.device]):
                    torch.cuda.manual_seed(int(rng_seed))
                    self._rng.append(torch.cuda.get_rng_state(self.device))

    # -- helpers
    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def is_last(self) -> bool:
        return self.delay == 0

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _own_rng(self):
        """Forward under the stage's own RNG stream (if seeded) and advance it."""
        if self._rng is None:
            yield
            return
        with rng_states_used(self._rng, self.device):
            yield
            self._rng = rng_states(self.device)

    def _rng_now(self) -> list[torch.Tensor]:
        return list(self._rng) if self._rng is not None else rng_states(self.device)

    def _apply(self, grads: Sequence[Optional[torch.Tensor]]) -> None:
        for (_, p), g in zip(self._trainable(), grads):
            p.grad = g
        self.optimizer.step()
        self.updates += 1

    # -- schedule
    def forward(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Forward the batch of step t through a delayed stage (d > 0); remember it.

        x: [B, ...] stage input. Returns the output, detached (it is sent downstream).
        """
        if self.is_last:
            raise RuntimeError("the last stage is undelayed: call train_last(...)")
        if t in self.pending:
            raise RuntimeError(f"stage {self.index} already holds the batch of step {t}")
        rng = self._rng_now()
        if self.semantics == "stash":
            params = {n: p.detach().clone().requires_grad_(True) for n, p in self._trainable()}
            # Buffers go in as copies: BatchNorm saves the running statistics in the
            # graph, so the live ones must not be updated in place under it; the updated
            # copies are written back, which counts the batch once.
            buffers = {n: b.detach().clone() for n, b in self.module.named_buffers()}
            x_in = x.detach().requires_grad_(self.index > 0)
            with torch.enable_grad(), self._own_rng():
                y = functional_call(self.module, {**params, **buffers}, (x_in,))
            with torch.no_grad():
                for n, b in self.module.named_buffers():
                    b.copy_(buffers[n])
            self.pending[t] = _InFlight(x_in, rng, params, y)
        else:
            x_in = x.detach()
            with torch.no_grad(), self._own_rng():
                y = self.module(x_in)
            self.pending[t] = _InFlight(x_in, rng)
        return y.detach()

    def backward(
        self, t: int, grad_output: torch.Tensor, need_input_grad: bool
    ) -> Optional[torch.Tensor]:
        """At step t, apply the error of the batch of step t-d and update the weights.

        grad_output: [B, ...] dLoss/d(output) for batch t-d, from the next stage.
        Returns dLoss/d(input) for that batch (for the previous stage) or None.
        """
        tau = t - self.delay
        entry = self.pending.pop(tau, None)
        if entry is None:
            raise RuntimeError(
                f"stage {self.index} has no in-flight batch of step {tau} at step {t} "
                f"(holds {sorted(self.pending)}); the schedule was broken"
            )
        named = self._trainable()
        if self.semantics == "stash":
            inputs = [entry.params[n] for n, _ in named]
            if need_input_grad:
                inputs.append(entry.x)
            grads = torch.autograd.grad(entry.y, inputs, grad_output, allow_unused=True)
            x_grad = grads[-1] if need_input_grad else None
            self._apply(grads[: len(named)])
            return x_grad
        # recompute: current weights, same input and RNG; buffers restored afterwards so
        # running statistics count each batch once.
        saved = [b.detach().clone() for b in self.module.buffers()]
        x_in = entry.x.detach().requires_grad_(need_input_grad)
        with torch.enable_grad(), rng_states_used(entry.rng, self.device):
            y = self.module(x_in)
        inputs = [p for _, p in named] + ([x_in] if need_input_grad else [])
        grads = torch.autograd.grad(y, inputs, grad_output, allow_unused=True)
        with torch.no_grad():  # after the backward: BatchNorm saved these in the graph
            for b, v in zip(self.module.buffers(), saved):
                b.copy_(v)
        x_grad = grads[-1] if need_input_grad else None
        self._apply(grads[: len(named)])
        return x_grad

    def train_last(
        self,
        t: int,
        x: torch.Tensor,
        target: torch.Tensor,
        loss_fn: LossFn,
        need_input_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The undelayed last stage: forward, loss, backward and update for batch t.

        Plain autograd on the live parameters, so with one stage this is exactly
        `opt.zero_grad(); loss_fn(model(x), target).backward(); opt.step()`.
        Returns (loss detached, output detached [B, C], dLoss/dx or None).
        """
        if not self.is_last:
            raise RuntimeError(f"stage {self.index} is delayed: call forward/backward")
        x_in = x.detach().requires_grad_(need_input_grad) if need_input_grad else x
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad(), self._own_rng():
            y = self.module(x_in)
            loss = loss_fn(y, target)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        x_grad = x_in.grad if need_input_grad else None
        return loss.detach(), y.detach(), x_grad

    def end_step(self) -> None:
        """Close step t: step the LR scheduler (once per global step)."""
        if self.scheduler is not None:
            with warnings.catch_warnings():
                # A delayed stage steps its schedule before its first optimizer step on
                # purpose (lr_t follows the global step); torch warns about that order.
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                self.scheduler.step()
        self.steps_done += 1

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler, RNG and in-flight batches (graphs are rebuilt on load)."""
        return {
            "index": self.index,
            "num_stages": self.num_stages,
            "semantics": self.semantics,
            "steps_done": self.steps_done,
            "updates": self.updates,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": self._rng,
            "pending": {
                tau: {
                    "x": e.x.detach(),
                    "rng": e.rng,
                    "params": None
                    if e.params is None
                    else {n: v.detach() for n, v in e.params.items()},
                }
                for tau, e in self.pending.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; load the module's own parameters separately first."""
        if (state["index"], state["num_stages"], state["semantics"]) != (
            self.index,
            self.num_stages,
            self.semantics,
        ):
            raise ValueError(
                "checkpoint is for stage {}/{} ({}), this stage is {}/{} ({})".format(
                    state["index"],
                    state["num_stages"],
                    state["semantics"],
                    self.index,
                    self.num_stages,
                    self.semantics,
                )
            )
        self.steps_done = state["steps_done"]
        self.updates = state["updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._rng = state["rng"]
        self.pending = {}
        for tau, e in sorted(state["pending"].items()):
            x = e["x"].to(self.device)
            rng = e["rng"]
            if e["params"] is None:
                self.pending[tau] = _InFlight(x, rng)
                continue
            # Rebuild the stash graph: same input, stashed weights, replayed RNG; the
            # buffers are copies so the running statistics are not counted twice.
            params = {n: v.to(self.device).requires_grad_(True) for n, v in e["params"].items()}
            buffers = {n: b.detach().clone() for n, b in self.module.named_buffers()}
            x_in = x.detach().requires_grad_(self.index > 0)
            with torch.enable_grad(), rng_states_used(rng, self.device):
                y = functional_call(self.module, {**params, **buffers}, (x_in,))
            self.pending[tau] = _InFlight(x_in, rng, params, y)


def make_stages(
    modules: Sequence[nn.Module],
    optimizer_factory: OptimizerFactory,
    scheduler_factory: Optional[SchedulerFactory] = None,
    semantics: str = "stash",
    rng_seed: Optional[int] = None,
) -> list[DDGStage]:
    """One DDGStage per module, each with its own optimizer (and scheduler).

    rng_seed: stage s gets the stream rng_seed + s (see DDGStage), or the global RNG.
    """
    stages = []
    for s, m in enumerate(modules):
        opt = optimizer_factory(m.parameters())
        sched = scheduler_factory(opt) if scheduler_factory is not None else None
        seed = None if rng_seed is None else rng_seed + s
        stages.append(DDGStage(m, s, len(modules), opt, sched, semantics, seed))
    return stages
