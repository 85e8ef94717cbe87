"""Layer responses (He et al. 2016, Sec. 4.2 and Fig. 7) and what they are made of; residual branches by block.

The paper's "response" of a 3x3 layer is its output after BN and before the nonlinearity (ReLU or the
addition); Fig. 7 plots its standard deviation, per channel over every image and position, averaged over
channels. In eval mode a BN layer is the per-channel affine map y = gamma (x - running_mean) / s_running + beta
(s = sqrt(var + eps)), so per channel

    std(y) = |gamma| * s_pop / s_running * sqrt(var_pop / (var_pop + eps)),

with var_pop the variance of the layer's input over the images. The last factor is 1 within eps / var, and
s_pop / s_running is 1 where the running statistics describe these images: Fig. 7's curve is then the learned
BN scale |gamma|, made larger or smaller where the running statistics are stale. Both factors are stored beside
the response (`bn_scale`, `bn_std_ratio`).

The paper's argument ("residual functions might be generally closer to zero than the non-residual functions")
is about the size of a block's branch against the signal it is added to. Per residual block of this package's
models (BasicBlock, Bottleneck) `branch_ratio` is ||F(x)|| / ||A(x)||: the L2 norm, over every image, channel
and position, of the branch output F(x) (the block's last BN output, before the addition) over that of A(x),
the block's input through the parameter-free option-A shortcut (the identity on the output grid, new channels
zero). A(x) exists in a plain twin too, so plain and residual blocks are measured on one footing; the block's
own shortcut S(x) (a projection for options B and C) is stored as `shortcut_rms`.

Cost: one streamed moment pass per measured BN input (the output's moments follow from the affine map), and one
sum of squares per block input and per projection shortcut; no activation is kept, none is copied to float64.
"""
import math
from typing import Iterable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import xarray as xr

import models
from models.resnet import BasicBlock, Bottleneck, Projection

from .common import (ChannelMoments, attrs, forward_hooks, inputs_of, layer_coords, model_device, preserved_state,
                     squared_norms, stage_and_block, variable)

DEFINITION = (
    "in eval mode over every image and position of the split: response_std, the std per channel of each 3x3 "
    "layer's response (the output of the BN right after it, before the ReLU or addition; models.response_layers), "
    "averaged over channels (He et al. 2016, Fig. 7), computed from the BN input's moments through BN's eval-mode "
    "affine map, so that per channel it is |gamma| * bn_std_ratio * sqrt(var / (var + eps)) with bn_scale = "
    "|gamma| and bn_std_ratio = sqrt(var + eps) / sqrt(running_var + eps), var the input's variance over the "
    "images; per residual block, branch_ratio = ||F(x)|| / ||A(x)||, the L2 "
    "norm over all images of the branch output F(x) (the block's last BN, before the addition) over that of the "
    "block input through the parameter-free option-A shortcut A(x) (identity on the output grid, new channels "
    "zero), in plain and residual networks alike, with branch_rms, input_rms and shortcut_rms (the block's own "
    "shortcut output S(x), NaN without one) their root-mean-square values")


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every BasicBlock and Bottleneck of this package's ResNets and plain twins, forward order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, (BasicBlock, Bottleneck))]


def shortcut_kind(block: nn.Module) -> str:
    """"none" (a plain block), "identity", "pad" (option A where the shape changes) or "projection"."""
    if block.shortcut is None:
        return "none"
    if isinstance(block.shortcut, Projection):
        return "projection"
    return "identity" if isinstance(block.shortcut, nn.Identity) else "pad"


def measures_input(module: nn.Module | None) -> bool:
    """A BN layer with running statistics: in eval mode its output's moments follow from its input's."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None


class SumOfSquares:
    """The streamed sum of squares of a tensor's values and their count: per image, float32 sums of squares
    over chunks of its values (`analyses.common.squared_norms`), added up in float64 on the device."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, x: torch.Tensor, count: int | None = None) -> None:
        """`count`: the number of values `x` stands for, where zeros left out of it count too (option A's)."""
        if x.numel():
            self.total = self.total + squared_norms(x.float().reshape(len(x), -1)).sum()
        self.count += x.numel() if count is None else count

    def rms(self) -> float:
        return math.sqrt(float(self.total) / self.count)


