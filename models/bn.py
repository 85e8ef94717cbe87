"""BatchNorm helpers shared by the trainer and the analyses, and the guard that hands a model back unchanged."""
import warnings
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn as nn

with warnings.catch_warnings():  # fvcore imports torch.jit.script, which this torch deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn.precise_bn import update_bn_stats

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm layer, in registration (forward) order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BN_TYPES)]


@contextmanager
def preserved_state(model: nn.Module, bn_statistics: bool = True):
    """On exit, error or not: every module's train/eval mode and BN momentum as they were, no hook that was
    registered inside left behind (fvcore and Captum leave theirs when a forward fails), and, with
    `bn_statistics`, every BN buffer (running mean, variance, batches tracked) restored."""
    modules = list(model.modules())
    modes = [module.training for module in modules]
    hooks = [{name: set(getattr(module, name, {})) for name in _HOOK_DICTS} for module in modules]
    layers = [module for _, module in bn_layers(model)]
    momenta = [module.momentum for module in layers]
    buffers = [{key: value.clone() for key, value in module.named_buffers(recurse=False)} for module in layers] \
        if bn_statistics else []
    try:
        yield
    finally:
        for module, training, before in zip(modules, modes, hooks):
            module.training = training
            for name, keys in before.items():
                registered = getattr(module, name, {})
                for key in set(registered) - keys:
                    del registered[key]
        for module, momentum in zip(layers, momenta):
            module.momentum = momentum
        with torch.no_grad():
            for module, saved in zip(layers, buffers):
                for key, value in saved.items():
                    getattr(module, key).copy_(value)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: Iterable[torch.Tensor], num_batches: int) -> None:
    """PreciseBN (fvcore's `update_bn_stats`): replace every BN layer's running mean and variance by the
    population statistics of its input over `num_batches` batches, with the weights fixed.

    Only the BN layers run in training mode (dropout stays off); modes and momenta are restored after.
    """
    with preserved_state(model, bn_statistics=False):
        model.eval()
        for _, module in bn_layers(model):
            module.train()
        update_bn_stats(model, inputs, num_iters=num_batches)
        for _, module in bn_layers(model):
            module.running_var.clamp_(min=0)  # fvcore's E[x^2] - E[x]^2 in float32 can dip below zero
