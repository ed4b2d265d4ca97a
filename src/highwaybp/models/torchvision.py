"""Highway-BP through the residual stages of a torchvision (or timm) ResNet, in place.

    model = torchvision.models.resnet18(num_classes=10)
    highwaybp.from_torchvision(model, method=highwaybp.Highway(k=3))
    F.cross_entropy(model(images), labels).backward()

`from_torchvision` finds the stages `layer1`..`layer4` (each an `nn.Sequential` of
`BasicBlock` / `Bottleneck` modules) and swaps each `nn.Sequential` for a `ResNetStage`
holding the *same* block modules under the same names, so parameter names, `state_dict`
and weight loading are unchanged. When the model's forward calls `layer1` with gradients
enabled and a non-exact method, all the blocks of all stages run as one `ResidualChain`
(L = number of blocks: 8 for resnet18, 16 for resnet50), each block i cast as

    f_i(x) = ReLU(body_i(x) + S_i(x)),

with body_i the block's conv-BN-ReLU-...-BN path and S_i its shortcut:

- identity shortcut: `ReLUResidual()`, K = diag(ReLU'(.));
- projection shortcut (`downsample`, 1x1 conv + BatchNorm, stride 2): `ModuleShortcut(
  downsample, relu=True)`, K = diag(ReLU'(.)) dS/dx, applied as the VJP of `downsample`.

`layer1` then returns the chain's output and `layer2`..`layer4` pass it through (they
check that they receive exactly that tensor). Stem, pooling and head stay with autograd.
With `Exact()` or under `torch.no_grad()` the original blocks run unchanged
(bit-identical to the unadapted model).

Duck-typed: blocks are recognised by their forward (defined by a class named `BasicBlock`
or `Bottleneck`) and their submodules, with torchvision's names (conv1, bn1, relu, conv2,
bn2, [conv3, bn3], downsample) or timm's (conv1, bn1, drop_block, act1, aa, conv2, bn2,
[act2, conv3, bn3], se, drop_path, act2/act3, downsample). Anything else raises an error
naming the module.

Limits: under Highway/FixedPoint the stages must be called in order, each on the previous
one's output (as the ResNet forward does). A loss may also read intermediate stage outputs
(feature extractors, skips): each stage's output is a state of the one chain, so it is a
per-state loss. Stages never called still run in layer1's chain and get zero gradients
(autograd would leave them None). Hooks on the stages, blocks or their submodules are refused (the
Highway backward re-runs the blocks; hooks would see a different call pattern). The VJP
backend is "loop" (projection shortcuts have a general K; vjp="batched" is refused).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import Tensor, nn

from highwaybp.core.adapter import ChainAdapter
from highwaybp.core.chain import ResidualChain
from highwaybp.core.methods import Exact, Method, check_method
from highwaybp.core.residual import ModuleShortcut, ReLUResidual, ResidualLayer

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")

# Block layouts: (forward's class name, naming) -> (body steps in forward order, final
# activation). None-valued optional steps (timm's se, drop_path) are skipped, as the
# block's forward skips them.
_LAYOUTS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("BasicBlock", "torchvision"): (("conv1", "bn1", "relu", "conv2", "bn2"), "relu"),
    ("Bottleneck", "torchvision"): (
        ("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"),
        "relu",
    ),
    ("BasicBlock", "timm"): (
        ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se", "drop_path"),
        "act2",
    ),
    ("Bottleneck", "timm"): (
        ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3",
         "se", "drop_path"),
        "act3",
    ),
}
_OPTIONAL = ("se", "drop_path", "downsample")


class _Body(nn.Sequential):
    """A block's residual branch: its own submodules in its forward's order."""


def cast_block(block: nn.Module, name: str = "block") -> ResidualLayer:
    """The `ResidualLayer` computing `block`'s function from its own submodules.

    Raises TypeError (naming `name`) for a block whose layout is not a torchvision/timm
    BasicBlock or Bottleneck with ReLU activations.
    """
    steps, _ = _layout(block, name)
    body = _Body(*[getattr(block, s) for s in steps if getattr(block, s, None) is not None])
    downsample = getattr(block, "downsample", None)
    if downsample is None:
        return ResidualLayer(body, ReLUResidual())
    return ResidualLayer(body, ModuleShortcut(downsample, relu=True))


def _layout(block: nn.Module, name: str) -> tuple[tuple[str, ...], str]:
    forward = getattr(type(block), "forward", None)
    # The class that defines forward (a subclass overriding it is not recognised).
    parts = getattr(forward, "__qualname__", "").split(".")
    owner = parts[-2] if len(parts) >= 2 else ""
    naming = "timm" if hasattr(block, "act1") else "torchvision"
    layout = _LAYOUTS.get((owner, naming))
    if layout is None:
        raise TypeError(
            f"from_torchvision: {name} ({type(block).__name__}, forward defined by "
            f"{owner or '?'}) is not a torchvision/timm BasicBlock or Bottleneck; its function "
            "cannot be cast as ReLU(body(x) + shortcut(x)). Wrap such blocks yourself with "
            "highwaybp.ResidualLayer(body, highwaybp.ModuleShortcut(shortcut, relu=True))"
        )
    steps, final = layout
    required = [s for s in (*steps, final) if s not in _OPTIONAL]
    missing = [s for s in required if not isinstance(getattr(block, s, None), nn.Module)]
    if not hasattr(block, "downsample"):
        missing.append("downsample")
    if missing:
        raise TypeError(
            f"from_torchvision: {name} ({type(block).__name__}) lacks the submodule(s) "
            f"{', '.join(missing)} of a {naming} {owner}"
        )
    for s in _OPTIONAL:
        value = getattr(block, s, None)
        if value is not None and not isinstance(value, nn.Module):
            raise TypeError(
                f"from_torchvision: {name}.{s} is a {type(value).__name__}, not a module"
            )
    activations = {s for s in steps if s.startswith(("relu", "act"))} | {final}
    for s in sorted(activations):
        if type(getattr(block, s)) is not nn.ReLU:
            raise TypeError(
                f"from_torchvision: {name}.{s} is {type(getattr(block, s)).__name__}, not "
                "nn.ReLU; the cast (K = diag(ReLU'(.)) ...) needs ReLU activations"
            )
    return steps, final


class ResNetStage(ChainAdapter, nn.Sequential):
    """One stage (`layer1`..`layer4`) of an adapted ResNet: the same blocks, same names.

    The first stage owns the configuration: `method` (switchable, also by
    `highwaybp.use_method`) and every `ResidualChain` switch (`vjp`, `scan`,
    `record_step_norms`, `layerwise_sweeps`, `recompute`, `preserve_rng_state`: attributes
    of the same names, read at each forward), and reports `last_diagnostics` (any stage
    reads the first's; see `highwaybp.core.adapter.ChainAdapter`). Under a non-exact
    method with gradients enabled, the first stage runs the blocks of all stages as one
    `ResidualChain`; the later stages pass that output through.
    """

    def __init__(self, stage: nn.Sequential, index: int, head: Optional[ResNetStage]) -> None:
        super().__init__(OrderedDict(stage.named_children()))
        self.index = index
        # Plain lists: the other stages must not become submodules (state_dict unchanged).
        self._head: list[ResNetStage] = [] if head is None else [head]
        self._stages: list[ResNetStage] = []
        self._pending: list[tuple[Tensor, int, int]] = []  # (output, version, next index)
        if head is None:
            self._configure(Exact())

    def __getitem__(self, idx: int | slice) -> nn.Module:
        if isinstance(idx, slice):  # a plain Sequential of those blocks (not a stage)
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    # -- configuration (first stage) ----------------------------------------------------

    @property
    def head(self) -> ResNetStage:
        return self._head[0] if self._head else self

    def _owner(self) -> ResNetStage:
        return self.head

    @property
    def num_chain_layers(self) -> int:
        return len(self.blocks())  # one chain layer per block, all stages

    def _check_switches(self, switches: dict) -> None:
        if switches["vjp"] != "loop":
            raise ValueError(
                f"from_torchvision: vjp={switches['vjp']!r} is not supported: the projection "
                "shortcuts have a general (shape-changing) K, which only vjp='loop' handles"
            )

    def configure(self, method: Method, **switches: Any) -> None:
        """Set the method and the chain switches (those not given: their defaults)."""
        self.head._configure(method, **switches)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """(qualified name, block) of every block of every stage, in order."""
        return [
            (f"{STAGE_NAMES[s.index]}.{n}", b) for s in self.head._stages
            for n, b in s.named_children()
        ]

    def build_chain(self) -> ResidualChain:
        """The `ResidualChain` of all blocks (built per call: it reflects the current blocks)."""
        return self._chain_of([cast_block(b, n) for n, b in self.blocks()])

    # -- forward ------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        head = self.head
        if self.index == 0:
            head._pending.clear()
            if head.method.exact or not torch.is_grad_enabled():
                self._ran_original(torch.is_grad_enabled() and (x.requires_grad or any(
                    p.requires_grad for s in head._stages for p in s.parameters())))
                return super().forward(x)
            self._check_no_hooks()
            chain = self._running(self.build_chain())
            # Every stage's output is a state of the one chain (returned by the chain's
            # Function, so a loss that also reads layer1's output, as feature extractors
            # do, is a per-state loss of the iteration, not a silently dropped one).
            bounds, total = [], 0
            for stage in head._stages:
                total += len(list(stage.children()))
                bounds.append(total)
            outs = chain(x, return_states=bounds)
            head._pending[:] = [(outs, [o._version for o in outs], 1)]
            return outs[0]
        if not head._pending:
            # Exact mode (or no grad): the stage is its plain blocks.
            return super().forward(x)
        outs, versions, expected = head._pending[0]
        prev = outs[self.index - 1] if self.index - 1 < len(outs) else None
        if (expected != self.index or x is not prev
                or x._version != versions[self.index - 1]):
            head._pending.clear()
            raise RuntimeError(
                f"from_torchvision: under {head.method!r}, layer1 runs the blocks of all "
                f"stages as one chain, so {STAGE_NAMES[self.index]} must be called right after "
                f"the previous stage on its unchanged output; this model's forward does "
                "something else (e.g. calls a stage twice or on another tensor). Use "
                "method=Exact() for it."
            )
        if self.index == len(head._stages) - 1:
            head._pending.clear()
        else:
            head._pending[:] = [(outs, versions, self.index + 1)]
        return outs[self.index]

    def _check_no_hooks(self) -> None:
        for stage in self.head._stages:
            for name, m in stage.named_modules():
                if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(
                    m, "_backward_pre_hooks", None
                ):
                    where = STAGE_NAMES[stage.index] + (f".{name}" if name else "")
                    raise RuntimeError(
                        f"from_torchvision: {where} has hooks; under Highway/FixedPoint the "
                        "blocks run as one chain whose backward re-runs them, so the hooks "
                        "would not see the calls they expect. Remove them or use "
                        "method=Exact()."
                    )

    def extra_repr(self) -> str:
        if self._head:
            return f"index={self.index}"
        return f"index=0, method={self.method!r}, vjp={self.vjp}, scan={self.scan}"


def _find_stages(model: nn.Module) -> list[nn.Module]:
    missing = [n for n in STAGE_NAMES if not isinstance(getattr(model, n, None), nn.Sequential)]
    if missing:
        raise TypeError(
            f"from_torchvision: {type(model).__name__} has no ResNet stage(s) "
            f"{', '.join(missing)} (nn.Sequential of BasicBlock/Bottleneck): "
            "supported are torchvision-style ResNets with layer1..layer4 (torchvision.models."
            "resnet*, wide_resnet*, timm ResNets of that shape)"
        )
    stages = [getattr(model, n) for n in STAGE_NAMES]
    for n, stage in zip(STAGE_NAMES, stages):
        if not len(stage):
            raise TypeError(f"from_torchvision: {type(model).__name__}.{n} holds no blocks")
        for i, block in stage.named_children():
            _layout(block, f"{n}.{i}")
    return stages


def from_torchvision(
    model: nn.Module,
    method: Optional[Method] = None,
    **switches: Any,
) -> nn.Module:
    """Make a torchvision-style ResNet's residual stages train with Highway-BP (in place).

    Args:
        model: a ResNet with stages `layer1`..`layer4` of BasicBlock/Bottleneck modules
            (`torchvision.models.resnet18/34/50/...`, `wide_resnet*`, timm ResNets with
            ReLU activations).
        method: the gradient method (default `Exact()`); switch later with
            `highwaybp.use_method(model, ...)` or `resnet_stages(model).method = ...`.
        **switches: any keyword switch of `ResidualChain` (scan, recompute,
            record_step_norms, layerwise_sweeps, preserve_rng_state; vjp: "loop" only;
            defaults as there), for the chain built at each forward; also attributes of
            the first stage.

    Returns the same model; `highwaybp.models.torchvision.resnet_stages(model)` gives its
    first `ResNetStage` (configuration, `last_diagnostics`, `build_chain()`). Calling it
    twice re-configures the model (switches not given return to their defaults).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_torchvision needs a torch nn.Module, got {type(model).__name__}")
    method = Exact() if method is None else check_method(method)
    existing = resnet_stages(model, required=False)
    if existing is not None:
        existing.configure(method, **switches)
        return model
    stages = _find_stages(model)
    head = ResNetStage(stages[0], 0, None)
    head.configure(method, **switches)
    new = [head] + [ResNetStage(s, i, head) for i, s in enumerate(stages[1:], start=1)]
    head._stages = new
    for name, stage in zip(STAGE_NAMES, new):
        setattr(model, name, stage)
    return model


def resnet_stages(model: nn.Module, required: bool = True) -> Optional[ResNetStage]:
    """The first `ResNetStage` of a model converted by `from_torchvision`."""
    stage = getattr(model, STAGE_NAMES[0], None)
    if isinstance(stage, ResNetStage):
        return stage.head
    if required:
        raise ValueError(
            "no ResNetStage in this model: call highwaybp.from_torchvision(model) first"
        )
    return None
