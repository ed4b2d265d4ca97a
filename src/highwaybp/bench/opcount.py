"""Counted dispatches: the aten ops one training step dispatches, per forward and per backward.

On a GPU every dispatched op that computes is (at least) one kernel launch, whatever its
size; an RNN whose forward is a Python loop of small ops is then bound by launches, not by
FLOPs. Counting the ops is the device-independent measure of that, and it can be done on
this CPU: `OpCounter` is a `TorchDispatchMode` that records each aten op's name, its input
and output tensor shapes and dtype (the trace `highwaybp.bench.launchmodel` prices).

A call of torch's own fused RNN function (`torch._VF.gru` / `lstm` / `rnn_tanh` /
`rnn_relu`, what torch.nn.GRU/LSTM/RNN call: one cuDNN call on a GPU) counts as one op of
kind "fused_rnn", whatever it dispatches underneath on this device (on this CPU
torch.nn.GRU's forward is itself a loop of about 14 small ops per step; torch.nn.LSTM's is
one oneDNN op per layer). That is the forward: the backward of such a call is whatever
autograd dispatches for it on this device (on a GPU, one `_cudnn_rnn_backward` per call;
on this CPU the GRU cell's decomposed autograd ops, or `mkldnn_rnn_layer_backward` per
LSTM layer), counted raw.

Op kinds (`op_kind`): "view" (no kernel: views and aliases, `empty`), "sync" (a
device-to-host read such as `.item()`), "matmul" (the products `MATMUL_OPS`), "fused_rnn"
and "compute" (everything else: one kernel each on a GPU).

`highwaybp bench rnn --count-ops` runs `count_methods` at each --seq-len and writes JSON
(rendered by `highwaybp report`).
"""

from __future__ import annotations

import inspect
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# torch's fused RNN functions (torch.nn.RNNBase.forward calls them through torch._VF)
FUSED_RNN_FUNCTIONS = ("gru", "lstm", "rnn_tanh", "rnn_relu")
# products: FLOPs = 2 * numel(output) * K (`matmul_flops`)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
              "aten::addbmm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise",
              "aten::mv", "aten::addmv", "aten::addmv_", "aten::dot", "aten::vdot")
# ops whose bias (or accumulator) comes first: K is read from the second input
_BIAS_FIRST = ("aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::addbmm", "aten::addmv",
               "aten::addmv_")
# ops that launch nothing though their schema does not mark them as views
NO_KERNEL_OPS = ("aten::empty", "aten::empty_strided", "aten::new_empty",
                 "aten::new_empty_strided", "aten::unsafe_split", "aten::unsafe_chunk",
                 "aten::_unsafe_view", "aten::lift_fresh", "aten::empty_like",
                 "aten::_reshape_alias", "aten::resolve_conj", "aten::resolve_neg",
                 "aten::split_with_sizes", "aten::unsafe_split_with_sizes")
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
            "aten::equal", "aten::allclose")
KINDS = ("compute", "matmul", "view", "sync", "fused_rnn")


# the backward of a fused RNN call where it is one op (cuDNN; oneDNN's LSTM layer)
FUSED_BACKWARD_OPS = ("aten::_cudnn_rnn_backward", "aten::mkldnn_rnn_layer_backward",
                      "aten::_thnn_fused_lstm_cell_backward_impl")
# a fused RNN call that is one op underneath (what `fused:*` dispatched, one layer each)
FUSED_FORWARD_OPS = ("aten::_cudnn_rnn", "aten::mkldnn_rnn_layer")


def op_kind(name: str, is_view: bool = False) -> str:
    """The kind of an op by its qualified name (see the module docstring)."""
    if name.startswith("fused:") or name in FUSED_BACKWARD_OPS or name in FUSED_FORWARD_OPS:
        return "fused_rnn"
    if name in MATMUL_OPS:
        return "matmul"
    if name in SYNC_OPS:
        return "sync"
    if is_view or name in NO_KERNEL_OPS:
        return "view"
    return "compute"


Shape = tuple[int, ...]


