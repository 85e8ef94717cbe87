"""Which pixels a model's decision rests on: Captum's Integrated Gradients, Saliency and Grad-CAM, and how
faithful each map is, measured by deleting the pixels it ranks first (Petsiuk et al. 2018's deletion curve).

Every map is one value per pixel, so that methods and models compare on the same grid:
- `ig`: Integrated Gradients (Sundararajan et al. 2017) from the baseline, summed over the input channels with
  its sign; by completeness it sums to logit(image) - logit(baseline), up to the integration error.
- `saliency`: the largest absolute gradient of the logit over the input channels (Simonyan et al. 2014).
- `gradcam`: Grad-CAM (Selvaraju et al. 2017) at the output of a layer, ReLU'd and bilinearly upsampled.
- `random`: uniform noise from a fixed seed, the reference a map must beat; it also breaks the others' ties.

Deletion sets the top-ranked fraction of each image's pixels (all channels) to the baseline and counts the
images still classified as the class explained; the faster that falls, the more faithful the map.
"""
import re

import numpy as np
import torch
import torch.nn as nn
import xarray as xr
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

from .common import attrs, model_device, preserved_state, variable

METHODS = ("ig", "saliency", "gradcam")
TARGETS = ("label", "prediction")
DELETION_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
RANDOM_SEED = 0
SHARED_VARIABLES = ("image", "label")  # the same for every model of the same images
_STAGE = re.compile(r"stage(\d+)")


def default_gradcam_layer(model: nn.Module) -> str:
    """Our models' last stage (the top-level child `stageN` of highest N); for another model the last top-level
    child that holds a Conv2d (torchvision's `layer4`)."""
    children = dict(model.named_children())
    stages = sorted((int(match.group(1)), name) for name in children if (match := _STAGE.fullmatch(name)))
    if stages:
        return stages[-1][1]
    convolutional = [name for name, child in children.items()
                     if any(isinstance(module, nn.Conv2d) for module in child.modules())]
    if not convolutional:
        raise ValueError("the model has no top-level module holding a Conv2d; pass gradcam_layer")
    return convolutional[-1]


# ---------------------------------------------------------------------------------------------------------------
# Per-pixel maps: (N, C, H, W) images -> (N, H, W)


def integrated_gradients(model, x, targets, baseline, n_steps: int, batch_size: int) -> torch.Tensor:
    ig = IntegratedGradients(model)
    return ig.attribute(x, baselines=baseline, target=targets, n_steps=n_steps,
                        internal_batch_size=batch_size).sum(1)


def saliency(model, x, targets) -> torch.Tensor:
    return Saliency(model).attribute(x, target=targets, abs=True).amax(1)


def grad_cam(model, x, targets, layer: str) -> torch.Tensor:
    cam = LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=targets, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Deletion


def deletion_ranks(pixel_map: torch.Tensor, tie_break: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> the rank of each pixel in its image, 0 for the highest value; equal values are ordered by
    `tie_break` (highest first), so a constant map deletes in `tie_break`'s order."""
    values, keys = pixel_map.flatten(1), tie_break.flatten(1)
    by_key = keys.argsort(1, descending=True)
    order = by_key.gather(1, values.gather(1, by_key).argsort(dim=1, descending=True, stable=True))
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions).view_as(pixel_map)


def delete_top(x: torch.Tensor, ranks: torch.Tensor, fraction: float, baseline: torch.Tensor) -> torch.Tensor:
    """The images with their round(fraction * H * W) top-ranked pixels set to the baseline in every channel."""
    count = round(fraction * ranks[0].numel())
    return torch.where((ranks < count)[:, None], baseline, x)


def normalised_auc(fractions, accuracy: np.ndarray) -> np.ndarray:
    """Trapezoidal area under accuracy(fraction) along the last axis, divided by the span of the fractions:
    the mean accuracy over the curve, in [0, 1]."""
    fractions = np.asarray(fractions, dtype=float)
    heights = (accuracy[..., 1:] + accuracy[..., :-1]) / 2  # np.trapezoid needs numpy 2, we allow 1.24
    return (heights * np.diff(fractions)).sum(-1) / (fractions[-1] - fractions[0])


# ---------------------------------------------------------------------------------------------------------------
# The analysis


