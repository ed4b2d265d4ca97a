"""The in-place adapters carry every `ResidualChain` switch and work with every tool.

For each adapter (`from_huggingface` on tiny GPT-2, BERT and RoBERTa built offline from
config objects; `from_torchvision` on the torchvision-style replicas of resnet18/50):

- every keyword switch of `ResidualChain` (`SWITCHES`, read from its signature) set on the
  adapter has its effect on the chain the next forward runs (issue 18, item 3);
- `gradient_fidelity` and `KController` (every schedule kind, Adaptive's between-probe
  watch and a resume included) run on the adapted model (item 4);
- KController weights an adapted model by the layers of its chain (item 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

import highwaybp as hbp
from highwaybp import Exact, Highway, KController
from highwaybp.control import EXACT_SWEEPS
from highwaybp.core import chain as chain_module
from highwaybp.core.adapter import SWITCHES, ChainAdapter
from highwaybp.core.backends import VJP_BACKENDS, LoopVJP
from highwaybp.core.scan import SCANS, reverse_scan_hillis_steele
from highwaybp.models.torchvision import ResNetStage, resnet_stages
from highwaybp.schedules import Adaptive, Constant, Finish, Linear, Steps
from tests.models import tv_replicas

V, T, B = 13, 6, 3
HF = ("gpt2", "bert", "roberta")
ADAPTERS = (*HF, "resnet18", "resnet50")


@dataclass
class Case:
    model: nn.Module
    adapter: ChainAdapter
    loss: Callable[[nn.Module], Tensor]  # model -> scalar loss on fixed data
    length: int  # layers of the chain the adapter runs
    grow: Callable[[float], None]  # scale the residual branches' last weights by a factor


def _hf(kind: str, **switches) -> Case:
    transformers = pytest.importorskip("transformers")
    from highwaybp.models.huggingface import highway_stack

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2,
                                      n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg).double()
    else:
        config = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[kind]
        cfg = config(vocab_size=V + 3, hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                     num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # fmt: skip
        model_cls = {"bert": transformers.BertForSequenceClassification,
                     "roberta": transformers.RobertaForSequenceClassification}[kind]  # fmt: skip
        model = model_cls(cfg).double()
    hbp.from_huggingface(model, method=Highway(k=1), **switches)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0
    labels = torch.arange(B) % 3

    def loss(m: nn.Module) -> Tensor:
        if kind == "gpt2":
            return m(ids, attention_mask=mask, labels=ids, use_cache=False).loss
        return m(ids, attention_mask=mask, labels=labels).loss

    stack = highway_stack(model)

    def grow(factor: float) -> None:
        with torch.no_grad():
            for block in stack:
                if kind == "gpt2":
                    block.mlp.c_proj.weight.mul_(factor)
                    block.attn.c_proj.weight.mul_(factor)
                else:  # post-LN: the sub-layer's scale is normalised away, LN's gain is not
                    block.output.LayerNorm.weight.mul_(factor)
                    block.attention.output.LayerNorm.weight.mul_(factor)

    return Case(model, stack, loss, 2 * len(stack), grow)


def _tv(kind: str, **switches) -> Case:
    torch.manual_seed(0)
    build = {"resnet18": tv_replicas.resnet18, "resnet50": tv_replicas.resnet50}[kind]
    model = build(widths=(2, 3, 4, 5)).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    hbp.from_torchvision(model, method=Highway(k=1), **switches)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    w = torch.randn(3, 10, generator=g, dtype=torch.float64)
    head = resnet_stages(model)

    def grow(factor: float) -> None:
        with torch.no_grad():
            for _, block in head.blocks():
                last = block.bn3 if hasattr(block, "bn3") else block.bn2
                last.weight.mul_(factor)

    return Case(model, head, lambda m: (m(x) * w).sum(), len(head.blocks()), grow)


def _case(kind: str, **switches) -> Case:
    return _hf(kind, **switches) if kind in HF else _tv(kind, **switches)


def _backward(case: Case, method: hbp.Method, retain_graph: bool = False) -> Tensor:
    with hbp.use_method(case.model, method):
        loss = case.loss(case.model)
        loss.backward(retain_graph=retain_graph)
    return loss


# ---- item 3: every switch reaches the chain the adapter builds --------------------------


def test_the_switches_are_the_chains_keyword_options_and_each_has_a_test():
    assert SWITCHES == ("scan", "vjp", "preserve_rng_state", "recompute",
                        "record_step_norms", "layerwise_sweeps")  # fmt: skip
    assert set(SWITCH_EFFECTS) == set(SWITCHES)  # a new switch needs its effect tested here


def _record_step_norms(case: Case, monkeypatch) -> None:
    _backward(case, Highway(k=2))
    assert case.adapter.last_diagnostics.step_norms == []  # off by default: not computed
    case.adapter.record_step_norms = True
    _backward(case, Highway(k=2))
    norms = case.adapter.last_diagnostics.step_norms
    assert len(norms) == 2 and all(n > 0 for n in norms)


def _layerwise_sweeps(case: Case, monkeypatch) -> None:
    chunks: list[int] = []
    sweep = chain_module._ChainOps.layerwise_sweep

    def spy(self, w, g_rows, full=False, chunk=1):
        chunks.append(chunk)
        return sweep(self, w, g_rows, full, chunk)

    monkeypatch.setattr(chain_module._ChainOps, "layerwise_sweep", spy)
    _backward(case, Highway(k=2))
    assert chunks == [(case.length + 1) // 2] * 2  # off: the two-call sweep
    chunks.clear()
    case.adapter.layerwise_sweeps = True
    _backward(case, Highway(k=2))
    assert chunks == [1] * 2  # one autograd call per layer


def _vjp(case: Case, monkeypatch) -> None:
    made: list[int] = []

    class Spy(LoopVJP):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(len(self.layers))

    if isinstance(case.adapter, ResNetStage):
        # only vjp="loop" handles the projection shortcuts: another name is refused when
        # the chain is built, the registered "loop" is the one the chain takes
        case.adapter.vjp = "batched"
        with pytest.raises(ValueError, match="vjp='batched' is not supported"):
            _backward(case, Highway(k=1))
        case.adapter.vjp = "loop"
        monkeypatch.setitem(VJP_BACKENDS, "loop", Spy)
    else:
        monkeypatch.setitem(VJP_BACKENDS, "spy", Spy)
        _backward(case, Highway(k=1))
        assert made == []
        case.adapter.vjp = "spy"
    _backward(case, Highway(k=1))
    assert made == [case.length]


def _scan(case: Case, monkeypatch) -> None:
    calls: list[int] = []

    def spy(x, a=None):
        calls.append(x.shape[0])
        return reverse_scan_hillis_steele(x, a)

    monkeypatch.setitem(SCANS, "spy", spy)
    case.adapter.scan = "spy"
    if isinstance(case.adapter, ResNetStage):
        # the states change shape, so no stacked scan runs; the name reaches the chain,
        # which refuses it with the layer-by-layer sweeps (they scan sequentially)
        case.adapter.layerwise_sweeps = True
        with pytest.raises(ValueError, match="cannot use scan='spy'"):
            _backward(case, Highway(k=1))
        return
    _backward(case, Highway(k=2))
    assert calls and all(n == case.length + 1 for n in calls)


def _recompute(case: Case, monkeypatch) -> None:
    with hbp.use_method(case.model, Highway(k=1)):
        loss = case.loss(case.model)
        loss.backward(retain_graph=True)
        loss.backward()  # recompute=True: the saved inputs serve a second backward
        case.adapter.recompute = False
        loss = case.loss(case.model)
        assert case.adapter.last_chain.recompute is False
        loss.backward(retain_graph=True)
        # recompute=False: the forward recorded the layers' graphs, used up by one backward
        with pytest.raises(RuntimeError, match="a second time"):
            loss.backward()


def _preserve_rng_state(case: Case, monkeypatch) -> None:
    seen: list[bool] = []
    capture = chain_module.capture_forward_state

    def spy(h, preserve_rng_state, layer):
        seen.append(preserve_rng_state)
        return capture(h, preserve_rng_state, layer)

    monkeypatch.setattr(chain_module, "capture_forward_state", spy)
    _backward(case, Highway(k=1))
    assert seen == [True] * case.length
    seen.clear()
    case.adapter.preserve_rng_state = False
    _backward(case, Highway(k=1))
    assert seen == [False] * case.length


SWITCH_EFFECTS = {
    "record_step_norms": _record_step_norms,
    "layerwise_sweeps": _layerwise_sweeps,
    "vjp": _vjp,
    "scan": _scan,
    "recompute": _recompute,
    "preserve_rng_state": _preserve_rng_state,
}


@pytest.mark.parametrize("switch", sorted(SWITCH_EFFECTS))
@pytest.mark.parametrize("kind", ADAPTERS)
def test_each_switch_set_on_the_adapter_has_its_effect(kind, switch, monkeypatch):
    SWITCH_EFFECTS[switch](_case(kind), monkeypatch)


@pytest.mark.parametrize("kind", ["gpt2", "resnet18"])
def test_switches_given_to_the_adapter_function_reach_the_chain(kind):
    case = _case(kind, record_step_norms=True, recompute=False)
    assert case.adapter.record_step_norms and not case.adapter.recompute
    _backward(case, Highway(k=2))
    assert len(case.adapter.last_diagnostics.step_norms) == 2
    assert case.adapter.last_chain.recompute is False
    adapt = hbp.from_huggingface if kind in HF else hbp.from_torchvision
    adapt(case.model, method=Highway(k=2))  # re-configuring resets what is not given
    assert not case.adapter.record_step_norms and case.adapter.recompute
    with pytest.raises(TypeError, match=r"unknown chain option.*record_step_norm\b"):
        adapt(case.model, method=Highway(k=2), record_step_norm=True)
    with pytest.raises(ValueError, match="cannot use scan='hillis_steele'"):  # the chain's
        adapt(case.model, method=Highway(k=2), layerwise_sweeps=True, scan="hillis_steele")
    assert case.adapter.scan is None and not case.adapter.layerwise_sweeps  # unchanged


@pytest.mark.parametrize("switches", [
    {"layerwise_sweeps": True}, {"recompute": False}, {"scan": "hillis_steele"},
    {"record_step_norms": True, "recompute": False, "layerwise_sweeps": True},
], ids=["layerwise", "no-recompute", "hillis-steele", "three"])  # fmt: skip
@pytest.mark.parametrize("kind", ADAPTERS)
def test_with_any_switch_k_equal_L_is_exact(kind, switches):
    case = _case(kind, **switches)
    report = hbp.gradient_fidelity(case.model, case.loss, {"L": Highway(k=case.length)})
    assert report["L"]["rel_error"] < 1e-10
    assert all(getattr(case.adapter.last_chain, name) == value
               for name, value in switches.items() if name != "scan")  # fmt: skip
    assert case.adapter.last_chain.scan_name == switches.get("scan")


# ---- item 4: gradient_fidelity and KController on every adapter -------------------------


@pytest.mark.parametrize("kind", ADAPTERS)
def test_gradient_fidelity_reports_every_method_with_step_norms(kind):
    case = _case(kind)
    method_before = case.adapter.method
    report = hbp.gradient_fidelity(
        case.model, case.loss,
        {"full": Highway(k=case.length), "k1": Highway(k=1), "fp": hbp.FixedPoint(k=2)},
    )  # fmt: skip
    assert report["full"]["cosine"] == pytest.approx(1.0, abs=1e-10)
    assert report["full"]["rel_error"] < 1e-8
    assert report["k1"]["rel_error"] > 1e-6  # a truncation: not exact
    assert report["full"]["iterations"] == [case.length]
    assert report["k1"]["iterations"] == [1] and report["fp"]["iterations"] == [2]
    for name, n in (("full", case.length), ("k1", 1), ("fp", 2)):
        (norms,) = report[name]["step_norms"]
        assert len(norms) == n and all(v > 0 for v in norms[:1])
    assert case.adapter.method == method_before  # restored
    assert case.adapter.record_step_norms is False  # restored
    assert all(p.grad is None for p in case.model.parameters())


SCHEDULES = {
    "constant": Constant(Highway(k=2)),
    "steps": Steps({0: Highway(k=1), 2: Exact(), 3: hbp.FixedPoint(k=1)}),
    "linear": Linear(0, 2, 2),
    "finish": Finish(Linear(1, 3, 2), exact_last=1),
}


def _iterations(method: hbp.Method, length: int) -> int:
    return 0 if method.exact else min(method.k, length)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", ADAPTERS)
def test_kcontroller_follows_each_fixed_schedule(kind, name):
    case = _case(kind)
    schedule = SCHEDULES[name]
    steps = 4
    ctl = KController(case.model, schedule, total_steps=steps)
    for step in range(steps):
        method = ctl.step(step)
        assert case.adapter.method == method == schedule.method_at(step, steps)
        case.loss(case.model).backward()
        case.model.zero_grad()
    history = ctl.history
    assert [h["method"] for h in history] == [repr(schedule.method_at(t, steps))
                                              for t in range(steps)]  # fmt: skip
    for h, t in zip(history, range(steps)):
        method = schedule.method_at(t, steps)
        assert h["iterations"] == [_iterations(method, case.length)]
        expected = EXACT_SWEEPS if method.exact else _iterations(method, case.length) + 1
        assert h["sweeps"] == expected


def _adaptive_run(kind: str, steps: int, stop_at: int | None = None,
                  rise: float = 1.05) -> tuple[list[dict], dict, dict | None]:
    """Adaptive with one probe (step 0) on a model whose residual branches grow by 1.4x a
    step: the last iteration's step norm rises and the watch must raise k. `stop_at`:
    save the controller and the model there, rebuild both and resume from the save."""

    def build() -> Case:
        case = _case(kind)
        if kind not in HF:
            # BatchNorm with its running statistics: the branch's gain grows with its
            # weight (with batch statistics of 3 samples the step norms jump about)
            case.model.eval()
        return case

    case = build()
    schedule = Adaptive(target_cosine=0.5, probe_every=1000, k_min=1, k_max=4, rise=rise,
                        window=2)  # fmt: skip
    ctl = KController(case.model, schedule)
    saved = None
    for step in range(steps):
        if step == stop_at:
            saved = {"model": case.model.state_dict(), "ctl": ctl.state_dict()}
            case = build()
            case.model.load_state_dict(saved["model"])
            ctl = KController(case.model, schedule)
            ctl.load_state_dict(saved["ctl"])
            assert ctl.state_dict() == saved["ctl"]
        ctl.step(step, loss_fn=lambda c=case: c.loss(c.model))
        case.loss(case.model).backward()
        case.model.zero_grad()
        case.grow(1.4)
    return ctl.history, ctl.state_dict(), None if saved is None else saved["ctl"]


@pytest.mark.parametrize("kind", ADAPTERS)
def test_kcontroller_adaptive_watch_raises_k_between_probes_and_resumes(kind):
    history, state, _ = _adaptive_run(kind, steps=10)
    (probe,) = [h for h in history if "probed" in h]
    probed_k = int(probe["method"].split("=")[1].rstrip(")"))
    raised = [(h["step"], h["raised_to"]) for h in history if "raised_to" in h]
    assert raised and raised[0][1] == probed_k + 1, history
    # the probe's exact gradient counts 1 forward + 2 sweeps, as on a chain (the adapter
    # reports an exact backward), each Highway(k) 1 + k + 1
    assert probe["probe_sweeps"] == 3 + sum(k + 2 for k in probe["probed"])
    assert all(h["iterations"] for h in history)
    # the watch reads the step norms of the chain the adapter built: off, no raise
    quiet, _, _ = _adaptive_run(kind, steps=10, rise=float("inf"))
    assert not any("raised_to" in h for h in quiet)
    # a resume (model and controller rebuilt from their saved state) right before the
    # last raise, the window refilled since the one before: it must raise there too
    stop = raised[-1][0]
    assert stop - (raised[-2][0] if len(raised) > 1 else 0) >= 3
    resumed, resumed_state, saved = _adaptive_run(kind, steps=10, stop_at=stop)
    assert saved["adaptive"]["reference_step"] is not None
    assert resumed == history
    assert resumed_state == state


@pytest.mark.parametrize("kind", ["gpt2", "resnet18"])
def test_kcontroller_weights_an_adapted_model_by_its_chain_layers(kind):
    """An adapted model next to a plain 2-layer chain: Highway(k=3) runs 3 iterations on
    the adapter's chain (4 or 8 layers) and 2 on the short one (exact after L); the mean
    sweeps weight them by layers, as for two plain chains."""
    case = _case(kind)
    lin = nn.Linear(4, 4, bias=False).double()
    short = hbp.ResidualChain([hbp.ResidualLayer(lin), hbp.ResidualLayer(nn.Tanh())])
    both = nn.ModuleDict({"adapted": case.model, "short": short})
    x = torch.randn(3, 4, dtype=torch.float64)
    ctl = KController(both, Constant(Highway(k=3)))
    ctl.step(0)
    (case.loss(case.model) + short(x).sum()).backward()
    (entry,) = ctl.history
    assert entry["iterations"] == [3, 2]
    n = case.length
    assert entry["sweeps"] == pytest.approx((n * (3 + 1) + 2 * (2 + 1)) / (n + 2))


@pytest.mark.parametrize("kind", ["gpt2", "resnet18"])
def test_an_exact_forward_reports_an_exact_backward(kind):
    """As a chain under Exact: the adapter's report says exact (the controller counts 2
    sweeps), and a forward under no_grad keeps the last report."""
    case = _case(kind)
    _backward(case, Highway(k=1))
    assert case.adapter.last_diagnostics.iterations == 1
    with torch.no_grad():
        case.loss(case.model)
    assert case.adapter.last_diagnostics.iterations == 1
    _backward(case, Exact())
    assert case.adapter.last_diagnostics.stop_reason == "exact"
    assert case.adapter.last_chain is None
    case.adapter.last_diagnostics = None  # what the tools do before a measurement
    assert case.adapter.last_diagnostics is None
