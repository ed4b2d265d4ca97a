"""A launch-aware single-device model of an RNN training step, from its counted ops.

A step's time is the sum over the ops it dispatches (`highwaybp.bench.opcount`, with
shapes) of

    max(latency of the op's kind, FLOPs / matmul rate, bytes / bandwidth)

- latency: `Device.launch_s` for an op that computes (one kernel launch on a GPU, the
  dispatch floor of a do-nothing op on a CPU), `view_s` for a view (no kernel: host
  dispatch only), `sync_s` for a device-to-host read;
- FLOPs: matmuls only (2 * numel(out) * K); the rate is `Device.matmul` for the op's
  library ("onednn" for mkldnn:: ops, "blas" otherwise) at the op's FLOPs (a curve: small
  products run below a large one's rate on a CPU);
- bytes: every tensor operand read or written once (`OpSignature.bytes`), at
  `Device.bandwidth` for that many bytes (a curve; on a CPU measured with the operands
  read cold, as a training step's are: `_cold_mul_seconds`).

A product's rate is not a function of its FLOPs alone on a CPU: MKL's gemm runs the same
shapes up to 30x apart with another operand layout, and far below its large-matmul rate
on a skinny one (torch.nn.GRU's CPU backward: the input weights' gradient [192, 131072] x
[131072, 3], a transposed view, results/rnn/launchmodel_miss/). So the trace records a
product's operand strides, and a device may carry `Device.products`: the measured time of
each product signature (shapes and strides) its traces hold (`measure_products`, run by
`calibrate_cpu` on the BLAS products of the validated traces that move more than the
last-level cache); a product it does not hold (one within the cache; oneDNN's, whose
packed weights have no stride to replay; every product on the H100, where nothing is
measured) is priced by the rate curve.

A call of torch's fused RNN function (one op in the counted trace) is priced by a stated
model, `fused_rnn_seconds`, where the device runs it as one kernel (`Device.fused_native`:
cuDNN for every cell on a GPU, oneDNN's LSTM on this CPU); otherwise by what it dispatched
underneath (`fused_inner`: torch.nn.GRU's CPU loop). The fused kernel: per layer, the input
projection as one batched matmul, then T dependent steps, each at least one kernel's
latency (`Device.fused_step_s`) and its matmul time; its backward the same T steps plus
the batched weight and input gradients.

`highwaybp bench launch-model` validates the model on this CPU against the committed
`bench rnn` step times (each configuration's error) and predicts, marked as predictions,
the paper's Table 6 settings on one H100 (`H100`, figures and sources in `H100.sources`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from highwaybp.bench.opcount import FUSED_BACKWARD_OPS, OpSignature, OpTrace


@dataclass(frozen=True)
class Curve:
    """y(x) through measured points, log-log interpolated, flat beyond the ends."""

    points: tuple[tuple[float, float], ...]

    def __call__(self, x: float) -> float:
        pts = sorted(self.points)
        if x <= pts[0][0]:
            return pts[0][1]
        if x >= pts[-1][0]:
            return pts[-1][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= x <= x1:
                f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
                return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
        raise AssertionError("unreachable")

    @classmethod
    def constant(cls, y: float) -> Curve:
        return cls(((1.0, y),))


@dataclass(frozen=True)
class Device:
    """The figures the model prices ops with (seconds, FLOP/s, bytes/s)."""

    name: str
    launch_s: float
    view_s: float
    sync_s: float
    matmul: dict[str, Curve]  # library ("onednn", "blas") -> FLOP/s against FLOPs
    bandwidth: Curve  # bytes/s against bytes moved
    fused_step_s: float  # a fused RNN kernel's least time per time step
    fused_native: tuple[str, ...]  # torch._VF functions this device runs as one kernel
    sources: dict[str, str] = field(default_factory=dict)
    products: dict[str, float] = field(default_factory=dict)  # product_key -> seconds

    def matmul_rate(self, library: str, flops: float) -> float:
        return self.matmul.get(library, self.matmul["blas"])(flops)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["matmul"] = {k: [list(p) for p in c.points] for k, c in self.matmul.items()}
        d["bandwidth"] = [list(p) for p in self.bandwidth.points]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Device:
        return cls(d["name"], d["launch_s"], d["view_s"], d["sync_s"],
                   {k: Curve(tuple(tuple(p) for p in v)) for k, v in d["matmul"].items()},
                   Curve(tuple(tuple(p) for p in d["bandwidth"])), d["fused_step_s"],
                   tuple(d["fused_native"]), d.get("sources", {}), d.get("products", {}))

    def without_products(self) -> Device:
        """This device pricing every product by its rate curve (what the model did before
        it measured products: the validation reports both)."""
        return Device(**{**self.__dict__, "products": {}})


# One H100 SXM (80 GB HBM3). Figures are the vendor's and common measurements, not ours:
# no GPU has been lent to this project.
H100 = Device(
    name="NVIDIA H100 SXM (assumed figures)",
    launch_s=5e-6,
    view_s=2e-6,
    sync_s=10e-6,
    matmul={"blas": Curve.constant(67e12), "onednn": Curve.constant(67e12)},
    bandwidth=Curve.constant(3.35e12),
    fused_step_s=5e-6,
    fused_native=("gru", "lstm", "rnn_tanh", "rnn_relu"),
    sources={
        "launch_s": "~5 us per eager op (kernel launch plus PyTorch's host dispatch); the "
                    "issue's figure, typical of eager PyTorch on recent GPUs",
        "view_s": "~2 us: a view's host dispatch, no kernel (assumed)",
        "sync_s": "~10 us: a device-to-host copy and stream sync (assumed)",
        "matmul": "67 TFLOP/s: H100 SXM fp32 non-tensor-core peak (NVIDIA datasheet); "
                  "torch's fp32 default (no TF32). bf16 dense tensor cores: 989 TFLOP/s, "
                  "not used by these fp32 models",
        "bandwidth": "3.35 TB/s: H100 SXM HBM3 (NVIDIA datasheet)",
        "fused_step_s": "one kernel latency (5 us) per dependent time step of cuDNN's RNN, "
                        "the issue's stated model",
    },
)


def op_seconds(op: OpSignature, device: Device) -> float:
    """One call of `op` on `device` (fused RNN ops excluded: `trace_seconds` prices them)."""
    if op.kind == "view":
        return device.view_s
    if op.kind == "sync":
        return device.sync_s
    t = device.launch_s
    if op.kind == "matmul" and device.products:
        measured = device.products.get(product_key(op))
        if measured is not None:
            return max(t, measured)
    moved = op.bytes
    if moved:
        t = max(t, moved / device.bandwidth(moved))
    if op.kind == "matmul":
        flops = op.flops
        if flops:
            library = "onednn" if op.name.startswith("mkldnn::") else "blas"
            t = max(t, flops / device.matmul_rate(library, flops))
    return t


def fused_rnn_seconds(meta: dict[str, Any], device: Device, backward: bool) -> float:
    """The stated model of torch's fused RNN kernel over all its layers.

    Per layer (In = input size for the first layer, H above): the input projection
    [T*B, In] x [In, G*H] as one batched matmul, then T dependent steps, each
    max(`fused_step_s`, its [B, H] x [H, G*H] matmul's time). The backward: the same T
    steps (the adjoint's recurrent matmul) plus the weight gradients ([G*H, T*B] x
    [T*B, In + H], batched) and the input gradient ([T*B, G*H] x [G*H, In], batched).
    Elementwise gate math is assumed fused into the steps (it is, in cuDNN and oneDNN).
    """
    T, B, H, G = meta["seq_len"], meta["batch"], meta["hidden"], meta["gates"]
    size = meta.get("itemsize", 4)

    def batched(flops: float, elements: float) -> float:
        moved = size * elements
        return max(device.launch_s, flops / device.matmul_rate("onednn", flops),
                   moved / device.bandwidth(moved))

    step_flops = 2.0 * B * H * G * H
    step = max(device.fused_step_s, step_flops / device.matmul_rate("onednn", step_flops))
    total = 0.0
    for layer in range(meta["layers"]):
        n_in = meta["input_size"] if layer == 0 else H
        rows = T * B
        if not backward:
            total += batched(2.0 * rows * n_in * G * H, rows * (n_in + G * H)) + T * step
        else:
            total += T * step
            total += batched(2.0 * rows * (n_in + H) * G * H, rows * (n_in + H + G * H))
            total += batched(2.0 * rows * G * H * n_in, rows * (n_in + G * H))
    return total


def trace_seconds(trace: OpTrace, device: Device, fused_calls: list[dict[str, Any]],
                  inner: Optional[OpTrace], backward: bool,
                  autograd_backward: bool = True) -> dict[str, float]:
    """Seconds of one phase by op kind (and "total"). The fused RNN calls of the forward
    (`fused_calls`, in order) are priced by `fused_rnn_seconds` where the device runs
    that function as one kernel, else by `inner` (what they dispatched here); in the
    backward, the fused backward ops (`FUSED_BACKWARD_OPS`) share the fused backward
    model of the forward's calls. `autograd_backward`: the backward is torch's autograd
    through the fused forward (torch.nn, our Exact on the fused path), which a device
    that fuses the cell runs as its fused backward; False for our engines' own backward
    after a fused forward (Highway/FixedPoint: gates recomputed, then the sweeps), priced
    by the ops it dispatched."""
    out: dict[str, float] = {}
    native = [m for m in fused_calls if m["function"] in device.fused_native]
    for op, calls in trace.ops.items():
        if op.kind == "fused_rnn":
            continue
        out[op.kind] = out.get(op.kind, 0.0) + calls * op_seconds(op, device)
    fused = 0.0
    if not backward:
        fused = sum(fused_rnn_seconds(m, device, False) for m in native)
        if len(native) < len(fused_calls) and inner is not None:
            fused += trace_seconds(inner, device, [], None, False)["total"]
    elif any(op.name in FUSED_BACKWARD_OPS for op in trace.ops):
        fused = sum(fused_rnn_seconds(m, device, True) for m in native)
    elif native and autograd_backward:
        # the device would run a fused backward, but this trace shows the decomposed one
        # (torch.nn.GRU on this CPU): price the fused model instead of the counted ops
        fused = sum(fused_rnn_seconds(m, device, True) for m in native)
        return {"fused_rnn": fused, "total": fused}
    if fused:
        out["fused_rnn"] = fused
    out["total"] = sum(out.values())
    return out


def predict_record(record: dict[str, Any], device: Device) -> dict[str, Any]:
    """Modelled forward, backward and step seconds of one `count_methods` record."""
    fwd_d, bwd_d = record["forward"], record["backward"]
    fused = fwd_d.get("fused_calls") or []
    inner = OpTrace.from_json(fwd_d["fused_inner"]) if fwd_d.get("fused_inner") else None
    fwd = trace_seconds(OpTrace.from_json(fwd_d), device, fused, inner, False)
    # torch.nn's backward and our Exact's on the fused path are autograd through torch's
    # fused function; our iterative methods' backward is the engine's own (counted) ops
    autograd = record["method"] in ("torch", "hbp-exact", "autograd-loop")
    bwd = trace_seconds(OpTrace.from_json(bwd_d), device, fused, inner, True, autograd)
    return {"fwd_s": fwd["total"], "bwd_s": bwd["total"], "total_s": fwd["total"] + bwd["total"],
            "fwd_by_kind_s": fwd, "bwd_by_kind_s": bwd}


# ---- calibration on this CPU ------------------------------------------------------------------

# products [m, k] x [k, n] of the calibration ladder: per-step sizes up to a large matmul
MATMUL_LADDER = ((16, 64, 192), (128, 64, 192), (32, 512, 1536), (32, 512, 2048),
                 (1024, 512, 1536), (4096, 512, 2048), (2048, 1024, 4096))
BANDWIDTH_LADDER = (2**15, 2**18, 2**20, 2**22, 2**23, 2**25, 2**27)  # bytes per operand


def _min_seconds(fn: Callable[[], Any], repeats: int, inner: int = 1) -> float:
    """The least time of `repeats` runs of `inner` calls, per call: on a shared machine the
    least is the run other jobs disturbed least."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


COLD_BYTES = 2**29  # the operands one bandwidth point cycles through: beyond any CPU cache


def _cold_mul_seconds(size: int) -> float:
    """The median time of one out-of-place multiply of two `size`-byte float32 operands read
    cold: each call takes the next pair from buffers that together exceed `COLD_BYTES`, so
    every operand was last touched long ago, as a training step's are (its backward reads
    the gates and states the forward wrote over all T, its sweeps bring each chunk of them
    in from memory). The median of single calls: a loop of calls would measure the load of
    a shared machine, the least call an operand that was still cached."""
    n = size // 4
    count = max(8, min(4096, COLD_BYTES // size))
    pool = torch.randn(count, n)
    out = torch.empty(n)
    times = []
    for _ in range(3):
        for i in range(count):
            t0 = time.perf_counter()
            torch.mul(pool[i], pool[(i + 1) % count], out=out)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def product_key(op: OpSignature) -> str:
    """The key of a product in `Device.products`: name, input shapes and strides, dtype,
    non-tensor arguments (two products with the same shapes and another layout are two
    entries)."""
    return json.dumps([op.name, op.inputs, op.strides, op.dtype or op.itemsize, op.scalars],
                      separators=(",", ":"))


# the BLAS products `measure_products` replays: tensor operands of the op itself (an extra
# trailing tensor is the out= of its .out overload)
BLAS_OPERANDS = {"aten::mm": 2, "aten::addmm": 3, "aten::addmm_": 3, "aten::bmm": 2,
                 "aten::baddbmm": 3, "aten::addbmm": 3, "aten::mv": 2, "aten::addmv": 3,
                 "aten::addmv_": 3, "aten::dot": 2, "aten::vdot": 2}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _strided_randn(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype
                   ) -> torch.Tensor:
    """A random tensor with exactly this shape and these strides (a transposed view, an
    expanded bias, a slice of a larger buffer: whatever the trace recorded)."""
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
    return torch.randn(extent, dtype=dtype).as_strided(shape, stride)


def replay_product(op: OpSignature) -> Optional[Callable[[], Any]]:
    """A call of the BLAS product `op` on fresh operands with its recorded shapes, strides,
    dtype and keyword arguments (beta, alpha), or None where it cannot be replayed
    faithfully: no strides or dtype recorded (a file counted before they were, an operand
    that is not a plain strided tensor), an op outside `BLAS_OPERANDS`, a dtype other than
    float32/float64, a positional non-tensor argument."""
    n = BLAS_OPERANDS.get(op.name)
    dtype = _DTYPES.get(op.dtype)
    if (n is None or dtype is None or len(op.strides) != len(op.inputs)
            or any(name.startswith("#") for name, _ in op.scalars)):
        return None
    tensors = [_strided_randn(sh, st, dtype) for sh, st in zip(op.inputs, op.strides)]
    packet = getattr(torch.ops.aten, op.name.split("::")[1])
    kwargs = dict(op.scalars)
    if len(tensors) == n:
        return functools.partial(packet.default, *tensors, **kwargs)
    if len(tensors) == n + 1 and not op.name.endswith("_"):
        return functools.partial(packet.out, *tensors[:n], out=tensors[n], **kwargs)
    return None


def last_level_cache_bytes(default: int = 32 << 20,
                           sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """This CPU's largest cache (Linux sysfs), or `default` where it cannot be read."""
    sizes = []
    for f in sysfs.glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=default)


def measure_products(ops: Iterable[OpSignature], repeats: int = 7,
                     min_bytes: Optional[int] = None) -> dict[str, float]:
    """`Device.products` of this CPU for the distinct products among `ops` that
    `replay_product` can replay and that move more than `min_bytes` (default: the
    last-level cache, `last_level_cache_bytes`): the least time of one call
    (`_min_seconds`, as the calibration's matmul ladder).

    Only products beyond the cache: their operands come from memory in the step as in the
    replay. A per-step product's time in the step depends on what the loop around it left
    in cache; replayed alone twice, such products ran 0.81-1.60x apart on this CPU, those
    beyond the cache 1.01-1.10x (results/rnn/launchmodel_miss/products_repeat.json), so the
    smaller ones keep the rates the bench run measured in its own rounds
    (`device_from_bench`)."""
    limit = last_level_cache_bytes() if min_bytes is None else min_bytes
    out: dict[str, float] = {}
    for op in {op for op in ops if op.kind == "matmul" and op.bytes > limit}:
        key = product_key(op)
        if key in out:
            continue
        fn = replay_product(op)
        if fn is None:
            continue
        try:
            t0 = time.perf_counter()
            fn()
            once = time.perf_counter() - t0
        except RuntimeError:  # an out= that aliases itself, a layout the op refuses
            continue
        inner = max(1, min(200, int(0.01 / max(once, 1e-7))))  # ~10 ms per timed run
        out[key] = _min_seconds(fn, repeats, inner)
    return dict(sorted(out.items()))


def calibrate_cpu(threads: int, repeats: int = 7, products: Iterable[OpSignature] = ()
                  ) -> Device:
    """This CPU's figures, measured now (least of `repeats`): a do-nothing op's cost
    (`launch_s`), a view's (`view_s`), `.item()`'s (`sync_s`), the matmul rate along
    `MATMUL_LADDER` through oneDNN (`engine.linear`, weight packed as the engines do) and
    MKL (`torch.mm` into a preallocated output), and the bandwidth of an out-of-place
    multiply along `BANDWIDTH_LADDER` with its operands read cold (`_cold_mul_seconds`),
    and `measure_products` of the ops in `products` (the traces the model will price).
    The fused step's least time is the do-nothing op's."""
    from highwaybp.models.rnn.engine import PackedLinear, onednn_applies

    torch.set_num_threads(threads)
    tiny = torch.zeros(4, 4)
    launch = _min_seconds(lambda: tiny.add_(1.0), repeats, 2000)
    view = _min_seconds(lambda: tiny[1:], repeats, 2000)
    sync = _min_seconds(lambda: tiny[0, 0].item(), repeats, 2000)
    blas, onednn = [], []
    for m, k, n in MATMUL_LADDER:
        a, w = torch.randn(m, k), torch.randn(n, k)
        out, w_t = torch.empty(m, n), w.t().contiguous()
        flops = 2.0 * m * k * n
        inner = max(1, int(2e8 // flops))
        mm = functools.partial(torch.mm, a, w_t, out=out)
        blas.append((flops, flops / _min_seconds(mm, repeats, inner)))
        if onednn_applies(w):
            packed = functools.partial(PackedLinear(w, m), a)
            onednn.append((flops, flops / _min_seconds(packed, repeats, inner)))
    bandwidth = [(3.0 * size, 3.0 * size / _cold_mul_seconds(size))
                 for size in BANDWIDTH_LADDER]
    matmul = {"blas": Curve(tuple(blas))}
    if onednn:
        matmul["onednn"] = Curve(tuple(onednn))
    measured_products = measure_products(products, repeats)
    return Device(
        name=f"this CPU ({threads} threads)", launch_s=launch, view_s=view, sync_s=sync,
        matmul=matmul, bandwidth=Curve(tuple(bandwidth)), fused_step_s=launch,
        fused_native=("lstm",) if onednn else (),
        sources={"all": f"measured by calibrate_cpu now: least of {repeats} runs, "
                        f"{threads} threads, load average {os.getloadavg()[0]:.2f}",
                 "bandwidth": "median single out-of-place multiply, operands cold (cycled "
                              f"through {COLD_BYTES >> 20} MB)",
                 "fused_native": "torch.nn.LSTM's CPU forward and backward are oneDNN's RNN "
                                 "primitive (one op per layer); torch.nn.GRU's is a loop",
                 "products": f"{len(measured_products)} BLAS products of the priced traces "
                             f"that move more than the last-level cache "
                             f"({last_level_cache_bytes() >> 20} MiB), replayed with their "
                             "shapes and strides (least time of one call)"},
        products=measured_products)


MIN_INTENSITY = 16.0  # FLOP per byte: ~the CPU's matmul rate over its DRAM bandwidth, x2


def device_from_bench(meta: dict[str, Any], base: Device, gates: int, batch: int,
                      hidden: int, input_size: int, forward_trace: OpTrace) -> Device:
    """The CPU as a quiet `bench rnn` run measured it in its own rounds (`meta`, its
    floors), with `base`'s view and sync costs:

    - `launch_s` (and the fused step's least): a do-nothing op's cost, `dispatch_us_per_op`;
    - matmul rate, one curve per library (oneDNN, MKL's torch.mm): the per-step recurrent
      matmul's ([B, H] x [H, G*H], through the library the engines use at that size), the
      batched parts' (input projection, one batched recurrent backward, weight gradients:
      rows = T*B, the part's FLOPs per product, the library its `paths` name) where they
      are compute-bound, and the large matmul's through each library, each at its FLOPs;
    - bandwidth: the forward's elementwise ops alone (`elementwise_us_per_op`) at their
      mean bytes in `forward_trace` (the per-step point: sigmoid and tanh on a [B, G*H]
      row cost more than their bytes), then `base`'s ladder from 4x those bytes up.
    """
    (fwd,) = meta["forward_floor"].values()
    (step,) = meta["step_floor"].values()
    parts = step["parts"]
    from highwaybp.models.rnn.engine import STEP_ONEDNN_MIN_FLOPS

    # one curve per library: oneDNN's and MKL's (torch.mm) rates differ ~2x on this CPU
    points: dict[str, dict[float, float]] = {"onednn": {}, "blas": {}}
    step_flops = 2.0 * batch * hidden * gates * hidden
    step_library = "onednn" if step_flops >= STEP_ONEDNN_MIN_FLOPS else "blas"
    points[step_library][step_flops] = 1e9 * parts["recurrent_forward"]["gflops"]
    # each batched part's products [M, K] x [K, N] (rows = T * B); a part whose intensity
    # is below MIN_INTENSITY (the x projection of a 3-wide input) is bandwidth-bound: its
    # FLOP/s is not a matmul rate, and the model prices it by its bytes anyway
    gh, n_in = gates * hidden, input_size
    shapes = {"input_projection": [(1, n_in, gh)], "recurrent_backward_batched": [(1, gh, hidden)],
              "weight_grads": [(gh, 1, n_in), (gh, 1, hidden)]}
    for name, products in shapes.items():
        part = parts[name]
        if not part["gflops"]:
            continue
        rows = 1e9 * part["gflop"] / sum(2.0 * m * k * n for m, k, n in products)
        dims = [tuple(rows if d == 1 else d for d in p) for p in products]
        flops = [2.0 * m * k * n for m, k, n in dims]
        intensity = sum(flops) / sum(4.0 * (m * k + k * n + m * n) for m, k, n in dims)
        if intensity >= MIN_INTENSITY:
            library = "blas" if "torch.mm" in part.get("paths", []) else "onednn"
            points[library][sum(flops) / len(flops)] = 1e9 * part["gflops"]
    large = meta["large_matmul"]
    n, k, m = large["shape"]
    if large["onednn_gflops"]:
        points["onednn"][2.0 * n * k * m] = 1e9 * large["onednn_gflops"]
    points["blas"][2.0 * n * k * m] = 1e9 * large["torch_mm_gflops"]
    matmul = {lib: Curve(tuple(sorted(p.items()))) for lib, p in points.items() if p}
    compute = [(op, c) for op, c in forward_trace.ops.items() if op.kind == "compute"]
    mean_bytes = sum(op.bytes * c for op, c in compute) / sum(c for _, c in compute)
    launch = 1e-6 * fwd["dispatch_us_per_op"]
    # per-step ops: the run's own elementwise floor (sigmoid/tanh at these sizes cost more
    # than their bytes); chunk-sized and larger passes: the calibrated ladder
    small = (mean_bytes, mean_bytes / (1e-6 * fwd["elementwise_us_per_op"]))
    bandwidth = Curve((small, *(p for p in base.bandwidth.points if p[0] >= 4 * mean_bytes)))
    return Device(
        name="this CPU as the bench run measured it (2 threads, quiet)",
        launch_s=launch, view_s=base.view_s, sync_s=base.sync_s,
        matmul=matmul, bandwidth=bandwidth,
        fused_step_s=launch, fused_native=base.fused_native,
        sources={"launch_s, matmul, in-cache bandwidth": "the committed bench run's floors "
                 "(same rounds as its measured steps)",
                 "bandwidth above 4x the per-step bytes": "calibrate_cpu's ladder",
                 "view_s, sync_s, products": base.sources.get("all", "")},
        products=base.products)


# ---- validation and predictions -------------------------------------------------------------

def measured_path_labels(device_type: str = "cpu") -> tuple[str, ...]:
    """The counted paths a `bench rnn` step measured on `device_type` ran: its modules keep
    their default path ("auto", `resolve_paths`), torch.nn its own; "loop (only path)" is
    a file counted before the path options existed."""
    from highwaybp.bench.rnn_paths import default_path_label

    return ("torch.nn", "loop (only path)", default_path_label(device_type))


def measured_pairs(counts: list[dict[str, Any]], measured: list[dict[str, Any]]
                   ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(counted record, measured record) of the same setting and method, the counted one on
    the path the measured step ran (`measured_path_labels`)."""
    def key(r: dict[str, Any]) -> tuple:
        return (r["cell"], r["seq_len"], r["batch"], r["hidden"], r["input_size"],
                r["layers"], r["method"])

    paths = measured_path_labels()
    by_key = {key(r): r for r in measured}
    chosen: dict[tuple, dict[str, Any]] = {}
    for rec in counts:
        if key(rec) not in by_key or rec["path"] not in paths:
            continue
        other = chosen.get(key(rec))
        if other is not None and other["path"] == rec["path"]:
            raise ValueError(
                f"two counted records of {key(rec)} on path {rec['path']!r}: the count files "
                "repeat a setting; pass --counts with one file per setting")
        # a file counted before the path options existed ("loop (only path)") gives way
        # to one that names the default path
        if other is None or other["path"] == "loop (only path)":
            chosen[key(rec)] = rec
    return [(rec, by_key[k]) for k, rec in chosen.items()]


def validate(counts: list[dict[str, Any]], measured: list[dict[str, Any]], device: Device
             ) -> list[dict[str, Any]]:
    """Per `measured_pairs`: modelled and measured forward, backward and step (ms) and the
    model's error (%)."""
    rows = []
    for rec, m in measured_pairs(counts, measured):
        p = predict_record(rec, device)
        row = {k: rec[k] for k in ("cell", "seq_len", "batch", "hidden", "input_size",
                                   "layers", "method", "path")}
        for phase, mk in (("fwd", "fwd_ms"), ("bwd", "bwd_ms"), ("total", "total_ms")):
            row[f"model_{phase}_ms"] = 1e3 * p[f"{phase}_s"]
            row[f"measured_{phase}_ms"] = m[mk]
            row[f"{phase}_error_pct"] = 100.0 * (1e3 * p[f"{phase}_s"] / m[mk] - 1.0)
        row["model_by_kind_ms"] = {
            ph: {k: 1e3 * v for k, v in p[f"{ph}_by_kind_s"].items()} for ph in ("fwd", "bwd")}
        rows.append(row)
    return rows


# The paper's Table 6 settings (the paper gives T, hidden and layers; batch and input
# sizes it does not give for the char/word models are the bench's: batch 32, input =
# hidden; the pixel GRU reads one grey pixel per step, batch 128).
TABLE6 = (
    {"label": "LSTM x1, T=256, H=512", "cell": "lstm", "seq_len": 256, "batch": 32,
     "hidden": 512, "input_size": 512, "layers": 1},
    {"label": "GRU x1, T=256, H=512", "cell": "gru", "seq_len": 256, "batch": 32,
     "hidden": 512, "input_size": 512, "layers": 1},
    {"label": "GRU x3, T=256, H=512", "cell": "gru", "seq_len": 256, "batch": 32,
     "hidden": 512, "input_size": 512, "layers": 3},
    {"label": "GRU x1, T=1024, H=64 (pixel)", "cell": "gru", "seq_len": 1024, "batch": 128,
     "hidden": 64, "input_size": 1, "layers": 1},
)
# the paper's measured speedups over its BP on one GPU (Table 6; its BP ms)
PAPER_TABLE6 = {
    "LSTM x1, T=256, H=512": {"bp_ms": 261, "k=0": 3.0, "k=5": 1.7, "k=10": 1.2, "k=20": 0.75},
    "GRU x1, T=256, H=512": {"bp_ms": 209, "k=0": 3.2, "k=5": 1.8, "k=10": 1.3, "k=20": 0.79},
    "GRU x3, T=256, H=512": {"bp_ms": 687, "k=0": 2.9, "k=5": 1.8, "k=10": 1.3, "k=20": 0.82},
    "GRU x1, T=1024, H=64 (pixel)": {"bp_ms": 715, "k=0": 3.5, "k=5": 3.1, "k=10": 2.9,
                                     "k=20": 2.45},
}
PREDICT_KS = (0, 1, 5, 10)


def gate_recompute_seconds(setting: dict[str, Any], device: Device) -> float:
    """The fused path's extra backward work (issue 20, item 1), as a stated model: per layer
    the gates of all T steps recomputed from the stored inputs and outputs, one
    [T*B, In] x [In, G*H] and one [T*B, H] x [H, G*H] matmul plus G elementwise passes
    over [T*B, G*H]."""
    G = 3 if setting["cell"] == "gru" else 4
    T, B, H = setting["seq_len"], setting["batch"], setting["hidden"]
    rows, total = T * B, 0.0
    for layer in range(setting["layers"]):
        n_in = setting["input_size"] if layer == 0 else H
        for k in (n_in, H):
            op = OpSignature("aten::mm", "matmul", ((rows, k), (k, G * H)), ((rows, G * H),), 4)
            total += op_seconds(op, device)
        ew = OpSignature("aten::sigmoid", "compute", ((rows, G * H),), ((rows, G * H),), 4)
        total += G * op_seconds(ew, device)
    return total


def predict_table6(counts: list[dict[str, Any]], device: Device,
                   settings: tuple[dict[str, Any], ...] = TABLE6) -> list[dict[str, Any]]:
    """Predicted step (ms) per Table 6 setting and method on `device` from `counts` (the
    records of `count_table6`), with the speedups over torch.nn (cuDNN) and over our Exact.

    Rows: torch.nn (the fused-kernel model), our Exact and Highway(k) on each counted path,
    and "fused forward (modelled)": today's counted backward plus torch's fused forward
    and the gate recompute (`gate_recompute_seconds`), the fused path's expected cost
    before it exists."""
    out = []
    for setting in settings:
        mine = [r for r in counts if all(r[k] == setting[k] for k in
                                          ("cell", "seq_len", "batch", "hidden", "layers"))]
        if not mine:
            continue
        rows: dict[str, dict[str, Any]] = {}
        for r in mine:
            p = predict_record(r, device)
            label = r["method"] if r["method"] == "torch" else f"{r['method']} [{r['path']}]"
            rows[label] = {"fwd_ms": 1e3 * p["fwd_s"], "bwd_ms": 1e3 * p["bwd_s"],
                           "total_ms": 1e3 * p["total_s"],
                           "fwd_by_kind_ms": {k: 1e3 * v for k, v in p["fwd_by_kind_s"].items()},
                           "bwd_by_kind_ms": {k: 1e3 * v for k, v in p["bwd_by_kind_s"].items()}}
        torch_row = rows.get("torch")
        if torch_row:
            meta = {**{k: setting[k] for k in ("seq_len", "batch", "hidden", "input_size",
                                               "layers")},
                    "gates": 3 if setting["cell"] == "gru" else 4, "itemsize": 4}
            fused_fwd = 1e3 * fused_rnn_seconds(meta, device, False)
            recompute = 1e3 * gate_recompute_seconds(setting, device)
            for r in mine:
                if r["method"] in ("torch", "hbp-exact") or "fused" in r["path"] or (
                        "log" in r["path"]):
                    continue  # (from the sequential loop path's record only)
                loop = rows[f"{r['method']} [{r['path']}]"]
                rows[f"{r['method']} [fused forward (modelled)]"] = {
                    "fwd_ms": fused_fwd, "bwd_ms": loop["bwd_ms"] + recompute,
                    "total_ms": fused_fwd + loop["bwd_ms"] + recompute,
                    "gate_recompute_ms": recompute}
            rows["hbp-exact [fused forward (modelled)]"] = {
                "fwd_ms": torch_row["fwd_ms"], "bwd_ms": torch_row["bwd_ms"],
                "total_ms": torch_row["total_ms"],
                "note": "Exact on the fused path is torch's autograd through the fused kernel"}
        for row in rows.values():
            if torch_row:
                row["speedup_vs_torch"] = torch_row["total_ms"] / row["total_ms"]
        out.append({"setting": setting, "predicted": True, "device": device.name,
                    "paper": PAPER_TABLE6.get(setting["label"]),
                    "rows": rows})
    return out


def count_table6(ks: tuple[int, ...] = PREDICT_KS, settings: tuple[dict, ...] = TABLE6
                 ) -> list[dict[str, Any]]:
    """Counted traces of torch.nn, our Exact and Highway(k) at the Table 6 settings, with
    oneDNN off: the engines then take the path they take on a GPU (torch.mm throughout,
    `engine.onednn_applies`), so the trace is the op sequence a CUDA run dispatches."""
    from highwaybp.bench.opcount import count_methods

    names = ["torch", "hbp-exact", *(f"highway(k={k})" for k in ks)]
    records = []
    with torch.backends.mkldnn.flags(enabled=False):
        for s in settings:
            args = argparse.Namespace(**{k: v for k, v in s.items() if k != "label"}, seed=0)
            records += count_methods(args, s["seq_len"], names)
    return records


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch-model",
        help="launch-aware RNN step model: validate on this CPU, predict Table 6 on an H100",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=Path, nargs="+", default=None,
                   help="`bench rnn --count-ops` JSON files at the measured settings (default: "
                        "results/rnn/opcount_*.json; files without op shapes are skipped)")
    p.add_argument("--measured", type=Path, nargs="+", default=None,
                   help="`bench rnn` JSON files with measured steps (default: "
                        "results/rnn/bench_*_2threads.json)")
    p.add_argument("--threads", type=int, default=2, help="threads of the CPU calibration")
    p.add_argument("--calibration", type=Path, default=None,
                   help="reuse this device JSON instead of calibrating now")
    p.add_argument("--ks", type=str, default="0,1,5,10", help="Highway k of the predictions")
    p.add_argument("--out", type=Path, default=Path("results/rnn/launchmodel.json"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from highwaybp.train.io import atomic_write_json

    counts_files = args.counts or sorted(Path("results/rnn").glob("opcount_*.json"))
    measured_files = args.measured or sorted(Path("results/rnn").glob("bench_*_2threads.json"))
    if not counts_files or not measured_files:
        print("launch-model: no counted or measured files: run `highwaybp bench rnn "
              "--count-ops` at the measured settings first", file=sys.stderr)
        return 2
    counts = [r for f in counts_files for r in json.loads(f.read_text())["records"]
              if "signatures" in r["forward"]]
    measured = {f: json.loads(f.read_text()) for f in measured_files}
    priced = [rec for d in measured.values() for rec, _ in measured_pairs(counts, d["records"])]
    if args.calibration:
        cpu = Device.from_json(json.loads(args.calibration.read_text()))
        if f"({args.threads} threads)" not in cpu.name:
            print(f"launch-model: warning: {args.calibration} was measured as {cpu.name!r}, "
                  f"not with --threads {args.threads}: its figures (and measured products) "
                  "are that run's", file=sys.stderr)
    else:
        from highwaybp.train.threads import use_threads

        use_threads(args.threads, "highwaybp bench launch-model")
        cpu = calibrate_cpu(args.threads, products=(
            op for rec in priced for phase in (rec["forward"], rec["backward"],
                                               rec["forward"].get("fused_inner"))
            if phase for op in OpTrace.from_json(phase).ops))
    rows, rows_calibrated, rows_unmeasured, run_devices = [], [], [], []
    for f, d in measured.items():
        pairs = measured_pairs(counts, d["records"])
        exact = next(rec for rec, _ in pairs if rec["method"] == "hbp-exact")
        run_device = device_from_bench(d["meta"], cpu, 3 if exact["cell"] == "gru" else 4,
                                       exact["batch"], exact["hidden"], exact["input_size"],
                                       OpTrace.from_json(exact["forward"]))
        run_devices.append({"measured_file": str(f), **run_device.to_json()})
        rows += [{**r, "measured_file": str(f)} for r in validate(counts, d["records"],
                                                                   run_device)]
        rows_calibrated += [{**r, "measured_file": str(f)}
                            for r in validate(counts, d["records"], cpu)]
        rows_unmeasured += [{**r, "measured_file": str(f)} for r in validate(
            counts, d["records"], run_device.without_products())]
    for r in rows:
        print(f"{r['cell']} T={r['seq_len']} B={r['batch']} H={r['hidden']} {r['method']:14s}"
              f" model {r['model_total_ms']:8.1f} ms measured {r['measured_total_ms']:8.1f} ms"
              f" error {r['total_error_pct']:+6.1f}% (fwd {r['fwd_error_pct']:+.0f}%, bwd "
              f"{r['bwd_error_pct']:+.0f}%)")
    ks = tuple(int(k) for k in args.ks.split(","))
    predictions = predict_table6(count_table6(ks), H100)
    for p in predictions:
        print(f"\n{p['setting']['label']} on {H100.name} (PREDICTED):")
        for label, row in p["rows"].items():
            print(f"  {label:48s} {row['total_ms']:9.2f} ms  x{row.get('speedup_vs_torch', 0):.2f}"
                  " vs torch.nn")
    atomic_write_json(args.out, {
        "bench": "launch_model",
        "command": "highwaybp " + " ".join(sys.argv[1:]),
        "cpu": cpu.to_json(),
        "counts_files": [str(f) for f in counts_files],
        "measured_files": [str(f) for f in measured_files],
        "validation": rows,
        "validation_devices": run_devices,
        "validation_calibrated_only": rows_calibrated,
        "validation_without_products": rows_unmeasured,
        "gpu": H100.to_json(),
        "predictions": predictions,
        "notes": "validation: the model against the committed measured steps (no re-timing), "
                 "with each run's own dispatch cost and matmul rates (its floors) and this "
                 "CPU's calibration for views, syncs, bandwidth and the BLAS products it "
                 "measured (shapes and strides); validation_calibrated_only: the calibration "
                 "alone; validation_without_products: every product by the rate curves. "
                 "Predictions: not measured, from traces counted on this CPU with oneDNN off "
                 "(the engines' non-CPU path)",
    })
    print(f"\nwrote {args.out}")
    return 0


# ---- rendering (`highwaybp report`) -------------------------------------------------------------


def _us(s: float) -> str:
    return f"{1e6 * s:.1f} us"


def device_lines(d: dict[str, Any]) -> list[str]:
    """The figures a device JSON gives the model, one line each."""
    mm = "; ".join(f"{lib}: " + ", ".join(f"{y / 1e9:.0f} GFLOP/s at {x / 1e6:.3g} MFLOP"
                                          for x, y in pts) for lib, pts in d["matmul"].items())
    bw = ", ".join(f"{y / 1e9:.0f} GB/s at {x / 2**20:.3g} MiB" for x, y in d["bandwidth"])
    lines = [f"- launch (an op that computes) {_us(d['launch_s'])}, view {_us(d['view_s'])}, "
             f"sync {_us(d['sync_s'])}, fused RNN step at least {_us(d['fused_step_s'])}; "
             f"fused kernels: {', '.join(d['fused_native']) or 'none'}",
             f"- matmul rate: {mm}", f"- bandwidth: {bw}"]
    if d.get("products"):
        lines.append(f"- measured products (shapes and strides): {len(d['products'])}")
    lines += [f"- {k}: {v}" for k, v in d.get("sources", {}).items()]
    return lines


def prediction_table(predictions: list[dict[str, Any]], measured: Optional[dict] = None
                     ) -> list[str]:
    """The predicted steps per setting (and, where `measured` maps (setting label, row
    label) to a measured step in ms, the measurement beside)."""
    from highwaybp.bench.report import _table

    lines = []
    for p in predictions:
        s, paper = p["setting"], p.get("paper")
        lines += [f"**{s['label']}** (batch {s['batch']}, input {s['input_size']}), "
                  f"PREDICTED on {p.get('device', 'the GPU')}"
                  + (f"; the paper's Table 6: BP {paper['bp_ms']} ms, Highway k=0 "
                     f"{paper['k=0']}x, k=5 {paper['k=5']}x, k=10 {paper['k=10']}x, k=20 "
                     f"{paper['k=20']}x over its BP" if paper else "") + ":", ""]
        head = ["method [path]", "predicted fwd ms", "bwd ms", "step ms", "x torch.nn"]
        if measured is not None:
            head += ["measured step ms", "measured x torch.nn"]
        rows = []
        for label, r in p["rows"].items():
            row = [label, f"{r['fwd_ms']:.2f}", f"{r['bwd_ms']:.2f}", f"{r['total_ms']:.2f}",
                   f"{r.get('speedup_vs_torch', float('nan')):.2f}"]
            if measured is not None:
                m = measured.get((s["label"], label))
                row += ["-", "-"] if m is None else [f"{m[0]:.2f}", f"{m[1]:.2f}"]
            rows.append(row)
        lines += [*_table(head, rows), ""]
    return lines


def _pct(row: Optional[dict[str, Any]]) -> str:
    return "-" if row is None else f"{row['total_error_pct']:+.0f}%"


def render(path: Any, d: dict[str, Any]) -> list[str]:
    """docs/benchmarks.md's section of `bench launch-model`'s JSON."""
    from highwaybp.bench.report import _command_line, _table

    rows = d["validation"]
    within = sum(abs(r["total_error_pct"]) <= 25 for r in rows)
    worst = max(rows, key=lambda r: abs(r["total_error_pct"])) if rows else None
    lines = [f"### Launch-aware step model: `{path}`", "", d.get("notes", ""),
             *_command_line(d.get("command"))]
    for dev in d.get("validation_devices", []):
        lines += [f"This CPU's figures for `{dev['measured_file']}`:", "", *device_lines(dev), ""]
    lines += ["This CPU's figures measured by `calibrate_cpu` at the time of the command:", "",
              *device_lines(d["cpu"]), ""]
    if worst:
        lines += [f"Validation against the committed measured steps: the model's step is "
                  f"within 25% for {within} of {len(rows)} configurations; the largest error "
                  f"is {worst['total_error_pct']:+.0f}% ({worst['cell']} T={worst['seq_len']} "
                  f"{worst['method']}).", ""]
    def key(r: dict[str, Any]) -> tuple:
        return tuple(r.get(k) for k in ("measured_file", "cell", "seq_len", "batch", "hidden",
                                        "input_size", "layers", "method"))

    # the same rows with every product priced by the rate curves (files before products
    # were measured have none)
    curve_only = {key(r): r for r in d.get("validation_without_products") or []}
    head = ["setting", "method", "model fwd / bwd / step ms", "measured fwd / bwd / step ms",
            "error fwd", "bwd", "step"] + (["step, products by the curves"] if curve_only
                                           else [])
    table = [[f"{r['cell'].upper()} T={r['seq_len']} B={r['batch']} H={r['hidden']} "
              f"In={r['input_size']}", r["method"],
              f"{r['model_fwd_ms']:.0f} / {r['model_bwd_ms']:.0f} / {r['model_total_ms']:.0f}",
              f"{r['measured_fwd_ms']:.0f} / {r['measured_bwd_ms']:.0f} / "
              f"{r['measured_total_ms']:.0f}",
              f"{r['fwd_error_pct']:+.0f}%", f"{r['bwd_error_pct']:+.0f}%",
              f"{r['total_error_pct']:+.0f}%"]
             + ([_pct(curve_only.get(key(r)))] if curve_only else [])
             for r in rows]
    lines += [*_table(head, table), ""]
    if curve_only:
        lines += [f"With every product priced by the rate curves instead of its measured "
                  f"time: within 25% for "
                  f"{sum(abs(r['total_error_pct']) <= 25 for r in curve_only.values())} of "
                  f"{len(curve_only)}.", ""]
    cal = d.get("validation_calibrated_only") or []
    if cal:
        worst_cal = max(cal, key=lambda r: abs(r["total_error_pct"]))
        lines += [f"With this CPU's calibration alone (no figure from the bench runs): within "
                  f"25% for {sum(abs(r['total_error_pct']) <= 25 for r in cal)} of {len(cal)}; "
                  f"largest error {worst_cal['total_error_pct']:+.0f}% ({worst_cal['cell']} "
                  f"T={worst_cal['seq_len']} {worst_cal['method']}).", ""]
    lines += ["The H100's figures (assumed, not measured):", "",
              *device_lines(d["gpu"]), ""]
    return lines + prediction_table(d["predictions"])
