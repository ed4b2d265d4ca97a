"""`highwaybp bench rnn`: training-step time, memory and gradient fidelity of Highway-BP
through time against exact baselines, all measured in the same run.

Methods (one JSON record each, per sequence length):

- `torch`: torch.nn.GRU / torch.nn.LSTM (the native op; the LSTM's CPU forward and
  backward are oneDNN's fused RNN, `aten::mkldnn_rnn_layer`).
- `autograd-loop`: autograd through the same cell math looped over time, written well: the
  input projection for all steps is one matmul, the loop iterates with `unbind` (indexing a
  precomputed tensor per step would make the backward O(T^2)) and fuses the r/z sigmoids.
  The bench also times it at `--scaling-factor` x T to show that it scales linearly.
- `hbp-exact`: highwaybp's GRU/LSTM with method=Exact(): sequential BPTT on the gates the
  forward stored (a hand-written exact backward; a third, often the strongest, baseline).
- `highway(k)`, `fixedpoint(k)`: highwaybp's GRU/LSTM with Highway(k) / FixedPoint(k).

Per record: forward, backward and total step time (median over `--repeats` runs after
`--warmup`, methods interleaved round-robin so load changes on a shared machine hit all of
them; a step is forward + backward of a per-step loss, no optimizer), peak memory of
a step (a fresh subprocess, VmHWM above the RSS before the first step), the backward's
achieved matmul throughput as a fraction of a large matmul's measured in the same run, and
the cosine / relative error of the RNN parameter gradient against exact backprop, at init
and after `--train-steps` exact training steps on a delayed-copy task (the model state is
named in the record: accuracy at small k is good at init and can be poor once trained).

Floors, timed as extra entries in the same rounds (meta, per T; the input x needs no
gradient, for torch.nn and our methods alike):

- `matmul_floor`: the forward's recurrent matmuls alone (T per-step matmuls per layer).
- `forward_floor`: that plus the forward's per-step elementwise ops alone (the engines'
  loop without its matmul) and the cost of a do-nothing op; our forward over their sum
  (and over their sum plus the input projection), and their sum over the matmul floor
  (the least forward / matmul floor an eager loop of these ops reaches).
- `step_floor`: the matmuls one training step must do, each part alone with its operands
  prepared outside the timing (batched parts through oneDNN f32, or torch.mm into a
  preallocated output where that is faster): input projection, recurrent forward,
  recurrent backward (T sequential steps, or one batched matmul per Highway sweep),
  weight gradients (one G^T [G*H, T*B] matmul per weight), input gradient (layers above
  the first). exact = all with the sequential backward; Highway(k) = k batched backwards
  (none at k = 0). torch.nn's step over a floor is the best speedup over torch.nn that a
  method doing these matmuls, and nothing else, could reach in this run.
- `large_matmul`: a large matmul's GFLOP/s through oneDNN and through torch.mm (MKL);
  the records' `bwd_matmul_fraction_of_peak` is against oneDNN's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from highwaybp.bench.memory import step_peak_growth_bytes
from highwaybp.core.fidelity import compare_gradients
from highwaybp.core.methods import Exact, FixedPoint, Highway, Method
from highwaybp.models.rnn import GRU, LSTM, AutogradLoopRNN
from highwaybp.train.cli_types import (
    nonneg_int,
    nonneg_int_list,
    out_file,
    positive_float,
    positive_int,
    positive_int_list,
)
from highwaybp.train.threads import use_threads

EXACT_BASELINES = ("torch", "autograd-loop")


# ---- models and steps ---------------------------------------------------------------------


def _method_name(method: Method) -> str:
    return "hbp-exact" if method.exact else f"{method.name}(k={method.k})"


def _parse_method(name: str) -> tuple[str, Optional[Method]]:
    if name in EXACT_BASELINES:
        return name, None
    if name == "hbp-exact":
        return name, Exact()
    kind, k = name.split("(k=")
    k = int(k.rstrip(")"))
    return name, (Highway(k=k) if kind == "highway" else FixedPoint(k=k))


def build(args: Any, name: str, ref: nn.Module) -> Callable[[Tensor], Tensor]:
    """A callable x -> outputs [T, B, H] for the method `name`, sharing `ref`'s weights."""
    _, method = _parse_method(name)
    if name == "torch":
        return lambda x: ref(x)[0]
    if name == "autograd-loop":
        return AutogradLoopRNN(args.cell, ref)
    cls = GRU if args.cell == "gru" else LSTM
    m = cls(args.input_size, args.hidden, num_layers=args.layers, method=method)
    m.load_state_dict(ref.state_dict())
    return lambda x: m(x)[0]


def _params(fn: Any, ref: nn.Module) -> list[Tensor]:
    if isinstance(fn, nn.Module):
        return list(fn.parameters())
    owner = getattr(fn, "__closure__", None)
    for cell in owner or ():
        if isinstance(cell.cell_contents, nn.Module) and cell.cell_contents is not ref:
            return list(cell.cell_contents.parameters())
    return list(ref.parameters())


def time_step(fn: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor, gy: Tensor):
    for p in params:
        p.grad = None
    t0 = time.perf_counter()
    y = fn(x)
    t1 = time.perf_counter()
    if y is not None:  # the matmul floor has no backward
        y.backward(gy)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


FLOOR = "floor"  # the matmul-only loop, timed in the same rounds as the methods
# The parts of a training step's matmul floor, the forward's elementwise floor and the per-op
# dispatch floor: each a callable returning None, timed as a "forward" in the same rounds.
STEP_FLOOR_PARTS = ("input_projection", "recurrent_forward", "recurrent_backward_sequential",
                    "recurrent_backward_batched", "weight_grads", "input_grad")
ELEMENTWISE_FLOOR = "floor:elementwise"
DISPATCH_FLOOR = "floor:dispatch"
# top-level ops that are a step's matmul (and the add oneDNN fuses into it), not elementwise
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "mkldnn::_linear_pointwise")


def _is_floor(name: str) -> bool:
    return name == FLOOR or name.startswith("floor:")


class SequentialMatmuls:
    """T per-step matmuls a_t [B, K] x W^T (W [N, K]) for each weight, in a Python loop like
    the engines', through the matmul the engines' loops use (`engine.packed_linear`: oneDNN
    with a prepacked weight for large f32 steps, else torch.mm into a preallocated output).
    Returns None: nothing to differentiate."""

    def __init__(self, weights: list[Tensor], seq_len: int, batch: int) -> None:
        from highwaybp.models.rnn.engine import packed_linear

        self.weights = [w.detach().contiguous() for w in weights]
        self.linears = [packed_linear(w, batch) for w in self.weights]
        self.inputs = [torch.randn(seq_len, batch, w.shape[1]) for w in self.weights]
        self.outs = [torch.empty(seq_len, batch, w.shape[0]) for w in self.weights]

    def __call__(self, x: Optional[Tensor] = None) -> None:
        for w, linear, a, out in zip(self.weights, self.linears, self.inputs, self.outs):
            w_t = w.t()
            for a_t, out_t in zip(a.unbind(0), out.unbind(0)):
                if linear is None:
                    torch.mm(a_t, w_t, out=out_t)
                else:
                    linear(a_t)


