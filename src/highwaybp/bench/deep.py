"""`highwaybp bench deep`: deep residual stacks, Exact vs Highway(k), loop vs batched VJPs.

For each stack (residual MLP, pre-LN transformer sub-layers, pre-activation conv blocks with
BatchNorm) of depth L and width W it measures, in one process and one run:

- forward and backward wall time of one training step: Exact (autograd) and Highway(k) for
  each k, with the per-layer ("loop") and the batched (torch.func vmap) VJP backends;
  median of `--repeats` runs after `--warmup` runs, ratios against Exact from the same run;
- the cosine and relative error of each Highway(k) parameter gradient to the exact one
  (and k = L, which must be exact);
- peak memory of one step (fresh subprocess per method; resident-set growth during the step
  sampled every ~0.2 ms, with large allocations returned to the OS on free), also expressed
  as state-sized tensors per layer: the paper's Appendix D says Highway-BP needs about two
  more than backprop.

Writes JSON (`--out`) and prints a table. The machine is shared: timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from highwaybp.bench.memory import sampled_peak_growth_bytes
from highwaybp.bench.tensor_memory import TensorMemory
from highwaybp.core.chain import ResidualChain
from highwaybp.core.fidelity import compare_gradients
from highwaybp.core.methods import Exact, Highway, Method
from highwaybp.core.residual import Identity, ResidualLayer, Scaled
from highwaybp.train.cli_types import nonneg_int, nonneg_int_list, out_file, positive_int
from highwaybp.train.threads import use_threads

MODELS = ("mlp", "transformer", "resnet")


class Stack(nn.Module):
    """A bare ResidualChain (no stem/head) with its input and a fixed loss."""

    def __init__(self, chain: ResidualChain, x: Tensor, target: Tensor) -> None:
        super().__init__()
        self.chain = chain
        self.x = x
        self.target = target

    def loss(self, method: Method) -> Tensor:
        out = self.chain(self.x, method=method)
        return 0.5 * (out - self.target).square().mean()

    @property
    def state_bytes(self) -> int:
        return self.x.numel() * self.x.element_size()


def build_stack(
    model: str,
    depth: int,
    width: int,
    batch: int,
    seq: int,
    image: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Stack:
    """The benchmark stack: L = `depth` residual layers of width `width`.

    mlp: LN-Linear(W, 2W)-GELU-Linear blocks, K = I, input [batch, W].
    transformer: GPT-2 pre-LN sub-layers (attention, MLP alternating; gamma = 0.2,
        K = 0.8 I), input [batch, seq, W].
    resnet: pre-activation basic blocks (BN-ReLU-conv3x3 x2, W channels), K = I, input
        [batch, W, image, image].
    """
    from highwaybp.models.mlp import MLPBlock
    from highwaybp.models.resnet import PreActBlock
    from highwaybp.models.transformer import FeedForward, PreLNBlock, SelfAttention

    torch.manual_seed(seed)
    scale = 1.0 / math.sqrt(2 * depth)
    if model == "mlp":
        layers = [
            ResidualLayer(MLPBlock(width, 2 * width, 0.0, scale), Identity()) for _ in range(depth)
        ]
        shape: tuple[int, ...] = (batch, width)
    elif model == "transformer":
        gamma = 0.2
        layers = []
        for i in range(depth):
            sub = (
                SelfAttention(width, max(1, width // 32), True)
                if i % 2 == 0
                else FeedForward(width)
            )
            with torch.no_grad():
                sub.proj.weight.mul_(scale)
            layers.append(ResidualLayer(PreLNBlock(sub, width, gamma), Scaled(1.0 - gamma)))
        shape = (batch, seq, width)
    elif model == "resnet":
        layers = []
        for _ in range(depth):
            block = PreActBlock(width, width)
            with torch.no_grad():
                block.conv2.weight.mul_(scale)
            layers.append(ResidualLayer(block, Identity()))
        shape = (batch, width, image, image)
    else:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    chain = ResidualChain(layers).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=g, dtype=dtype)
    target = torch.randn(shape, generator=g, dtype=dtype)
    return Stack(chain, x, target)


LAYERWISE = "loop+layerwise"  # the loop backend with ResidualChain(layerwise_sweeps=True)


def use_vjp(chain: Any, vjp: str) -> None:
    """Set a bench VJP choice on the chain: "loop", "batched" or LAYERWISE."""
    chain.vjp = "loop" if vjp == LAYERWISE else vjp
    chain.layerwise_sweeps = vjp == LAYERWISE


def _step(stack: Stack, method: Method, vjp: str) -> tuple[float, float, list[Tensor]]:
    """One training step: (forward s, backward s, parameter gradients). `vjp`: "loop",
    "batched" or LAYERWISE (the loop backend with layerwise sweeps)."""
    use_vjp(stack.chain, vjp)
    params = [p for p in stack.chain.parameters()]
    for p in params:
        p.grad = None
    t0 = time.perf_counter()
    loss = stack.loss(method)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [p.grad.detach().clone() for p in params]


def _timed(stack: Stack, method: Method, vjp: str, warmup: int, repeats: int) -> dict[str, Any]:
    for _ in range(warmup):
        _step(stack, method, vjp)
    fwd, bwd = [], []
    grads: list[Tensor] = []
    for _ in range(repeats):
        f, b, grads = _step(stack, method, vjp)
        fwd.append(f)
        bwd.append(b)
    return {
        "fwd_ms": 1e3 * statistics.median(fwd),
        "bwd_ms": 1e3 * statistics.median(bwd),
        "bwd_runs_ms": [round(1e3 * t, 3) for t in bwd],
        "grads": grads,
    }


def _method(k: int | None) -> Method:
    return Exact() if k is None else Highway(k=k)


def memory_probe(spec: dict[str, Any]) -> dict[str, float]:
    """Peak memory growth (bytes) of one training step, measured by sampling RSS.

    Run it in a fresh process started with MALLOC_MMAP_THRESHOLD_=65536 (as
    `_probe_in_subprocess` does): every allocation of 64 KiB or more is then its own mmap,
    returned to the OS when freed, so the resident set follows the live tensors. A thread
    samples RSS every ~0.2 ms during the step (after one warm-up step); the result is the
    peak minus the resident size just before the step.
    """
    torch.set_num_threads(spec["threads"])
    stack = build_stack(
        spec["model"],
        spec["depth"],
        spec["width"],
        spec["batch"],
        spec["seq"],
        spec["image"],
        getattr(torch, spec["dtype"]),
    )
    use_vjp(stack.chain, spec["vjp"])
    method = _method(spec["k"])
    stack.loss(method).backward()  # warm-up: lazy initialisation is not the step's memory
    for p in stack.chain.parameters():
        p.grad = None
    growth = sampled_peak_growth_bytes(lambda: stack.loss(method).backward())
    return {"peak_rss_growth_bytes": float(growth), "state_bytes": stack.state_bytes}


def tensor_memory_peak(stack: Stack, method: Method, vjp: str) -> int:
    """Peak bytes of tensors alive during one training step (forward + backward), counted
    by `TensorMemory` (deterministic: the same on every run and machine load), after one
    warm-up step; parameters and the input, allocated before, are not counted."""
    previous = stack.chain.vjp, stack.chain.layerwise_sweeps
    use_vjp(stack.chain, vjp)
    try:
        stack.loss(method).backward()  # warm-up (lazy initialisation)
        stack.chain.zero_grad(set_to_none=True)
        with TensorMemory() as mem:
            stack.loss(method).backward()
        stack.chain.zero_grad(set_to_none=True)
    finally:
        stack.chain.vjp, stack.chain.layerwise_sweeps = previous
    return mem.peak_bytes


def extra_tensors_per_layer(stack: Stack, method: Method, vjp: str = "loop") -> float:
    """(peak tensor bytes of a step with `method` - with Exact()) / (state bytes x L): the
    state-sized tensors per layer a method holds beyond exact backprop (paper, Appendix D:
    about 2 for Highway-BP)."""
    exact = tensor_memory_peak(stack, Exact(), "loop")
    peak = tensor_memory_peak(stack, method, vjp)
    return (peak - exact) / (stack.state_bytes * len(stack.chain))


def _probe_in_subprocess(spec: dict[str, Any]) -> dict[str, float] | None:
    import os

    code = (
        "import json, sys; from highwaybp.bench.deep import memory_probe; "
        "print(json.dumps(memory_probe(json.loads(sys.argv[1]))))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
            env=env,
        )
    except (subprocess.SubprocessError, OSError) as err:
        print(f"  memory probe failed for {spec}: {err}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_model(args: argparse.Namespace, model: str, log: Callable[[str], None]) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    stack = build_stack(model, args.depth, args.width, args.batch, args.seq, args.image, dtype)
    depth = len(stack.chain)
    n_params = sum(p.numel() for p in stack.chain.parameters())
    ks = [k for k in args.ks if k <= depth]
    rows = []
    exact = _timed(stack, Exact(), "loop", args.warmup, args.repeats)
    exact_grads = exact.pop("grads")
    rows.append({"method": "exact", "k": None, "vjp": "autograd", **exact})
    for k in ks:
        for vjp in args.vjps:
            res = _timed(stack, Highway(k=k), vjp, args.warmup, args.repeats)
            fid = compare_gradients(res.pop("grads"), exact_grads)
            rows.append({"method": f"highway(k={k})", "k": k, "vjp": vjp, **res, **fid})
    # k = L must reproduce the exact gradient (to float rounding).
    _, _, g_full = _step(stack, Highway(k=depth), "loop")
    full = compare_gradients(g_full, exact_grads)
    for row in rows:
        row.update(model=model, depth=depth, width=args.width, params=n_params)
        row["bwd_speedup_vs_exact"] = exact["bwd_ms"] / row["bwd_ms"]
        row["step_speedup_vs_exact"] = (exact["fwd_ms"] + exact["bwd_ms"]) / (
            row["fwd_ms"] + row["bwd_ms"]
        )
    if args.memory:
        log(f"  tensor memory {model}")
        _add_tensor_memory(stack, rows)
        _add_memory(args, model, rows, log)
    rows.append(
        {
            "model": model,
            "depth": depth,
            "method": f"highway(k={depth})",
            "k": depth,
            "vjp": "loop",
            "exactness_rel_error": full["rel_error"],
            "cosine": full["cosine"],
        }
    )
    return rows


MEMORY_ONLY_NOTE = (
    "deterministic: peak bytes of the tensors alive during one training step (forward and "
    "backward), counted by highwaybp.bench.tensor_memory.TensorMemory after one warm-up "
    "step; the same on every run and under any machine load. extra_tensors_per_layer = "
    "(peak - exact's peak) / (state bytes x L)."
)


def memory_rows(args: argparse.Namespace, model: str) -> list[dict]:
    """Only the deterministic tensor memory: Exact, then each k with each VJP backend and
    with the loop backend's layerwise sweeps (`ResidualChain(layerwise_sweeps=True)`)."""
    dtype = getattr(torch, args.dtype)
    stack = build_stack(model, args.depth, args.width, args.batch, args.seq, args.image, dtype)
    depth = len(stack.chain)
    rows = [{"method": "exact", "k": None, "vjp": "autograd"}]
    rows += [{"method": f"highway(k={k})", "k": k, "vjp": vjp}
             for k in args.ks if k <= depth for vjp in dict.fromkeys([*args.vjps, LAYERWISE])]
    _add_tensor_memory(stack, rows)
    for row in rows:
        row.update(model=model, depth=depth, width=args.width,
                   state_mb=stack.state_bytes / 2**20)
    return rows


