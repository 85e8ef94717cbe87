"""Pieces shared by every family: the BN switch and He initialisation."""
import torch.nn as nn


def norm2d(channels: int, bn: bool) -> nn.Module:
    """BatchNorm, or an Identity in its place so that a BN-free network keeps the same layer names."""
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


def he_init(model: nn.Module) -> None:
    """He et al. 2015 ("forward" case, fan-in), as the ResNet paper and akamaster's CIFAR ResNets use."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