class MatmulFloor(SequentialMatmuls):
    """The forward's floor: each layer's recurrent matmuls alone, h_t W_hh^T for t = 1..T
    ([B, H] x [H, G*H]), as the engines' forward loops run them (`SequentialMatmuls`).

    Everything else a recurrent forward does per step (the gates' elementwise ops,
    `ElementwiseFloor`) costs on top of this; the input projection (one batched matmul) is
    not included.
    """

    def __init__(self, ref: nn.Module, seq_len: int, batch: int) -> None:
        weights = [getattr(ref, f"weight_hh_l{i}") for i in range(ref.num_layers)]
        super().__init__(weights, seq_len, batch)


class LargeMatmul:
    """a [M, K] @ weight^T (weight [N, K]), operands prepared contiguous outside the timing,
    by the faster of two CPU paths, timed at construction (`path`): "onednn" (oneDNN f32,
    `engine.linear`, the weight packed once if `packed`; a fresh output) and "torch.mm"
    (MKL into a preallocated output; faster where the output is large and K small, as the
    GRU's x projection with In = 3: a fresh output's page faults cost more than the
    product). Only "torch.mm" where oneDNN does not apply (`engine.onednn_applies`)."""

    def __init__(self, a: Tensor, weight: Tensor, packed: bool, trials: int = 3) -> None:
        from highwaybp.models.rnn.engine import PackedLinear, linear, onednn_applies

        self.a, self.weight = a.contiguous(), weight.detach().contiguous()
        out = a.new_empty((a.shape[0], self.weight.shape[0]))
        w_t = self.weight.t()
        self.paths: dict[str, Callable[[], Tensor]] = {
            "torch.mm": lambda: torch.mm(self.a, w_t, out=out)}
        if onednn_applies(self.weight):
            onednn = (PackedLinear(self.weight, a.shape[0]) if packed
                      else lambda x: linear(x, self.weight))  # fmt: skip
            self.paths["onednn"] = lambda: onednn(self.a)
        best = {name: min(_once(fn) for _ in range(trials)) for name, fn in self.paths.items()}
        self.path = min(best, key=best.__getitem__)

    @property
    def flops(self) -> int:
        return 2 * self.a.shape[0] * self.a.shape[1] * self.weight.shape[0]

    def __call__(self) -> Tensor:
        return self.paths[self.path]()


def _once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class BatchedMatmuls:
    """Large matmuls (`LargeMatmul`), the floor of work done batched over T*B rows. Returns
    None."""

    def __init__(self, products: list[LargeMatmul]) -> None:
        self.products = products

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.products]

    def __call__(self, x: Optional[Tensor] = None) -> None:
        for matmul in self.products:
            matmul()


def _layer_inputs(args: Any) -> list[int]:
    return [args.input_size if layer == 0 else args.hidden for layer in range(args.layers)]


def _needs_input_grad(layer: int) -> bool:
    """Whether a step computes dLoss/d(input) of `layer`: the bench's x needs no gradient
    (for torch.nn and our methods alike), a layer above the first feeds the one below."""
    return layer > 0


def step_floor_flops(args: Any, seq_len: int) -> dict[str, float]:
    """Matmul FLOPs of each part of one training step (all layers), by `STEP_FLOOR_PARTS`:
    the input projection x W_ih^T ([T*B, In] x [In, G*H], batched), the recurrent forward
    (T steps of [B, H] x [H, G*H]), the recurrent backward (the same FLOPs, sequential for
    exact or in one batch for one Highway sweep), the weight gradients G^T x and G^T h
    ([G*H, T*B] x [T*B, In] and x [T*B, H]) and the input gradient G W_ih ([T*B, G*H] x
    [G*H, In], only for layers whose input needs it)."""
    G = 3 if args.cell == "gru" else 4
    H, rows = args.hidden, seq_len * args.batch
    recurrent = 2 * rows * G * H * H
    out = dict.fromkeys(STEP_FLOOR_PARTS, 0.0)
    for layer, in_size in enumerate(_layer_inputs(args)):
        projection = 2 * rows * G * H * in_size
        out["input_projection"] += projection
        out["recurrent_forward"] += recurrent
        out["recurrent_backward_sequential"] += recurrent
        out["recurrent_backward_batched"] += recurrent
        out["weight_grads"] += projection + recurrent  # dW_ih, dW_hh
        if _needs_input_grad(layer):
            out["input_grad"] += projection
    return out


def step_floor_parts(ref: nn.Module, args: Any, seq_len: int) -> dict[str, Callable]:
    """The matmuls a training step must do (`step_floor_flops`), each part a callable that
    runs them with the operands prepared outside it: the weights packed for oneDNN, the
    data operands (x, h, the gate adjoints G, G^T) contiguous. The per-step parts loop over
    time as the engines do (`SequentialMatmuls`), the batched ones are one matmul per
    weight and layer (`LargeMatmul`: oneDNN, or MKL into a preallocated output where that
    is faster). Values are random: matmul time does not depend on them."""
    T, B, H = seq_len, args.batch, args.hidden
    rows = T * B
    projection, backward_batched, weight_grads, input_grad = [], [], [], []
    w_hh_t = []
    for layer, in_size in enumerate(_layer_inputs(args)):
        w_ih = getattr(ref, f"weight_ih_l{layer}").detach()
        w_hh = getattr(ref, f"weight_hh_l{layer}").detach()
        gh = w_hh.shape[0]
        w_hh_t.append(w_hh.t().contiguous())  # [H, G*H]: adjoint [B, G*H] -> [B, H]
        projection.append(LargeMatmul(torch.randn(rows, in_size), w_ih, packed=True))
        backward_batched.append(LargeMatmul(torch.randn(rows, gh), w_hh_t[-1], packed=True))
        g_t = torch.randn(gh, rows)  # G^T [G*H, T*B] times x and h [T*B, In or H]: the
        for k in (in_size, H):  # "weight" operand is x^T / h^T [In or H, T*B] (data: unpacked)
            weight_grads.append(LargeMatmul(g_t, torch.randn(k, rows), packed=False))
        if _needs_input_grad(layer):
            input_grad.append(LargeMatmul(torch.randn(rows, gh), w_ih.t(), packed=True))
    return {
        "input_projection": BatchedMatmuls(projection),
        "recurrent_forward": MatmulFloor(ref, T, B),
        "recurrent_backward_sequential": SequentialMatmuls(w_hh_t, T, B),
        "recurrent_backward_batched": BatchedMatmuls(backward_batched),
        "weight_grads": BatchedMatmuls(weight_grads),
        "input_grad": BatchedMatmuls(input_grad),
    }


