"""BatchNorm helpers shared by the trainer and the analyses."""
import warnings
from typing import Iterable

import torch
import torch.nn as nn

with warnings.catch_warnings():  # fvcore imports torch.jit.script, which this torch deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn.precise_bn import update_bn_stats

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm layer, in registration (forward) order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BN_TYPES)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: Iterable[torch.Tensor], num_batches: int) -> None:
    """PreciseBN (fvcore's `update_bn_stats`): replace every BN layer's running mean and variance by the
    population statistics of its input over `num_batches` batches, with the weights fixed.

    Only the BN layers run in training mode (dropout stays off). Every module's mode, and on failure the BN
    momenta and hooks that fvcore would leave behind, are restored.
    """
    modes = {module: module.training for module in model.modules()}
    layers = [module for _, module in bn_layers(model)]
    momenta = [module.momentum for module in layers]
    hooks = [set(module._forward_pre_hooks) for module in layers]
    try:
        model.eval()
        for module in layers:
            module.train()
        update_bn_stats(model, inputs, num_iters=num_batches)
    finally:
        for module, training in modes.items():
            module.train(training)
        for module, momentum, before in zip(layers, momenta, hooks):
            module.momentum = momentum
            for key in set(module._forward_pre_hooks) - before:
                del module._forward_pre_hooks[key]
