"""CIFAR-family ResNets (He et al. 2016; depth 6n+2: 20, 32, 56, 110) cast for Highway-BP.

Two block forms (`form=`):

- "post": the original post-activation block, f(x) = ReLU(S(x) + Block(x)) with
  Block = conv-BN-ReLU-conv-BN, so r(x, z) = ReLU(S(x) + z), K = diag(ReLU'(.)) S.
- "pre": the pre-activation block (He et al., "Identity mappings"), f(x) = S(x) + Block(x)
  with Block = BN-ReLU-conv-BN-ReLU-conv, so K = S.

Two ways to change resolution (`downsample=`):

- "updown" (the paper's): the residual stream keeps the stem's resolution and width; a
  block of stage s (s = 0, 1, 2) is Up^s(Block(Down^s(x))), with the i-RevNet-style
  space-to-channel `down` that averages over the patch height (channels x2, spatial /2)
  and `up` its right inverse (Down(Up(y)) = y). S = I everywhere: K = I ("pre") or
  diag(ReLU') ("post"), and the chain runs one stacked scan.
- "option_a": the unmodified original: the first block of stages 1 and 2 has a stride-2
  conv and the parameter-free shortcut S(x) = zero-channel-pad(x[:, :, ::2, ::2]). S is
  linear, so it is a structured K with its exact transpose (`subsample_pad_adjoint`); the
  chain then scans over states of different shapes. Parameter counts are the originals'
  (ResNet20 0.27M, ResNet32 0.46M, ResNet56 0.85M, ResNet110 1.73M for 10 classes).

BatchNorm runs inside the blocks (its batch statistics are part of the block function);
the Highway backward re-runs each block once and restores the running statistics, so
a Highway step updates them exactly as an exact step does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from highwaybp.core.chain import ResidualChain
from highwaybp.core.methods import Method
from highwaybp.core.residual import (
    Identity,
    LinearShortcut,
    ReLUResidual,
    ResidualLayer,
    ResidualMap,
)

FORMS = ("pre", "post")
DOWNSAMPLES = ("updown", "option_a")


# ---------------------------------------------------------------------------------------
# Space-to-channel Down / Up (paper's construction; Down(Up(y)) = y)
# ---------------------------------------------------------------------------------------


def down(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, 2C, H/2, W/2]: each 2x2 patch averaged over its 2 rows.

    Output channel 2c + j holds the mean of column j of the patch (i-RevNet-style
    space-to-channel, but channels grow by 2, not 4). H and W must be even.
    """
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"down() needs even spatial sizes, got {h}x{w}; use inputs divisible by 4")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=3)  # [B, C, H/2, W/2, 2]
    return x.permute(0, 1, 4, 2, 3).reshape(b, 2 * c, h // 2, w // 2)


def up(y: Tensor) -> Tensor:
    """[B, 2C, H, W] -> [B, C, 2H, 2W], the right inverse of `down`: each value is copied
    to both rows of its patch column, so down(up(y)) = y."""
    b, c2, h, w = y.shape
    if c2 % 2:
        raise ValueError(f"up() needs an even channel count, got {c2}")
    c = c2 // 2
    y = y.reshape(b, c, 2, h, w).permute(0, 1, 3, 4, 2)  # [B, C, H, W, 2]
    y = y.unsqueeze(3).expand(b, c, h, 2, w, 2)
    return y.reshape(b, c, 2 * h, 2 * w)


# ---------------------------------------------------------------------------------------
# Option-A shortcut: stride-2 subsample + zero channel padding, and its exact transpose
# ---------------------------------------------------------------------------------------


def subsample_pad(x: Tensor, in_channels: int, out_channels: int) -> Tensor:
    """S(x): x[:, :, ::2, ::2] with (out-in)//2 zero channels before and the rest after."""
    if x.shape[1] != in_channels:
        raise ValueError(f"option-A shortcut expects {in_channels} channels, got {x.shape[1]}")
    if x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(
            f"option-A shortcut needs even spatial sizes, got {tuple(x.shape[2:])}; "
            "use inputs whose height and width are divisible by 4"
        )
    front = (out_channels - in_channels) // 2
    back = out_channels - in_channels - front
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, front, back))


def subsample_pad_adjoint(v: Tensor, in_channels: int, out_channels: int) -> Tensor:
    """S^T(v): drop the padded channels and scatter back to the even pixels (zeros elsewhere)."""
    front = (out_channels - in_channels) // 2
    b, _, h, w = v.shape
    out = v.new_zeros((b, in_channels, 2 * h, 2 * w))
    out[:, :, ::2, ::2] = v[:, front : front + in_channels]
    return out


def option_a_shortcut(in_channels: int, out_channels: int) -> LinearShortcut:
    """The pre-activation downsampling residual map: r(x, z) = S(x) + z, K = S."""
    return LinearShortcut(
        functools.partial(subsample_pad, in_channels=in_channels, out_channels=out_channels),
        functools.partial(
            subsample_pad_adjoint, in_channels=in_channels, out_channels=out_channels
        ),
    )