def _check_options(methods, target, deletion_fractions, n_steps) -> None:
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be some of {', '.join(METHODS)}, not {', '.join(unknown) or 'none'}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    fractions = np.asarray(deletion_fractions, dtype=float)
    if len(fractions) < 2 or np.any(np.diff(fractions) <= 0) or fractions[0] < 0 or fractions[-1] > 1:
        raise ValueError("deletion_fractions must be at least two increasing fractions in [0, 1]")
    if n_steps < 1:
        raise ValueError(f"n_steps must be positive, not {n_steps}")


def definition(methods, target: str, n_steps: int, layer: str, baseline: str) -> str:
    """The one sentence of docs/design.md §4 for these options."""
    maps = {"ig": f"ig = Integrated Gradients (Captum, {n_steps} Gauss-Legendre steps from the baseline) summed "
                  "over input channels with its sign",
            "saliency": "saliency = max over input channels of |d logit / d input|",
            "gradcam": f"gradcam = ReLU(Grad-CAM at {layer}) bilinearly upsampled (half-pixel centres) to the "
                       "input size"}
    return (f"per-pixel attribution of the logit of the {'true label' if target == 'label' else 'predicted class'}"
            f" with BN in eval mode, {'; '.join(maps[m] for m in methods)}; random = uniform noise (seed "
            f"{RANDOM_SEED}) that also orders equal values; deletion_accuracy = fraction of the images still "
            f"classified as that class after the round(fraction x H x W) pixels of highest attribution are set to "
            f"the baseline ({baseline}) in every channel, and deletion_auc = its trapezoidal area over the "
            "fractions divided by their span (lower = more faithful)")


def _in_batches(function, n: int, batch_size: int) -> torch.Tensor:
    """function(slice) for consecutive slices of at most `batch_size` of n images, concatenated."""
    return torch.cat([function(slice(start, start + batch_size)) for start in range(0, n, batch_size)])


def _pixel_map(method: str, model, x, targets, baseline, n_steps: int, layer: str, batch_size: int):
    x = x.detach().requires_grad_()  # Captum would do it, with a warning
    if method == "ig":
        return integrated_gradients(model, x, targets, baseline, n_steps, batch_size)
    if method == "saliency":
        return saliency(model, x, targets)
    return grad_cam(model, x, targets, layer)


