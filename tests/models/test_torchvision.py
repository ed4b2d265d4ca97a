"""`from_torchvision`: torchvision-style ResNets trained with Highway-BP, unchanged as modules.

On structural replicas of torchvision's resnet18/resnet50 (tests/models/tv_replicas.py), in
float64: Highway(k = L) and FixedPoint(k = L) equal autograd, Exact() is autograd bit for
bit, BatchNorm running statistics after a Highway step equal those after an exact step,
`state_dict` is unchanged. The same checks run on the real `torchvision.models` when
torchvision imports (the skip reason is reported otherwise).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.models.torchvision import ResNetStage, from_torchvision, resnet_stages
from tests.models import tv_replicas

SMALL = {
    "resnet18": lambda: tv_replicas.resnet18(widths=(4, 6, 8, 10)),
    "resnet50": lambda: tv_replicas.resnet50(widths=(2, 3, 4, 5)),
}


def _num_blocks(model: nn.Module) -> int:
    return sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))


def _model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = tv_replicas.resnet18(**kwargs) if kwargs else SMALL[name]()
    model = model.double()
    # Non-trivial BatchNorm affine parameters and running statistics.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    return model


def _data(seed: int = 1, batch: int = 3, side: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, side, side, generator=g, dtype=torch.float64)
    w = torch.randn(batch, 10, generator=g, dtype=torch.float64)
    return x, w


def _step(model: nn.Module, x: torch.Tensor, w: torch.Tensor):
    """One backward of a random linear loss; returns (output, [dx, *param grads])."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * w).sum().backward()
    return out.detach(), [x.grad, *(p.grad for p in model.parameters())]


def _max_diff(a: list, b: list) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["highway", "fixedpoint"])
def test_k_equal_L_equals_autograd(name, mode, kind):
    reference = _model(name).train(mode == "train")
    x, w = _data()
    _, exact = _step(reference, x, w)
    model = _model(name).train(mode == "train")
    num_layers = _num_blocks(model)
    method = hbp.Highway(k=num_layers) if kind == "highway" else hbp.FixedPoint(k=num_layers)
    from_torchvision(model, method=method)
    _, grads = _step(model, x, w)
    assert len(grads) == len(exact) and all(g is not None for g in grads)
    assert _max_diff(grads, exact) < 1e-9
    # The Highway backward ran (not a fall-through to autograd), with all L iterations.
    diag = resnet_stages(model).last_diagnostics
    assert diag is not None and diag.iterations == num_layers


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_small_k_differs_from_autograd(name):
    """The k = L equality above is not vacuous: k = 1 gives another gradient."""
    x, w = _data()
    _, exact = _step(_model(name), x, w)
    model = from_torchvision(_model(name), method=hbp.Highway(k=1))
    _, grads = _step(model, x, w)
    assert _max_diff(grads, exact) > 1e-3


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_exact_is_bitwise_autograd(name, mode):
    x, w = _data()
    out_ref, exact = _step(_model(name).train(mode == "train"), x, w)
    model = from_torchvision(_model(name).train(mode == "train"), method=hbp.Exact())
    out, grads = _step(model, x, w)
    assert torch.equal(out, out_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, exact))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_highway_forward_is_bitwise_the_original_function(name):
    """The cast ReLU(body(x) + shortcut(x)) computes each block's forward op for op."""
    x, w = _data()
    out_ref, _ = _step(_model(name), x, w)
    model = from_torchvision(_model(name), method=hbp.Highway(k=2))
    out, _ = _step(model, x, w)
    assert torch.equal(out, out_ref)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_running_statistics_after_highway_step_equal_exact_step(name):
    x, w = _data()
    reference = _model(name)
    before = copy.deepcopy(reference.state_dict())
    _step(reference, x, w)
    model = from_torchvision(_model(name), method=hbp.Highway(k=2))
    _step(model, x, w)
    after_exact, after_highway = reference.state_dict(), model.state_dict()
    buffers = [k for k in after_exact if "running" in k or "num_batches" in k]
    shortcut_buffers = [k for k in buffers if "downsample" in k]
    assert shortcut_buffers  # the projection shortcuts' BatchNorm is covered
    for key in buffers:
        assert not torch.equal(after_exact[key], before[key]), key  # the step updated it
        assert torch.equal(after_highway[key], after_exact[key]), key