class ElementwiseFloor:
    """The forward's per-step elementwise ops alone, at the bench's shapes, without the
    matmul: what each step of GRUEngine.forward / LSTMEngine.forward does after its matmul,
    op for op (tests/bench/test_bench_rnn.py checks the per-step op counts against the
    engines'), in the same Python loop over T and layers. Where the engine adds oneDNN's
    fresh product in a separate op (GRU) or reads it fused into the gates' ops (LSTM), the
    product is a preallocated random tensor here. Returns None."""

    def __init__(self, ref: nn.Module, cell: str, seq_len: int, batch: int) -> None:
        from highwaybp.models.rnn.engine import packed_linear

        T, B, H = seq_len, batch, ref.hidden_size
        self.cell, self.H, self.layers = cell, H, ref.num_layers
        gh = (3 if cell == "gru" else 4) * H
        # the engines take the oneDNN path (a fresh product) iff packed_linear applies
        self.fresh = [packed_linear(getattr(ref, f"weight_hh_l{i}").detach(), B) is not None
                      for i in range(ref.num_layers)]  # fmt: skip
        self.gates = torch.randn(T, B, gh)  # GRU: [pre_r, pre_z, hn]; LSTM: A (gates)
        # oneDNN's fresh h W_hh^T (+ the x projection, LSTM), where the engine has one
        self.product = torch.randn(T, B, gh) if any(self.fresh) else None
        self.states = torch.randn(T + 1, B, H)  # h
        if cell == "gru":
            self.n = torch.randn(T, B, H)  # N
        else:
            self.cells = torch.randn(T + 1, B, H)  # c
            self.tanh_c = torch.randn(T, B, H)  # TC

    @property
    def ops_per_step(self) -> int:
        """Elementwise ops per step and layer: GRU 4 (sigmoid, addcmul, tanh, lerp) plus the
        add of oneDNN's fresh product where the engine takes that path; LSTM 7 (three gate
        activations, mul, addcmul, tanh, mul)."""
        if self.cell == "lstm":
            return 7
        return 4 + int(self.fresh[0])

    def __call__(self, x: Optional[Tensor] = None) -> None:
        for fresh in self.fresh:
            if self.cell == "gru":
                self._gru(fresh)
            else:
                self._lstm(fresh)

    def _gru(self, fresh: bool) -> None:
        H, h2 = self.H, 2 * self.H
        hs, rows_g, rows_n = self.states.unbind(0), self.gates.unbind(0), self.n.unbind(0)
        products = self.product.unbind(0) if fresh else ()
        for t in range(len(rows_g)):
            g, n, h = rows_g[t], rows_n[t], hs[t]
            if fresh:
                g.add_(products[t])
            g[:, :h2].sigmoid_()
            n.addcmul_(g[:, :H], g[:, h2:]).tanh_()
            torch.lerp(n, h, g[:, H:h2], out=hs[t + 1])

    def _lstm(self, fresh: bool) -> None:
        H, h2, h3 = self.H, 2 * self.H, 3 * self.H
        hs, cs, tcs = self.states.unbind(0), self.cells.unbind(0), self.tanh_c.unbind(0)
        rows = self.gates.unbind(0)
        products = self.product.unbind(0) if fresh else ()
        for t in range(len(rows)):
            a = rows[t]
            if fresh:
                pre = products[t]
                torch.sigmoid(pre[:, :h2], out=a[:, :h2])
                g = torch.tanh(pre[:, h2:h3], out=a[:, h2:h3])
                o = torch.sigmoid(pre[:, h3:], out=a[:, h3:])
            else:
                a[:, :h2].sigmoid_()
                g = a[:, h2:h3].tanh_()
                o = a[:, h3:].sigmoid_()
            c = cs[t + 1]
            torch.mul(a[:, H:h2], cs[t], out=c)
            c.addcmul_(a[:, :H], g)
            torch.tanh(c, out=tcs[t])
            torch.mul(o, tcs[t], out=hs[t + 1])


class DispatchFloor:
    """T in-place `add_` of a scalar on a [B, H] row: the cost of one elementwise op per
    step when the op does almost nothing (dispatch and setup). Returns None."""

    def __init__(self, seq_len: int, batch: int, hidden: int) -> None:
        self.rows = torch.zeros(seq_len, batch, hidden).unbind(0)

    def __call__(self, x: Optional[Tensor] = None) -> None:
        for row in self.rows:
            row.add_(1.0)


