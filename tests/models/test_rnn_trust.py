"""highwaybp.GRU/LSTM refuse what torch.nn refuses, and accept what torch.nn accepts.

In-place changes of the weights between forward and backward (version counters), and the
drop-in surface: proj_size, dtype/device/empty-input errors, flatten_parameters, all_weights.
Each test compares with torch.nn's own behaviour on the same case.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.models.rnn import GRU, LSTM, CellRNN, GRUCellRef

T, B, IN, H = 6, 3, 4, 5
PAIRS = {"gru": (GRU, nn.GRU), "lstm": (LSTM, nn.LSTM)}
INPLACE = "modified by an inplace operation"


def _pair(cell: str, layers: int = 1, **kw):
    ours, theirs = PAIRS[cell]
    ref = theirs(IN, H, num_layers=layers).double()
    m = ours(IN, H, num_layers=layers, **kw).double()
    m.load_state_dict(ref.state_dict())
    return m, ref


# ---- parameters changed in place between forward and backward ---------------------------

METHODS = [
    hbp.Exact(),
    hbp.Highway(k=0),
    hbp.Highway(k=1),
    hbp.Highway(k=T),
    hbp.FixedPoint(k=2),
    hbp.Highway(tol=1e-12, max_k=2, fallback="exact"),
]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("iterate", ["fast", "reference"])
def test_second_backward_after_optimizer_step_raises_like_torch(cell, method, iterate):
    """Two forwards, backward, opt.step(), then the second backward: torch.nn raises, and so
    must we (the gradient read the stepped W_hh with the old gates: a gradient of no model).

    Fails on eab6026 (before this fix): the second backward ran silently, for every method.
    """
    torch.manual_seed(0)
    m, ref = _pair(cell, layers=2, method=method, iterate=iterate)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    for model in (ref, m):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        first = model(x)[0].square().sum()
        second = model(x)[0].sum()
        first.backward()
        opt.step()
        with pytest.raises(RuntimeError, match=INPLACE) as err:
            second.backward()
    text = str(err.value)
    assert f"highwaybp.{cell.upper()}" in text
    assert re.search(r"parameter weight_(ih|hh)_l1 ", text)  # layer 1's backward runs first
    assert "call backward before optimizer.step()" in text.lower()
    assert "run the forward again" in text


PARAM_NAMES = [
    f"{kind}_{side}_l{layer}"
    for layer in (0, 1)
    for kind in ("weight", "bias")
    for side in ("ih", "hh")
]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("name", PARAM_NAMES)
@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_inplace_change_of_one_parameter_is_refused_exactly_when_torch_refuses(
    cell, name, x_needs_grad
):
    """Raise iff torch.nn (float64) raises: W_hh always, W_ih when its layer's input needs a
    gradient; biases never (the stored gates already hold them). When neither raises, the
    gradient is torch's, i.e. that of the forward that ran.

    Fails on eab6026 (before this fix) for the weights torch refuses: no error there.
    """
    torch.manual_seed(1)
    m, ref = _pair(cell, layers=2, method=hbp.Highway(k=T))  # exact: torch's gradients
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=x_needs_grad)
    weights = torch.randn(T, B, H, dtype=torch.float64)
    outcomes = []
    for model in (ref, m):
        loss = (model(x)[0] * weights).sum()
        with torch.no_grad():
            getattr(model, name).add_(0.5)
        inputs = [*model.parameters(), *([x] if x_needs_grad else [])]
        try:
            outcomes.append(torch.autograd.grad(loss, inputs))
        except RuntimeError as e:
            assert INPLACE in str(e)
            outcomes.append(None)
    torch_raised, we_raised = outcomes[0] is None, outcomes[1] is None
    assert we_raised == torch_raised, (name, torch_raised)
    if not torch_raised:
        for got, want in zip(outcomes[1], outcomes[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    if "weight_hh" in name:  # the case of the issue: torch refuses, so must we
        assert we_raised


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_usual_training_loop_is_not_refused(cell):
    """forward, backward, step, forward, backward ... and a second backward of an earlier
    forward when no step came between: no false alarm, gradients as torch.nn's."""
    torch.manual_seed(2)
    m, ref = _pair(cell, method=hbp.Highway(k=T))
    x = torch.randn(T, B, IN, dtype=torch.float64)
    grads = []
    for model in (ref, m):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(x)[0].square().sum().backward()
            opt.step()
        first, second = model(x)[0].sum(), model(x)[0].square().sum()
        opt.zero_grad()
        first.backward()
        second.backward()  # no parameter changed since both forwards
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


# ---- drop-in surface ----------------------------------------------------------------------