def test_state_dict_round_trip():
    plain = _model("resnet50")
    adapted = from_torchvision(_model("resnet50", seed=5), method=hbp.Highway(k=2))
    assert list(adapted.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in adapted.named_parameters()] == [n for n, _ in plain.named_parameters()]
    adapted.load_state_dict(plain.state_dict())
    x, _ = _data()
    with torch.no_grad():
        assert torch.equal(adapted.eval()(x), plain.eval()(x))
    fresh = _model("resnet50", seed=9)
    fresh.load_state_dict(adapted.state_dict())
    for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_adapting_twice_reconfigures():
    model = from_torchvision(_model("resnet18"), method=hbp.Highway(k=1))
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    keys = list(model.state_dict())
    from_torchvision(model, method=hbp.FixedPoint(k=3))
    assert [model.layer1, model.layer2, model.layer3, model.layer4] == stages  # not re-wrapped
    assert list(model.state_dict()) == keys
    assert resnet_stages(model).method == hbp.FixedPoint(k=3)
    assert all(not isinstance(b, ResNetStage) for b in model.layer1)
    x, w = _data()
    _step(model, x, w)
    assert resnet_stages(model).last_diagnostics.method == "FixedPoint(k=3)"


def test_use_method_switches_and_gradient_fidelity_measures():
    model = from_torchvision(_model("resnet18"), method=hbp.Highway(k=1))
    x, w = _data()
    report = hbp.gradient_fidelity(
        model, lambda m: (m(x) * w).sum(), {"k8": hbp.Highway(k=8), "k1": hbp.Highway(k=1)}
    )
    assert report["k8"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert report["k1"]["rel_error"] > 1e-3
    assert report["k8"]["iterations"] == [8]
    assert resnet_stages(model).method == hbp.Highway(k=1)  # restored


def test_deepcopy_of_adapted_model_is_independent():
    model = from_torchvision(_model("resnet18"), method=hbp.Highway(k=8))
    clone = copy.deepcopy(model)
    assert clone.layer2.head is clone.layer1 and clone.layer1 is not model.layer1
    x, w = _data()
    _, exact = _step(_model("resnet18"), x, w)
    _, grads = _step(clone, x, w)
    assert _max_diff(grads, exact) < 1e-9
    assert resnet_stages(clone).last_diagnostics.iterations == 8
    assert resnet_stages(model).last_diagnostics is None


def test_stage_indexing_and_slicing():
    model = from_torchvision(_model("resnet18"), method=hbp.Highway(k=2))
    part = model.layer2[0:1]
    assert type(part) is nn.Sequential and part[0] is model.layer2[0]
    assert len(model.layer3) == 2


def test_zero_init_residual():
    x, w = _data()
    reference = _model("", zero_init_residual=True, widths=(4, 6, 8, 10))
    _, exact = _step(reference, x, w)
    model = from_torchvision(
        _model("", zero_init_residual=True, widths=(4, 6, 8, 10)), method=hbp.Highway(k=8)
    )
    _, grads = _step(model, x, w)
    assert _max_diff(grads, exact) < 1e-9


def test_channels_last_input_and_model():
    x, w = _data()
    x = x.contiguous(memory_format=torch.channels_last)
    reference = _model("resnet18").to(memory_format=torch.channels_last)
    _, exact = _step(reference, x, w)
    model = from_torchvision(
        _model("resnet18").to(memory_format=torch.channels_last), method=hbp.Highway(k=8)
    )
    _, grads = _step(model, x, w)
    assert _max_diff(grads, exact) < 1e-9


def test_no_grad_and_eval_run_the_original_blocks():
    model = from_torchvision(_model("resnet18"), method=hbp.Highway(k=2))
    x, _ = _data()
    with torch.no_grad():
        out = model.eval()(x)
        ref = _model("resnet18").eval()(x)
    assert torch.equal(out, ref)
    assert resnet_stages(model).last_diagnostics is None


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


def test_non_resnet_model_is_refused():
    with pytest.raises(TypeError, match="layer1, layer2, layer3, layer4"):
        from_torchvision(nn.Sequential(nn.Linear(3, 3)))
    model = _model("resnet18")
    del model.layer3
    with pytest.raises(TypeError, match=r"no ResNet stage.*layer3"):
        from_torchvision(model)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        from_torchvision("resnet18")


def test_block_with_another_forward_is_refused_by_name():
    class MyBlock(tv_replicas.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    model = _model("resnet18")
    model.layer2[1] = MyBlock(6, 6)
    with pytest.raises(TypeError, match=r"layer2\.1 \(MyBlock"):
        from_torchvision(model)


def test_non_relu_activation_is_refused():
    model = _model("resnet18")
    model.layer3[0].relu = nn.SiLU()
    with pytest.raises(TypeError, match=r"layer3\.0\.relu is SiLU"):
        from_torchvision(model)


def test_batched_vjp_is_refused():
    with pytest.raises(ValueError, match="vjp='loop'"):
        from_torchvision(_model("resnet18"), method=hbp.Highway(k=1), vjp="batched")


def test_hooks_on_block_submodules_are_refused_under_highway():
    model = from_torchvision(_model("resnet18"), method=hbp.Highway(k=2))
    calls = []
    handle = model.layer2[0].conv1.register_forward_hook(lambda *a: calls.append(1))
    x, w = _data()
    with pytest.raises(RuntimeError, match=r"layer2\.0\.conv1 has hooks"):
        _step(model, x, w)
    resnet_stages(model).method = hbp.Exact()
    _step(model, x, w)  # with autograd the original blocks run, hooks and all
    assert calls == [1]
    handle.remove()
    resnet_stages(model).method = hbp.Highway(k=2)
    model.layer4.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="layer4 has hooks"):
        _step(model, x, w)


def test_stages_called_out_of_order_are_refused():
    model = from_torchvision(_model("resnet18"), method=hbp.Highway(k=2))
    x, _ = _data()
    stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    h1 = model.layer1(stem)
    with pytest.raises(RuntimeError, match="layer2 must be called right after"):
        model.layer2(h1 * 1.0)  # layer2 on another tensor than layer1's output


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_a_loss_that_reads_intermediate_stage_outputs_gets_autograds_gradient(name):
    """Feature-extractor / skip-connection style: the loss reads layer1's and layer2's
    outputs and layer3/layer4 are never called. layer1 used to return the output of all
    four stages, so this ran without error and gave the stem a 10x wrong gradient (found
    by the hostile review). Every stage output is now a state of the chain."""
    reference = _model(name)
    model = from_torchvision(copy.deepcopy(reference),
                             method=hbp.Highway(k=_num_blocks(reference)))
    x, _ = _data()
    grads = []
    for m in (reference, model):
        stem = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        a = m.layer1(stem)
        b = m.layer2(a)
        ((a ** 2).mean() + b.sum()).backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad for p in m.parameters()])
    assert _max_diff(grads[0], grads[1]) < 1e-9