def measure(fn, params, x, gy, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        time_step(fn, params, x, gy)
    return _summary([time_step(fn, params, x, gy) for _ in range(repeats)])


def measure_round_robin(
    fns: dict, ref: nn.Module, inputs: dict, repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Time every method once per round, `repeats` rounds: a load change on a shared machine
    then hits all methods alike instead of whichever happened to run at the time."""
    params = {name: [] if _is_floor(name) else _params(fn, ref) for name, fn in fns.items()}
    for name, fn in fns.items():
        for _ in range(warmup):
            time_step(fn, params[name], *inputs[name])
    runs: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(time_step(fn, params[name], *inputs[name]))
    return {name: _summary(r) for name, r in runs.items()}


def _summary(runs: list[tuple[float, float]]) -> dict[str, float]:
    fwd = [r[0] for r in runs]
    bwd = [r[1] for r in runs]
    tot = [a + b for a, b in runs]
    return {
        "fwd_ms": 1e3 * statistics.median(fwd),
        "bwd_ms": 1e3 * statistics.median(bwd),
        "total_ms": 1e3 * statistics.median(tot),
        "total_runs_ms": [round(1e3 * t, 3) for t in tot],
    }


def large_matmul_gflops(
    shape: tuple[int, int, int] = (2048, 1024, 4096), repeats: int = 5
) -> dict[str, float]:
    """Throughput of a large fp32 matmul [n, k] x [k, m] on this machine, now (GFLOP/s), by
    the two CPU paths of `LargeMatmul`: "onednn" (oneDNN's linear with the weight packed,
    what the engines' large matmuls and torch.nn.LSTM use; None where oneDNN does not
    apply) and "torch_mm" (torch.mm, MKL's gemm, into a preallocated output; 40-50% of
    oneDNN's on the AMD calibration CPU)."""
    n, k, m = shape
    matmul = LargeMatmul(torch.randn(n, k), torch.randn(m, k), packed=True, trials=1)
    times: dict[str, list[float]] = {name: [] for name in matmul.paths}
    for _ in range(repeats):  # interleaved: a load change hits both alike
        for name, fn in matmul.paths.items():
            times[name].append(_once(fn))
    gflops = {name: matmul.flops / statistics.median(ts) / 1e9 for name, ts in times.items()}
    return {"onednn": gflops.get("onednn"), "torch_mm": gflops["torch.mm"]}


def backward_matmul_flops(args: Any, name: str, seq_len: int) -> float:
    """Matmul FLOPs of one backward (`step_floor_flops`' backward parts): recurrent
    input-VJPs (T sequential steps for exact methods, k batched sweeps for Highway /
    FixedPoint) plus the weight gradients and the input gradient where a layer needs it."""
    parts = step_floor_flops(args, seq_len)
    _, method = _parse_method(name)
    sweeps = 1 if method is None or method.exact else min(method.k, seq_len)
    return (sweeps * parts["recurrent_backward_sequential"] + parts["weight_grads"]
            + parts["input_grad"])


# ---- gradient fidelity --------------------------------------------------------------------


class CopyTask:
    """Delayed copy: read x_{t - lag} (projected) from h_t. Forces memory through the blocks."""

    def __init__(self, args: Any, seq_len: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(seq_len, args.batch, args.input_size, generator=gen)
        self.lag = min(args.lag, seq_len - 1)
        self.readout = nn.Linear(args.hidden, args.input_size)
        with torch.no_grad():
            self.readout.weight.copy_(
                torch.randn(args.input_size, args.hidden, generator=gen) / math.sqrt(args.hidden)
            )
            self.readout.bias.zero_()
        target = torch.zeros_like(self.x)
        target[self.lag :] = self.x[: seq_len - self.lag]
        self.target = target

    def loss(self, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(self.readout(y), self.target)


def train_exact(ref: nn.Module, task: CopyTask, steps: int, lr: float) -> list[float]:
    params = [*ref.parameters(), *task.readout.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss(ref(task.x)[0])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def fidelity(args: Any, ref: nn.Module, names: list[str], task: CopyTask) -> dict[str, dict]:
    """Cosine / relative error of each method's RNN parameter gradient vs torch autograd."""
    exact = torch.autograd.grad(task.loss(ref(task.x)[0]), list(ref.parameters()))
    out = {}
    for name in names:
        fn = build(args, name, ref)
        params = _params(fn, ref)
        grads = torch.autograd.grad(task.loss(fn(task.x)), params)
        out[name] = compare_gradients(list(grads), list(exact))
    return out


# ---- memory (fresh subprocess per method) ---------------------------------------------


def memory_probe(config: dict) -> dict:
    """Run in a child: peak RSS above the pre-step RSS over two steps of one method."""
    args = argparse.Namespace(**config)
    use_threads(args.threads, "highwaybp bench rnn")
    torch.manual_seed(0)
    ref = _reference(args)
    fn = build(args, args.probe_method, ref)
    params = _params(fn, ref)
    # One tiny step first: lazy library/thread initialisation is not the method's memory
    # (the tiny buffers are pooled under other shapes, so the real step still allocates its own).
    time_step(fn, params, torch.randn(2, 1, args.input_size), torch.randn(2, 1, args.hidden))
    x = torch.randn(args.probe_seq_len, args.batch, args.input_size)
    gy = torch.randn(args.probe_seq_len, args.batch, args.hidden)
    growth = step_peak_growth_bytes(lambda: [time_step(fn, params, x, gy) for _ in range(2)])
    return {"peak_mb": growth / 2**20}


def peak_memory_mb(args: Any, name: str, seq_len: int) -> Optional[float]:
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config.update(probe_method=name, probe_seq_len=seq_len)
    code = (
        "import json, sys; from highwaybp.bench.rnn import memory_probe; "
        "print(json.dumps(memory_probe(json.loads(sys.argv[1]))))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps(config)],
            capture_output=True,
            text=True,
            timeout=args.memory_timeout,
            check=True,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    except (subprocess.SubprocessError, ValueError, OSError, KeyError, IndexError) as err:
        print(f"  memory probe for {name} failed: {err}", file=sys.stderr)
        return None


# ---- profile of the engine (--profile) ------------------------------------------------

# Role of each aten op in GRUEngine.sweep (one Highway iteration): the README's "where the
# time goes" categories. View ops (unbind, slice, select, ...) cost little without the
# profiler but each is a recorded event under it; they are reported separately.
SWEEP_OP_ROLES: dict[str, str] = {
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "mkldnn::_linear_pointwise": "matmul",  # the f32 path (engine.onednn_applies)
    "aten::copy_": "matmul",  # oneDNN's fresh output copied into the state (+ one loss row)
    "aten::addcmul_": "scan rows",
    "aten::mul": "gate adjoints",
    "aten::sub": "step-norm difference",
    "aten::dot": "step-norm difference",
    "aten::stack": "step-norm difference",
    "aten::sum": "step-norm difference",
    "aten::sqrt": "step-norm difference",
    "aten::_local_scalar_dense": "step-norm difference",
    "aten::item": "step-norm difference",
    "aten::add_": "losses",
}
VIEW_OPS = ("aten::unbind", "aten::slice", "aten::select", "aten::reshape", "aten::unsqueeze",
            "aten::view", "aten::as_strided", "aten::resolve_conj", "aten::resolve_neg")


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def profile_engine(args: Any, seq_len: int) -> dict:
    """Where a GRU or LSTM Highway step's time goes, on the engine the model uses.

    Phase times (median of `--repeats`, no profiler): forward, prepare (gates ->
    coefficients), one sweep (= one fixed-k Highway iteration, no step norms), the same
    sweep with step norms (adaptive methods, recording), parameter gradients, and the
    sequential exact backward for comparison, and torch.nn's own forward and backward
    (its fused kernels, oneDNN for the LSTM) on the same weights and input. Then
    torch.profiler over `--repeats` sweeps:
    the inclusive CPU time of each top-level aten op, grouped by its role in the sweep
    (`SWEEP_OP_ROLES`), as a share of all top-level op time and of the non-view op time.
    """
    from torch.profiler import ProfilerActivity, profile

    from highwaybp.models.rnn import BufferPool, GRUEngine, LSTMEngine

    torch.manual_seed(args.seed)
    lstm = args.cell == "lstm"
    ref = (nn.LSTM if lstm else nn.GRU)(args.input_size, args.hidden)
    weights = [t.detach() for t in (ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0,
                                    ref.bias_hh_l0)]  # fmt: skip
    x = torch.randn(seq_len, args.batch, args.input_size)
    gy = torch.randn(seq_len, args.batch, args.hidden)
    h0 = torch.zeros(args.batch, args.hidden)
    pool = BufferPool()

    def engine() -> GRUEngine | LSTMEngine:
        if lstm:
            eng = LSTMEngine(pool, x, h0, torch.zeros_like(h0), *weights)
        else:
            eng = GRUEngine(pool, x, h0, *weights)
        eng.forward()
        eng.set_loss(gy)
        return eng

    x_ref = x.clone().requires_grad_(True)

    def torch_forward() -> Tensor:
        return ref(x_ref)[0]

    def torch_step() -> None:  # torch.nn's forward and backward, for the same shapes
        torch_forward().backward(gy)

    def forward() -> None:
        engine().release()

    def prepare_ms() -> float:
        times = []
        for _ in range(args.repeats):
            eng = engine()  # not timed: only prepare is
            t0 = time.perf_counter()
            eng.prepare()
            times.append(time.perf_counter() - t0)
            eng.release()
        return 1e3 * statistics.median(times)

    eng = engine()
    eng.prepare()
    w = eng.scan_(eng.init_loss_(eng.new_state()))
    nxt = eng.new_state()
    scratch = eng.new_state()

    def sweep() -> None:  # one fixed-k Highway iteration: no step norms (nothing reads them)
        eng.sweep(w, nxt, False, with_loss=True, scan=True, norms=False)

    def sweep_with_norms() -> None:  # as an adaptive method's (or a recording) iteration
        eng.sweep(w, nxt, False, with_loss=True, scan=True, norms=True)

    phases = {}
    for _ in range(args.warmup):
        forward(), sweep(), eng.param_grads(w, True), eng.exact_backward(scratch)
    phases["forward_ms"] = _median_ms(forward, args.repeats)
    phases["prepare_ms"] = prepare_ms()
    phases["sweep_ms"] = _median_ms(sweep, args.repeats)
    phases["sweep_with_norms_ms"] = _median_ms(sweep_with_norms, args.repeats)
    phases["param_grads_ms"] = _median_ms(lambda: eng.param_grads(w, True), args.repeats)
    phases["exact_backward_ms"] = _median_ms(lambda: eng.exact_backward(scratch), args.repeats)
    with torch.no_grad():
        phases["torch_forward_ms"] = _median_ms(torch_forward, args.repeats)
    phases["torch_forward_backward_ms"] = _median_ms(torch_step, args.repeats)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            sweep()
    by_op: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in prof.events():
        if event.cpu_parent is None:  # top level: its time includes its children's
            by_op[event.name] = by_op.get(event.name, 0.0) + event.cpu_time_total
            calls[event.name] = calls.get(event.name, 0) + 1
    total = sum(by_op.values())
    views = sum(t for name, t in by_op.items() if name in VIEW_OPS)
    roles: dict[str, float] = {}
    for name, t in by_op.items():
        role = "views" if name in VIEW_OPS else SWEEP_OP_ROLES.get(name, "other")
        roles[role] = roles.get(role, 0.0) + t
    eng.release()
    return {
        "cell": args.cell,
        "seq_len": seq_len,
        "batch": args.batch,
        "hidden": args.hidden,
        "input_size": args.input_size,
        "threads": torch.get_num_threads(),
        "chunk_steps": eng.chunk,
        "chunks": len(eng.chunks()),
        "phases": phases,
        "sweep_profile": {
            "repeats": args.repeats,
            "share_of_op_time": {r: t / total for r, t in sorted(roles.items())},
            "share_of_non_view_op_time": {
                r: t / (total - views) for r, t in sorted(roles.items()) if r != "views"
            },
            "op_time_ms": {n: t / 1e3 for n, t in sorted(by_op.items())},
            "op_calls": dict(sorted(calls.items())),
            "roles": SWEEP_OP_ROLES,
        },
    }


def print_profile(prof: dict) -> None:
    ph = prof["phases"]
    print(f"GRU engine T={prof['seq_len']} B={prof['batch']} H={prof['hidden']} "
          f"threads={prof['threads']} ({prof['chunks']} chunks of {prof['chunk_steps']} steps)")
    for key in ("forward_ms", "prepare_ms", "sweep_ms", "sweep_with_norms_ms", "param_grads_ms",
                "exact_backward_ms"):
        print(f"  {key[:-3]:16s} {ph[key]:9.2f} ms")
    print("  one sweep (Highway iteration), share of the non-view op time:")
    for role, share in prof["sweep_profile"]["share_of_non_view_op_time"].items():
        print(f"    {role:22s} {100 * share:5.1f}%")
    views = prof["sweep_profile"]["share_of_op_time"].get("views", 0.0)
    print(f"    (view ops: {100 * views:.1f}% of all op time under the profiler)")


# ---- the run --------------------------------------------------------------------------


def _reference(args: Any) -> nn.Module:
    cls = nn.GRU if args.cell == "gru" else nn.LSTM
    return cls(args.input_size, args.hidden, num_layers=args.layers)


def method_names(ks: list[int]) -> list[str]:
    names = ["torch", "autograd-loop", "hbp-exact"]
    names += [f"highway(k={k})" for k in ks]
    names += [f"fixedpoint(k={k})" for k in ks]
    return names


def run_length(args: Any, seq_len: int, peak: float) -> tuple[list[dict], dict]:
    torch.manual_seed(args.seed)
    ref = _reference(args)
    names = method_names(args.k)
    x = torch.randn(seq_len, args.batch, args.input_size)
    gy = torch.randn(seq_len, args.batch, args.hidden)
    records = []
    fns = {name: build(args, name, ref) for name in names}
    parts = step_floor_parts(ref, args, seq_len)
    fns[FLOOR] = parts.pop("recurrent_forward")  # the forward's matmul floor (MatmulFloor)
    fns.update({f"floor:{part}": fn for part, fn in parts.items() if _has_work(fn)})
    fns[ELEMENTWISE_FLOOR] = ElementwiseFloor(ref, args.cell, seq_len, args.batch)
    fns[DISPATCH_FLOOR] = DispatchFloor(seq_len, args.batch, args.hidden)
    inputs = {name: (x, gy) for name in fns}
    big = seq_len * args.scaling_factor
    if args.scaling_factor > 1:  # the baseline at factor x T, timed in the same rounds
        fns["autograd-loop@big"] = build(args, "autograd-loop", ref)
        inputs["autograd-loop@big"] = (
            torch.randn(big, args.batch, args.input_size),
            torch.randn(big, args.batch, args.hidden),
        )
    timings = measure_round_robin(fns, ref, inputs, args.repeats, args.warmup)
    floor_ms = timings[FLOOR]["fwd_ms"]
    print(f"  T={seq_len} {'floor (matmuls)':16s} fwd {floor_ms:9.1f} ms: the recurrent "
          "matmuls alone, same rounds", flush=True)
    step_floor = _step_floor(args, seq_len, timings, fns)
    for name in names:
        timing = timings[name]
        flops = backward_matmul_flops(args, name, seq_len)
        gflops = flops / (timing["bwd_ms"] / 1e3) / 1e9
        record = {
            "cell": args.cell,
            "seq_len": seq_len,
            "batch": args.batch,
            "hidden": args.hidden,
            "input_size": args.input_size,
            "layers": args.layers,
            "method": name,
            **timing,
            "bwd_matmul_gflop": flops / 1e9,
            "bwd_matmul_gflops": gflops,
            "bwd_matmul_fraction_of_peak": gflops / peak,  # of oneDNN's large matmul if any
            "floor_fwd_ms": floor_ms,
            "fwd_over_floor": timing["fwd_ms"] / floor_ms,
        }
        records.append(record)
        print(
            f"  T={seq_len} {name:16s} fwd {timing['fwd_ms']:9.1f} bwd {timing['bwd_ms']:9.1f} "
            f"total {timing['total_ms']:9.1f} ms (fwd {record['fwd_over_floor']:.2f}x floor)",
            flush=True,
        )
    extra: dict[str, Any] = {
        "floor": {"fwd_ms": floor_ms, "runs_ms": timings[FLOOR]["total_runs_ms"]}
    }
    torch_timing = next(r for r in records if r["method"] == "torch")
    exact_fwd_ms = next(r for r in records if r["method"] == "hbp-exact")["fwd_ms"]
    extra["step_floor"] = _step_floor_summary(step_floor, torch_timing, args.k, seq_len)
    extra["forward_floor"] = _forward_floor(seq_len, timings, fns[ELEMENTWISE_FLOOR],
                                            step_floor["input_projection"]["ms"], exact_fwd_ms)
    _print_floors(seq_len, extra["step_floor"], extra["forward_floor"])
    if args.scaling_factor > 1:
        t_big = timings["autograd-loop@big"]
        base = next(r for r in records if r["method"] == "autograd-loop")
        extra["autograd_loop_scaling"] = {
            "T": seq_len,
            "T_big": big,
            "total_ms_T": base["total_ms"],
            "total_ms_T_big": t_big["total_ms"],
            "bwd_ms_T": base["bwd_ms"],
            "bwd_ms_T_big": t_big["bwd_ms"],
            "ratio": t_big["total_ms"] / base["total_ms"],
            "linear_ratio": float(args.scaling_factor),
        }
        print(
            f"  autograd-loop at T={seq_len}: {base['total_ms']:.1f} ms, at T={big}: "
            f"{t_big['total_ms']:.1f} ms (ratio {extra['autograd_loop_scaling']['ratio']:.2f},"
            f" linear would be {args.scaling_factor}; same rounds)",
            flush=True,
        )
    _add_ratios(records)
    extra["fidelity_curve"] = _add_fidelity(args, ref, names, records, seq_len)
    if args.memory:
        for r in records:
            r["peak_mem_mb"] = peak_memory_mb(args, r["method"], seq_len)
        torch_mb = next(r for r in records if r["method"] == "torch")["peak_mem_mb"]
        for r in records:
            mine = r["peak_mem_mb"]
            r["peak_mem_vs_torch"] = None if mine is None or not torch_mb else mine / torch_mb
    return records, extra


def _has_work(fn: Callable) -> bool:
    return not isinstance(fn, BatchedMatmuls) or bool(fn.products)


def _step_floor(args: Any, seq_len: int, timings: dict, fns: dict) -> dict[str, dict]:
    """Per part of `STEP_FLOOR_PARTS`: its median time (ms, 0 for a part with no work),
    FLOPs, achieved GFLOP/s (from this run's rounds) and, for the batched parts, the path
    of each matmul (`LargeMatmul.path`)."""
    flops = step_floor_flops(args, seq_len)
    out = {}
    for part in STEP_FLOOR_PARTS:
        name = FLOOR if part == "recurrent_forward" else f"floor:{part}"
        ms = timings[name]["fwd_ms"] if name in timings else 0.0
        out[part] = {
            "ms": ms,
            "gflop": flops[part] / 1e9,
            "gflops": flops[part] / (ms / 1e3) / 1e9 if ms > 0 else None,
        }
        if isinstance(fns.get(name), BatchedMatmuls):
            out[part]["paths"] = fns[name].paths
    return out


def _step_floor_summary(
    parts: dict[str, dict[str, float]], torch: dict[str, float], ks: list[int], seq_len: int
) -> dict[str, Any]:
    """The matmul floor of a whole training step, exact and Highway(k), against torch.nn.

    exact = input projection + recurrent forward + sequential recurrent backward + weight
    gradients + input gradient; Highway(k) = the same with min(k, T) batched recurrent
    backwards (one per sweep: k = 0 runs none, `loop.fast_iterate`) in place of the
    sequential one. torch.nn's step over a floor is the best speedup over torch.nn that a
    method doing these matmuls at this run's matmul speed, and nothing else, could reach.
    torch.nn's forward and backward are also compared with the floor's forward part
    (projection + recurrent forward) and exact backward part (the rest): a ratio below 1
    means its fused kernel runs those FLOPs faster than separate matmul calls do.
    """
    ms = {part: p["ms"] for part, p in parts.items()}
    forward = ms["input_projection"] + ms["recurrent_forward"]
    params = ms["weight_grads"] + ms["input_grad"]
    exact = forward + ms["recurrent_backward_sequential"] + params
    highway = {str(k): forward + min(k, seq_len) * ms["recurrent_backward_batched"] + params
               for k in ks}  # fmt: skip
    torch_ms = torch["total_ms"]
    return {
        "parts": parts,
        "exact_step_floor_ms": exact,
        "highway_step_floor_ms": highway,
        "torch_total_ms": torch_ms,
        "torch_over_exact_step_floor": torch_ms / exact,
        "torch_over_highway_step_floor": {k: torch_ms / v for k, v in highway.items()},
        "torch_fwd_over_forward_floor": torch["fwd_ms"] / forward,
        "torch_bwd_over_exact_backward_floor": torch["bwd_ms"] / (exact - forward),
    }


def _forward_floor(
    seq_len: int, timings: dict, elementwise: ElementwiseFloor, projection_ms: float,
    forward_ms: float,
) -> dict:
    """Our exact forward against its floor: the recurrent matmuls alone plus the per-step
    elementwise ops alone (`ElementwiseFloor`: the loop's floor), plus the input projection
    (the step floor's part: the whole forward's floor), all from this run's rounds, and the
    cost of one do-nothing elementwise op (`DispatchFloor`)."""
    matmul_ms = timings[FLOOR]["fwd_ms"]
    elementwise_ms = timings[ELEMENTWISE_FLOOR]["fwd_ms"]
    dispatch_ms = timings[DISPATCH_FLOOR]["fwd_ms"]
    ops = elementwise.ops_per_step
    both = matmul_ms + elementwise_ms
    return {
        "matmul_floor_ms": matmul_ms,
        "elementwise_floor_ms": elementwise_ms,
        "matmul_plus_elementwise_floor_ms": both,
        "input_projection_ms": projection_ms,
        "forward_floor_ms": both + projection_ms,
        "hbp_forward_ms": forward_ms,
        "hbp_forward_over_matmul_plus_elementwise": forward_ms / both,
        # what our forward loses beyond every floor (Python, views, allocations, copies)
        "hbp_forward_over_forward_floor": forward_ms / (both + projection_ms),
        # the smallest forward / matmul floor an eager loop of these ops can reach
        "matmul_plus_elementwise_over_matmul_floor": both / matmul_ms,
        "elementwise_ops_per_step": ops,
        "dispatch_us_per_op": 1e3 * dispatch_ms / seq_len,
        "elementwise_us_per_op": 1e3 * elementwise_ms / (seq_len * elementwise.layers * ops),
    }


def _print_floors(seq_len: int, step: dict, fwd: dict) -> None:
    parts = ", ".join(f"{part} {p['ms']:.1f}" for part, p in step["parts"].items())
    highway = ", ".join(f"k={k} {v:.1f}" for k, v in step["highway_step_floor_ms"].items())
    print(f"  T={seq_len} step matmul floor (ms): {parts}; exact {step['exact_step_floor_ms']:.1f}"
          f", highway {highway}; torch.nn step / exact floor "
          f"{step['torch_over_exact_step_floor']:.2f}x", flush=True)
    print(f"  T={seq_len} forward floor: matmuls {fwd['matmul_floor_ms']:.1f} + elementwise "
          f"{fwd['elementwise_floor_ms']:.1f} ms ({fwd['elementwise_ops_per_step']} ops/step, "
          f"{fwd['elementwise_us_per_op']:.1f} us/op; a do-nothing op "
          f"{fwd['dispatch_us_per_op']:.1f} us); hbp forward "
          f"{fwd['hbp_forward_over_matmul_plus_elementwise']:.2f}x their sum, "
          f"{fwd['hbp_forward_over_forward_floor']:.2f}x with the input projection "
          f"({fwd['input_projection_ms']:.1f} ms)", flush=True)


def _add_ratios(records: list[dict]) -> None:
    fastest = min(
        (r for r in records if r["method"] in EXACT_BASELINES), key=lambda r: r["total_ms"]
    )
    hbp_exact = next(r for r in records if r["method"] == "hbp-exact")
    for r in records:
        r["fastest_exact_baseline"] = fastest["method"]
        r["speedup_vs_fastest_exact"] = fastest["total_ms"] / r["total_ms"]
        r["speedup_vs_hbp_exact"] = hbp_exact["total_ms"] / r["total_ms"]


def _add_fidelity(
    args: Any, ref: nn.Module, names: list[str], records: list[dict], seq_len: int
) -> dict:
    """Fidelity of every timed method (into its record) and of the --fidelity-k curve
    (Highway and FixedPoint at more k, returned), at init and after exact training."""
    task = CopyTask(args, seq_len, args.seed + 1)
    curve_names = [f"{kind}(k={k})" for kind in ("highway", "fixedpoint") for k in args.fidelity_k]
    all_names = names + [n for n in curve_names if n not in names]
    at_init = fidelity(args, ref, all_names, task)
    trained: dict[str, dict] = {}
    state = "init"
    if args.train_steps > 0:
        losses = train_exact(ref, task, args.train_steps, args.lr)
        trained = fidelity(args, ref, all_names, task)
        state = (
            f"after {args.train_steps} exact Adam steps (lr {args.lr}) on a delayed-copy task "
            f"(lag {task.lag}); loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        )
    for r in records:
        r["fidelity_init"] = {"state": "init", **at_init[r["method"]]}
        if trained:
            r["fidelity_trained"] = {"state": state, **trained[r["method"]]}
    return {
        "trained_state": state if trained else None,
        "points": [
            {"method": n, "init": at_init[n], "trained": trained.get(n)} for n in curve_names
        ],
    }


def headline_ratios(
    records: list[dict], step_floors: Optional[dict] = None, forward_floors: Optional[dict] = None
) -> dict[str, dict[str, float]]:
    """Per T, the issue's goal ratios within this run (total step times; > 1: faster), and
    the floors that bound them: our forward over its matmul + elementwise floor, torch.nn's
    step over the exact and Highway(k) step matmul floors (the best speedup over torch.nn
    any method doing those matmuls could reach)."""
    out: dict[str, dict[str, float]] = {}
    for seq_len in dict.fromkeys(r["seq_len"] for r in records):
        by = {r["method"]: r for r in records if r["seq_len"] == seq_len}
        exact, ratios = by["hbp-exact"], {}
        for name in ("highway(k=0)", "highway(k=1)"):
            if name in by:
                ratios[f"{name} vs hbp-exact"] = exact["total_ms"] / by[name]["total_ms"]
        for name in ("hbp-exact", "highway(k=1)"):
            if name in by:
                ratios[f"{name} vs torch"] = by["torch"]["total_ms"] / by[name]["total_ms"]
        ratios["hbp forward / matmul floor"] = exact["fwd_over_floor"]
        fwd = (forward_floors or {}).get(str(seq_len))
        if fwd:
            ratios["hbp forward / (matmul + elementwise floor)"] = fwd[
                "hbp_forward_over_matmul_plus_elementwise"]
            ratios["(matmul + elementwise floor) / matmul floor"] = fwd[
                "matmul_plus_elementwise_over_matmul_floor"]
            ratios["hbp forward / (projection + matmul + elementwise floor)"] = fwd[
                "hbp_forward_over_forward_floor"]
        step = (step_floors or {}).get(str(seq_len))
        if step:
            ratios["torch step / exact step floor"] = step["torch_over_exact_step_floor"]
            for k, v in step["torch_over_highway_step_floor"].items():
                ratios[f"torch step / highway(k={k}) step floor"] = v
        if exact.get("peak_mem_vs_torch") is not None:
            ratios["hbp-exact peak memory / torch"] = exact["peak_mem_vs_torch"]
        out[str(seq_len)] = ratios
    return out


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(records: list[dict]) -> None:
    head = (
        f"{'T':>6} {'method':16s} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} "
        f"{'x fastest':>9} {'x hbpEx':>8} {'fwd/flr':>7} {'mem MB':>8} {'x torch':>7} "
        f"{'mm frac':>7} "
        f"{'cos init':>9} {'rel init':>9} {'cos trn':>9} {'rel trn':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in records:
        ft = r.get("fidelity_trained", {})
        print(
            f"{r['seq_len']:>6} {r['method']:16s} {r['fwd_ms']:9.1f} {r['bwd_ms']:9.1f} "
            f"{r['total_ms']:9.1f} {r['speedup_vs_fastest_exact']:9.2f} "
            f"{r['speedup_vs_hbp_exact']:8.2f} {r['fwd_over_floor']:7.2f} "
            f"{_fmt(r.get('peak_mem_mb'), '8.0f')} {_fmt(r.get('peak_mem_vs_torch'), '7.2f')} "
            f"{r['bwd_matmul_fraction_of_peak']:7.2f} "
            f"{r['fidelity_init']['cosine']:9.6f} {r['fidelity_init']['rel_error']:9.2e} "
            f"{_fmt(ft.get('cosine'), '9.6f')} {_fmt(ft.get('rel_error'), '9.2e')}"
        )


def print_curves(curves: dict) -> None:
    for seq_len, curve in curves.items():
        if not curve["points"]:
            continue
        print(f"\ngradient error vs k at T={seq_len} (rel. error of the RNN parameter gradient)")
        if curve["trained_state"]:
            print(f"  trained = {curve['trained_state']}")
        for p in curve["points"]:
            trained = p["trained"]["rel_error"] if p["trained"] else None
            print(
                f"  {p['method']:16s} init {p['init']['rel_error']:9.2e}  trained "
                f"{_fmt(trained, '9.2e')}"
            )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rnn",
        help="GRU/LSTM training step: torch.nn, autograd loop, exact, Highway(k), FixedPoint(k)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    p.add_argument(
        "--seq-len",
        type=positive_int_list,
        default=[1024],
        help="sequence length, or a comma-separated sweep (e.g. 256,1024,4096)",
    )
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--hidden", type=positive_int, default=64)
    p.add_argument("--input-size", type=positive_int, default=None, help="default: hidden")
    p.add_argument("--layers", type=positive_int, default=1)
    p.add_argument(
        "--k", type=nonneg_int_list, default=[0, 1, 3], help="comma-separated k values"
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs (median), >= 5")
    p.add_argument("--warmup", type=nonneg_int, default=1)
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    p.add_argument(
        "--train-steps",
        type=nonneg_int,
        default=50,
        help="exact training steps before the 'trained' fidelity (0: skip)",
    )
    p.add_argument(
        "--fidelity-k",
        type=nonneg_int_list,
        default=[0, 1, 2, 3, 5, 10, 20],
        help="k values of the error-vs-k curve (Highway and FixedPoint, not timed)",
    )
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--lag", type=positive_int, default=10, help="delay of the copy task")
    p.add_argument(
        "--scaling-factor",
        type=positive_int,
        default=4,
        help="also time the autograd loop at this multiple of T (1: skip)",
    )
    p.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the per-method peak-memory subprocesses",
    )
    p.add_argument("--memory-timeout", type=positive_float, default=1800.0)
    p.add_argument(
        "--peak-matmul",
        type=positive_int_list,
        default=[2048, 1024, 4096],
        help="n,k,m of the reference matmul for the throughput fraction",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the method comparison: time the GRU engine's phases (forward, "
        "prepare, one sweep, parameter gradients, exact backward) and profile one sweep's "
        "op mix (torch.profiler); use --threads 1 on a shared machine",
    )
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="instead of timing: count the aten ops one training step dispatches, per "
        "forward and backward, method and path (torch.nn, hbp-exact, Highway(k) for --k), "
        "with their shapes (highwaybp.bench.opcount); deterministic",
    )
    p.add_argument(
        "--paths",
        action="store_true",
        help="instead of the method comparison: time torch.nn, hbp-exact and Highway(k) "
        "for --k on every path of the module (forward= x scan=), interleaved, each against "
        "the default path (highwaybp.bench.rnn_paths)",
    )
    p.add_argument(
        "--no-op-shapes",
        dest="op_shapes",
        action="store_false",
        help="with --count-ops: counts only, without each op's shapes (the launch model "
        "needs them; a T sweep does not)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", type=out_file, default="results/rnn/bench_rnn.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.repeats < 5:
        print(
            "error: --repeats must be >= 5 (medians of fewer runs are too noisy here)",
            file=sys.stderr,
        )
        return 2
    if args.input_size is None:
        args.input_size = args.hidden
    modes = [f"--{m.replace('_', '-')}" for m in ("profile", "count_ops", "paths")
             if getattr(args, m)]
    if len(modes) > 1:
        print(f"error: {' and '.join(modes)} each replace the method comparison: give one",
              file=sys.stderr)
        return 2
    use_threads(args.threads, "highwaybp bench rnn")
    load_before = os.getloadavg()
    if args.profile:
        return run_profile(args, load_before)
    if args.count_ops:
        from highwaybp.bench.opcount import run_count_ops

        return run_count_ops(args, _run_meta(args, load_before))
    if args.paths:
        from highwaybp.bench.rnn_paths import run_paths

        return run_paths(args, _run_meta(args, load_before))
    large = large_matmul_gflops(tuple(args.peak_matmul))
    peak = large["onednn"] or large["torch_mm"]  # the faster path where oneDNN applies
    print(
        f"bench rnn: cell={args.cell} B={args.batch} H={args.hidden} In={args.input_size} "
        f"layers={args.layers} k={args.k} threads={args.threads}; large matmul "
        f"{_fmt(large['onednn'], '.1f')} GFLOP/s (oneDNN), {large['torch_mm']:.1f} "
        f"(torch.mm); load average {load_before[0]:.2f}",
        flush=True,
    )
    records, scaling, curves, floors, step_floors, forward_floors = [], {}, {}, {}, {}, {}
    for seq_len in args.seq_len:
        recs, extra = run_length(args, seq_len, peak)
        records += recs
        scaling[str(seq_len)] = extra.get("autograd_loop_scaling")
        curves[str(seq_len)] = extra["fidelity_curve"]
        floors[str(seq_len)] = extra["floor"]
        step_floors[str(seq_len)] = extra["step_floor"]
        forward_floors[str(seq_len)] = extra["forward_floor"]
    print()
    print_table(records)
    print_curves(curves)
    ratios = headline_ratios(records, step_floors, forward_floors)
    for seq_len, rs in ratios.items():
        print(f"\nratios at T={seq_len} (same run): " + ", ".join(
            f"{name} {value:.2f}x" for name, value in rs.items()))
    meta = {
        **_run_meta(args, load_before),
        "large_matmul": {"shape": list(args.peak_matmul), "onednn_gflops": large["onednn"],
                         "torch_mm_gflops": large["torch_mm"]},
        "matmul_floor": floors,
        "step_floor": step_floors,
        "forward_floor": forward_floors,
        "ratios": ratios,
        "autograd_loop_scaling": scaling,
        "fidelity_curve": curves,
        "notes": "medians of --repeats runs after --warmup; a step is forward + backward of a "
        "per-step loss; the machine may be shared (see load averages)",
    }
    from highwaybp.train.io import atomic_write_json

    atomic_write_json(args.out, {"meta": meta, "records": records})
    print(f"\nwrote {args.out}")
    return 0


def _run_meta(args: argparse.Namespace, load_before: tuple[float, float, float]) -> dict:
    """What every `bench rnn` JSON records of its run: command, versions, threads, load."""
    return {
        "command": "highwaybp bench rnn " + " ".join(sys.argv[3:]) if len(sys.argv) > 2 else "",
        "argv": sys.argv,
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def run_profile(args: argparse.Namespace, load_before: tuple[float, float, float]) -> int:
    profiles = []
    for seq_len in args.seq_len:
        profiles.append(profile_engine(args, seq_len))
        print_profile(profiles[-1])
    meta = {
        **_run_meta(args, load_before),
        "notes": "phase times: medians of --repeats runs after --warmup, no profiler; op "
        "shares: torch.profiler over --repeats sweeps (top-level aten ops, inclusive CPU "
        "time). Shares are noisy on a loaded machine (see load averages); run with "
        "--threads 1 there.",
    }
    from highwaybp.train.io import atomic_write_json

    atomic_write_json(args.out, {"meta": meta, "profiles": profiles})
    print(f"\nwrote {args.out}")
    return 0
