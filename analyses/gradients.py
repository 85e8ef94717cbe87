"""Gradient norms per layer: how much of the loss's gradient reaches each depth.

For every conv and fc weight, in forward order, the L2 (Frobenius) norm of the gradient of a mini-batch's mean
cross-entropy. In a deep plain network at initialisation these norms change by a roughly constant factor per
layer (with BN using batch statistics they grow towards the input: Yang et al. 2019, "A mean field theory of
batch normalization"); a residual network keeps them within a small range.
A mini-batch gradient is an average over the batch, so its norm depends on the batch size: the dataset
records it.

The raw norm partly measures the weight's size. A conv followed by BN is scale invariant: L(a W) = L(W) for
a > 0, so dL/dW at a W is (dL/dW at W) / a; weight decay shrinks such weights epoch after epoch, and layers
of different width start at different norms, so a raw norm that grows may only mean a weight that shrank.
`scaled_grad_norm` = ||dL/dW|| * ||W|| takes that out: it is the loss's first-order change per unit e when the
weight moves by e ||W|| in the steepest direction, i.e. the gradient with respect to a relative change of the
weight; it is the same at W and at a W, and for a scale-invariant weight it is the norm of the gradient with
respect to the weight's direction W / ||W|| (on the unit sphere). How much the loss responds to changing a layer
by a given fraction of itself is comparable across layers and epochs; the figures show it by default. The
relative update ||dL/dW|| / ||W|| is not invariant (it scales as 1 / a^2): it is the layer's effective learning
rate, a property of the optimisation rather than of the function.
"""
from itertools import islice
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

from .common import attrs, layer_coords, model_device, preserved_state, variable
from .evaluate import set_bn_mode

GRADIENT_BN_MODES = ("train", "eval")


def definition(bn_mode: str) -> str:
    return ("L2 (Frobenius) norm of the gradient of one mini-batch's mean cross-entropy (natural log) with respect "
            "to each conv and fc weight (biases and BN parameters excluded), in forward order, per mini-batch "
            "(grad_norm), and scaled_grad_norm = grad_norm * the weight's L2 norm (the gradient with respect to a "
            "relative change of the weight, unchanged when a weight that BN follows is rescaled); _mean and _std "
            "are their mean and population std over the mini-batches; BN in "
            f"{bn_mode} mode ({'batch' if bn_mode == 'train' else 'running'} statistics), dropout off")


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Conv2d and nn.Linear, in registration order: forward order in this package's
    models and in torchvision's (a shortcut projection is registered, and runs, after its block's convs)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def kind_of(module: nn.Module) -> str:
    """"conv3x3", "conv1x1", ... for a convolution, "fc" for a linear layer."""
    if isinstance(module, nn.Conv2d):
        return "conv{}x{}".format(*module.kernel_size)
    return "fc"


def batch_gradient_norms(model: nn.Module, weights: list[torch.Tensor], x: torch.Tensor,
                         y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The norms (float64, on the device) of d(mean cross-entropy)/d(weight) for one batch, and the loss.

    `torch.autograd.grad` returns the gradients instead of accumulating them in `.grad`; a weight the forward
    pass does not use gets a zero gradient."""
    loss = F.cross_entropy(model(x).float(), y)
    grads = torch.autograd.grad(loss, weights, materialize_grads=True)
    return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]), loss.detach().double()


def gradient_norms(model: nn.Module, batches: Iterable, n_batches: int | None = None, *, bn_mode: str = "train",
                   checkpoint=None, dataset=None, split=None) -> xr.Dataset:
    """Per conv/fc weight (dim `depth`) and mini-batch (dim `batch`), the norm of the loss gradient.

    `batches`: normalised `(images, labels)` pairs; the first `n_batches` are used (default: all). BN uses batch
    statistics (`train`, as in training) or its running ones (`eval`). The model comes back as it came: BN
    buffers, momenta, module modes, `requires_grad` and `.grad` of every parameter.
    """
    if bn_mode not in GRADIENT_BN_MODES:
        raise ValueError(f"bn_mode must be one of {', '.join(GRADIENT_BN_MODES)}, not {bn_mode!r}")
    layers = weight_layers(model)
    if not layers:
        raise ValueError("the model has no nn.Conv2d or nn.Linear weight")
    weights = [module.weight for _, module in layers]
    requires_grad = [w.requires_grad for w in weights]
    device = model_device(model)
    norms, losses, sizes = [], [], []
    try:
        with preserved_state(model), torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            set_bn_mode(model, bn_mode)
            for batch in islice(batches, n_batches):
                if not isinstance(batch, (tuple, list)):
                    raise ValueError("gradient norms need labels: give batches as (images, labels) pairs")
                x, y = batch
                norm, loss = batch_gradient_norms(model, weights, x.to(device), y.to(device))
                norms.append(norm)
                losses.append(loss)
                sizes.append(len(x))
    finally:
        for w, flag in zip(weights, requires_grad):
            w.requires_grad_(flag)
    if not norms:
        raise ValueError("no batches were given")
    grad_norm = torch.stack(norms, dim=1).cpu().numpy()  # (depth, batch): the one wait for the device
    loss = torch.stack(losses).cpu().numpy()
    with torch.no_grad():
        weight_norm = torch.stack([torch.linalg.vector_norm(w, dtype=torch.float64) for w in weights]).cpu().numpy()
    scaled = grad_norm * weight_norm[:, None]
    names = [name for name, _ in layers]
    coords = {**layer_coords(names), "batch": ("batch", np.arange(len(sizes))),
              "kind": ("depth", np.array([kind_of(module) for _, module in layers], dtype=object)),
              "n_weights": ("depth", np.array([w.numel() for w in weights])),
              "batch_images": ("batch", np.array(sizes))}
    data = {
        "grad_norm": variable(("depth", "batch"), grad_norm, "L2 norm of the mini-batch loss gradient", "nats"),
        "scaled_grad_norm": variable(("depth", "batch"), scaled,
                                     "L2 norm of the mini-batch loss gradient times the weight's norm", "nats"),
        "weight_norm": variable("depth", weight_norm, "L2 norm of the weight", "1"),
        "loss": variable("batch", loss, "mean cross-entropy of the mini-batch", "nats"),
    }
    for name, values, long_name in (("grad_norm", grad_norm, "L2 norm of the loss gradient"),
                                    ("scaled_grad_norm", scaled, "||dL/dW|| * ||W||")):
        data[f"{name}_mean"] = variable("depth", values.mean(axis=1), f"{long_name}, mean over mini-batches", "nats")
        data[f"{name}_std"] = variable("depth", values.std(axis=1), f"{long_name}, population std over mini-batches",
                                       "nats")
    return xr.Dataset(
        data,
        coords=coords,
        attrs=attrs(definition(bn_mode), checkpoint=checkpoint, dataset=dataset, split=split,
                    n_images=int(sum(sizes)), batch_size=max(sizes), n_batches=len(sizes), bn_mode=bn_mode),
    )