def _add_tensor_memory(stack: Stack, rows: list[dict]) -> None:
    """Deterministic peak tensor memory of every timed row (see `tensor_memory_peak`)."""
    state, depth = stack.state_bytes, len(stack.chain)
    base = None
    for row in rows:
        vjp = "loop" if row["vjp"] == "autograd" else row["vjp"]
        peak = tensor_memory_peak(stack, _method(row["k"]), vjp)
        row["tensor_peak_mb"] = peak / 2**20
        if row["k"] is None:
            base = peak
        if base is not None:
            row["extra_tensors_per_layer"] = (peak - base) / (state * depth)


def _add_memory(args: argparse.Namespace, model: str, rows: list[dict], log) -> None:
    probe_k = 1 if 1 in args.ks or not args.ks else min(args.ks)
    wanted = {(None, "autograd")} | {(probe_k, v) for v in args.vjps}
    base = None
    for row in rows:
        if (row["k"], row["vjp"]) not in wanted:
            continue
        spec = {
            "model": model,
            "depth": args.depth,
            "width": args.width,
            "batch": args.batch,
            "seq": args.seq,
            "image": args.image,
            "dtype": args.dtype,
            "threads": args.threads,
            "k": row["k"],
            "vjp": "loop" if row["vjp"] == "autograd" else row["vjp"],
        }
        log(f"  memory probe {model} {row['method']} {row['vjp']}")
        mem = _probe_in_subprocess(spec)
        if mem is None:
            continue
        growth, state = mem["peak_rss_growth_bytes"], mem["state_bytes"]
        row["peak_mb"] = growth / 2**20
        row["peak_state_tensors"] = growth / state
        if row["k"] is None:
            base = growth
        if base is not None:
            row["extra_state_tensors_per_layer_vs_exact"] = (growth - base) / (state * row["depth"])


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'model':<12}{'L':>4} {'method':<16}{'vjp':<9}{'fwd ms':>9}{'bwd ms':>9}"
        f"{'bwd x':>7}{'step x':>7}{'cosine':>11}{'rel err':>10}{'peak MB':>9}{'extra/L':>8}"
        f"{'tensors/L':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "bwd_ms" not in r:
            print(
                f"{r['model']:<12}{r['depth']:>4} {r['method']:<16}exactness check: rel err "
                f"{r['exactness_rel_error']:.1e}"
            )
            continue
        print(
            f"{r['model']:<12}{r['depth']:>4} {r['method']:<16}{r['vjp']:<9}{r['fwd_ms']:>9.1f}"
            f"{r['bwd_ms']:>9.1f}{r['bwd_speedup_vs_exact']:>7.2f}{r['step_speedup_vs_exact']:>7.2f}"
            f"{_fmt(r.get('cosine'), '.6f'):>11}{_fmt(r.get('rel_error'), '.1e'):>10}"
            f"{_fmt(r.get('peak_mb'), '.1f'):>9}"
            f"{_fmt(r.get('extra_state_tensors_per_layer_vs_exact'), '.2f'):>8}"
            f"{_fmt(r.get('extra_tensors_per_layer'), '.2f'):>10}"
        )