@torch.no_grad()
def deletion_curve(model, x, targets, pixel_map, tie_break, fractions, baseline, batch_size: int) -> list[float]:
    """The fraction of images still classified as `targets` after each deletion fraction; every fraction of a
    slice of images goes through the model in one pass of at most `batch_size` images."""
    def still_right(part):  # (images of the part, fractions) booleans
        ranks = deletion_ranks(pixel_map[part], tie_break[part])
        deleted = torch.cat([delete_top(x[part], ranks, fraction, baseline) for fraction in fractions])
        return (model(deleted).argmax(1) == targets[part].repeat(len(fractions))).view(len(fractions), -1).T
    right = _in_batches(still_right, len(x), max(1, batch_size // len(fractions)))
    return right.double().mean(0).tolist()


def _explain(model, x, labels, methods, target: str, baseline, n_steps: int, layer: str, fractions,
             batch_size: int) -> dict:
    """Everything that runs the model (in eval mode, its modes restored after): logits, maps, deletion curves."""
    noise = torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(RANDOM_SEED))
    noise = noise.to(x.device)
    with preserved_state(model):
        model.eval()
        with torch.no_grad():
            logits = _in_batches(lambda part: model(x[part]), len(x), batch_size)
            baseline_logits = model(baseline)[0]
        predictions = logits.argmax(1)
        targets = labels if target == "label" else predictions
        maps = {method: _in_batches(lambda part: _pixel_map(method, model, x[part], targets[part], baseline,
                                                            n_steps, layer, batch_size), len(x), batch_size).detach()
                for method in methods}
        maps["random"] = noise
        accuracy = [deletion_curve(model, x, targets, pixel_map, noise, fractions, baseline, batch_size)
                    for pixel_map in maps.values()]
    # IG's completeness: its sum is logit(image) - logit(baseline) up to the integration error of n_steps
    gap = logits.gather(1, targets[:, None])[:, 0] - baseline_logits[targets]
    return {"logits": logits, "predictions": predictions, "maps": maps, "accuracy": np.array(accuracy),
            "ig_error": maps["ig"].sum((1, 2)) - gap if "ig" in maps else None}


def attributions(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, methods=METHODS, *,
                 target: str = "label", baseline=None, n_steps: int = 32, gradcam_layer: str | None = None,
                 deletion_fractions=DELETION_FRACTIONS, batch_size: int = 256, mean=0.0, std=1.0,
                 class_names=None, checkpoint=None, dataset=None, split=None) -> xr.Dataset:
    """Attribution maps of `images` (normalised, (N, C, H, W)) for the class `target` names, and their deletion
    curves, with a `random` reference row.

    `baseline`: what a removed pixel becomes and where IG starts, broadcastable to one image (C, H, W);
    default zeros, which is the dataset mean after normalisation. `gradcam_layer`: a module name, by default
    `default_gradcam_layer(model)`. `mean`/`std`: the normalisation the images were made with; `image` stores
    `images * std + mean` (pixel values in [0, 1] for the dataset's statistics). `batch_size` bounds the
    images per forward pass (IG: images x steps). The model is left as it came: same modes, no hook, no grad.
    """
    methods = list(methods)
    _check_options(methods, target, deletion_fractions, n_steps)
    layer = ""
    if "gradcam" in methods:
        layer = gradcam_layer or default_gradcam_layer(model)
        if layer not in dict(model.named_modules()):
            raise ValueError(f"the model has no module named {layer}; pass a module name as gradcam_layer")
    device = model_device(model)
    x, labels = images.detach().float().to(device), labels.to(device)
    n, channels, height, width = x.shape
    base = torch.zeros(()) if baseline is None else torch.as_tensor(baseline, dtype=torch.float32)
    base = torch.broadcast_to(base.to(device), (1, channels, height, width))
    found = _explain(model, x, labels, methods, target, base, n_steps, layer, deletion_fractions, batch_size)
    num_classes = found["logits"].shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    pixel_mean, pixel_std = (torch.broadcast_to(torch.as_tensor(value, dtype=torch.float32), (channels,)).view(-1, 1, 1)
                             for value in (mean, std))
    variables = {
        "attribution": variable(("method", "sample", "y", "x"), torch.stack(list(found["maps"].values())).cpu(),
                                "attribution of the explained logit per pixel",
                                "logit (ig, gradcam); logit per normalised input unit (saliency); 1 (random)"),
        "image": variable(("sample", "channel", "y", "x"), x.cpu() * pixel_std + pixel_mean,
                          "image (normalised input x std + mean)", "1"),
        "label": variable("sample", labels.cpu(), "true class", "1"),
        "prediction": variable("sample", found["predictions"].cpu(), "predicted class (argmax of the logits)", "1"),
        "deletion_accuracy": variable(("method", "fraction"), found["accuracy"],
                                      "fraction of images still classified as the explained class", "1"),
        "deletion_auc": variable("method", normalised_auc(deletion_fractions, found["accuracy"]),
                                 "normalised area under the deletion curve", "1"),
    }
    variables["image"].attrs.update(mean=pixel_mean.flatten().tolist(), std=pixel_std.flatten().tolist())
    if found["ig_error"] is not None:
        variables["ig_completeness_error"] = variable("sample", found["ig_error"].cpu().double(),
                                                      "sum of IG attributions minus logit(image) - logit(baseline)",
                                                      "logit")
    baseline_text = "zeros: the dataset mean" if baseline is None else "as given"
    return xr.Dataset(
        variables,
        coords={"method": list(found["maps"]), "sample": np.arange(n), "channel": np.arange(channels),
                "y": np.arange(height), "x": np.arange(width), "fraction": np.asarray(deletion_fractions, float),
                "class": np.arange(num_classes), "class_name": ("class", np.array(names, dtype=object))},
        attrs=attrs(definition(methods, target, n_steps, layer, baseline_text), checkpoint=checkpoint,
                    dataset=dataset, split=split, n_images=n, batch_size=batch_size, bn_mode="eval", target=target,
                    n_steps=n_steps, gradcam_layer=layer, baseline=baseline_text, random_seed=RANDOM_SEED),
    )


def combine_models(datasets: list[xr.Dataset], labels: list[str], dataset_attrs: dict) -> xr.Dataset:
    """One dataset along `model` from per-model datasets of the same images: `image` and `label` stay shared,
    every other variable gains the `model` dimension."""
    per_model = [ds.assign({name: ds[name].expand_dims(model=[label]) for name in ds.data_vars
                            if name not in SHARED_VARIABLES}) for ds, label in zip(datasets, labels)]
    combined = xr.concat(per_model, dim="model", data_vars="minimal", coords="minimal", compat="override",
                         combine_attrs="override")
    combined.attrs = dataset_attrs
    return combined