def test_lstm_proj_size_zero_is_torch_default_and_positive_is_refused():
    """proj_size=0 works as in torch.nn.LSTM; > 0 says what to use; invalid values raise
    torch's ValueError. Fails on eab6026 (before this fix): proj_size was an unexpected
    keyword (TypeError), even 0."""
    torch.manual_seed(3)
    ref = nn.LSTM(IN, H, proj_size=0).double()
    m = LSTM(IN, H, proj_size=0).double()
    m.load_state_dict(ref.state_dict())
    assert m.proj_size == ref.proj_size == 0
    x = torch.randn(T, B, IN, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=0, atol=1e-12)
    with pytest.raises(NotImplementedError, match=r"proj_size=2.*torch\.nn\.LSTM"):
        LSTM(IN, H, proj_size=2)
    nn.LSTM(IN, H, proj_size=2)  # torch accepts it: the refusal is ours, and says so
    for bad in (-1, H):
        with pytest.raises(ValueError) as theirs:
            nn.LSTM(IN, H, proj_size=bad)
        with pytest.raises(ValueError) as ours:
            LSTM(IN, H, proj_size=bad)
        assert str(theirs.value) in str(ours.value)


def test_gru_proj_size_is_refused_as_in_torch():
    """torch.nn.GRU refuses proj_size (even 0) with a ValueError; so do we. Fails on eab6026
    (before this fix): TypeError (unexpected keyword)."""
    with pytest.raises(ValueError) as theirs:
        nn.GRU(IN, H, proj_size=0)
    with pytest.raises(ValueError) as ours:
        GRU(IN, H, proj_size=0)
    assert str(theirs.value) in str(ours.value)
    assert GRU(IN, H).proj_size == nn.GRU(IN, H).proj_size == 0


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize(
    ("module_dtype", "input_dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.half)],
)
def test_input_dtype_mismatch_names_the_fix_as_torch(cell, module_dtype, input_dtype):
    """Fails on eab6026 (before this fix): a raw "mat1 and mat2 must have the same dtype"."""
    ours, theirs = PAIRS[cell]
    x = torch.randn(T, B, IN, dtype=input_dtype)
    with pytest.raises(ValueError) as want:
        theirs(IN, H).to(module_dtype)(x)
    with pytest.raises(ValueError) as got:
        ours(IN, H).to(module_dtype)(x)
    fix = f"Convert input: input.to({module_dtype}), or convert model: model.to({input_dtype})"
    if "Convert input" in str(want.value):  # torch 2.5 words it "input must have the type"
        assert fix in str(want.value)
    assert fix in str(got.value)
    assert f"input dtype ({input_dtype}) does not match weight dtype ({module_dtype})" in str(
        got.value
    )


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_input_on_another_device_is_refused_as_torch(cell):
    ours, theirs = PAIRS[cell]
    x = torch.randn(T, B, IN)
    with pytest.raises(RuntimeError, match="not at the same device") as want:
        theirs(IN, H, device="meta")(x)
    with pytest.raises(RuntimeError, match="not at the same device") as got:
        ours(IN, H, device="meta")(x)
    assert "found input tensor at cpu and parameter tensor at meta" in str(want.value)
    assert "found input tensor at cpu and parameter tensor at meta" in str(got.value)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("shape", [(0, IN), "batched"], ids=["unbatched", "batched"])
def test_empty_sequence_raises_torch_error(cell, batch_first, shape):
    """An input with no time step: torch's RuntimeError text. Fails on eab6026 (before this
    fix): unbatched, a raw IndexError ("index -1 is out of bounds"); batched, a ValueError
    (not torch's RuntimeError)."""
    if shape == "batched":
        shape = (B, 0, IN) if batch_first else (0, B, IN)
    ours, theirs = PAIRS[cell]
    x = torch.randn(shape)
    with pytest.raises(RuntimeError) as want:
        theirs(IN, H, batch_first=batch_first)(x)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError) as got:
            ours(IN, H, batch_first=batch_first)(x)
        assert str(want.value) in str(got.value)
        assert str(tuple(shape)) in str(got.value)


def test_empty_batch_is_refused_with_what_to_do():
    m = GRU(IN, H)
    with pytest.raises(ValueError, match=r"batch size 0.*skip empty batches"):
        m(torch.randn(T, 0, IN))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_flatten_parameters_is_a_no_op_like_torch_on_cpu(cell):
    """Code written for torch.nn calls rnn.flatten_parameters(). Fails on eab6026 (before this
    fix): AttributeError."""
    torch.manual_seed(4)
    m, ref = _pair(cell, layers=2)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = list(m.parameters())
    assert m.flatten_parameters() is None and ref.flatten_parameters() is None
    assert all(a is b for a, b in zip(m.parameters(), params))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layers", [1, 3])