@dataclass(frozen=True)
class OpSignature:
    """One op as the model prices it: name, tensor input/output shapes, element size, and
    for a product what a replay of it needs (`launchmodel.replay_product`): the strides of
    its tensor inputs (a CPU library's product runs up to 30x apart on the same shapes with
    another operand layout: results/rnn/launchmodel_miss/), its dtype and its non-tensor
    arguments (beta=0 skips reading the bias). Other ops are priced by their bytes, whatever
    their layout, and leave those empty; so does a product with an operand that is not a
    plain strided tensor (sparse, a conjugate view): it cannot be replayed."""

    name: str
    kind: str
    inputs: tuple[Shape, ...]
    outputs: tuple[Shape, ...]
    itemsize: int  # bytes per element of the first tensor input (or output)
    strides: tuple[Shape, ...] = ()  # of `inputs`, matmuls only
    dtype: str = ""  # of the first tensor input, matmuls only ("float32")
    scalars: tuple[tuple[str, Any], ...] = ()  # non-tensor arguments (name, value), matmuls

    @property
    def bytes(self) -> int:
        """Bytes read and written if each tensor operand is touched once (views: 0)."""
        if self.kind in ("view", "sync"):
            return 0
        return self.itemsize * sum(math.prod(s) for s in (*self.inputs, *self.outputs))

    @property
    def flops(self) -> float:
        """Matmul FLOPs (2 * numel(out) * K) for matmuls; 0 otherwise (elementwise ops are
        priced by their bytes; fused RNN calls by `launchmodel.fused_rnn_seconds`)."""
        return matmul_flops(self) if self.kind == "matmul" else 0.0

    def to_json(self) -> dict[str, Any]:
        """Shapes run-length encoded, [[shape, repeats], ...]: an unbind of T steps has T
        equal outputs."""
        d = {"name": self.name, "kind": self.kind, "inputs": _runs(self.inputs),
             "outputs": _runs(self.outputs), "itemsize": self.itemsize}
        if self.strides:
            d["strides"] = [list(s) for s in self.strides]
        if self.dtype:
            d["dtype"] = self.dtype
        if self.scalars:
            d["scalars"] = [list(s) for s in self.scalars]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OpSignature:
        """(Files counted before strides were recorded have none: their products are
        priced by shape alone.)"""
        return cls(d["name"], d["kind"], _unruns(d["inputs"]), _unruns(d["outputs"]),
                   d["itemsize"], tuple(tuple(s) for s in d.get("strides", ())),
                   d.get("dtype", ""), tuple((k, _plain(v)) for k, v in d.get("scalars", ())))