class ReLUShortcut(ResidualMap):
    """r(x, z) = ReLU(S(x) + z) for the option-A shortcut S: the post-activation downsampling
    layer. K = diag(ReLU'(S x + z)) S, so v @ K = S^T(ReLU' * v)."""

    kind = "linear"

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels

    def check_shapes(self, x: Tensor, z: Any) -> None:
        if not isinstance(z, Tensor):
            raise TypeError("ReLUShortcut expects the block to return one tensor")

    def combine(self, x: Tensor, z: Tensor) -> Tensor:
        self.check_shapes(x, z)
        sx = subsample_pad(x, self.in_channels, self.out_channels)
        if sx.shape != z.shape:
            raise ValueError(
                f"ReLUShortcut: S(x) has shape {tuple(sx.shape)} but the block returned "
                f"{tuple(z.shape)}"
            )
        return torch.relu(sx + z)

    def k_context(self, x: Tensor, z: Tensor, y: Tensor) -> Tensor:
        return (y > 0).to(y.dtype)

    def apply_kt(self, v: Tensor, ctx: Tensor) -> Tensor:
        return subsample_pad_adjoint(v * ctx, self.in_channels, self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PostActBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN (the residual ReLU lives in the residual map)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))


class UpDown(nn.Module):
    """Up^levels(inner(Down^levels(x))): a low-resolution block on a full-resolution stream."""

    def __init__(self, inner: nn.Module, levels: int) -> None:
        super().__init__()
        self.inner = inner
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.levels):
            x = down(x)
        z = self.inner(x)
        for _ in range(self.levels):
            z = up(z)
        return z

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


# ---------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2: stem -> ResidualChain of 3n blocks -> head.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        form: "post" (original, ReLU after the addition) or "pre" (pre-activation).
        downsample: "updown" (paper's full-resolution stream, K = I / diag) or "option_a"
            (the original stride-2 + zero-pad shortcut as a structured linear K).
        num_classes, in_channels: classifier output and image channels.
        width: channels of the first stage (16 in the original; stages use w, 2w, 4w).
        method, vjp, scan: passed to the `ResidualChain` (`model.chain`).

    Input images [B, in_channels, H, W] with H, W divisible by 4; output logits
    [B, num_classes]. The chain has L = 3n layers (ResNet32: 15, ResNet110: 54).
    """

    def __init__(
        self,
        depth: int = 20,
        *,
        form: str = "pre",
        downsample: str = "updown",
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        method: Method | None = None,
        vjp: str = "loop",
        scan: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, 110), got {depth}"
            )
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {downsample!r}")
        self.depth, self.form, self.downsample = depth, form, downsample
        n = (depth - 2) // 6
        self.stem = self._stem(in_channels, width)
        if downsample == "updown":
            layers = self._updown_layers(n, width)
        else:
            layers = self._option_a_layers(n, width)
        self.chain = ResidualChain(layers, method=method, vjp=vjp, scan=scan)
        final = 4 * width
        head: list[nn.Module] = []
        if form == "pre":  # pre-activation nets end with BN-ReLU before pooling
            head += [nn.BatchNorm2d(final), nn.ReLU()]
        head += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(final, num_classes)]
        self.head = nn.Sequential(*head)
        self._init_weights()

    def _stem(self, in_channels: int, width: int) -> nn.Module:
        if self.form == "pre":
            return _conv3x3(in_channels, width)
        return nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU())

    def _block(self, cin: int, cout: int, stride: int) -> nn.Module:
        return (PostActBlock if self.form == "post" else PreActBlock)(cin, cout, stride)

    def _residual(self) -> ResidualMap:
        return ReLUResidual() if self.form == "post" else Identity()

    def _updown_layers(self, n: int, width: int) -> list[ResidualLayer]:
        layers = []
        for stage in range(3):
            ch = width * 2**stage
            for _ in range(n):
                block = self._block(ch, ch, 1)
                if stage:
                    block = UpDown(block, stage)
                layers.append(ResidualLayer(block, self._residual()))
        return layers

    def _option_a_layers(self, n: int, width: int) -> list[ResidualLayer]:
        layers = []
        cin = width
        for stage in range(3):
            ch = width * 2**stage
            for i in range(n):
                if stage and i == 0:
                    residual: ResidualMap = (
                        ReLUShortcut(cin, ch) if self.form == "post" else option_a_shortcut(cin, ch)
                    )
                    layers.append(ResidualLayer(self._block(cin, ch, 2), residual))
                else:
                    layers.append(ResidualLayer(self._block(ch, ch, 1), self._residual()))
                cin = ch
        return layers

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: Tensor) -> Tensor:
        """The stream after the chain: [B, 4w, H/4, W/4] (option A) or [B, w, H, W] (updown)."""
        return self.chain(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"CifarResNet expects images [B, C, H, W], got shape {tuple(x.shape)}")
        h = self.features(x)
        if self.downsample == "updown":
            h = down(down(h))
        return self.head(h)

    @property
    def num_layers(self) -> int:
        """L, the number of residual layers in the chain (3n)."""
        return len(self.chain)


def resnet_cifar(depth: int, **kwargs: Any) -> CifarResNet:
    """`CifarResNet(depth, **kwargs)`, e.g. `resnet_cifar(110, downsample="option_a")`."""
    return CifarResNet(depth, **kwargs)


def resnet20(**kwargs: Any) -> CifarResNet:
    return CifarResNet(20, **kwargs)


def resnet32(**kwargs: Any) -> CifarResNet:
    return CifarResNet(32, **kwargs)


def resnet56(**kwargs: Any) -> CifarResNet:
    return CifarResNet(56, **kwargs)


def resnet110(**kwargs: Any) -> CifarResNet:
    return CifarResNet(110, **kwargs)
