"""`highwaybp selftest`: the exactness checks that matter, run on the user's own device.

Highway-BP after L iterations (and FixedPoint after L) is exact backprop, and the RNNs are
torch.nn.GRU/LSTM; a kernel, a dtype or a torch version on another machine must not break
that silently. `run(device)` rebuilds small models on `device` (in float64 where the device
has it) and compares, gradient by gradient, each method against plain autograd:

- chain/<residual>/...: a `ResidualChain` of small MLP blocks for each residual kind
  (`RESIDUAL_CASES`: Identity, Scaled, ReLUResidual, Gated, LinearShortcut,
  ModuleShortcut), Highway(k=L)
  and FixedPoint(k=L) with each VJP backend (`BACKENDS`: loop, batched where the kind allows
  it, loop with recompute=False), Exact(), adaptive Highway(tol, max_k=L) reaching L, and
  the Hillis-Steele scan; the reference runs the same layers one after the other under
  ordinary autograd. Compared: dLoss/dx and every parameter's gradient. Also a loss on
  every state (return_states=True, per-layer losses) and blocks with BatchNorm in train
  mode (gradients and running statistics after the backward).
- scan/...: the log-depth Hillis-Steele scan against the sequential one.
- rng-replay/...: blocks with dropout in train mode, Highway(k=L) against autograd with
  the same seed (the backward must replay each layer's masks), and the batched backend
  refusing dropout.
- rnn/...: highwaybp.GRU/LSTM (2 layers, batch_first) against torch.nn.GRU/LSTM with the
  same state_dict: the forward, and the gradients (input, initial state, parameters) at
  Exact() and Highway(k=T) (fast and reference iteration); dropout in train mode (CPU only: the
  GPU kernels of torch.nn draw their own masks; elsewhere Highway against Exact). Each
  forward path x scan (loop/fused x sequential/log) at Highway(k=T), the fused path's
  Exact (torch autograd through its kernel), FixedPoint, adaptive and dropout on fused +
  log, and fused + log against loop + sequential at a truncated Highway(k=1).
- hf/...: `from_huggingface` on a tiny GPT-2 and BERT built from a config (no download),
  Highway(k=L) against the unadapted model's autograd; SKIP if transformers is missing.
- ddg/...: a 2-process DDG run (gloo, or NCCL with 2 GPUs) against the single-process
  oracle; SKIP if torch.distributed is unavailable.

Each check reports the largest per-tensor relative L2 error ||est - ref|| / ||ref|| (a
tensor whose reference is near zero is measured against `NORM_FLOOR` times the norm of
all compared tensors) and passes if it is at most `TOLERANCES[dtype]`. A check whose
reference is zero or non-finite fails: it could not have detected an error. An exception
in a check is a FAIL with its message; a SKIP always says why. Each check also reads the
module's diagnostics to confirm the method really ran (all L iterations): a module that
fell back to plain autograd would match the reference and prove nothing.

`quick=True` runs the checks marked quick, at smaller sizes (L = 4, T = 5): Highway(k=L)
per residual kind with the loop and batched backends, the Hillis-Steele chain on Gated,
BatchNorm with the loop backend, the scans, RNG replay, the RNN Highway(k=T) gradients and
GPT-2. It leaves out the FixedPoint, Exact, adaptive and recompute=False chain checks, the
other RNN checks, BERT and the multi-process DDG run.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from highwaybp.core.chain import ResidualChain
from highwaybp.core.methods import Exact, FixedPoint, Highway, Method
from highwaybp.core.residual import (
    Gated,
    Identity,
    LinearShortcut,
    ModuleShortcut,
    ReLUResidual,
    ResidualLayer,
    Scaled,
)
from highwaybp.core.scan import get_scan, reverse_scan_sequential

# Largest allowed relative error per compared tensor, by the dtype the check ran in.
# float64: exact methods agree with autograd to ~1e-15 (summation order only).
# float32 (devices without float64, e.g. mps): ~2e-7 measured on CPU; 1e-4 leaves room for
# other kernels' summation orders while a wrong gradient is off by 1e-2 or more.
TOLERANCES: dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-4}
# A tensor's error is relative to max(its own norm, NORM_FLOOR * the norm of all compared
# tensors): a gradient that is ~0 by symmetry is not judged by its rounding noise alone.
NORM_FLOOR = 1e-3
STATUSES = ("PASS", "FAIL", "SKIP")
# The transformers major versions the Hugging Face adapter is tested with.
TESTED_TRANSFORMERS_MAJOR = (5,)


@dataclass(frozen=True)
class CheckResult:
    """One row of the selftest table.

    status: "PASS", "FAIL" or "SKIP". max_abs_error / rel_error: the measured errors (None
    when the check did not get to compare). tolerance: the rel_error bound. reason: why a
    check failed or was skipped, or a note on how it ran (e.g. the DDG backend).
    """

    name: str
    device: str
    dtype: str
    status: str
    max_abs_error: float | None = None
    rel_error: float | None = None
    tolerance: float | None = None
    reason: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "PASS"


class SkipCheck(Exception):
    """Raised by a check that cannot run here; the message is the reason shown."""


class CheckFailed(Exception):
    """Raised by a check that failed other than by a numeric mismatch (a missing refusal,
    a wrong stop reason); the message is the reason shown."""


@dataclass(frozen=True)
class Setup:
    """Where the checks run: device, dtype (float64 if the device has it) and size."""

    device: torch.device
    dtype: torch.dtype
    quick: bool

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.dtype]

    def randn(self, *shape: int, seed: int) -> Tensor:
        """Deterministic data: drawn on the CPU, then moved (the same on every device)."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(self.device, self.dtype)

    def build(self, make: Callable[[], nn.Module], seed: int) -> nn.Module:
        """A module initialised from `seed` on the CPU, then moved to the device/dtype."""
        torch.manual_seed(seed)
        return make().to(torch.float64).to(self.device, self.dtype)