def _runs(shapes: tuple[Shape, ...]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for s in shapes:
        if out and out[-1][0] == list(s):
            out[-1][1] += 1
        else:
            out.append([list(s), 1])
    return out


def _unruns(runs: list[list[Any]]) -> tuple[Shape, ...]:
    return tuple(tuple(s) for s, n in runs for _ in range(n))


def matmul_flops(op: OpSignature) -> float:
    """2 * numel(output) * K, K the contracted size: the last dimension of the first matrix
    operand (the second input for the add-into ops, whose first is the bias)."""
    if not op.outputs:
        return 0.0
    operands = op.inputs[1:] if op.name in _BIAS_FIRST else op.inputs
    if not operands or not operands[0]:
        return 0.0
    k = operands[0][-1]
    return 2.0 * math.prod(op.outputs[0]) * k


@dataclass
class OpTrace:
    """The ops of one phase (a forward or a backward), aggregated by signature."""

    ops: Counter = field(default_factory=Counter)  # OpSignature -> calls

    def add(self, op: OpSignature, calls: int = 1) -> None:
        self.ops[op] += calls

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def by_kind(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for op, n in self.ops.items():
            out[op.kind] += n
        return out

    def by_name(self) -> dict[str, int]:
        out: Counter = Counter()
        for op, n in self.ops.items():
            out[op.name] += n
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_json(self, signatures: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"ops": self.total, "by_kind": self.by_kind(),
                             "by_name": self.by_name()}
        if signatures:
            d["signatures"] = [{**op.to_json(), "calls": n} for op, n in
                               sorted(self.ops.items(), key=lambda kv: (kv[0].name, -kv[1]))]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OpTrace:
        trace = cls()
        for s in d["signatures"]:
            trace.add(OpSignature.from_json(s), s["calls"])
        return trace


def _plain(value: Any) -> Any:
    """A hashable, JSON-stable form of an op's non-tensor argument: numbers, strings and
    booleans as they are, sequences as tuples, anything else by its repr."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return repr(value)


def _signature(name: str, kind: str, inputs: Any, outputs: Any) -> OpSignature:
    ins, size_in = _shapes(inputs)
    outs, size_out = _shapes(outputs)
    if kind != "matmul":
        return OpSignature(name, kind, ins, outs, size_in or size_out or 4)
    args, kwargs = inputs
    tensors = [t for t in tree_leaves(inputs) if isinstance(t, Tensor)]
    if not tensors or any(t.layout != torch.strided or t.is_conj() or t.is_neg()
                          for t in tensors):
        return OpSignature(name, kind, ins, outs, size_in or size_out or 4)
    scalars = [(f"#{i}", _plain(a)) for i, a in enumerate(args)
               if not isinstance(a, Tensor) and a is not None]
    scalars += [(k, _plain(v)) for k, v in sorted((kwargs or {}).items())
                if not isinstance(v, Tensor) and v is not None]
    return OpSignature(name, kind, ins, outs, size_in or size_out or 4,
                       tuple(tuple(t.stride()) for t in tensors),
                       str(tensors[0].dtype).removeprefix("torch."), tuple(scalars))


def _shapes(tree: Any) -> tuple[tuple[Shape, ...], int]:
    shapes, itemsize = [], 0
    for leaf in tree_leaves(tree):
        if isinstance(leaf, Tensor):
            shapes.append(tuple(leaf.shape))
            itemsize = itemsize or leaf.element_size()
    return tuple(shapes), itemsize


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        # inside a fused RNN call: what it dispatches on this device, kept apart
        target = self.counter.inner if self.counter.fused_depth else self.counter.trace
        target.add(_signature(name, op_kind(name, func.is_view), (args, kwargs), out))
        return out


class _Function(TorchFunctionMode):
    """Turns a call of torch's fused RNN function into one op (its inner dispatches are
    not counted)."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in FUSED_RNN_FUNCTIONS or self.counter.fused_depth:
            return func(*args, **(kwargs or {}))
        self.counter.fused_depth += 1
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.counter.fused_depth -= 1
        self.counter.trace.add(_signature(f"fused:{name}", "fused_rnn", (args, kwargs), out))
        self.counter.fused_meta.append(_fused_meta(name, args))
        return out


def _fused_meta(name: str, args: tuple) -> dict[str, Any]:
    """What the fused-kernel model needs of a torch._VF.gru/lstm call: x [T, B, In] (or
    batch first), the flat weights, layers, batch_first. torch calls these functions as
    (input, hx, flat_weights, has_biases, num_layers, dropout, train, bidirectional,
    batch_first)."""
    x, weights = args[0], args[2]
    num_layers, batch_first = int(args[4]), bool(args[8])
    shape = tuple(x.shape)
    seq_len, batch = (shape[1], shape[0]) if batch_first else (shape[0], shape[1])
    w_hh = weights[1]  # [G*H, H] of layer 0
    return {"function": name, "seq_len": seq_len, "batch": batch, "input_size": shape[-1],
            "hidden": int(w_hh.shape[1]), "gates": int(w_hh.shape[0]) // int(w_hh.shape[1]),
            "layers": num_layers, "itemsize": x.element_size()}


class OpCounter:
    """Context manager: every aten op dispatched inside is recorded into `trace`, except
    inside a call of torch's fused RNN function: that call is one op of `trace`, what it
    dispatches underneath goes to `inner`, and `fused_meta` holds its sizes.

        counter = OpCounter()
        with counter:
            y = model(x)
        counter.trace.total, counter.trace.by_name()
    """

    def __init__(self) -> None:
        self.trace = OpTrace()
        self.inner = OpTrace()  # what the fused RNN calls dispatched underneath, here
        self.fused_depth = 0
        self.fused_meta: list[dict[str, Any]] = []
        self._modes: list[Any] = []

    def __enter__(self) -> OpCounter:
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []


def count_step(fn: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor, gy: Tensor
               ) -> tuple[OpCounter, OpCounter]:
    """Counters of one training step's forward (`y = fn(x)`) and backward
    (`y.backward(gy)`), after one uncounted warm-up step (lazy initialisation, weight
    packing caches and buffer pools are not the step's ops)."""
    for _ in range(2):
        for p in params:
            p.grad = None
        fwd, bwd = OpCounter(), OpCounter()
        with fwd:
            y = fn(x)
        with bwd:
            y.backward(gy)
    return fwd, bwd


# ---- the module options of the GPU-shaped path (another branch adds them) ------------------

PATH_OPTIONS: dict[str, tuple[str, ...]] = {"forward": ("loop", "fused"),
                                            "scan": ("sequential", "log")}


def available_options(cls: type) -> dict[str, Optional[tuple[str, ...]]]:
    """Which of `PATH_OPTIONS` the module class `cls` accepts (None: not available), read
    from its constructor's signature and confirmed by building a tiny module with each
    value (a value the module refuses is left out)."""
    params = inspect.signature(cls.__init__).parameters
    out: dict[str, Optional[tuple[str, ...]]] = {}
    for option, values in PATH_OPTIONS.items():
        if option not in params:
            out[option] = None
            continue
        ok = []
        for value in values:
            try:
                cls(2, 2, **{option: value})
            except (TypeError, ValueError, NotImplementedError):
                continue
            ok.append(value)
        out[option] = tuple(ok) or None
    return out


def paths(cls: type) -> list[dict[str, str]]:
    """Every combination of the available options (one empty dict when none is: the
    module's only path, today's loop)."""
    combos: list[dict[str, str]] = [{}]
    for option, values in available_options(cls).items():
        if values:
            combos = [{**c, option: v} for c in combos for v in values]
    return combos


def path_label(path: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in path.items()) or "loop (only path)"


# ---- counting the bench's methods ------------------------------------------------------------


def build_counted(args: Any, name: str, ref: nn.Module, path: dict[str, str]
                  ) -> tuple[Callable[[Tensor], Tensor], list[Tensor]]:
    """The callable and parameters of method `name` (the bench's names: "torch",
    "hbp-exact", "highway(k=1)", ...) on `path`, with `ref`'s weights, on `ref`'s device."""
    from highwaybp.bench.rnn import _parse_method
    from highwaybp.models.rnn import GRU, LSTM

    if name == "torch":
        return (lambda x: ref(x)[0]), list(ref.parameters())
    _, method = _parse_method(name)
    cls = GRU if args.cell == "gru" else LSTM
    m = cls(args.input_size, args.hidden, num_layers=args.layers, method=method, **path)
    m.load_state_dict(ref.state_dict())
    m.to(next(ref.parameters()).device)
    return (lambda x: m(x)[0]), list(m.parameters())


def count_methods(args: Any, seq_len: int, names: list[str], device: str = "cpu",
                  shapes: bool = True) -> list[dict[str, Any]]:
    """One record per method and path: forward and backward op counts (total, by kind, by
    name, and with `shapes` the signatures the launch model prices) of one training step
    at `seq_len` with the bench's sizes, on `device`. torch.nn has one path; our methods one per
    `paths`."""
    from highwaybp.bench.rnn import _reference

    torch.manual_seed(args.seed)
    ref = _reference(args).to(device)
    x = torch.randn(seq_len, args.batch, args.input_size, device=device)
    gy = torch.randn(seq_len, args.batch, args.hidden, device=device)
    records = []
    for name, path, label in method_paths(args.cell, names):
        fn, params = build_counted(args, name, ref, path)
        fwd, bwd = count_step(fn, params, x, gy)
        records.append({
            "cell": args.cell, "seq_len": seq_len, "batch": args.batch,
            "hidden": args.hidden, "input_size": args.input_size, "layers": args.layers,
            "method": name, "path": label,
            "forward": {**fwd.trace.to_json(shapes), "fused_calls": fwd.fused_meta,
                        "fused_inner": fwd.inner.to_json(shapes) if fwd.fused_meta
                        else None},
            "backward": bwd.trace.to_json(shapes),
        })
    return records


def method_paths(cell: str, names: list[str]) -> list[tuple[str, dict[str, str], str]]:
    """(method name, path options, path label) for each of `names` on each of its paths:
    torch.nn ("torch") has one, labelled "torch.nn"; our methods every `paths` of the
    cell's module class."""
    ours = paths(module_class(cell))
    return [(name, path, "torch.nn" if name == "torch" else path_label(path))
            for name in names for path in ([{}] if name == "torch" else ours)]


def module_class(cell: str) -> type:
    """highwaybp's GRU or LSTM class for the bench's --cell."""
    from highwaybp.models.rnn import GRU, LSTM

    return GRU if cell == "gru" else LSTM



def count_names(ks: list[int]) -> list[str]:
    """The counted methods: torch.nn, our Exact, Highway(k) for each k."""
    return ["torch", "hbp-exact", *(f"highway(k={k})" for k in ks)]


def run_count_ops(args: Any, meta: dict[str, Any]) -> int:
    """`highwaybp bench rnn --count-ops`: `count_methods` at each --seq-len, printed and
    written to --out."""
    from highwaybp.files import atomic_write_text

    options = {k: (list(v) if v else "not available")
               for k, v in available_options(module_class(args.cell)).items()}
    print(f"count-ops: cell={args.cell} B={args.batch} H={args.hidden} In={args.input_size} "
          f"layers={args.layers}; module options {options}", flush=True)
    records = []
    for seq_len in args.seq_len:
        recs = count_methods(args, seq_len, count_names(args.k), shapes=args.op_shapes)
        for r in recs:
            print(f"  T={seq_len:5d} {r['method']:14s} {r['path']:18s} forward "
                  f"{r['forward']['ops']:7d} backward {r['backward']['ops']:7d}", flush=True)
        records += recs
    result = {
        "bench": "rnn_opcount",
        "meta": {**meta, "module_options": options,
                 "notes": "aten ops dispatched by one training step (forward: y = model(x); "
                          "backward: y.backward(gy)) after one uncounted step; a call of "
                          "torch's fused RNN function is one op (kind fused_rnn), what it "
                          "dispatches underneath on this device is in forward.fused_inner"},
        "records": records,
    }
    # with the op shapes the file is machine data (hundreds of signatures): one line
    atomic_write_text(args.out, json.dumps(result, indent=None if args.op_shapes else 1) + "\n")
    print(f"wrote {args.out}")
    return 0


# ---- rendering (`highwaybp report`) -------------------------------------------------------------


def render(path: Any, d: dict[str, Any]) -> list[str]:
    """docs/benchmarks.md's section of one `--count-ops` file: per method and path, the
    forward / backward ops at each T, and the ratio of the largest T's count to the
    smallest's (the issue's launch-boundness measure)."""
    from highwaybp.bench.report import _command_line, _table

    recs, meta = d["records"], d["meta"]
    r0 = recs[0]
    lens = sorted({r["seq_len"] for r in recs})
    by = {(r["method"], r["path"]): {} for r in recs}
    for r in recs:
        by[(r["method"], r["path"])][r["seq_len"]] = r
    options = ", ".join(f"{k}: {v if isinstance(v, str) else ', '.join(v)}"
                        for k, v in meta.get("module_options", {}).items())
    lines = [f"### Dispatched ops, {r0['cell'].upper()} batch {r0['batch']}, hidden "
             f"{r0['hidden']}, input {r0['input_size']}, layers {r0['layers']}: `{path}`", "",
             f"aten ops one training step dispatches (forward / backward), counted (not timed: "
             f"the same on every run). Module options of the GPU-shaped path: {options}. "
             "torch.nn's forward counts torch's fused RNN call as one op (one cuDNN call on a "
             "GPU); its backward is what this CPU dispatches for it.",
             *_command_line(meta.get("command"))]
    head = ["method", "path", *(f"T={t} fwd / bwd" for t in lens)]
    if len(lens) > 1:
        head += [f"fwd T={lens[-1]} / T={lens[0]}", f"bwd T={lens[-1]} / T={lens[0]}"]
    rows = []
    for (method, path_name), per in by.items():
        row = [method, path_name, *(f"{per[t]['forward']['ops']:,} / {per[t]['backward']['ops']:,}"
                                    if t in per else "-" for t in lens)]
        if len(lens) > 1 and lens[0] in per and lens[-1] in per:
            lo, hi = per[lens[0]], per[lens[-1]]
            row += [f"{hi['forward']['ops'] / lo['forward']['ops']:.1f}x",
                    f"{hi['backward']['ops'] / lo['backward']['ops']:.1f}x"]
        rows.append(row)
    return lines + _table(head, rows) + [""]
