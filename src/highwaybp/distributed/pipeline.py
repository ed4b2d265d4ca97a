"""`HighwayPipeline`: a `ResidualChain` split across processes, one stage per rank, whose
backward is Highway-BP (or FixedPoint, or exact backprop) run layer-parallel.

Conventions follow torch.distributed.pipelining: every rank builds the same chain (same
seed), wraps it with its own `stage_index`, and calls `step()` once per training step:

    pipe = HighwayPipeline(chain, num_stages=P, stage_index=rank, method=Highway(k=1),
                           loss_fn=loss_fn)
    loss = pipe.step(x)             # first stage (returns None unless it owns a loss)
    loss = pipe.step(target=y)      # last stage: the loss (mean over micro-batches)
    pipe.step()                     # middle stages
    opt.step()                      # each rank, on pipe.parameters()

The forward flows rank to rank, micro-batch by micro-batch (GPipe: rank r runs micro-batch
m while rank r+1 runs m-1), and keeps each layer's autograd graph (recompute=False). The
backward of `Highway(k)` is the iteration of docs/highway-bp.md section 3 on the whole
chain: w^0 by one scan of the loss gradients, then per iteration every rank takes the input
VJPs of all its layers at once (one `autograd.grad` call over all its layers and
micro-batches) and one scan runs over all states across ranks (`highwaybp.distributed.dscan`:
"distributed", "centralized" or "sequential"); the parameter VJPs follow, on every rank at
once. `FixedPoint(k)` is the same with K = 0 (no scan: the VJP of a rank's first layer is sent
to the previous rank). `Exact()` is a GPipe backward: per micro-batch, each rank waits for
dLoss/d(its output), runs one `torch.autograd.backward` over its layers (inputs and
parameters together) and sends dLoss/d(its input) on.

Gradients accumulate into `.grad` as `loss.backward()` does (parameter hooks run once per
step); with M micro-batches they are, as in torch.distributed.pipelining, those of the mean
of the micro-batch losses (`scale_grads=True`; False: their sum). For a mean loss and
blocks that treat samples independently that is the full batch's gradient; a block that
mixes samples (BatchNorm in training mode) sees each micro-batch alone, as under any
pipeline schedule.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from highwaybp.core.anderson import AndersonMixer
from highwaybp.core.backends.loop import LoopVJP, check_no_foreign_leaves
from highwaybp.core.chain import (
    ResidualChain,
    _apply_layer,
    _check_input,
    _check_layer,
    _check_layer_hooks,
    _unaliased,
)
from highwaybp.core.iteration import Diagnostics, StopRule
from highwaybp.core.methods import Method, check_method
from highwaybp.core.replay import ForwardState, capture_forward_state
from highwaybp.distributed import dscan
from highwaybp.distributed.handshake import check_same_config, dtype_text, layer_fingerprint
from highwaybp.distributed.trace import NullTracer, Tracer
from highwaybp.distributed.transport import Link, TransportError

# Message tags beyond the transport's own (1..3: header, activation, DDG error).
_TAG_SCAN = 4  # scan carries
_TAG_GRAD = 5  # gradients w.r.t. a stage's input (Exact) and first-layer VJPs (FixedPoint)

LossFn = Callable[[Tensor, Any], Tensor]
_heartbeat: Optional[Callable[[], None]] = None  # set by the spawn launcher's watchdog


def set_heartbeat(fn: Optional[Callable[[], None]]) -> None:
    """Called after every completed receive (the spawn launcher's watchdog beats there)."""
    global _heartbeat
    _heartbeat = fn


def balanced_boundaries(num_layers: int, num_stages: int,
                        costs: Sequence[float] | None = None) -> list[int]:
    """Stage s holds layers boundaries[s]+1 .. boundaries[s+1] (1-based).

    Without `costs`: equal layer counts, the first num_layers % num_stages stages one more.
    With `costs` (one number per layer, e.g. each layer's measured forward + backward time):
    the contiguous split that minimizes the largest stage cost (ties: the earliest cuts).
    """
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must be in 1..{num_layers} (one layer per stage at "
                         f"least), got {num_stages}")
    if costs is None:
        base, extra = divmod(num_layers, num_stages)
        out = [0]
        for s in range(num_stages):
            out.append(out[-1] + base + (1 if s < extra else 0))
        return out
    costs = [float(c) for c in costs]
    if len(costs) != num_layers or any(not (c >= 0 and math.isfinite(c)) for c in costs):
        raise ValueError(f"costs must be {num_layers} finite numbers >= 0, got {costs}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[s][i]: the smallest largest-stage cost splitting the first i layers in s stages.
    inf = math.inf
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, num_layers - (num_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    out = [num_layers]
    for s in range(num_stages, 0, -1):
        out.append(cut[s][out[-1]])
    return out[::-1]


class _Comm:
    """dscan's comm interface over the transport: packs a list of tensors into one message,
    bounded waits, trace events with bytes and peers."""

    def __init__(self, pipe: HighwayPipeline) -> None:
        self.pipe = pipe

    def send(self, dst: int, tensors: Sequence[Tensor], what: str, tag: int = _TAG_SCAN) -> None:
        p = self.pipe
        flat = tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
        flat = flat.contiguous()
        with p.tracer.phase("comm", p.step_index, p._iteration, peer=dst, kind="send") as ev:
            p.link.send_to(flat, dst, tag, what, p.step_index, p._iteration)
            ev["bytes"] = flat.numel() * flat.element_size()

    def recv(self, src: int, likes: Sequence[Tensor], what: str,
             tag: int = _TAG_SCAN) -> list[Tensor]:
        p = self.pipe
        numel = sum(t.numel() for t in likes)
        buf = torch.empty(numel, dtype=likes[0].dtype, device=likes[0].device)
        with p.tracer.phase("comm", p.step_index, p._iteration, peer=src, kind="recv"):
            p.link.recv_from(buf, src, tag, what, p.step_index, p._iteration)
        if _heartbeat is not None:
            _heartbeat()
        out, start = [], 0
        for t in likes:
            out.append(buf[start:start + t.numel()].view(t.shape))
            start += t.numel()
        return out


class _FixedAfterHandshake:
    """A `HighwayPipeline` setting the ranks compared when it was built: set once (by the
    constructor), then read-only, since changing it on one rank would make the ranks
    disagree without either noticing (e.g. `pipe.method = Highway(k=2)` on one rank sends
    one scan carry more per step)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj: Any, value: Any) -> None:
        if self.name in obj.__dict__:
            raise AttributeError(
                f"HighwayPipeline.{self.name} is fixed when the pipeline is built: the ranks "
                "compared their configurations then, and changing it on one rank would make "
                f"them disagree silently. Build a new HighwayPipeline with the new "
                f"{self.name} on every rank.")
        obj.__dict__[self.name] = value


class HighwayPipeline:
    """One stage (a contiguous group of a `ResidualChain`'s layers) of a layer-parallel run.

    Args:
        chain: the `ResidualChain`, built identically on every rank (same seed); this rank
            uses only its own layers (the chain's method/scan/vjp settings do not apply).
        num_stages: P, the number of ranks (the default process group's world size).
        stage_index: this rank (must equal `dist.get_rank()` when P > 1).
        method: `Highway(k)`, `Highway(tol=, max_k=, fallback=)`, `FixedPoint(k)` or
            `Exact()` (default: the chain's method). The adaptive form's relative step is
            global: one all-reduce of two numbers per iteration; its "exact" fallback runs
            exact backprop through the kept graphs, rank to rank.
        loss_fn: `loss_fn(h_L, target) -> scalar` on the last stage; target is what the
            last stage passed to `step(target=...)` (split into micro-batches), or None.
            Any module it uses (a head) gets its gradient there, as with loss.backward().
        state_losses: {i: fn(h_i, target) -> scalar} for states 1 <= i <= L (h_i is layer
            i's output): per-layer losses, each evaluated on the rank whose layer produces
            h_i, with the target that rank passed to `step` (or None). The same as the
            single-process chain with `return_states` and the sum of these losses.
        scan: "distributed" (default for chains whose K are identity/scalar/diagonal),
            "centralized" or "sequential" (the only one, and the default, when a layer has a
            general linear K: LinearShortcut/ModuleShortcut). See `highwaybp.distributed.dscan`.
        num_microbatches: M; the first stage's x (and targets) are split along dim 0 into M
            equal micro-batches (the batch must divide by M).
        scale_grads: True (default, as torch.distributed.pipelining's schedules): the
            gradients are those of the mean of the micro-batch losses, which for a
            mean-reduced loss and per-sample blocks equals the full batch's gradient (a
            BatchNorm in training mode normalizes each micro-batch alone), and `step`
            returns that mean. False: the sum over micro-batches (gradients and loss).
        boundaries: P+1 increasing layer counts [0, b_1, ..., L]: stage s holds layers
            b_s+1..b_{s+1}. Default: `balanced_boundaries(L, P)` (equal layer counts;
            `balanced_boundaries(L, P, costs)` balances measured per-layer costs).
        recompute: False (default): the forward keeps each layer's graph (as pipeline
            schedules keep activations) and the input VJPs reuse it. True (Highway and
            FixedPoint only): the forward keeps only each layer's input (and RNG state for
            dropout) and the backward re-runs every layer once under autograd, as the
            single-process chain does by default (less memory, one more forward).
        trace: a `Tracer` to record per-phase timings into (`highwaybp.distributed.trace`).
        timeout: seconds any wait for another rank may take before a `TransportError`.

    After `step()`, `last_iterations` is the number of iterations run (at most min(k, L))
    and `last_diagnostics` the `Diagnostics` of the stopping rule (step norms: adaptive
    methods only, as they are the only ones that compute them).
    """

    def __init__(
        self,
        chain: ResidualChain,
        num_stages: int,
        stage_index: int,
        method: Method | None = None,
        loss_fn: LossFn | None = None,
        *,
        state_losses: Mapping[int, LossFn] | None = None,
        scan: str | None = None,
        num_microbatches: int = 1,
        scale_grads: bool = True,
        boundaries: Sequence[int] | None = None,
        recompute: bool = False,
        trace: Tracer | None = None,
        timeout: float = 120.0,
    ) -> None:
        if not isinstance(chain, ResidualChain):
            raise TypeError(f"HighwayPipeline needs a highwaybp.ResidualChain, got "
                            f"{type(chain).__name__}")
        num_layers = len(chain.layers)
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        if (isinstance(stage_index, bool) or not isinstance(stage_index, int)
                or not 0 <= stage_index < num_stages):
            raise ValueError(f"stage_index must be in 0..{num_stages - 1}, got {stage_index!r}")
        self.method = check_method(chain.method if method is None else method)
        # What the chain's own `method` was when the pipeline took its method: a later
        # change of it (KController, use_method, a user) cannot reach a running pipeline
        # (every rank must agree), so `step` refuses it rather than ignore it.
        self._chain_method_at_build = chain.method
        if recompute and self.method.exact:
            raise NotImplementedError(
                "HighwayPipeline(recompute=True) with Exact() (activation checkpointing of a "
                "stage) is not implemented; pass recompute=False for the exact baseline.")
        if boundaries is None:
            boundaries = balanced_boundaries(num_layers, num_stages)
        boundaries = list(boundaries)
        if any(isinstance(b, bool) or not isinstance(b, numbers.Integral) for b in boundaries):
            raise TypeError(
                f"boundaries must be ints (layer counts; stage s holds layers "
                f"boundaries[s]+1..boundaries[s+1]), got {boundaries!r}: a fractional or "
                "boolean boundary is refused rather than rounded")
        boundaries = [int(b) for b in boundaries]
        if (len(boundaries) != num_stages + 1 or boundaries[0] != 0
                or boundaries[-1] != num_layers
                or any(b >= c for b, c in zip(boundaries, boundaries[1:]))):
            raise ValueError(
                f"boundaries must be {num_stages + 1} strictly increasing layer counts from 0 "
                f"to {num_layers} (stage s holds layers boundaries[s]+1..boundaries[s+1]), "
                f"got {list(boundaries)}")
        if (isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int)
                or num_microbatches < 1):
            raise ValueError(f"num_microbatches must be an int >= 1, got {num_microbatches!r}")
        self.chain = chain
        self.num_stages, self.stage_index = num_stages, stage_index
        self.boundaries = tuple(boundaries)
        self.first_layer = boundaries[stage_index]  # 0-based index of this stage's first layer
        self.layers = list(chain.layers[self.first_layer:boundaries[stage_index + 1]])
        for i, layer in enumerate(self.layers):
            _check_layer(self.first_layer + i, layer)
        self._check_tied(chain, boundaries)
        self.num_layers = num_layers
        self.loss_fn = loss_fn
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        if self.is_last and loss_fn is None:
            raise ValueError("the last stage needs loss_fn (loss_fn(h_L, target) -> scalar)")
        self.state_losses = self._check_state_losses(state_losses or {})
        self.k_kind = dscan.chain_k_kind([layer.residual.kind for layer in chain.layers])
        self.scan = self._check_scan(scan)
        self.num_microbatches = num_microbatches
        self.scale_grads = bool(scale_grads)
        # Each micro-batch loss is seeded with this factor: 1/M gives the mean's gradient.
        self._loss_scale = 1.0 / num_microbatches if self.scale_grads else 1.0
        self.tracer: Tracer = trace if trace is not None else NullTracer(stage_index, num_stages)
        self.tracer.rank, self.tracer.world = stage_index, num_stages  # what its file says
        self.timeout = float(timeout)
        self.recompute = bool(recompute)
        first_param = next(iter(self.module.parameters()), None)
        device = first_param.device if first_param is not None else torch.device("cpu")
        if num_stages > 1:  # the arguments are checked first, then the environment
            if not dist.is_initialized():
                raise RuntimeError(
                    "HighwayPipeline with num_stages > 1 needs torch.distributed initialized "
                    "(dist.init_process_group, e.g. under torchrun, or use "
                    "highwaybp.distributed.spawn)")
            if dist.get_world_size() != num_stages or dist.get_rank() != stage_index:
                raise ValueError(
                    f"one stage per rank: num_stages={num_stages}, stage_index={stage_index} "
                    f"but this process is rank {dist.get_rank()} of {dist.get_world_size()}")
        channel = check_same_config("HighwayPipeline", self._config(), rank=stage_index,
                                    world=num_stages, timeout=self.timeout, device=device)
        self.link = Link(stage_index, num_stages, self.timeout, device, label="HighwayPipeline",
                         channel=channel)
        self.comm = _Comm(self)
        self.step_index = 0
        self._iteration: Optional[int] = None
        self.last_iterations = 0
        self.last_diagnostics: Optional[Diagnostics] = None

    # ------------------------------------------------------------------ configuration

    # Compared across ranks when the pipeline is built (`_config`), so fixed afterwards.
    num_stages = _FixedAfterHandshake()
    boundaries = _FixedAfterHandshake()
    method = _FixedAfterHandshake()
    scan = _FixedAfterHandshake()
    num_microbatches = _FixedAfterHandshake()
    scale_grads = _FixedAfterHandshake()
    recompute = _FixedAfterHandshake()

    def _config(self) -> dict[str, Any]:
        """What every rank must agree on (`highwaybp.distributed.handshake`): a rank with
        other boundaries, a longer chain or another k sends messages that still fit."""
        layers = self.chain.layers
        return {
            "runtime": "HighwayPipeline",
            "num_stages": self.num_stages,
            "boundaries": list(self.boundaries),
            "num_layers": self.num_layers,
            "method": self.method.to_string(),  # every option, present and future
            "scan": self.scan,
            "num_microbatches": self.num_microbatches,
            "scale_grads": self.scale_grads,
            "recompute": self.recompute,
            "state_losses": sorted(self.state_losses),  # each evaluated by its state's owner
            "dtype": dtype_text(layers),
            "layers": [layer_fingerprint(layer) for layer in layers],
        }

    @staticmethod
    def _check_tied(chain: ResidualChain, boundaries: list[int]) -> None:
        owner: dict[int, int] = {}
        for s in range(len(boundaries) - 1):
            for layer in chain.layers[boundaries[s]:boundaries[s + 1]]:
                for t in [*layer.parameters(), *layer.buffers()]:
                    if owner.setdefault(id(t), s) != s:
                        raise ValueError(
                            f"a parameter or buffer of shape {tuple(t.shape)} is shared by "
                            f"layers of stages {owner[id(t)]} and {s}: each rank would update "
                            "its own copy with part of the gradient. Put the layers that share "
                            "it in one stage (boundaries=...), or untie it.")

    def _check_state_losses(self, state_losses: Mapping[int, LossFn]) -> dict[int, LossFn]:
        out = {}
        for i, fn in state_losses.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= self.num_layers:
                raise ValueError(f"state_losses keys are state indices 1..{self.num_layers} "
                                 f"(h_i is layer i's output), got {i!r}")
            if not callable(fn):
                raise TypeError(f"state_losses[{i}] must be callable fn(h, target), got {fn!r}")
            out[i] = fn
        return out

    def _check_scan(self, scan: str | None) -> str:
        if self.k_kind == "linear":
            if scan not in (None, "sequential"):
                raise ValueError(
                    f"scan={scan!r} combines products of K across ranks, but this chain has a "
                    "general linear K (LinearShortcut/ModuleShortcut), whose products cannot "
                    "be formed: use scan='sequential' (or leave scan unset), which carries "
                    "the scan rank to rank.")
            return "sequential"
        scan = "distributed" if scan is None else scan
        if scan not in dscan.STRATEGIES:
            raise ValueError(f"scan must be one of {dscan.STRATEGIES}, got {scan!r}")
        return scan

    def parameters(self) -> list[Tensor]:
        """This stage's parameters that require grad (give these to the optimizer)."""
        return list(self.params)

    @property
    def params(self) -> list[Tensor]:
        """This stage's parameters requiring grad now (once each, tied ones included)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def module(self) -> nn.ModuleList:
        """This stage's layers as a ModuleList (e.g. for state_dict or train/eval)."""
        return nn.ModuleList(self.layers)

    # ------------------------------------------------------------------ step

    def step(self, x: Tensor | None = None, *, target: Any = None) -> Optional[Tensor]:
        """One training step's forward and backward on this stage (see the module doc).

        x: the chain input [B, ...] on the first stage (None elsewhere); if it requires
        grad, dLoss/dx is pushed into it (x.grad, or whatever module produced x).
        target: given on the last stage (and on any stage owning state losses that read
        it), [B, ...], split like x. Returns the losses this stage evaluated (detached),
        summed over losses and averaged over micro-batches (summed with
        `scale_grads=False`), or None if it evaluated none.
        """
        if self.chain.method != self._chain_method_at_build:
            raise ValueError(
                f"HighwayPipeline: the chain's method changed to {self.chain.method!r} after "
                f"the pipeline was built with {self.method!r} (KController, use_method or an "
                "assignment): a pipeline runs the method every rank agreed on at "
                "construction; build a new HighwayPipeline on every rank with the new method")
        if self.is_first and x is None:
            raise ValueError("the first stage's step needs the chain input: pipe.step(x)")
        if x is not None:
            _check_input(x)
        if not self.is_first and x is not None:
            raise ValueError(f"stage {self.stage_index} is not the first stage: call "
                             "pipe.step() without x (pass target=... if it owns a loss)")
        m = self.num_microbatches
        xs = self._split(x, "x") if x is not None else [None] * m
        targets = self._split_target(target)
        step = self.step_index
        try:
            with self.tracer.phase("step", step):
                if self.method.exact:
                    loss = self._step_exact(x, xs, targets)
                else:
                    loss = self._step_iterative(x, xs, targets)
                self._iteration = None
                self.link.flush(step)
            if _heartbeat is not None:
                _heartbeat()
        finally:
            self.tracer.fill_idle(step)
            self.step_index += 1
        return loss

    def _split(self, t: Tensor, what: str) -> list[Tensor]:
        m = self.num_microbatches
        if t.dim() == 0 or t.shape[0] % m:
            raise ValueError(f"{what} of shape {tuple(t.shape)} does not split into "
                             f"num_microbatches={m} equal micro-batches along dim 0")
        return list(t.chunk(m)) if m > 1 else [t]

    def _split_target(self, target: Any) -> list[Any]:
        """The target for each micro-batch: every tensor in it (alone, or inside tuples,
        lists and dicts) split along dim 0 like x; anything else given to every one."""
        m = self.num_microbatches

        def split(t: Any, where: str) -> list[Any]:
            if isinstance(t, Tensor):
                return self._split(t, where)
            if isinstance(t, (tuple, list)):
                parts = [split(v, f"{where}[{i}]") for i, v in enumerate(t)]
                return [type(t)(p[j] for p in parts) for j in range(m)]
            if isinstance(t, dict):
                parts = {k: split(v, f"{where}[{k!r}]") for k, v in t.items()}
                return [{k: p[j] for k, p in parts.items()} for j in range(m)]
            return [t] * m

        return split(target, "target")

    def _receive_input(self, m: int) -> Tensor:
        with self.tracer.phase("comm", self.step_index, m, peer=self.stage_index - 1,
                               kind="recv"):
            h = self.link.recv_activation(self.step_index)
        if _heartbeat is not None:
            _heartbeat()
        return h

    def _send_output(self, h: Tensor, m: int) -> None:
        with self.tracer.phase("comm", self.step_index, m, peer=self.stage_index + 1,
                               kind="send") as ev:
            self.link.send_activation(h, self.step_index)
            ev["bytes"] = h.numel() * h.element_size()

    def _loss(self, fn: LossFn, h: Tensor, target: Any, m: int, name: str
              ) -> tuple[Tensor, Tensor]:
        """(loss value, dLoss/dh) of one loss on a state; the loss's own modules get grads."""
        with self.tracer.phase("loss", self.step_index, m):
            leaf = h.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = fn(leaf, target)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError(f"{name} must return a scalar tensor, got "
                                 f"{getattr(loss, 'shape', type(loss).__name__)}")
            (loss * self._loss_scale if self._loss_scale != 1.0 else loss).backward()
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(h)
        return loss.detach(), grad

    def _state_loss_grads(self, outputs: list[Tensor], target: Any, m: int
                          ) -> tuple[dict[int, Tensor], list[Tensor]]:
        """{entry e: dLoss/dh} for this stage's states with a loss (e = 1..n), losses."""
        grads: dict[int, Tensor] = {}
        values: list[Tensor] = []
        n = len(self.layers)
        for e in range(1, n + 1):
            i = self.first_layer + e  # global state index
            fns = []
            if i in self.state_losses:
                fns.append((self.state_losses[i], f"state_losses[{i}]"))
            if self.is_last and e == n:
                fns.append((self.loss_fn, "loss_fn"))
            for fn, name in fns:
                value, grad = self._loss(fn, outputs[e - 1], target, m, name)
                values.append(value)
                grads[e] = grad if e not in grads else grads[e] + grad
        return grads, values

    def _total(self, values: list[Tensor]) -> Optional[Tensor]:
        return torch.stack(values).sum() * self._loss_scale if values else None

    def _check_owned_leaves(self, states: list[Tensor], leaf: Tensor) -> None:
        """Refuse a tensor requiring grad that the layers use but this stage does not own
        (a module captured in a closure): exact backprop would fill its .grad with only this
        rank's part, and another rank using it would update its own copy (the Highway
        path refuses it through its VJP backend)."""
        try:
            check_no_foreign_leaves(states, [leaf, *self.params], self.params)
        except RuntimeError as err:
            raise RuntimeError(
                f"HighwayPipeline stage {self.stage_index}: {err} A pipeline stage can only "
                "update the parameters of its own layers, under Exact() too.") from None

    def _push_input_grad(self, x: Tensor | None, grads: list[Tensor]) -> None:
        """dLoss/dx into x (its .grad, or the module that produced it)."""
        if x is None or not x.requires_grad:
            return
        with self.tracer.phase("param", self.step_index):
            g = grads[0] if len(grads) == 1 else torch.cat(grads)
            torch.autograd.backward([x], [g])

    # ------------------------------------------------------------------ exact (GPipe)

    def _step_exact(self, x: Tensor | None, xs: list, targets: list) -> Optional[Tensor]:
        step = self.step_index
        leaves, outputs, grads, values = [], [], [], []
        # dLoss/d(input) is needed to send on, or for an x that requires grad.
        need_input = not self.is_first or (x is not None and x.requires_grad)
        for m, xm in enumerate(xs):
            h = self._receive_input(m) if not self.is_first else xm.detach()
            with self.tracer.phase("forward", step, m):
                leaf = h.requires_grad_(need_input)
                states = []
                with torch.enable_grad():
                    for layer in self.layers:
                        h = layer(h)
                        states.append(h)
            if m == 0:
                self._check_owned_leaves(states, leaf)
            if not self.is_last:
                self._send_output(h.detach(), m)
            g, v = self._state_loss_grads(states, targets[m], m)
            leaves.append(leaf)
            outputs.append(states)
            grads.append(g)
            values.extend(v)
        input_grads = []
        n = len(self.layers)
        params = self.params
        for m in range(len(xs)):
            self._iteration = m
            top = outputs[m][-1]
            if not self.is_last:
                (incoming,) = self.comm.recv(self.stage_index + 1, [top], "an error",
                                             tag=_TAG_GRAD)
                grads[m][n] = incoming if n not in grads[m] else grads[m][n] + incoming
            with self.tracer.phase("sweep", step, m):
                entries = [e for e in sorted(grads[m]) if outputs[m][e - 1].requires_grad]
                tensors = [outputs[m][e - 1] for e in entries]
                inputs = [leaves[m]] if need_input else []
                if tensors and (inputs or params):
                    torch.autograd.backward(tensors, [grads[m][e] for e in entries],
                                            inputs=[*inputs, *params])
                g_in = leaves[m].grad
                if need_input and g_in is None:
                    g_in = torch.zeros_like(leaves[m])
            outputs[m] = []  # free the graph's outputs as soon as possible
            if not self.is_first:
                self.comm.send(self.stage_index - 1, [g_in], "an error", tag=_TAG_GRAD)
            else:
                input_grads.append(g_in)
        self.last_iterations = 0
        self.last_diagnostics = Diagnostics(method=repr(self.method), stop_reason="exact")
        if self.is_first:
            self._push_input_grad(x, input_grads)
        return self._total(values)

    # ------------------------------------------------------------------ Highway / FixedPoint

    def _step_iterative(self, x: Tensor | None, xs: list, targets: list) -> Optional[Tensor]:
        step = self.step_index
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            _check_layer_hooks(self.first_layer + i, layer)
        backend = LoopVJP([])
        saved: list[tuple[Tensor, ForwardState]] = []  # recompute=True: (input, state)
        g0: list[list[Tensor]] = []  # per micro-batch: entries 0..n of dLoss_i/dh_i
        values: list[Tensor] = []
        for m, xm in enumerate(xs):
            h = self._receive_input(m) if not self.is_first else xm.detach()
            with self.tracer.phase("forward", step, m):
                outs = []
                for i, layer in enumerate(self.layers):
                    if self.recompute:
                        saved.append((h, capture_forward_state(
                            h, self.chain.preserve_rng_state, layer)))
                        with torch.no_grad():
                            h = _apply_layer(self.first_layer + i, layer, h)
                    else:
                        h = self._record(backend, i, layer, h)
                    outs.append(h)
            if not self.is_last:
                self._send_output(h, m)
            grads, v = self._state_loss_grads(outs, targets[m], m)
            values.extend(v)
            inputs = saved[m * n][0] if self.recompute else backend.xs[m * n]
            entries = [torch.zeros_like(inputs)]
            entries += [grads[e] if e in grads else torch.zeros_like(outs[e - 1])
                        for e in range(1, n + 1)]
            g0.append(entries)
        if self.recompute:
            with self.tracer.phase("rerun", step):
                backend = LoopVJP(self.layers * len(xs), [h for h, _ in saved],
                                  [state for _, state in saved])
            del saved
        w = self._iterate(backend, g0)
        self._iteration = None
        with self.tracer.phase("param", step):
            ws = [w[m][e] for m in range(len(xs)) for e in range(1, n + 1)]
            params = self.params
            grads = backend.param_vjps(ws, params)
            pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
            if pairs:  # into .grad through AccumulateGrad: hooks run once, as in autograd
                torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
        if self.is_first:
            self._push_input_grad(x, [w[m][0] for m in range(len(xs))])
        return self._total(values)

    def _record(self, backend: LoopVJP, i: int, layer: nn.Module, h: Tensor) -> Tensor:
        """The forward of one layer, keeping its graph (recompute=False)."""
        try:
            return backend.record(layer, h).detach()
        except RuntimeError as err:
            if "leaf Variable" not in str(err):
                raise
            raise RuntimeError(
                f"layer {self.first_layer + i + 1} modified its input in place (e.g. "
                "ReLU(inplace=True) as the block's first op); use inplace=False there"
            ) from err

    def _sweep(self, backend: LoopVJP, w: list[list[Tensor]], j: int, full: bool
               ) -> list[list[Tensor]]:
        """Entries 0..n per micro-batch: the VJPs of this stage's layers (v_{e-1} from layer
        e), entry n zero. `full`: whole-layer VJPs (FixedPoint, K included)."""
        n = len(self.layers)
        with self.tracer.phase("sweep", self.step_index, j):
            ws = [w[m][e] for m in range(len(w)) for e in range(1, n + 1)]
            flat_w = [t for row in w for t in row]
            v = _unaliased(backend.block_vjps(ws), flat_w)
            out = []
            for m in range(len(w)):
                row = v[m * n:(m + 1) * n]
                if full:
                    for i in range(n):
                        layer = self.layers[i]
                        row[i].add_(layer.residual.apply_kt(w[m][i + 1],
                                                            backend.contexts[m * n + i]))
                out.append([*row, torch.zeros_like(w[m][n])])
        return out

    def _iterate(self, backend: LoopVJP, g0: list[list[Tensor]]) -> list[list[Tensor]]:
        """w^k per micro-batch (entries 0..n) by the method's iteration; `core.iteration`'s
        StopRule decides how many iterations run and what an adaptive method returns."""
        method, n, mb = self.method, len(self.layers), len(g0)
        rule = StopRule(method, self.num_layers)
        g_exact = None
        if rule.adaptive and method.fallback == "exact":
            g_exact = [[t.clone() for t in row] for row in g0]
        kmaps = coeffs = None
        if method.keeps_residual:
            ctx = backend.contexts
            kmaps = [[self._k_map(i, ctx[m * n + i]) for i in range(n)] for m in range(mb)]
            if self.scan != "sequential":
                coeffs = [[self.layers[i].residual.coefficient(ctx[m * n + i])
                           for i in range(n)] for m in range(mb)]
            self._iteration = 0
            w0 = self._scan(g0, kmaps, coeffs, 0)
        else:
            w0 = g0  # K = 0: w^0 is the loss gradients themselves
        w = best = w0
        owned = range(0 if self.is_first else 1, n + 1)  # entry 0 of a later stage is not
        if rule.mixes:                                   # its state (and may be in flight)
            return self._iterate_mixed(backend, rule, w0, g_exact, kmaps, coeffs, owned)
        for j in rule.iterations():
            self._iteration = j
            u = self._apply_map(backend, w, w0, j, kmaps, coeffs, owned)
            if rule.adaptive:
                step = self._global_step(u, w, owned)
                if rule.record(j, step):
                    best = u
            else:
                step = 0.0
                rule.diag.iterations = j
            w = u
            if rule.should_stop(j, step):
                break
        return self._finish(rule, backend, w, best, g_exact)

    def _apply_map(self, backend: LoopVJP, w: list[list[Tensor]], w0: list[list[Tensor]],
                   j: int, kmaps: Optional[list], coeffs: Optional[list], owned: range
                   ) -> list[list[Tensor]]:
        """F(w) = w^0 + scan(block_vjp(w)) on this stage's entries (FixedPoint: w^0 + the
        full-layer VJPs, the first one exchanged with the stage before): iteration j."""
        if self.method.keeps_residual:
            f = self._scan(self._sweep(backend, w, j, full=False), kmaps, coeffs, j)
        else:
            f = self._exchange_first_vjp(self._sweep(backend, w, j, full=True))
        for row, base in zip(f, w0):
            for e in owned:
                row[e].add_(base[e])
        return f

    def _finish(self, rule: StopRule, backend: LoopVJP, last: list[list[Tensor]],
                best: Optional[list[list[Tensor]]], g_exact: Optional[list[list[Tensor]]]
                ) -> list[list[Tensor]]:
        """Record the diagnostics; the estimate the stop rule's fallback picks."""
        self.last_diagnostics = diag = rule.finish()
        self.last_iterations = diag.iterations
        if diag.fallback == "best" and best is not None:
            return best
        if diag.fallback == "exact":
            return self._exact_sweep(backend, g_exact)
        return last

    def _iterate_mixed(self, backend: LoopVJP, rule: StopRule, w0: list[list[Tensor]],
                       g_exact: Optional[list[list[Tensor]]], kmaps: Optional[list],
                       coeffs: Optional[list], owned: range) -> list[list[Tensor]]:
        """`core.iteration.mixed_iterate` across ranks: the same sweeps and scans as the
        plain iteration give F(x); `core.anderson.AndersonMixer` mixes this rank's owned
        states, its inner products summed over the ranks by one all-reduce of m + 2 numbers
        per iteration (so every rank takes the same weights and decisions); traced as "mix" and
        "comm" phases."""
        method, n = self.method, len(self.layers)

        def flat(rows: list[list[Tensor]]) -> list[Tensor]:
            return [row[e] for row in rows for e in owned]

        def rows_of(states: list[Tensor], like: list[list[Tensor]]) -> list[list[Tensor]]:
            it = iter(states)  # entries this rank does not own are never read by a sweep
            return [[next(it) if e in owned else torch.zeros_like(row[e])
                     for e in range(n + 1)] for row in like]

        mixer = AndersonMixer(method.anderson, flat(w0), self.num_layers, reuse_buffers=False)
        x, best = w0, None
        for j in rule.iterations():
            self._iteration = j
            f = self._apply_map(backend, x, w0, j, kmaps, coeffs, owned)
            with self.tracer.phase("mix", self.step_index, j):
                r, dots = mixer.residual_dots(flat(x), flat(f))
            dots = self._allreduce(dots, "the Anderson inner products")
            with self.tracer.phase("mix", self.step_index, j):
                out, mix = mixer.mix(flat(f), r, dots)
            x = rows_of(out, f)
            if rule.record(j, mix.relative):  # F of the best-measured iterate
                best = [[t.clone() for t in row] for row in f]
            rule.record_mix(mix)
            if rule.should_stop(j, mix.relative, exact=mixer.is_exact):
                break
        return self._finish(rule, backend, x, best, g_exact)

    def _allreduce(self, t: Tensor, what: str) -> Tensor:
        """Sum the float64 tensor t over every rank (in place; returned), with the
        pipeline's timeout and an error naming the rank and step."""
        if self.num_stages == 1:
            return t
        t = t.to(self.link.device)
        with self.tracer.phase("comm", self.step_index, self._iteration,
                               kind="allreduce") as ev:
            ev["bytes"] = t.numel() * t.element_size()
            try:
                work = dist.all_reduce(t, async_op=True)
                if not work.wait(self.link.timeout):
                    raise TimeoutError("all-reduce did not complete")
            except Exception as err:
                raise TransportError(
                    f"HighwayPipeline rank {self.stage_index}/{self.num_stages}: the "
                    f"all-reduce of {what} failed at step {self.step_index} "
                    f"(timeout {self.timeout:.0f}s): {type(err).__name__}: {err}. A peer "
                    "died, raised or is stuck; every rank stops.") from err
        if _heartbeat is not None:
            _heartbeat()
        return t.cpu()

    def _exchange_first_vjp(self, v: list[list[Tensor]]) -> list[list[Tensor]]:
        """FixedPoint: the VJP of this stage's first layer goes to the previous stage's last
        state; the next stage's arrives into entry n."""
        n = len(self.layers)
        if not self.is_first:
            self.comm.send(self.stage_index - 1, [row[0] for row in v], "a VJP", tag=_TAG_GRAD)
        if not self.is_last:
            got = self.comm.recv(self.stage_index + 1, [row[n] for row in v], "a VJP",
                                 tag=_TAG_GRAD)
            for row, t in zip(v, got):
                row[n] = t
        return v

    def _global_step(self, new: list[list[Tensor]], old: list[list[Tensor]],
                     owned: range) -> float:
        """||w_new - w|| / ||w_new|| over all states of all ranks (an all-reduce), as
        core.iteration's relative step."""
        diff = sum(float(torch.sum((a[e] - b[e]) ** 2)) for a, b in zip(new, old) for e in owned)
        norm = sum(float(torch.sum(a[e] ** 2)) for a in new for e in owned)
        if self.num_stages > 1:
            t = self._allreduce(torch.tensor([diff, norm], dtype=torch.float64),
                                "the step norm")
            diff, norm = (float(v) for v in t.tolist())
        diff, norm = math.sqrt(diff), math.sqrt(norm)
        return 0.0 if diff == 0.0 else diff / max(norm, 1e-300)

    def _exact_sweep(self, backend: LoopVJP, g: list[list[Tensor]]) -> list[list[Tensor]]:
        """Exact backprop through the recorded graphs, rank to rank from the top (the
        adaptive method's "exact" fallback): w_i = g_i + w_{i+1} (J_{i+1} + K_{i+1})."""
        n = len(self.layers)
        if not self.is_last:
            got = self.comm.recv(self.stage_index + 1, [row[n] for row in g],
                                 "an exact gradient", tag=_TAG_GRAD)
            for row, t in zip(g, got):
                row[n] = row[n] + t
        with self.tracer.phase("sweep", self.step_index, None):
            for m, row in enumerate(g):
                for i in range(n - 1, -1, -1):
                    k = m * n + i
                    through = backend.layer_block_vjp(k + 1, row[i + 1]) + self.layers[
                        i].residual.apply_kt(row[i + 1], backend.contexts[k])
                    row[i] = row[i] + through
        if not self.is_first:
            self.comm.send(self.stage_index - 1, [row[0] for row in g], "an exact gradient",
                           tag=_TAG_GRAD)
        return g

    def _k_map(self, i: int, context: Any) -> Callable[[Tensor], Tensor] | None:
        residual = self.layers[i].residual
        if residual.kind == "identity":
            return None
        return lambda v: residual.apply_kt(v, context)

    def _scan(self, entries: list[list[Tensor]], kmaps: list, coeffs: Optional[list],
              j: int) -> list[list[Tensor]]:
        """In place over this stage's entries: the reverse scan over all states of all ranks
        (entry 0 of a stage > 0 is left holding its outgoing part, not an owned state)."""
        return dscan.scan_across_ranks_(
            self.scan, self.comm, self.stage_index, self.num_stages, entries, kmaps, coeffs,
            self.k_kind, timed=lambda: self.tracer.phase("scan", self.step_index, j))