# ---------------------------------------------------------------------------------------
# timm naming (act1/act2, drop_block, aa, se, drop_path) and the real torchvision
# ---------------------------------------------------------------------------------------


def test_timm_style_blocks():
    x, w = _data()
    reference = tv_replicas.timm_style_resnet18(widths=(4, 6, 8, 10)).double()
    model = copy.deepcopy(reference)
    _, exact = _step(reference, x, w)
    from_torchvision(model, method=hbp.Highway(k=8))
    _, grads = _step(model, x, w)
    assert _max_diff(grads, exact) < 1e-9
    assert resnet_stages(model).last_diagnostics.iterations == 8


def _torchvision():
    try:
        import torchvision  # noqa: F401
        from torchvision import models
    except Exception as err:  # ImportError, or a RuntimeError from a CUDA-built wheel
        pytest.skip(f"torchvision unavailable: {type(err).__name__}: {err}")
    return models


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_real_torchvision_resnet(name):
    models = _torchvision()
    torch.manual_seed(0)
    reference = getattr(models, name)(num_classes=10).double()
    model = copy.deepcopy(reference)
    keys = list(model.state_dict())
    x, w = _data(side=32, batch=2)
    _, exact = _step(reference, x, w)
    num_layers = _num_blocks(model)
    from_torchvision(model, method=hbp.Highway(k=num_layers))
    assert list(model.state_dict()) == keys
    _, grads = _step(model, x, w)
    assert _max_diff(grads, exact) < 1e-9
    before = copy.deepcopy(model.state_dict())
    model.load_state_dict(reference.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values()))
    assert before.keys() == model.state_dict().keys()


def test_replica_state_dict_keys_match_torchvision():
    models = _torchvision()
    for name in ("resnet18", "resnet50"):
        real = list(getattr(models, name)(num_classes=10).state_dict())
        assert list(getattr(tv_replicas, name)().state_dict()) == real