def option_a_hook(sums: SumOfSquares):
    """A block's forward hook: add the squares of A(x), the input on the output's grid (its zero channels add
    nothing but count)."""
    def hook(module, inputs, output):
        x = inputs[0]
        stride_y, stride_x = -(-x.shape[2] // output.shape[2]), -(-x.shape[3] // output.shape[3])
        sums.add(x[:, :, ::stride_y, ::stride_x], count=output.numel())
    return hook


class Response(NamedTuple):
    """Per channel, float64: the response's mean and variance, |gamma| and s_pop / s_running (NaN: no BN)."""
    mean: torch.Tensor
    var: torch.Tensor
    scale: torch.Tensor
    ratio: torch.Tensor


def response(module: nn.Module, moments: ChannelMoments) -> Response:
    """A layer's response from the moments its hook streamed: for an eval-mode BN, those of its input through
    its affine map; for any other layer (an Identity in place of BN), those of its output."""
    mean, var = moments.mean, moments.variance
    if not measures_input(module):
        nan = torch.full_like(mean, float("nan"))
        return Response(mean, var, nan, nan)
    running_mean, running_var = module.running_mean.double(), module.running_var.double()
    s_running = (running_var + module.eps).sqrt()
    gamma = module.weight.double() if module.weight is not None else torch.ones_like(mean)
    beta = module.bias.double() if module.bias is not None else torch.zeros_like(mean)
    return Response(gamma * (mean - running_mean) / s_running + beta, gamma.square() * var / s_running.square(),
                    gamma.abs(), (var + module.eps).sqrt() / s_running)


def per_channel(rows: list[torch.Tensor]) -> np.ndarray:
    """(layer, channel) from per-layer vectors of different lengths, NaN past a layer's channels."""
    table = np.full((len(rows), max(len(row) for row in rows)), np.nan)
    for i, row in enumerate(rows):
        table[i, :len(row)] = row.cpu().numpy()
    return table


def mean_over_channels(table: np.ndarray) -> np.ndarray:
    """Each layer's mean over its channels; NaN for a layer with no value (no BN)."""
    return np.array([np.nan if np.isnan(row).all() else np.nanmean(row) for row in table])


@torch.no_grad()
def layer_responses(model: nn.Module, batches: Iterable, layers: list[str] | None = None, *, checkpoint=None,
                    dataset=None, split=None) -> xr.Dataset:
    """Per response layer (dim `depth`) and residual block (dim `block_depth`), in one eval-mode pass.

    `batches`: normalised images, as `(images, labels)` pairs or bare tensors. `layers` defaults to
    `models.response_layers(model)`, which works for any model whose 3x3 convs are followed by BN; blocks are
    those of this package's ResNets (none elsewhere).
    """
    layers = list(layers) if layers is not None else models.response_layers(model)
    if not layers:
        raise ValueError("the model has no 3x3 conv followed by BN; pass the layers to measure")
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    blocks = residual_blocks(model)
    branches = [names[block.last_bn()] for _, block in blocks]
    moments = {name: ChannelMoments() for name in dict.fromkeys(layers + branches)}
    # (an unknown layer name is not measured at its input; forward_hooks refuses it)
    hooks = {name: (lambda module, inputs, output, m=moment, at_input=measures_input(modules.get(name)):
                    m.update(inputs[0] if at_input else output)) for name, moment in moments.items()}
    inputs, shortcuts = [], []  # per block, the SumOfSquares of A(x) and of S(x)
    for name, block in blocks:
        inputs.append(SumOfSquares())
        hooks[name] = option_a_hook(inputs[-1])
        kind = shortcut_kind(block)
        if kind == "projection":
            shortcuts.append(SumOfSquares())
            hooks[f"{name}.shortcut"] = lambda module, inputs, output, sums=shortcuts[-1]: sums.add(output)
        else:  # a plain block has none; an identity or option-A shortcut is A(x) itself
            shortcuts.append(None if kind == "none" else inputs[-1])
    device = model_device(model)
    n_images, batch_size = 0, 0
    with preserved_state(model, bn_statistics=False), forward_hooks(model, hooks):
        model.eval()
        for x in inputs_of(batches):
            model(x.to(device))
            n_images += len(x)
            batch_size = max(batch_size, len(x))
    if n_images == 0:
        raise ValueError("no images were given")

    responses = {name: response(modules[name], m) for name, m in moments.items()}
    table = {key: per_channel([getattr(responses[name], key) for name in layers]) for key in Response._fields}
    std = np.sqrt(table["var"])
    branch_rms = np.array([(responses[name].mean.square() + responses[name].var).mean().sqrt().item()
                           for name in branches])
    input_rms = np.array([sums.rms() for sums in inputs])
    shortcut_rms = np.array([sums.rms() if sums is not None else np.nan for sums in shortcuts])
    block_names = [name for name, _ in blocks]
    coords = {**layer_coords(layers), "channel": ("channel", np.arange(std.shape[1])),
              "n_channels": ("depth", np.array([len(responses[name].mean) for name in layers])),
              "block_depth": ("block_depth", np.arange(1, len(blocks) + 1)),
              "block_layer": ("block_depth", np.array(block_names, dtype=object)),
              "block_stage": ("block_depth", np.array([stage_and_block(name)[0] for name in block_names], dtype=int)),
              "block_shortcut": ("block_depth", np.array([shortcut_kind(block) for _, block in blocks], dtype=object))}
    return xr.Dataset(
        {
            "response_std": variable("depth", mean_over_channels(std), "std of layer response, mean over channels",
                                     "1"),
            "response_std_channel": variable(("depth", "channel"), std, "std of layer response per channel",
                                             "1"),
            "response_mean_channel": variable(("depth", "channel"), table["mean"],
                                              "mean of layer response per channel", "1"),
            "bn_scale": variable("depth", mean_over_channels(table["scale"]),
                                 "|gamma| of the layer's BN, mean over channels", "1"),
            "bn_scale_channel": variable(("depth", "channel"), table["scale"], "|gamma| of the layer's BN", "1"),
            "bn_std_ratio": variable("depth", mean_over_channels(table["ratio"]),
                                     "input std over these images / running std (eps included), mean over "
                                     "channels", "1"),
            "bn_std_ratio_channel": variable(("depth", "channel"), table["ratio"],
                                             "input std over these images / running std (eps included)", "1"),
            "branch_ratio": variable("block_depth", branch_rms / input_rms,
                                     "||F(x)|| / ||A(x)||: branch output over the block input (option A)", "1"),
            "branch_rms": variable("block_depth", branch_rms, "RMS of the branch output F(x)", "1"),
            "input_rms": variable("block_depth", input_rms, "RMS of the block input A(x) on the output grid", "1"),
            "shortcut_rms": variable("block_depth", shortcut_rms, "RMS of the block's shortcut output S(x)", "1"),
        },
        coords=coords,
        attrs=attrs(DEFINITION, checkpoint=checkpoint, dataset=dataset, split=split, n_images=n_images,
                    batch_size=batch_size, bn_mode="eval"),
    )
