"""The autograd Function of one recurrent layer: a tape-free forward on the engine, and a
backward that runs the chosen method (exact BPTT, Highway-BP, FixedPoint) on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from highwaybp.core.iteration import Diagnostics
from highwaybp.core.methods import Method, register_method_function
from highwaybp.models.rnn.engine import BufferPool, Engine
from highwaybp.models.rnn.fused import fused_layer
from highwaybp.models.rnn.gru import GRUEngine
from highwaybp.models.rnn.loop import _check_finite, fast_iterate, reference_iterate
from highwaybp.models.rnn.lstm import LSTMEngine

FIRST_ORDER_ONLY = (
    "{what} through highwaybp.GRU/LSTM is unsupported: their forward and backward are "
    "hand-written on stored gates (for every method, Exact() included), not autograd "
    "graphs. Use torch.nn.GRU/LSTM (load_state_dict works both ways) for higher-order "
    "gradients and torch.func transforms."
)


def apply_layer(*args: Any):
    """`_LayerFunction.apply`, with a clear error under torch.func transforms."""
    try:
        return _LayerFunction.apply(*args)
    except RuntimeError as err:
        if "functorch" not in str(err) and "setup_context" not in str(err):
            raise
        raise RuntimeError(FIRST_ORDER_ONLY.format(what="torch.func transforms (grad, vmap, "
                                                   "jacrev, ...)")) from err


@dataclass
class _LayerRun:
    """Non-tensor arguments of one layer's forward, handed to the autograd Function."""

    owner: Any
    layer: int
    method: Method
    pool: BufferPool
    iterate: str = "fast"
    record_steps: bool = False  # the owner's record_step_norms at this forward
    engine: Optional[Engine] = field(default=None, repr=False)
    forward_path: str = "loop"  # "loop" (the engine's tape-free loop) or "fused" (torch's kernel)
    scan: str = "sequential"  # the engine's time scans: "sequential" or "log"
    split: str = "gate"  # what K_t is (engine.SPLITS)


def _make_engine(run: _LayerRun, x, h0, c0, w_ih, w_hh, b_ih, b_hh) -> Engine:
    if c0 is None:
        return GRUEngine(run.pool, x, h0, w_ih, w_hh, b_ih, b_hh, run.scan, run.split)
    return LSTMEngine(run.pool, x, h0, c0, w_ih, w_hh, b_ih, b_hh, run.scan, run.split)


@register_method_function
class _LayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        h0: Tensor,
        c0: Optional[Tensor],
        run: _LayerRun,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Optional[Tensor],
        b_hh: Optional[Tensor],
    ):
        eng = _make_engine(run, x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        fused = run.forward_path == "fused"
        if fused:  # torch's kernel, no tape; the backward recomputes the gates (`prepare`)
            out = fused_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
            y, c_last = (out, None) if c0 is None else out
            eng.use_fused_outputs(y)
        elif c0 is None:
            y, c_last = eng.forward()[1:], None
        else:
            states, c_last = eng.forward()
            y = states[1:]
        ctx.run, ctx.eng = run, eng
        # The loop's backward reads W_hh (block VJPs) and W_ih (dx) again; the gates it needs
        # are stored, so the biases, h0 and c0 are not read. The fused path's backward
        # recomputes the gates from all of them: they are saved (h0, c0) or version-checked
        # (the parameters, `_check_weight_versions`) too.
        params = (w_ih, w_hh, b_ih, b_hh)
        ctx.weight_versions = tuple(None if p is None else p._version for p in params)
        if fused:
            ctx.save_for_backward(x, y, h0, c0)
        else:
            ctx.save_for_backward(x, y)
        return y if c0 is None else (y, c_last)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_c: Optional[Tensor] = None):
        if torch.is_grad_enabled():  # the engine runs backward in grad mode iff create_graph
            raise RuntimeError(FIRST_ORDER_ONLY.format(what="backward(create_graph=True) "
                                                       "(double backward)"))
        eng: Optional[Engine] = ctx.eng
        if eng is None:
            raise RuntimeError(
                "backward through a highwaybp RNN a second time: its stored gates were released "
                "by the first backward. Run the forward again (retain_graph is not supported)."
            )
        run: _LayerRun = ctx.run
        try:
            ctx.saved_tensors  # noqa: B018 -- raises if x or the output was modified in place
            _check_weight_versions(run, eng, ctx.weight_versions, need_x=ctx.needs_input_grad[0])
            grads = _layer_backward(eng, run, grad_y, grad_c, ctx.needs_input_grad)
        finally:
            eng.release()
            ctx.eng = None
        return grads


def _check_weight_versions(
    run: _LayerRun, eng: Engine, versions: tuple[Optional[int], ...], need_x: bool
) -> None:
    """Refuse a backward whose weights changed in place since the forward, as torch.nn does.

    The backward multiplies by W_hh (and by W_ih for dx): after e.g. an optimizer.step()
    between the forward and this backward it would silently mix the new weights with the old
    gates, a gradient of no model. W_ih is read only when x needs a gradient (as in torch.nn)
    on the loop path; the fused path recomputes the gates from every parameter.
    """
    checks = [("weight_hh", eng.w_hh, versions[1])]
    fused = run.forward_path == "fused"  # recomputes the gates: reads every parameter
    if need_x or fused:
        checks.insert(0, ("weight_ih", eng.w_ih, versions[0]))
    if fused:
        checks += [(name, b, v) for name, b, v in (("bias_ih", eng.b_ih, versions[2]),
                                                   ("bias_hh", eng.b_hh, versions[3]))
                   if b is not None]  # fmt: skip
    for name, weight, saved in checks:
        if weight._version != saved:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: parameter {name}_l{run.layer} of highwaybp."
                f"{run.owner.mode} {list(weight.shape)} is at version {weight._version}; "
                f"expected version {saved} (its value at the forward). The backward reads "
                "this weight, so the gradient would mix the old and the new values. Call "
                "backward before optimizer.step() (or any in-place change of the parameters), "
                "or run the forward again."
            )


def _layer_backward(
    eng: Engine, run: _LayerRun, grad_y: Tensor, grad_c: Optional[Tensor], needs: tuple[bool, ...]
):
    lstm = isinstance(eng, LSTMEngine)
    eng.set_loss(grad_y, grad_c if lstm else None)
    eng.prepare()
    method = run.method
    if method.exact:
        w = eng.exact_backward(eng.new_state())
        _check_finite(eng, w, 0)
        diag = Diagnostics(method=repr(method), stop_reason="exact")
    elif run.iterate == "reference":
        w, diag = reference_iterate(eng, method, run.record_steps)
    else:
        w, diag = fast_iterate(eng, method, run.record_steps)
    dx, d_w_ih, d_w_hh, d_b_ih, d_b_hh = eng.param_grads(w, need_x=needs[0])
    dh0 = (w[1, 0] if lstm else w[0]).clone() if needs[1] else None
    dc0 = w[0, 0].clone() if lstm and needs[2] else None
    run.owner._record_diagnostics(run.layer, diag)
    return (
        dx,
        dh0,
        dc0,
        None,
        d_w_ih,
        d_w_hh,
        d_b_ih if needs[6] else None,
        d_b_hh if needs[7] else None,
    )


# ---- the modules ------------------------------------------------------------------------
