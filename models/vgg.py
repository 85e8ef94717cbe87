"""VGG-11/13/16/19 (Simonyan & Zisserman 2015, configurations A, B, D, E) with BN after every conv.

On 32x32 inputs the five max-pools leave a 1x1x512 map, flattened into the features. The head is either one
linear layer (`head="linear"`, the usual CIFAR VGG) or the original FC-4096 head (`fc1`, `fc2`, `fc`).
"""
from collections import OrderedDict

import torch
import torch.nn as nn

from .layers import he_init, norm2d
from .registry import ModelError, register

CONFIGS = {  # output channels of the 3x3 convs of each stage; a max-pool ends every stage
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}
HEADS = ("linear", "fc4096")


class VGG(nn.Module):
    """Stages `stage1..stage5` of `conv{k}`, `bn{k}`, `relu{k}` and a `pool`; then the head."""

    def __init__(self, config, *, num_classes=10, in_channels=3, bn=True, head="linear", dropout=0.5):
        super().__init__()
        if head not in HEADS:
            raise ModelError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
        if not 0 <= dropout < 1:
            raise ModelError(f"dropout must be in [0, 1), not {dropout}")
        channels = in_channels
        for s, widths in enumerate(config, start=1):
            layers = OrderedDict()
            for k, width in enumerate(widths, start=1):
                layers[f"conv{k}"] = nn.Conv2d(channels, width, 3, padding=1)
                layers[f"bn{k}"] = norm2d(width, bn)
                layers[f"relu{k}"] = nn.ReLU()
                channels = width
            layers["pool"] = nn.MaxPool2d(2)
            self.add_module(f"stage{s}", nn.Sequential(layers))
        self.num_stages = len(config)
        self.flatten = nn.Flatten()
        self.head = head
        if head == "fc4096":
            self.fc1, self.relu_fc1, self.dropout1 = nn.Linear(channels, 4096), nn.ReLU(), nn.Dropout(dropout)
            self.fc2, self.relu_fc2, self.dropout2 = nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(dropout)
            channels = 4096
        self.fc = nn.Linear(channels, num_classes)
        he_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{s}")(x)
        return self.flatten(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.head == "fc4096":
            features = self.dropout1(self.relu_fc1(self.fc1(features)))
            features = self.dropout2(self.relu_fc2(self.fc2(features)))
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _register(depth: int):
    @register(f"vgg{depth}")
    def builder(num_classes: int = 10, in_channels: int = 3, bn: bool = True, head: str = "linear",
                dropout: float = 0.5) -> VGG:
        return VGG(CONFIGS[depth], num_classes=num_classes, in_channels=in_channels, bn=bn, head=head,
                   dropout=dropout)
    builder.__doc__ = f"VGG-{depth} with BN; `dropout` applies to the FC-4096 head only."


for _depth in CONFIGS:
    _register(_depth)