def test_all_weights_has_torch_structure(cell, bias, layers):
    """all_weights: per layer [w_ih, w_hh(, b_ih, b_hh)], the module's own parameters, in
    torch.nn's order. Fails on eab6026 (before this fix): AttributeError."""
    ours, theirs = PAIRS[cell]
    ref = theirs(IN, H, num_layers=layers, bias=bias)
    m = ours(IN, H, num_layers=layers, bias=bias)
    got, want = m.all_weights, ref.all_weights
    assert len(got) == len(want) == layers
    for names, ours_layer, theirs_layer in zip(ref._all_weights, got, want):
        assert [tuple(p.shape) for p in ours_layer] == [tuple(p.shape) for p in theirs_layer]
        assert all(p is getattr(m, name) for p, name in zip(ours_layer, names, strict=True))
        assert all(isinstance(p, nn.Parameter) for p in ours_layer)


# ---- CellRNN: the backward re-runs the cell ----------------------------------------------


class _ScaledGRUCell(GRUCellRef):
    """GRUCellRef with an input scale held as a buffer, a Python float and a dropout."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__(IN, H)
        self.register_buffer("in_scale", torch.ones(IN))
        self.py_scale = 1.0
        self.drop = nn.Dropout(p)

    def _gates(self, x, h):
        return super()._gates(self.drop(x * self.in_scale * self.py_scale), h)


def _cell_rnn_loss(cell, method=None):
    torch.manual_seed(5)
    rnn = CellRNN(cell, method or hbp.Highway(k=1))
    x = torch.randn(T, B, IN, dtype=torch.float64)
    h0 = torch.randn(B, H, dtype=torch.float64)
    return rnn(x, h0).square().sum()


@pytest.mark.parametrize("what", ["frozen_weight", "buffer"])
def test_cell_rnn_refuses_backward_after_inplace_change_of_untracked_tensors(what):
    """Frozen parameters and buffers are not saved tensors, so autograd did not see their
    in-place change, and the backward's re-run of the cell used the new values. Fails on
    eab6026 (before this fix): the gradient silently belonged to the changed cell."""
    cell = _ScaledGRUCell().double()
    name = {"frozen_weight": "weight_hh", "buffer": "in_scale"}[what]
    tensor = getattr(cell, name)
    tensor.requires_grad_(False)
    loss = _cell_rnn_loss(cell)
    with torch.no_grad():
        tensor.mul_(1.0 + 1e-12)  # tiny: only the version counter tells
    with pytest.raises(RuntimeError, match=rf"{INPLACE}: {name} of the CellRNN cell"):
        loss.backward()


@pytest.mark.parametrize("what", ["dropout", "python_state"])
def test_cell_rnn_refuses_a_cell_whose_rerun_differs(what):
    """A cell with dropout inside (other masks in the backward's batched re-run) or with
    Python state changed between forward and backward. Fails on eab6026 (before this fix):
    a silently wrong gradient."""
    cell = _ScaledGRUCell(p=0.5 if what == "dropout" else 0.0).double()
    loss = _cell_rnn_loss(cell)
    if what == "python_state":
        cell.py_scale = 2.0
    with pytest.raises(RuntimeError, match="deterministic function of"):
        loss.backward()


def test_cell_rnn_with_a_deterministic_cell_is_not_refused():
    """The same cell in eval mode (dropout off) passes the re-run check, in float32 too
    (batched vs per-step matmul rounding), and its Highway(k=T) gradient is the Exact one."""
    cell = _ScaledGRUCell(p=0.5).double().eval()
    grads = []
    for method in (hbp.Highway(k=T), hbp.Exact()):
        cell.zero_grad()
        _cell_rnn_loss(cell, method).backward()
        grads.append([p.grad.clone() for p in cell.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.manual_seed(6)
    cell32 = GRUCellRef(IN, 64)
    x, h0 = torch.randn(50, 8, IN), torch.randn(8, 64)
    CellRNN(cell32, hbp.Highway(k=2))(x, h0).square().sum().backward()


@pytest.mark.parametrize("cls", [GRU, LSTM])
def test_double_backward_and_torch_func_say_what_to_use(cls):
    """They gave torch's generic errors ("marked with @once_differentiable", "must override
    the setup_context staticmethod"), even with Exact() (found by the hostile review)."""
    rnn = cls(3, 4, method=hbp.Exact()).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = rnn(x)
    with pytest.raises(RuntimeError, match=r"double backward.*torch\.nn\.GRU/LSTM"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"torch\.func transforms.*torch\.nn\.GRU/LSTM"):
        torch.func.grad(lambda t: rnn(t)[0].sum())(x)