@dataclass
class Measured:
    """What a check computed: estimate and reference, tensor by tensor, plus a note.

    ran_on: (device, dtype) when the check ran elsewhere than the setup says (DDG runs
    its processes on the CPU unless there are 2 GPUs); its tolerance is that dtype's.
    """

    estimate: list[Tensor]
    reference: list[Tensor]
    note: str = ""
    names: list[str] = field(default_factory=list)
    ran_on: tuple[str, torch.dtype] | None = None


@dataclass
class Verified:
    """A check of a behaviour rather than of numbers (a refusal with a clear error)."""

    note: str


@dataclass(frozen=True)
class Check:
    """A named check; `quick` ones also run under --quick."""

    name: str
    fn: Callable[[Setup], Measured | Verified]
    quick: bool = False


# ---- comparing ------------------------------------------------------------------------


def compare(measured: Measured) -> tuple[float, float]:
    """(max abs error, largest per-tensor relative L2 error) of estimate vs reference.

    Raises CheckFailed on a shape/count mismatch, a non-finite estimate, or a reference
    that is zero or non-finite (a comparison with it could not fail).
    """
    est, ref = measured.estimate, measured.reference
    names = measured.names or [f"tensor {i}" for i in range(len(ref))]
    if len(est) != len(ref):
        raise CheckFailed(f"{len(est)} tensors computed, {len(ref)} in the reference")
    if not ref:
        raise CheckFailed("nothing to compare")
    pairs = []
    for name, e, r in zip(names, est, ref):
        if e is None or r is None:
            if e is None and r is None:
                continue
            raise CheckFailed(f"{name}: gradient is None in only one of the two")
        if tuple(e.shape) != tuple(r.shape):
            raise CheckFailed(f"{name}: shape {tuple(e.shape)} vs {tuple(r.shape)}")
        as64 = [t.detach().to("cpu", torch.float64) for t in (e, r)]
        pairs.append((name, *as64))
    total = math.sqrt(sum(float(r.pow(2).sum()) for _, _, r in pairs))
    if not math.isfinite(total) or total == 0.0:
        raise CheckFailed(f"the reference is {'zero' if total == 0 else 'not finite'}: "
                          "this check could not detect an error")
    max_abs, worst = 0.0, 0.0
    for name, e, r in pairs:
        if not bool(torch.isfinite(e).all()):
            raise CheckFailed(f"{name}: the estimate has NaN/Inf")
        diff = e - r
        max_abs = max(max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
        denom = max(float(torch.linalg.vector_norm(r)), NORM_FLOOR * total)
        worst = max(worst, float(torch.linalg.vector_norm(diff)) / denom)
    return max_abs, worst


def ran_method(diag: Any, method: Method, length: int, what: str) -> str:
    """Raise CheckFailed unless the diagnostics say `method` ran (all `length` iterations
    for Highway/FixedPoint at k = length): a module that silently fell back to autograd
    would otherwise pass every comparison. Returns a short note."""
    if diag is None or diag.method != repr(method):
        got = None if diag is None else diag.method
        raise CheckFailed(f"{what} did not report running {method!r} (diagnostics: {got})")
    if method.exact:
        return ""
    if diag.iterations != length:
        raise CheckFailed(f"{what} ran {diag.iterations} iterations of {method!r}, expected "
                          f"{length}")
    return f"{diag.iterations} iterations"


def _grads(loss: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, list(tensors), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


# ---- residual chains ---------------------------------------------------------------------


class MLPBlock(nn.Module):
    """Linear-tanh-Linear, [B, d_in] -> [B, d_out]; optional dropout after the tanh."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, 2 * d_out)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(2 * d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class GateBlock(nn.Module):
    """Returns (a, b) for Gated(): a = sigmoid(W_a x) in (0, 1), b = tanh(W_b x)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(self.gate(x)), torch.tanh(self.value(x))


def _matrix_shortcut(matrix: Tensor) -> LinearShortcut:
    """LinearShortcut P(x) = x @ M^T for a fixed matrix M [d_out, d_in] (adjoint v @ M)."""
    return LinearShortcut(lambda x: x @ matrix.T, lambda v: v @ matrix)


@dataclass(frozen=True)
class ResidualCase:
    """One residual kind: how to build a layer of it, and which backends support it.

    make_layer(index, widths, setup, dropout) -> the index-th layer mapping widths[index]
    to widths[index + 1] (equal widths unless the kind can change the shape).
    """

    name: str
    make_layer: Callable[[int, Sequence[int], Setup, float], ResidualLayer]
    batched: bool = True
    shape_changing: bool = False


def _mlp_layer(residual: Callable[[], Any]):
    def make(i: int, widths: Sequence[int], setup: Setup, dropout: float) -> ResidualLayer:
        block = setup.build(lambda: MLPBlock(widths[i], widths[i + 1], dropout), seed=100 + i)
        return ResidualLayer(block, residual())

    return make


def _gated_layer(i: int, widths: Sequence[int], setup: Setup, dropout: float) -> ResidualLayer:
    return ResidualLayer(setup.build(lambda: GateBlock(widths[i]), seed=200 + i), Gated())


def _shortcut_layer(i: int, widths: Sequence[int], setup: Setup, dropout: float):
    block = setup.build(lambda: MLPBlock(widths[i], widths[i + 1], dropout), seed=300 + i)
    matrix = setup.randn(widths[i + 1], widths[i], seed=400 + i) / math.sqrt(widths[i])
    return ResidualLayer(block, _matrix_shortcut(matrix))


def _module_shortcut_layer(i: int, widths: Sequence[int], setup: Setup, dropout: float):
    """torchvision's projection shortcut in 1-D: Linear + BatchNorm, post-activation ReLU."""
    block = setup.build(lambda: MLPBlock(widths[i], widths[i + 1], dropout), seed=500 + i)
    shortcut = setup.build(
        lambda: nn.Sequential(nn.Linear(widths[i], widths[i + 1]), nn.BatchNorm1d(widths[i + 1])),
        seed=600 + i,
    )
    return ResidualLayer(block, ModuleShortcut(shortcut, relu=True))


# One entry per residual kind; a new kind is one more entry.
RESIDUAL_CASES: tuple[ResidualCase, ...] = (
    ResidualCase("identity", _mlp_layer(Identity)),
    ResidualCase("scaled", _mlp_layer(lambda: Scaled(0.7))),
    ResidualCase("relu", _mlp_layer(ReLUResidual)),
    ResidualCase("gated", _gated_layer),
    # General linear K: the batched backend refuses it (shapes may differ per layer).
    ResidualCase("linear_shortcut", _shortcut_layer, batched=False, shape_changing=True),
    # K is a module's VJP (BatchNorm in train mode: K couples the batch); loop backend only.
    ResidualCase("module_shortcut", _module_shortcut_layer, batched=False, shape_changing=True),
)

# VJP backends (and the recorded-graph path): name -> ResidualChain keyword arguments.
BACKENDS: dict[str, dict[str, Any]] = {
    "loop": {"vjp": "loop"},
    "batched": {"vjp": "batched"},
    "loop-no-recompute": {"vjp": "loop", "recompute": False},
}


def _sizes(setup: Setup) -> tuple[int, int, int]:
    """(batch, width, depth L) of the chain checks."""
    return (3, 5, 4) if setup.quick else (4, 6, 6)


def _widths(case: ResidualCase, width: int, depth: int) -> list[int]:
    if not case.shape_changing:
        return [width] * (depth + 1)
    return [width + (i % 3) for i in range(depth + 1)]  # e.g. 6, 7, 8, 6, ...


def _chain_layers(case: ResidualCase, setup: Setup, dropout: float = 0.0):
    batch, width, depth = _sizes(setup)
    widths = _widths(case, width, depth)
    layers = [case.make_layer(i, widths, setup, dropout) for i in range(depth)]
    x = setup.randn(batch, widths[0], seed=1).requires_grad_(True)
    weights = setup.randn(batch, widths[-1], seed=2)
    return layers, x, weights


def _params(layers: Sequence[nn.Module]) -> list[Tensor]:
    return [p for layer in layers for p in layer.parameters()]


def _autograd_reference(layers, x: Tensor, weights: Tensor, seed: int | None = None):
    """dLoss/dx and parameter gradients, the layers run one by one under plain autograd.

    weights: shaped like h_L (loss <weights, h_L>), or [L, *h.shape] for a loss on every
    state h_1..h_L (per-layer losses, the chain's return_states=True).
    """
    if seed is not None:
        torch.manual_seed(seed)
    h, states = x, []
    for layer in layers:
        h = layer(h)
        states.append(h)
    out = torch.stack(states) if weights.dim() == h.dim() + 1 else h
    return _grads((out * weights).sum(), [x, *_params(layers)])


def chain_check(
    case: ResidualCase,
    method: Callable[[int], Method],
    chain_kwargs: dict[str, Any] | None = None,
    expect_stop: str | None = None,
    per_layer_loss: bool = False,
) -> Callable[[Setup], Measured]:
    """Check: the chain with method(L) against the same layers under plain autograd
    (loss on h_L, or with `per_layer_loss` on every state through return_states=True)."""

    def check(setup: Setup) -> Measured:
        layers, x, weights = _chain_layers(case, setup)
        if per_layer_loss:
            weights = setup.randn(len(layers), *weights.shape, seed=3)
        reference = _autograd_reference(layers, x, weights)
        chosen = method(len(layers))
        chain = ResidualChain(layers, method=chosen, **(chain_kwargs or {}))
        out = chain(x, return_states=per_layer_loss)
        estimate = _grads((out * weights).sum(), [x, *_params(layers)])
        diag = chain.last_diagnostics
        note = ran_method(diag, chosen, len(layers), "the chain")
        if expect_stop is not None:
            if diag.stop_reason != expect_stop:
                raise CheckFailed(f"expected stop reason {expect_stop!r}, got "
                                  f"{diag.stop_reason!r} after {diag.iterations} iterations")
            note += f", stop: {diag.stop_reason}"
        names = ["dLoss/dx", *(n for n, _ in chain.named_parameters())]
        return Measured(estimate, reference, note, names)

    return check


def _adaptive(num_layers: int) -> Method:
    # tol far below rounding and fallback="last": only reaching L makes it exact.
    return Highway(tol=1e-300, max_k=num_layers, fallback="last")


def _chain_checks() -> list[Check]:
    checks = []
    for case in RESIDUAL_CASES:
        prefix = f"chain/{case.name}"
        for backend, kwargs in BACKENDS.items():
            if backend == "batched" and not case.batched:
                continue
            quick = backend in ("loop", "batched")
            checks.append(Check(f"{prefix}/highway-k=L/{backend}",
                                chain_check(case, lambda n: Highway(k=n), kwargs), quick))
            checks.append(Check(f"{prefix}/fixedpoint-k=L/{backend}",
                                chain_check(case, lambda n: FixedPoint(k=n), kwargs)))
        checks.append(Check(f"{prefix}/exact", chain_check(case, lambda n: Exact())))
        checks.append(Check(f"{prefix}/adaptive-tol-reaches-L/loop",
                            chain_check(case, _adaptive, expect_stop="exact_after_L")))
        checks.append(Check(f"{prefix}/anderson-k=L/loop",
                            chain_check(case, lambda n: Highway(k=n, anderson=3))))
        checks.append(Check(f"{prefix}/anderson-adaptive-falls-back-exact/loop",
                            chain_check(case, _adaptive_mixed, expect_stop="max_k")))
        if not case.shape_changing:  # stacked scans and stacked states need one shape
            checks.append(Check(f"{prefix}/highway-k=L/hillis_steele",
                                chain_check(case, lambda n: Highway(k=n),
                                            {"scan": "hillis_steele"}),
                                quick=case.name == "gated"))
            checks.append(Check(f"{prefix}/highway-k=L/per-layer-loss",
                                chain_check(case, lambda n: Highway(k=n), per_layer_loss=True)))
    return checks


def check_scans(setup: Setup) -> Measured:
    """Hillis-Steele against the sequential scan: a = None, scalar, per-element; odd N."""
    est, ref, names = [], [], []
    for n in (1, 2, 7, 16):
        x = setup.randn(n, 3, 4, seed=10 + n)
        coefficients = {
            "K=I": None,
            "scalar": torch.full((n, 1, 1), 0.8, dtype=setup.dtype, device=setup.device),
            "diagonal": torch.sigmoid(setup.randn(n, 3, 4, seed=20 + n)),
        }
        for kind, a in coefficients.items():
            est.append(get_scan("hillis_steele")(x, a))  # the registered scan the chain uses
            ref.append(reverse_scan_sequential(x, a))
            names.append(f"N={n} {kind}")
    return Measured(est, ref, names=names)


def batchnorm_check(backend: str) -> Callable[[Setup], Measured]:
    """Blocks with BatchNorm in train mode: gradients as autograd's, and the running
    statistics updated once per forward (the backward's re-run must not touch them)."""

    def check(setup: Setup) -> Measured:
        batch, width, depth = _sizes(setup)

        def block() -> nn.Module:
            return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh(),
                                 nn.Linear(width, width))

        layers = [ResidualLayer(setup.build(block, seed=700 + i)) for i in range(depth)]
        copies = copy.deepcopy(layers)
        x = setup.randn(batch, width, seed=1).requires_grad_(True)
        weights = setup.randn(batch, width, seed=2)
        reference = _autograd_reference(copies, x, weights)
        reference += [b for layer in copies for b in layer.buffers()]
        chain = ResidualChain(layers, method=Highway(k=depth), **BACKENDS[backend])
        estimate = _grads((chain(x) * weights).sum(), [x, *_params(layers)])
        estimate += [b for layer in layers for b in layer.buffers()]
        note = ran_method(chain.last_diagnostics, chain.method, depth, "the chain")
        names = ["dLoss/dx", *(n for n, _ in chain.named_parameters()),
                 *(n for n, _ in chain.named_buffers())]
        return Measured(estimate, reference, note, names)

    return check


# ---- RNG replay --------------------------------------------------------------------------


def check_dropout_replay(setup: Setup) -> Measured:
    """Blocks with dropout in train mode: Highway(k=L) equals autograd under the same seed
    (the backward re-runs each layer with the RNG state its forward saw)."""
    case = RESIDUAL_CASES[0]
    layers, x, weights = _chain_layers(case, setup, dropout=0.3)
    seed = 7
    reference = _autograd_reference(layers, x, weights, seed=seed)
    chain = ResidualChain(layers, method=Highway(k=len(layers)))
    torch.manual_seed(seed)
    out = chain(x)
    torch.manual_seed(seed + 1)  # the backward must not depend on the RNG at backward time
    estimate = _grads((out * weights).sum(), [x, *_params(layers)])
    note = ran_method(chain.last_diagnostics, chain.method, len(layers), "the chain")
    # The masks must differ from a run without dropout, or this check proves nothing.
    torch.manual_seed(seed)
    undropped = _autograd_reference([_without_dropout(layer) for layer in layers], x, weights)
    if all(torch.equal(a, b) for a, b in zip(undropped, reference)):
        raise CheckFailed("dropout had no effect on the reference: the check is vacuous")
    names = ["dLoss/dx", *(n for n, _ in chain.named_parameters())]
    return Measured(estimate, reference, note, names)


def _without_dropout(layer: ResidualLayer) -> ResidualLayer:
    clone = copy.deepcopy(layer)
    for m in clone.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return clone


def check_batched_refuses_dropout(setup: Setup) -> Verified:
    """vjp='batched' cannot replay per-layer masks: it must refuse, not return a gradient."""
    layers, x, weights = _chain_layers(RESIDUAL_CASES[0], setup, dropout=0.3)
    chain = ResidualChain(layers, method=Highway(k=len(layers)), vjp="batched")
    try:
        _grads((chain(x) * weights).sum(), [x])
    except RuntimeError as err:
        if "dropout" not in str(err):
            raise
        return Verified("refused with a clear error")
    raise CheckFailed("vjp='batched' returned a gradient for blocks with dropout")


# ---- RNNs -------------------------------------------------------------------------------


def _rnn_pair(kind: str, setup: Setup, dropout: float = 0.0, layers: int = 2):
    """(highwaybp module, torch.nn module) with the same state_dict, batch_first=True."""
    import highwaybp.models.rnn as hbp_rnn

    ours_cls, ref_cls = {"gru": (hbp_rnn.GRU, nn.GRU), "lstm": (hbp_rnn.LSTM, nn.LSTM)}[kind]
    ref = setup.build(
        lambda: ref_cls(4, 5, num_layers=layers, batch_first=True, dropout=dropout), seed=500
    )
    ours = ours_cls(
        4, 5, num_layers=layers, batch_first=True, dropout=dropout,
        device=setup.device, dtype=setup.dtype,
    )
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _rnn_inputs(kind: str, setup: Setup, layers: int = 2):
    batch, steps = (2, 5) if setup.quick else (3, 7)
    x = setup.randn(batch, steps, 4, seed=30).requires_grad_(True)
    h0 = (0.5 * setup.randn(layers, batch, 5, seed=31)).requires_grad_(True)
    state: Any = h0
    leaves = [x, h0]
    if kind == "lstm":
        c0 = (0.5 * setup.randn(layers, batch, 5, seed=32)).requires_grad_(True)
        state = (h0, c0)
        leaves.append(c0)
    return x, state, leaves


def _rnn_outputs(kind: str, module: nn.Module, x: Tensor, state: Any, **kwargs) -> list[Tensor]:
    out, final = module(x, state, **kwargs)
    return [out, *(final if kind == "lstm" else (final,))]


def _rnn_loss(outputs: list[Tensor], setup: Setup) -> Tensor:
    return sum((o * setup.randn(*o.shape, seed=40 + i)).sum() for i, o in enumerate(outputs))


def rnn_forward_check(kind: str) -> Callable[[Setup], Measured]:
    def check(setup: Setup) -> Measured:
        ours, ref = _rnn_pair(kind, setup)
        x, state, _ = _rnn_inputs(kind, setup)
        with torch.no_grad():
            est = _rnn_outputs(kind, ours, x, state)
            reference = _rnn_outputs(kind, ref, x, state)
        return Measured(est, reference, names=_output_names(kind))

    return check


def _output_names(kind: str) -> list[str]:
    return ["output", "h_n", "c_n"] if kind == "lstm" else ["output", "h_n"]


def rnn_grad_check(
    kind: str,
    method: Callable[[int], Method],
    iterate: str = "fast",
    dropout: float = 0.0,
    forward: str = "auto",
    scan: str = "auto",
    split: str = "gate",
) -> Callable[[Setup], Measured]:
    """highwaybp.{GRU,LSTM} with method(T) against torch.nn: outputs and all gradients.
    forward/scan: the module's paths ("auto": fused + log on CUDA, loop + sequential on CPU);
    split: the module's K_t (GRU: "gate" or "diagonal")."""

    def check(setup: Setup) -> Measured:
        layers = 3 if dropout else 2
        ours, ref = _rnn_pair(kind, setup, dropout, layers)
        ours.iterate = iterate
        ours.forward_path, ours.scan, ours.split = forward, scan, split
        x, state, leaves = _rnn_inputs(kind, setup, layers)
        note = ""
        versus_torch = not dropout or setup.device.type == "cpu"
        if not versus_torch:  # torch.nn's GPU kernels draw their own dropout masks
            ref = ours
            note = "vs highwaybp Exact() (torch.nn's device kernels draw other masks)"
        seed = 11
        torch.manual_seed(seed)
        ref_kwargs = {} if versus_torch else {"method": Exact()}
        ref_out = _rnn_outputs(kind, ref, x, state, **ref_kwargs)
        reference = [*ref_out, *_grads(_rnn_loss(ref_out, setup), [*leaves, *ref.parameters()])]
        torch.manual_seed(seed)
        steps, chosen = x.shape[1], method(x.shape[1])
        out = _rnn_outputs(kind, ours, x, state, method=chosen)
        estimate = [*out, *_grads(_rnn_loss(out, setup), [*leaves, *ours.parameters()])]
        for layer, diag in enumerate(ours.layer_diagnostics):
            ran = ran_method(diag, chosen, steps, f"highwaybp.{kind.upper()} layer {layer}")
        note = "; ".join(filter(None, (ran, note)))
        state_names = ["dL/dh0", "dL/dc0"] if kind == "lstm" else ["dL/dh0"]
        names = [*_output_names(kind), "dL/dx", *state_names,
                 *(f"dL/d{n}" for n, _ in ours.named_parameters())]
        return Measured(estimate, reference, note, names)

    return check


def rnn_paths_check(kind: str, k: int, split: str = "gate") -> Callable[[Setup], Measured]:
    """Highway(k) (truncated: not exact) on the fused forward + log scan against the loop +
    sequential scan: the same estimate to rounding (outputs and all gradients)."""

    def check(setup: Setup) -> Measured:
        results, notes = [], []
        for forward, scan in (("fused", "log"), ("loop", "sequential")):
            ours, _ = _rnn_pair(kind, setup)
            ours.forward_path, ours.scan, ours.split = forward, scan, split
            x, state, leaves = _rnn_inputs(kind, setup)
            chosen = Highway(k=k)
            out = _rnn_outputs(kind, ours, x, state, method=chosen)
            results.append([*out, *_grads(_rnn_loss(out, setup), [*leaves, *ours.parameters()])])
            notes.append(ran_method(ours.last_diagnostics, chosen, k, f"{forward}+{scan}"))
            names = [*_output_names(kind), "dL/dx", "dL/dh0", *(["dL/dc0"] if kind == "lstm"
                     else []), *(f"dL/d{n}" for n, _ in ours.named_parameters())]  # fmt: skip
        return Measured(results[0], results[1], notes[0], names)

    return check


def _adaptive_mixed(num_layers: int) -> Method:
    # Mixing cannot meet tol 1e-300 and is not exact at L: the exact fallback must apply.
    return Highway(tol=1e-300, max_k=num_layers, anderson=3)


def rnn_mixed_vs_cpu_float64(kind: str) -> Callable[[Setup], Measured]:
    """Highway(k=T//2, anderson=3) on the device against the same on the CPU in float64:
    the Anderson solve and mix (inner products, a small solve, a combination) run on the
    device's kernels and must give the CPU's estimate (no autograd reference exists for a
    truncated, mixed gradient)."""

    def grads(setup: Setup) -> tuple[list[Tensor], Any, int]:
        ours, _ = _rnn_pair(kind, setup)
        x, state, leaves = _rnn_inputs(kind, setup)
        chosen = Highway(k=x.shape[1] // 2, anderson=3)
        out = _rnn_outputs(kind, ours, x, state, method=chosen)
        grad = _grads(_rnn_loss(out, setup), [*leaves, *ours.parameters()])
        for layer, diag in enumerate(ours.layer_diagnostics):
            ran_method(diag, chosen, chosen.k, f"highwaybp.{kind.upper()} layer {layer}")
            if not any(diag.mixed):
                raise CheckFailed(f"layer {layer} never mixed: this check would test nothing")
        return grad, ours, chosen.k

    def check(setup: Setup) -> Measured:
        estimate, ours, k = grads(setup)
        reference, _, _ = grads(Setup(torch.device("cpu"), torch.float64, setup.quick))
        state_names = ["dL/dh0", "dL/dc0"] if kind == "lstm" else ["dL/dh0"]
        names = ["dL/dx", *state_names, *(f"dL/d{n}" for n, _ in ours.named_parameters())]
        return Measured(estimate, reference, f"k={k}, mixed", names)

    return check


RNN_PATHS = (("loop", "sequential"), ("loop", "log"), ("fused", "sequential"), ("fused", "log"))


def _rnn_checks() -> list[Check]:
    checks = []
    for kind in ("gru", "lstm"):
        for forward, scan in RNN_PATHS:  # explicit: "auto" picks one pair per device
            path = f"rnn/{kind}/{forward}+{scan}"
            gpu_shaped = (forward, scan) == ("fused", "log")
            checks.append(Check(f"{path}/highway-k=T-grad", rnn_grad_check(
                kind, lambda t: Highway(k=t), forward=forward, scan=scan), quick=gpu_shaped))
        checks += [
            Check(f"rnn/{kind}/fused/exact-grad",
                  rnn_grad_check(kind, lambda t: Exact(), forward="fused")),
            Check(f"rnn/{kind}/fused+log/fixedpoint-k=T-grad",
                  rnn_grad_check(kind, lambda t: FixedPoint(k=t), forward="fused", scan="log")),
            Check(f"rnn/{kind}/fused+log/adaptive-reaches-T",
                  rnn_grad_check(kind, lambda t: Highway(tol=1e-300, max_k=t), forward="fused",
                                 scan="log")),
            Check(f"rnn/{kind}/fused+log/dropout-train/highway-k=T",
                  rnn_grad_check(kind, lambda t: Highway(k=t), dropout=0.3, forward="fused",
                                 scan="log")),
            Check(f"rnn/{kind}/fused+log-vs-loop/highway-k=1", rnn_paths_check(kind, 1),
                  quick=True),
        ]
    # K_t = diag(J_t): exact at k = T on both paths, and the paths agree at k = 1
    for forward, scan in (("loop", "sequential"), ("fused", "log")):
        checks.append(Check(f"rnn/gru/{forward}+{scan}/split=diagonal/highway-k=T-grad",
                            rnn_grad_check("gru", lambda t: Highway(k=t), forward=forward,
                                           scan=scan, split="diagonal"),
                            quick=scan == "log"))
    checks.append(Check("rnn/gru/fused+log-vs-loop/split=diagonal/highway-k=1",
                        rnn_paths_check("gru", 1, split="diagonal")))
    for kind in ("gru", "lstm"):
        checks += [
            Check(f"rnn/{kind}/forward", rnn_forward_check(kind)),
            Check(f"rnn/{kind}/exact-grad", rnn_grad_check(kind, lambda t: Exact())),
            Check(f"rnn/{kind}/highway-k=T-grad",
                  rnn_grad_check(kind, lambda t: Highway(k=t)), quick=True),
            Check(f"rnn/{kind}/highway-k=T-grad/reference-iterate",
                  rnn_grad_check(kind, lambda t: Highway(k=t), iterate="reference")),
            Check(f"rnn/{kind}/fixedpoint-k=T-grad",
                  rnn_grad_check(kind, lambda t: FixedPoint(k=t))),
            Check(f"rnn/{kind}/dropout-train/highway-k=T",
                  rnn_grad_check(kind, lambda t: Highway(k=t), dropout=0.3)),
            Check(f"rnn/{kind}/anderson-k=T-grad",
                  rnn_grad_check(kind, lambda t: Highway(k=t, anderson=3))),
            Check(f"rnn/{kind}/anderson-adaptive-falls-back-exact",
                  rnn_grad_check(kind, _adaptive_mixed)),
            Check(f"rnn/{kind}/anderson-k=T/2-vs-cpu-float64", rnn_mixed_vs_cpu_float64(kind),
                  quick=True),
        ]
    return checks


# ---- Hugging Face adapter -----------------------------------------------------------------


def _transformers() -> Any:
    if importlib.util.find_spec("transformers") is None:
        raise SkipCheck("transformers not installed")
    import transformers

    return transformers


def _untested_version(transformers: Any) -> str | None:
    version = getattr(transformers, "__version__", "unknown")
    major = version.split(".")[0]
    if not major.isdigit() or int(major) not in TESTED_TRANSFORMERS_MAJOR:
        return version
    return None


def hf_check(kind: str) -> Callable[[Setup], Measured]:
    """from_huggingface(model, Highway(k=L)) against the unadapted model's autograd, on a
    tiny model built from a config (no download); training-style forward, use_cache=False."""

    def check(setup: Setup) -> Measured:
        transformers = _transformers()
        untested = _untested_version(transformers)
        try:
            with _quiet(transformers):
                return _hf_compare(kind, transformers, setup)
        except (CheckFailed, SkipCheck):
            raise
        except Exception as err:
            if untested is None:
                raise
            raise SkipCheck(
                f"untested transformers version: {untested} (adapter tested with "
                f"{', '.join(f'{v}.x' for v in TESTED_TRANSFORMERS_MAJOR)}): "
                f"{type(err).__name__}: {err}"
            ) from err

    return check


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' config notices and deprecation warnings would break up the table."""
    logging = getattr(transformers, "logging", None)
    level = logging.get_verbosity() if logging is not None else None
    try:
        if logging is not None:
            logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if logging is not None:
            logging.set_verbosity(level)


def _hf_compare(kind: str, transformers: Any, setup: Setup) -> Measured:
    from highwaybp.models.huggingface import from_huggingface, highway_stack

    vocab, seq, layers = 40, 6, 2
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=16, n_embd=16, n_layer=layers, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
        make = lambda: transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        make = lambda: transformers.BertModel(config, add_pooling_layer=False)
    reference_model = setup.build(make, seed=600)
    adapted = copy.deepcopy(reference_model)
    method = Highway(k=2 * layers)  # L = 2 sub-layers (attention, MLP) per block
    from_huggingface(adapted, method=method)
    gen = torch.Generator().manual_seed(50)
    ids = torch.randint(0, vocab, (2, seq), generator=gen).to(setup.device)
    mask = torch.ones(2, seq, dtype=torch.long, device=setup.device)
    mask[1, -2:] = 0  # padding in the second sequence: the mask must reach every block

    def loss_of(model: nn.Module) -> Tensor:
        if kind == "gpt2":
            return model(ids, attention_mask=mask, labels=ids, use_cache=False).loss
        hidden = model(ids, attention_mask=mask).last_hidden_state
        return (hidden * setup.randn(*hidden.shape, seed=51)).sum()

    reference = _grads(loss_of(reference_model), list(reference_model.parameters()))
    estimate = _grads(loss_of(adapted), list(adapted.parameters()))
    ran = ran_method(highway_stack(adapted).last_diagnostics, method, 2 * layers, "the adapter")
    names = [n for n, _ in adapted.named_parameters()]
    version = getattr(transformers, "__version__", "?")
    return Measured(estimate, reference, f"{ran}; transformers {version}", names)


# ---- DDG ---------------------------------------------------------------------------------


def _ddg_backend(setup: Setup) -> tuple[str, str]:
    """(backend, note): NCCL on 2 GPUs when checking cuda, else gloo on the CPU."""
    import torch.distributed as dist

    if setup.device.type == "cuda":
        if torch.cuda.device_count() >= 2 and dist.is_nccl_available():
            return "nccl", "nccl on cuda:0 and cuda:1"
        return "gloo", "gloo on CPU (NCCL needs 2 GPUs)"
    if not dist.is_gloo_available():
        raise SkipCheck("torch.distributed has no gloo backend in this build")
    note = "gloo on CPU" + ("" if setup.device.type == "cpu" else f" (not {setup.device.type})")
    return "gloo", note


def check_ddg(setup: Setup) -> Measured:
    """A 2-process DDG run (5 steps, tiny ResNet1d, float64) against the single-process
    oracle: every parameter/buffer of the trained model and every loss."""
    import torch.distributed as dist

    if not dist.is_available():
        raise SkipCheck("torch.distributed is not available in this torch build")
    backend, note = _ddg_backend(setup)
    from highwaybp.ddg import DDGRunConfig, DDGTrainer, EpochBatches, assemble_model, spawn_ddg
    from highwaybp.models.resnet1d import build_resnet1d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 40, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (32,), generator=gen)
    cfg = DDGRunConfig(
        build_model=functools.partial(
            build_resnet1d, seed=3, channels=4, blocks=2, dtype=torch.float64
        ),
        batches=EpochBatches(x, y, batch_size=8, seed=1),
        steps=5,
        optimizer_factory=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        semantics="stash",
        rng_seed=0,
        timeout=30.0,
        threads=1,
        backend=backend,
    )
    results = spawn_ddg(cfg, 2, deadline=90.0)
    trained = assemble_model(cfg, results)
    oracle = cfg.build_model()
    trainer = DDGTrainer(oracle, 2, cfg.optimizer_factory, semantics=cfg.semantics,
                         rng_seed=cfg.rng_seed)
    losses = [trainer.step(*cfg.batches(t)).loss for t in range(cfg.steps)]
    initial = cfg.build_model().state_dict()
    if all(torch.equal(initial[k], v) for k, v in oracle.state_dict().items()):
        raise CheckFailed("the oracle did not train: the comparison is vacuous")
    names = list(oracle.state_dict())
    estimate = [v.double() for v in trained.state_dict().values()]
    estimate.append(torch.tensor(results[-1]["losses"], dtype=torch.float64))
    reference = [v.double() for v in oracle.state_dict().values()]
    reference.append(torch.tensor(losses, dtype=torch.float64))
    ran_on = ("cuda" if backend == "nccl" else "cpu", torch.float64)
    return Measured(estimate, reference, note, [*names, "losses"], ran_on)


# ---- the list and the runner ---------------------------------------------------------------


def all_checks() -> list[Check]:
    """Every check, in table order."""
    return [
        *_chain_checks(),
        Check("chain/batchnorm-train/highway-k=L/loop", batchnorm_check("loop"), quick=True),
        Check("chain/batchnorm-train/highway-k=L/batched", batchnorm_check("batched")),
        Check("scan/hillis_steele-vs-sequential", check_scans, quick=True),
        Check("rng-replay/dropout/highway-k=L/loop", check_dropout_replay, quick=True),
        Check("rng-replay/batched-refuses-dropout", check_batched_refuses_dropout, quick=True),
        *_rnn_checks(),
        Check("hf/gpt2/highway-k=L", hf_check("gpt2"), quick=True),
        Check("hf/bert/highway-k=L", hf_check("bert")),
        Check("ddg/2-process-vs-oracle", check_ddg),
    ]


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch.device to check, or a ValueError saying why it cannot be used."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device}: not a device name; use cpu, cuda, cuda:N or mps") \
            from err
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"--device {device}: CUDA is not available in this torch build "
                             f"(torch {torch.__version__}); install a CUDA build of torch")
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise ValueError(f"--device {device}: this torch build has CUDA but no GPU is "
                             "visible (check the driver and CUDA_VISIBLE_DEVICES)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_built():
            raise ValueError(f"--device {device}: MPS is not available in this torch build")
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: this torch build has MPS but the device is "
                             "not available (needs macOS 12.3+ on Apple silicon)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: the selftest supports cpu, cuda and mps")
    return dev


