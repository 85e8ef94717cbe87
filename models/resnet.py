"""ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition") and their plain twins.

- CIFAR ResNets (Sec. 4.2): a 3x3 stem of 16 channels, three stages of n basic blocks with 16, 32 and 64
  channels, global average pooling and a linear classifier: 6n+2 weighted layers.
- ResNet-18/34/50/101 (Sec. 3.3, Table 1) adapted to 32x32 images as is usual on CIFAR: a 3x3 stem of 64
  channels and no max-pool, then four stages of 64, 128, 256 and 512 channels.

`skip=False` removes the whole shortcut branch, projections included: the plain twin is the same network
minus the additions. Projections are bias-free 1x1 convolutions followed by BN, as torchvision's;
`projection_bias=True` gives them a bias too (redundant before BN, but it is what the parameter counts of some
published ablations include: ResNet-50 for 3 classes has 23,510,339 parameters with it, 23,506,499 without).
Nothing is in-place and every ReLU is its own module, so each hook fires once and a tensor a hook holds is
never overwritten.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import he_init, norm2d
from .registry import ModelError, register

SHORTCUTS = ("A", "B", "C")


class PadShortcut(nn.Module):
    """Option A: the identity on a strided grid, the new channels zero-padded equally on both sides.

    The same as akamaster's `LambdaLayer` (`planes // 4` each side), but a named module with no lambda.
    """

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride, self.extra_channels = stride, extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        before = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


class Projection(nn.Module):
    """Options B and C: a 1x1 convolution and BN (`shortcut.conv`, `shortcut.bn`); the convolution has a bias
    only with `bias` (or without BN, like every conv of a BN-free network)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bn: bool, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias or not bn)
        self.bn = norm2d(out_channels, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def make_shortcut(in_channels: int, out_channels: int, stride: int, shortcut: str, bn: bool,
                  projection_bias: bool) -> nn.Module:
    reshapes = stride != 1 or in_channels != out_channels
    if shortcut == "C" or (shortcut == "B" and reshapes):
        return Projection(in_channels, out_channels, stride, bn, projection_bias)
    if shortcut == "A" and reshapes:
        return PadShortcut(stride, out_channels - in_channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (Fig. 2 of the paper)."""
    expansion = 1

    def __init__(self, in_channels, width, stride, skip, shortcut, bn, projection_bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=not bn)
        self.bn1 = norm2d(width, bn)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=not bn)
        self.bn2 = norm2d(width, bn)
        self.shortcut = make_shortcut(in_channels, width, stride, shortcut, bn, projection_bias) if skip else None
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu2(out)

    def last_bn(self) -> nn.Module:
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (Fig. 5, right); the stride is on the 3x3 conv, as torchvision's."""
    expansion = 4

    def __init__(self, in_channels, width, stride, skip, shortcut, bn, projection_bias=False):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=not bn)
        self.bn1 = norm2d(width, bn)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=not bn)
        self.bn2 = norm2d(width, bn)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=not bn)
        self.bn3 = norm2d(out_channels, bn)
        self.shortcut = (make_shortcut(in_channels, out_channels, stride, shortcut, bn, projection_bias) if skip
                         else None)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu3(out)

    def last_bn(self) -> nn.Module:
        return self.bn3


class ResNet(nn.Module):
    """Stem, stages `stage1..`, each of blocks `block1..`, global average pooling, `fc`."""

    def __init__(self, block, blocks_per_stage, widths, *, num_classes=10, in_channels=3, skip=True,
                 shortcut="A", bn=True, zero_init_residual=False, projection_bias=False):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ModelError(f"shortcut must be one of {', '.join(SHORTCUTS)}, not {shortcut!r}")
        if projection_bias and shortcut == "A":
            raise ModelError("projection_bias (--projection-bias) biases the 1x1 projection shortcuts of options B "
                             "and C, and option A has none: use shortcut B or C with it, or drop it")
        if zero_init_residual and not skip:
            raise ModelError("zero_init_residual zeroes each block's last BN so the block starts as its shortcut; "
                             "without skip connections that kills the signal: drop one of them")
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not bn),
            bn=norm2d(widths[0], bn),
            relu=nn.ReLU(),
        ))
        channels = widths[0]
        for s, (n_blocks, width) in enumerate(zip(blocks_per_stage, widths), start=1):
            blocks = OrderedDict()
            for b in range(1, n_blocks + 1):
                stride = 2 if s > 1 and b == 1 else 1
                blocks[f"block{b}"] = block(channels, width, stride, skip, shortcut, bn, projection_bias)
                channels = width * block.expansion
            self.add_module(f"stage{s}", nn.Sequential(blocks))
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        he_init(self)
        if zero_init_residual and bn:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_bn().weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{s}")(x)
        return self.flatten(self.pool(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register("cifar_resnet")
def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3, skip: bool = True,
                 shortcut: str = "A", bn: bool = True, zero_init_residual: bool = False,
                 projection_bias: bool = False) -> ResNet:
    """The CIFAR ResNet of depth 6n+2 (Sec. 4.2): n basic blocks in each of three stages of 16/32/64 channels."""
    if depth < 8 or (depth - 2) % 6:
        raise ModelError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110, ...), not {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, (n, n, n), (16, 32, 64), num_classes=num_classes, in_channels=in_channels,
                  skip=skip, shortcut=shortcut, bn=bn, zero_init_residual=zero_init_residual,
                  projection_bias=projection_bias)


def _register_cifar(depth: int):
    @register(f"resnet{depth}")
    def builder(num_classes: int = 10, in_channels: int = 3, skip: bool = True, shortcut: str = "A",
                bn: bool = True, zero_init_residual: bool = False, projection_bias: bool = False) -> ResNet:
        return cifar_resnet(depth, num_classes=num_classes, in_channels=in_channels, skip=skip, shortcut=shortcut,
                            bn=bn, zero_init_residual=zero_init_residual, projection_bias=projection_bias)
    builder.__doc__ = f"ResNet-{depth} for CIFAR (He et al. 2016, Sec. 4.2), option-A shortcuts by default."


def _register_imagenet_style(depth: int, block, blocks_per_stage):
    @register(f"resnet{depth}")
    def builder(num_classes: int = 10, in_channels: int = 3, skip: bool = True, shortcut: str = "B",
                bn: bool = True, zero_init_residual: bool = False, projection_bias: bool = False) -> ResNet:
        return ResNet(block, blocks_per_stage, (64, 128, 256, 512), num_classes=num_classes,
                      in_channels=in_channels, skip=skip, shortcut=shortcut, bn=bn,
                      zero_init_residual=zero_init_residual, projection_bias=projection_bias)
    builder.__doc__ = f"ResNet-{depth} (Table 1) adapted to 32x32 inputs: 3x3 stem, no max-pool."


for _depth in (20, 32, 44, 56, 110, 1202):
    _register_cifar(_depth)
_register_imagenet_style(18, BasicBlock, (2, 2, 2, 2))
_register_imagenet_style(34, BasicBlock, (3, 4, 6, 3))
_register_imagenet_style(50, Bottleneck, (3, 4, 6, 3))
_register_imagenet_style(101, Bottleneck, (3, 4, 23, 3))