def print_memory_table(rows: list[dict]) -> None:
    head = f"{'model':<12}{'L':>4} {'method':<16}{'vjp':<9}{'tensor MB':>10}{'extra/L':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<12}{r['depth']:>4} {r['method']:<16}{r['vjp']:<9}"
              f"{r['tensor_peak_mb']:>10.1f}{r['extra_tensors_per_layer']:>9.2f}")


def run(args: argparse.Namespace) -> int:
    from highwaybp.train.io import atomic_write_json

    use_threads(args.threads, "highwaybp bench deep")
    if args.quick:
        args.depth, args.width, args.batch, args.seq, args.image = 4, 16, 4, 8, 6
        args.ks, args.repeats, args.warmup = [0, 1], 2, 1
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    rows: list[dict] = []
    for model in args.models:
        log(f"bench deep: {model} L={args.depth} W={args.width}")
        if args.memory_only:
            rows.extend(memory_rows(args, model))
        else:
            rows.extend(bench_model(args, model, log))
    result = {
        "bench": "deep",
        "argv": list(sys.argv),
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "note": MEMORY_ONLY_NOTE if args.memory_only else (
            "median of repeats after warm-up; shared, noisy machine; memory = peak growth "
            "of the sampled resident set during one step in a fresh process "
            "(MALLOC_MMAP_THRESHOLD_=65536); tensor memory = peak bytes of tensors alive "
            "during one step (deterministic)"),
        "memory_only": bool(args.memory_only),
        "results": rows,
    }
    if args.out:
        atomic_write_json(args.out, result)
    if not args.quiet:
        (print_memory_table if args.memory_only else print_table)(rows)
        if args.out:
            print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deep", help="deep stacks: Exact vs Highway(k), loop vs batched VJPs, cosine, memory"
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--depth", type=positive_int, default=32, help="L, residual layers (default 32)")
    p.add_argument("--width", type=positive_int, default=128, help="features / d_model / channels")
    p.add_argument("--batch", type=positive_int, default=64, help="rows (mlp), sequences, images")
    p.add_argument("--seq", type=positive_int, default=64, help="transformer sequence length")
    p.add_argument("--image", type=positive_int, default=8, help="resnet image side")
    p.add_argument(
        "--ks", type=nonneg_int_list, default=[0, 1, 2, 3], help="comma list, e.g. 0,1,2,3"
    )
    p.add_argument("--vjps", nargs="+", choices=("loop", "batched", LAYERWISE),
                   default=["loop", "batched"],
                   help=f"VJP backends to time ({LAYERWISE}: ResidualChain(layerwise_sweeps"
                        "=True), the lower-memory option)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--warmup", type=nonneg_int, default=1)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the subprocess peak-memory probes",
    )
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="only the deterministic tensor memory of each method (no timings, no RSS probes)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--out", type=out_file, default="results/deep/bench_deep.json", help="JSON path ('' = none)"
    )
    p.set_defaults(func=run)