def best_dtype(device: torch.device) -> torch.dtype:
    """float64 if the device computes in it (mps does not), else float32."""
    try:
        probe = torch.ones(2, dtype=torch.float64, device=device)
        (probe @ probe).item()
    except (TypeError, RuntimeError):
        return torch.float32
    return torch.float64


def resolve_dtype(device: str | torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype` checked against the device (None: `best_dtype`), or a ValueError."""
    dev = resolve_device(device)
    if dtype is None:
        return best_dtype(dev)
    if dtype not in TOLERANCES:
        names = sorted(map(_dtype_name, TOLERANCES))
        raise ValueError(f"--dtype must be one of {names}, got {_dtype_name(dtype)}")
    if dtype == torch.float64 and best_dtype(dev) != torch.float64:
        raise ValueError(f"--device {device} does not compute in float64; use --dtype float32")
    return dtype


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """cuDNN deterministic, no TF32, the caller's RNG streams untouched; all restored."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    # torch.manual_seed (used to build the models) seeds every GPU: restore all of them.
    devices: list[Any] = []
    if device.type == "cuda":
        devices = list(range(torch.cuda.device_count()))
    elif device.type == "mps":
        devices = ["mps"]
    # device_type only with devices: torch < 2.5 refuses device_type=None.
    kind = {"device_type": device.type} if devices else {}
    try:
        cudnn.deterministic, cudnn.benchmark = True, False
        cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with torch.random.fork_rng(devices=devices, **kind):
            yield
    finally:
        (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved


def run_check(check: Check, setup: Setup) -> CheckResult:
    """Run one check and turn its outcome (or exception) into a table row."""
    row: dict[str, Any] = {
        "name": check.name,
        "device": str(setup.device),
        "dtype": _dtype_name(setup.dtype),
    }
    start = time.perf_counter()
    try:
        outcome = check.fn(setup)
        if isinstance(outcome, Verified):
            return CheckResult(**row, status="PASS", reason=outcome.note,
                               seconds=time.perf_counter() - start)
        max_abs, rel = compare(outcome)
    except SkipCheck as skip:
        return CheckResult(**row, status="SKIP", reason=str(skip),
                           seconds=time.perf_counter() - start)
    except CheckFailed as failed:
        return CheckResult(**row, status="FAIL", tolerance=setup.tolerance, reason=str(failed),
                           seconds=time.perf_counter() - start)
    except Exception as err:  # a crash is a failure of the check, with what happened
        return CheckResult(**row, status="FAIL", tolerance=setup.tolerance,
                           reason=f"error: {type(err).__name__}: {err}",
                           seconds=time.perf_counter() - start)
    tolerance = setup.tolerance
    if outcome.ran_on is not None:
        row["device"], dtype = outcome.ran_on
        row["dtype"], tolerance = _dtype_name(dtype), TOLERANCES[dtype]
    status = "PASS" if rel <= tolerance else "FAIL"
    reason = outcome.note
    if status == "FAIL":
        reason = f"relative error {rel:.3g} > {tolerance:g}" + (f"; {reason}" if reason else "")
    return CheckResult(**row, status=status, max_abs_error=max_abs, rel_error=rel,
                       tolerance=tolerance, reason=reason, seconds=time.perf_counter() - start)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run(
    device: str | torch.device = "cpu",
    quick: bool = False,
    progress: Callable[[CheckResult], None] | None = None,
    dtype: torch.dtype | None = None,
) -> list[CheckResult]:
    """Run the selftest on `device` and return one `CheckResult` per check.

    Args:
        device: "cpu", "cuda", "cuda:1" or "mps"; ValueError if it is not usable here.
        quick: run the quick subset at small sizes (see the module docstring).
        progress: called with each result as soon as it is known (the CLI prints it).
        dtype: torch.float64 or torch.float32; default float64 where the device has it.
            The DDG check always runs its processes in float64.

    The caller's RNG state and cuDNN/TF32 settings are restored afterwards.
    """
    dev = resolve_device(device)
    setup = Setup(dev, resolve_dtype(dev, dtype), quick)
    checks = [c for c in all_checks() if c.quick or not quick]
    results = []
    with _deterministic(dev):
        for check in checks:
            result = run_check(check, setup)
            results.append(result)
            if progress is not None:
                progress(result)
    return results


# ---- the table ---------------------------------------------------------------------------

_COLUMNS = ("check", "device", "dtype", "max abs err", "rel err", "tol", "result")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def format_row(result: CheckResult, name_width: int = 48) -> str:
    cells = (
        result.name.ljust(name_width),
        result.device.ljust(6),
        result.dtype.ljust(7),
        _fmt(result.max_abs_error).rjust(11),
        _fmt(result.rel_error).rjust(9),
        _fmt(result.tolerance).rjust(8),
        result.status,
    )
    line = "  ".join(cells)
    return f"{line}  {result.reason}" if result.reason else line


def format_header(name_width: int = 48) -> str:
    widths = (name_width, 6, 7, 11, 9, 8, 6)
    cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(_COLUMNS, widths))]
    cells[-1] = _COLUMNS[-1]
    return "  ".join(cells)


def summary(results: Sequence[CheckResult]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return (f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
            f"of {len(results)} checks")
