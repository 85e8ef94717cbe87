"""BatchNorm statistics: what a BN layer normalises with, how wrong that is, and recomputing it.

One unit for every statistics error in this toolkit (the spike diagnosis's drift and eval-mode mismatch, the
training monitor's gaps, the amplification test): the **normalisation error**. A BN layer in eval mode computes
(x - mu_used) / s_used, where the statistics it should have used are mu_true, s_true (s = sqrt(var + eps)). For
an input x = mu_true + sqrt(var_true) z with z of mean 0 and variance 1, the error of the normalised activation
is e = (mu_true - mu_used) / s_used + z sqrt(var_true) (1 / s_used - 1 / s_true), so its root mean square is

    rms = sqrt(mean^2 + scale^2),   mean = |mu_true - mu_used| / s_used,
                                    scale = sqrt(var_true / (var_true + eps)) |1 - s_true / s_used|,

in units of the normalised activation (1 = an error as large as the signal BN means to produce). `mean` and
`scale` are the two components, kept apart. Over a layer's channels the three are root-mean-squared, so that
rms^2 = mean^2 + scale^2 holds per layer too. This is sqrt((1 - s_true/s_used)^2 + (d_mean/s_used)^2) of the
spike issue, with the eps that BN itself adds (a dead channel, var_true = 0, has no scale error).
"""
import warnings
from typing import Iterable, NamedTuple

import torch
import torch.nn as nn

import models

from .common import autocast, forward_hooks, preserved_state

with warnings.catch_warnings():  # fvcore imports torch.jit.script, which this torch deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn.precise_bn import update_bn_stats

COMPONENTS = ("rms", "mean", "scale")  # the `component` dim of every normalisation-error variable
UNITS = "normalised activation (RMS)"


class BNStatistics(NamedTuple):
    """Per-channel statistics a BN layer normalises with (or should): mean, variance, and the layer's eps."""
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


def running_statistics(model: nn.Module) -> dict[str, BNStatistics]:
    """A copy of every BN layer's running mean and variance (layers that keep none are left out)."""
    return {name: BNStatistics(module.running_mean.detach().clone(), module.running_var.detach().clone(), module.eps)
            for name, module in models.bn_layers(model) if module.running_mean is not None}


def normalisation_error(used: BNStatistics, true: BNStatistics) -> dict[str, torch.Tensor]:
    """Per channel, in float64: the `rms` normalisation error of normalising with `used` an input whose
    statistics are `true`, and its `mean` and `scale` components (module docstring)."""
    used_mean, used_var, true_mean, true_var = (t.double() for t in (used.mean, used.var, true.mean, true.var))
    used_std, true_std = (used_var + used.eps).sqrt(), (true_var + used.eps).sqrt()
    mean = (true_mean - used_mean).abs() / used_std
    scale = (true_var.clamp_min(0) / (true_var + used.eps)).sqrt() * (1 - true_std / used_std).abs()
    return {"rms": (mean.square() + scale.square()).sqrt(), "mean": mean, "scale": scale}


def channel_rms(error: dict[str, torch.Tensor]) -> list[float]:
    """One value per component for a layer: the root mean square over its channels, in COMPONENTS order."""
    return [error[component].square().mean().sqrt().item() for component in COMPONENTS]


def statistics_error_table(used: dict[str, BNStatistics], true: dict[str, BNStatistics],
                           layers: list[str]) -> torch.Tensor:
    """(layer, component) normalisation errors of `used` against `true` for `layers`; NaN where either lacks
    the layer."""
    table = torch.full((len(layers), len(COMPONENTS)), float("nan"), dtype=torch.float64)
    for i, name in enumerate(layers):
        if name in used and name in true:
            table[i] = torch.tensor(channel_rms(normalisation_error(used[name], true[name])), dtype=torch.float64)
    return table


def set_statistics(model: nn.Module, statistics: dict[str, BNStatistics]) -> None:
    """Copy `statistics` into the running buffers of the BN layers they name."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, stats in statistics.items():
            modules[name].running_mean.copy_(stats.mean)
            modules[name].running_var.copy_(stats.var)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """PreciseBN (fvcore's `update_bn_stats`, its population-variance estimator): replace every BN layer's
    running mean and variance by the population statistics of its input over all `inputs`, with the weights
    fixed and every BN upstream normalising with its batch's statistics, as in training.

    `dtype`: the autocast dtype the model trained in (None: fp32), so that the statistics are those of the
    activations training normalised. Only the BN layers run in training mode (dropout stays off); modes,
    momenta and hooks are restored after. Returns the number of images used.
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("no recalibration images were given")
    device = next(model.parameters()).device
    with preserved_state(model, bn_statistics=False), autocast(device.type, dtype):
        model.eval()
        for _, module in models.bn_layers(model):
            module.train()
        update_bn_stats(model, (x.to(device) for x in inputs), num_iters=len(inputs))
        for _, module in models.bn_layers(model):
            module.running_var.clamp_(min=0)  # E[x^2] - E[x]^2 in float32 can dip below zero
    return sum(len(x) for x in inputs)


@torch.no_grad()
def batch_statistics(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, BNStatistics], torch.Tensor]:
    """Every BN layer's input statistics in one forward of `x` with BN in train mode (each layer normalising
    by the batch's statistics, as in training), read from BN's own computation: momentum 1 makes the running
    buffers the batch's mean and unbiased variance, which is turned back into the population variance (divided
    by the count). Then every buffer, mode and momentum is put back; dropout stays off and no random number is
    drawn. Returns the statistics and the model's output."""
    layers = {name: module for name, module in models.bn_layers(model) if module.running_mean is not None}
    counts = {}
    hooks = {name: (lambda module, inputs, output, name=name: counts.__setitem__(name, inputs[0].numel()
                                                                                 // inputs[0].shape[1]))
             for name in layers}
    with preserved_state(model), forward_hooks(model, hooks):
        model.eval()
        for module in layers.values():
            module.train()
            module.momentum = 1.0
        output = model(x)
        return {name: BNStatistics(module.running_mean.clone(),
                                   module.running_var * ((counts[name] - 1) / counts[name]), module.eps)
                for name, module in layers.items() if name in counts}, output  # a layer never run: none
