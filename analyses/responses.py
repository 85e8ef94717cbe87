"""Layer responses (He et al. 2016, Sec. 4.2 and Fig. 7).

The paper's "response" of a 3x3 layer is its output after BN and before the nonlinearity (ReLU or the
addition). Its standard deviation is taken per channel over every image and position of the split, then
averaged over channels. Residual functions being "generally closer to zero than the non-residual ones" shows
up as smaller responses in ResNets than in their plain twins.
"""
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import xarray as xr

import models

from .common import ChannelMoments, attrs, forward_hooks, inputs_of, layer_coords, model_device, preserved_state, variable

DEFINITION = ("standard deviation of each 3x3 layer's response (its output after BN, before the ReLU or the "
              "addition; models.response_layers), per channel over all images and spatial positions, with BN in "
              "eval mode; response_std is its mean over channels (He et al. 2016, Fig. 7)")


@torch.no_grad()
def layer_responses(model: nn.Module, batches: Iterable, layers: list[str] | None = None, *, checkpoint=None,
                    dataset=None, split=None) -> xr.Dataset:
    """Per-channel mean and std of each response layer's output, streamed in float64.

    `batches`: normalised images, as `(images, labels)` pairs or bare tensors. `layers` defaults to
    `models.response_layers(model)`, which works for any model whose 3x3 convs are followed by BN.
    """
    layers = list(layers) if layers is not None else models.response_layers(model)
    if not layers:
        raise ValueError("the model has no 3x3 conv followed by BN; pass the layers to measure")
    moments = {name: ChannelMoments() for name in layers}
    hooks = {name: (lambda module, inputs, output, m=moments[name]: m.update(output)) for name in layers}
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
    width = max(len(m.mean) for m in moments.values())
    std = np.full((len(layers), width), np.nan)
    mean = np.full((len(layers), width), np.nan)
    for i, name in enumerate(layers):
        channels = len(moments[name].mean)
        std[i, :channels] = moments[name].variance.sqrt().cpu().numpy()
        mean[i, :channels] = moments[name].mean.cpu().numpy()
    coords = {**layer_coords(layers), "channel": ("channel", np.arange(width)),
              "n_channels": ("depth", np.array([len(moments[name].mean) for name in layers]))}
    return xr.Dataset(
        {
            "response_std": variable("depth", np.nanmean(std, axis=1), "std of layer response, mean over channels",
                                     "1"),
            "response_std_channel": variable(("depth", "channel"), std, "std of layer response per channel", "1"),
            "response_mean_channel": variable(("depth", "channel"), mean, "mean of layer response per channel",
                                              "1"),
        },
        coords=coords,
        attrs=attrs(DEFINITION, checkpoint=checkpoint, dataset=dataset, split=split, n_images=n_images,
                    batch_size=batch_size, bn_mode="eval"),
    )
