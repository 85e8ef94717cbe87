"""Which pixels a model's decision rests on: Captum's Integrated Gradients, Saliency and Grad-CAM, and how
faithful each map is, by the deletion and insertion curves of Petsiuk et al. 2018 (RISE).

Every map is one value per pixel, so that explainers and models compare on the same grid:
- `ig`: Integrated Gradients (Sundararajan et al. 2017) from the baseline, summed over the input channels with
  its sign; by completeness it sums to logit(image) - logit(baseline), up to the integration error.
- `saliency`: the largest absolute gradient of the logit over the input channels (Simonyan et al. 2014).
- `gradcam`: Grad-CAM (Selvaraju et al. 2017) at the output of a layer, ReLU'd and bilinearly upsampled; by
  default the last feature map larger than 1x1 (`choose_gradcam_layer`): a 1x1 map (VGG's last stage on 32x32
  images ends in its fifth max-pool) would give every pixel of an image the same value.
- `random`: uniform noise from a fixed seed, the reference a map must beat; it also breaks the others' ties.

Faithfulness ranks each image's pixels by the map, highest first. Deletion sets the top-ranked fraction of the
pixels (all channels) to the baseline, for fractions from 0 to 1, and follows the softmax probability of the
explained class; insertion starts from the baseline and puts the image's pixels back in the same order. The
area under each curve is a score in [0, 1] per image: lower deletion AUC and higher insertion AUC mean a more
faithful map. The scores are given per image and as their mean and standard error over the images, the random
order's beside them.
"""
import numpy as np
import torch
import torch.nn as nn
import xarray as xr
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

from .common import attrs, forward_hooks, model_device, preserved_state, variable

EXPLAINERS = ("ig", "saliency", "gradcam")
TARGETS = ("label", "prediction")
FRACTIONS = tuple(step / 20 for step in range(21))  # 0, 5%, ..., 100% of the pixels
RANDOM_SEED = 0
INSERTION_START = "the baseline"  # Petsiuk et al. start insertion from a blurred image; we start where IG does
SHARED_VARIABLES = ("image", "label")  # the same for every model of the same images


# ---------------------------------------------------------------------------------------------------------------
# Grad-CAM's layer


def _feature_maps(model: nn.Module, image_shape) -> tuple[list[str], dict[str, tuple]]:
    """One eval-mode forward pass on zeros of `image_shape` (C, H, W): the (C, H, W) output of each module that
    returns an (N, C, H, W) tensor, and, in the order their forward passes finish, the feature maps Grad-CAM may
    use: the outputs of modules that hold a Conv2d, and of modules that take such a map and keep its shape (the
    BN, ReLU or dropout after a conv)."""
    shapes, candidates, latest = {}, [], {}

    def record(name: str, holds_conv: bool):
        def hook(module, inputs, output):
            if not (isinstance(output, torch.Tensor) and output.dim() == 4):
                return
            shapes[name] = tuple(output.shape[1:])
            before = latest.get("map")
            follows = before is not None and inputs and inputs[0] is before and output.shape == before.shape
            if holds_conv or follows:
                latest["map"] = output
                candidates.append(name)
        return hook

    hooks = {name: record(name, any(isinstance(m, nn.Conv2d) for m in module.modules()))
             for name, module in model.named_modules() if name}
    with preserved_state(model, bn_statistics=False), forward_hooks(model, hooks), torch.no_grad():
        model.eval()
        model(torch.zeros(1, *image_shape, device=model_device(model)))
    return candidates, shapes


def choose_gradcam_layer(model: nn.Module, image_shape, layer: str | None = None) -> tuple[str, tuple]:
    """(module name, its output's (C, H, W)) where Grad-CAM looks on images of `image_shape` (C, H, W): `layer`,
    or by default the last feature map larger than 1x1 (see `_feature_maps`): our ResNets' last stage, VGG's last
    ReLU before its fifth max-pool, torchvision's `layer3` for a ResNet on 32x32 images (its `layer4` is 1x1)."""
    if layer is not None and layer not in dict(model.named_modules()):
        raise ValueError(f"the model has no module named {layer}; pass a module name as gradcam_layer")
    candidates, shapes = _feature_maps(model, image_shape)
    larger = [name for name in candidates if shapes[name][1] * shapes[name][2] > 1]
    size = "x".join(map(str, image_shape[1:]))
    if layer is None:
        if not larger:
            raise ValueError(f"the model has no convolutional feature map larger than 1x1 on {size} images; pass "
                             "gradcam_layer")
        layer = larger[-1]
    if layer not in shapes:
        raise ValueError(f"{layer} returns no (N, C, H, W) feature map; pass another module as gradcam_layer")
    if shapes[layer][1] * shapes[layer][2] == 1:
        raise ValueError(f"{layer}'s output is {'x'.join(map(str, shapes[layer]))} on {size} images: its Grad-CAM "
                         f"would be one value per image; choose a larger map" +
                         (f" such as {larger[-1]}" if larger else ""))
    return layer, shapes[layer]


# ---------------------------------------------------------------------------------------------------------------
# Per-pixel maps: (N, C, H, W) images -> (N, H, W)


MAX_STEPS = 1024  # Gauss-Legendre's nodes come from an n x n eigenproblem: 8 MB at 1024, 8 TB at a million


def _pixel_map(explainer: str, model, x, targets, baseline, n_steps: int, layer: str, batch_size: int):
    """One explainer's (N, H, W) map: IG summed over channels, saliency's max over channels, Grad-CAM at `layer`
    bilinearly upsampled to the input."""
    x = x.detach().requires_grad_()  # Captum would do it, with a warning
    if explainer == "ig":
        return IntegratedGradients(model).attribute(x, baselines=baseline, target=targets, n_steps=n_steps,
                                                    internal_batch_size=batch_size).sum(1)
    if explainer == "saliency":
        return Saliency(model).attribute(x, target=targets, abs=True).amax(1)
    cam = LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=targets, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Deletion and insertion


def importance_ranks(pixel_map: torch.Tensor, tie_break: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> the rank of each pixel in its image, 0 for the highest value; equal values are ordered by
    `tie_break` (highest first), so a constant map ranks in `tie_break`'s order."""
    values, keys = pixel_map.flatten(1), tie_break.flatten(1)
    by_key = keys.argsort(1, descending=True)
    order = by_key.gather(1, values.gather(1, by_key).argsort(dim=1, descending=True, stable=True))
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions).view_as(pixel_map)


def perturb(x: torch.Tensor, ranks: torch.Tensor, fraction: float, baseline: torch.Tensor):
    """(deleted, inserted): the images with their round(fraction x H x W) top-ranked pixels set to the baseline
    in every channel, and the baseline with those pixels taken from the images."""
    top = (ranks < round(fraction * ranks[0].numel()))[:, None]
    return torch.where(top, baseline, x), torch.where(top, x, baseline)


def normalised_auc(fractions, curve: np.ndarray) -> np.ndarray:
    """Trapezoidal area under curve(fraction) along the last axis, divided by the span of the fractions: the
    curve's mean, in [0, 1] for a probability."""
    fractions = np.asarray(fractions, dtype=float)
    heights = (curve[..., 1:] + curve[..., :-1]) / 2  # np.trapezoid needs numpy 2, we allow 1.24
    return (heights * np.diff(fractions)).sum(-1) / (fractions[-1] - fractions[0])


def mean_and_sem(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the last axis and its standard error, std (ddof=1) / sqrt(n); NaN where n is 1."""
    n = values.shape[-1]
    sem = values.std(-1, ddof=1) / np.sqrt(n) if n > 1 else np.full(values.shape[:-1], np.nan)
    return values.mean(-1), sem


@torch.no_grad()
def faithfulness_curves(model, x, targets, pixel_map, tie_break, fractions, baseline, batch_size: int):
    """(N, 2, F): the softmax probability of each image's `targets` class after deletion (0) and insertion (1)
    of each fraction of its pixels in the map's order; a slice of images goes through the model with all its
    perturbations in passes of at most `batch_size` images."""
    def probabilities(part):
        ranks = importance_ranks(pixel_map[part], tie_break[part])
        deleted, inserted = zip(*(perturb(x[part], ranks, fraction, baseline) for fraction in fractions))
        images = torch.cat(deleted + inserted)  # (curve, fraction, image) flattened
        probability = model(images).float().softmax(1)
        n = len(images) // (2 * len(fractions))
        explained = targets[part].repeat(2 * len(fractions))[:, None]
        return probability.gather(1, explained).view(2, len(fractions), n).permute(2, 0, 1)
    return _in_batches(probabilities, len(x), max(1, batch_size // (2 * len(fractions))))


# ---------------------------------------------------------------------------------------------------------------
# The analysis


def _check_options(explainers, target, fractions, n_steps) -> None:
    unknown = [name for name in explainers if name not in EXPLAINERS]
    if unknown or not explainers:
        raise ValueError(f"explainers must be some of {', '.join(EXPLAINERS)}, not {', '.join(unknown) or 'none'}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    fractions = np.asarray(fractions, dtype=float)
    if len(fractions) < 2 or np.any(np.diff(fractions) <= 0) or fractions[0] != 0 or fractions[-1] != 1:
        raise ValueError("fractions must be increasing from 0 to 1 (the whole deletion and insertion curves)")
    if not 1 <= n_steps <= MAX_STEPS:
        raise ValueError(f"n_steps must be from 1 to {MAX_STEPS}, not {n_steps}")


def definition(explainers, target: str, n_steps: int, layer: str, baseline: str) -> str:
    """The one sentence of docs/design.md §4 for these options; `layer` names Grad-CAM's layer and its size."""
    maps = {"ig": f"ig = Integrated Gradients (Captum, {n_steps} Gauss-Legendre steps from the baseline) summed "
                  "over input channels with its sign",
            "saliency": "saliency = max over input channels of |d logit / d input|",
            "gradcam": f"gradcam = ReLU(Grad-CAM at {layer}) bilinearly upsampled (half-pixel centres) to the "
                       "input size"}
    return (f"per-pixel attribution of the logit of the {'true label' if target == 'label' else 'predicted class'}"
            f" with BN in eval mode, {'; '.join(maps[name] for name in explainers)}; random = uniform noise (seed "
            f"{RANDOM_SEED}) that also orders equal values; deletion_probability = softmax probability of that "
            f"class after the round(fraction x H x W) pixels of highest attribution are set to the baseline "
            f"({baseline}) in every channel, insertion_probability = the same for {INSERTION_START} with those "
            "pixels taken from the image (Petsiuk et al. 2018); deletion_auc and insertion_auc = the trapezoidal "
            "area under each image's curve over fractions 0 to 1 (lower deletion, higher insertion = more "
            "faithful), *_auc_mean and *_auc_sem = their mean and standard error (std ddof=1 / sqrt(n)) over the "
            "images")


def _in_batches(function, n: int, batch_size: int) -> torch.Tensor:
    """function(slice) for consecutive slices of at most `batch_size` of n images, concatenated."""
    return torch.cat([function(slice(start, start + batch_size)) for start in range(0, n, batch_size)])


def _explain(model, x, labels, explainers, target: str, baseline, n_steps: int, layer: str, fractions,
             batch_size: int) -> dict:
    """Everything that runs the model (in eval mode, its modes restored after): logits, maps, faithfulness."""
    noise = torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(RANDOM_SEED))
    noise = noise.to(x.device)
    with preserved_state(model):
        model.eval()
        with torch.no_grad():
            logits = _in_batches(lambda part: model(x[part]), len(x), batch_size)
            baseline_logits = model(baseline)[0]
        predictions = logits.argmax(1)
        targets = labels if target == "label" else predictions
        maps = {name: _in_batches(lambda part: _pixel_map(name, model, x[part], targets[part], baseline, n_steps,
                                                          layer, batch_size), len(x), batch_size).detach()
                for name in explainers}
        maps["random"] = noise
        curves = [faithfulness_curves(model, x, targets, pixel_map, noise, fractions, baseline, batch_size)
                  for pixel_map in maps.values()]
    # IG's completeness: its sum is logit(image) - logit(baseline) up to the integration error of n_steps
    gap = logits.gather(1, targets[:, None])[:, 0] - baseline_logits[targets]
    return {"logits": logits, "predictions": predictions, "maps": maps,
            "curves": torch.stack(curves).cpu().double().numpy(),  # (explainer, sample, curve, fraction)
            "ig_error": maps["ig"].sum((1, 2)) - gap if "ig" in maps else None}


def _faithfulness_variables(curves: np.ndarray, fractions) -> dict:
    explained = "the softmax probability of the explained class"
    variables = {
        "deletion_probability": variable(("explainer", "sample", "fraction"), curves[:, :, 0],
                                         f"{explained} with the top-ranked fraction of pixels deleted", "1"),
        "insertion_probability": variable(("explainer", "sample", "fraction"), curves[:, :, 1],
                                          f"{explained} with the top-ranked fraction of pixels inserted into "
                                          f"{INSERTION_START}", "1"),
    }
    for curve, better in (("deletion", "lower"), ("insertion", "higher")):
        auc = normalised_auc(fractions, variables[f"{curve}_probability"].values)
        mean, sem = mean_and_sem(auc)
        long_name = f"area under the {curve} curve over fractions 0 to 1 ({better} = more faithful)"
        variables |= {f"{curve}_auc": variable(("explainer", "sample"), auc, long_name, "1"),
                      f"{curve}_auc_mean": variable("explainer", mean, f"{long_name}, mean over the images", "1"),
                      f"{curve}_auc_sem": variable("explainer", sem, f"{long_name}, standard error of the mean over "
                                                   "the images (std ddof=1 / sqrt(n))", "1")}
    return variables


def attributions(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, explainers=EXPLAINERS, *,
                 target: str = "label", baseline=None, n_steps: int = 32, gradcam_layer: str | None = None,
                 fractions=FRACTIONS, batch_size: int = 256, mean=0.0, std=1.0, class_names=None, checkpoint=None,
                 dataset=None, split=None) -> xr.Dataset:
    """Attribution maps of `images` (normalised, (N, C, H, W)) for the class `target` names, and their deletion
    and insertion curves, with a `random` reference row.

    `baseline`: what a removed pixel becomes, where insertion and IG start, broadcastable to one image
    (C, H, W); default zeros, which is the dataset mean after normalisation. `gradcam_layer`: a module name, by
    default the last feature map larger than 1x1 (`choose_gradcam_layer`). `fractions`: where the curves are
    measured, increasing from 0 to 1. `mean`/`std`: the normalisation the images were made with; `image` stores
    `images * std + mean` (pixel values in [0, 1] for the dataset's statistics). `batch_size` bounds the images
    per forward pass (IG: images x steps). The model is left as it came: same modes, no hook, no grad.
    """
    explainers = list(explainers)
    _check_options(explainers, target, fractions, n_steps)
    n, channels, height, width = images.shape
    layer, layer_shape = "", ()
    if "gradcam" in explainers:
        layer, layer_shape = choose_gradcam_layer(model, (channels, height, width), gradcam_layer)
    device = model_device(model)
    x, labels = images.detach().float().to(device), labels.to(device)
    base = torch.zeros(()) if baseline is None else torch.as_tensor(baseline, dtype=torch.float32)
    base = torch.broadcast_to(base.to(device), (1, channels, height, width))
    found = _explain(model, x, labels, explainers, target, base, n_steps, layer, fractions, batch_size)
    num_classes = found["logits"].shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    pixel_mean, pixel_std = (torch.broadcast_to(torch.as_tensor(value, dtype=torch.float32), (channels,)).view(-1, 1, 1)
                             for value in (mean, std))
    variables = {
        "attribution": variable(("explainer", "sample", "y", "x"), torch.stack(list(found["maps"].values())).cpu(),
                                "attribution of the explained logit per pixel",
                                "logit (ig, gradcam); logit per normalised input unit (saliency); 1 (random)"),
        "image": variable(("sample", "channel", "y", "x"), x.cpu() * pixel_std + pixel_mean,
                          "image (normalised input x std + mean)", "1"),
        "label": variable("sample", labels.cpu(), "true class", "1"),
        "prediction": variable("sample", found["predictions"].cpu(), "predicted class (argmax of the logits)", "1"),
        **_faithfulness_variables(found["curves"], fractions),
    }
    variables["image"].attrs.update(mean=pixel_mean.flatten().tolist(), std=pixel_std.flatten().tolist())
    if found["ig_error"] is not None:
        variables["ig_completeness_error"] = variable("sample", found["ig_error"].cpu().double(),
                                                      "sum of IG attributions minus logit(image) - logit(baseline)",
                                                      "logit")
    baseline_text = "zeros: the dataset mean" if baseline is None else "as given"
    layer_size = "x".join(map(str, layer_shape))
    return xr.Dataset(
        variables,
        coords={"explainer": list(found["maps"]), "sample": np.arange(n), "channel": np.arange(channels),
                "y": np.arange(height), "x": np.arange(width), "fraction": np.asarray(fractions, float),
                "class": np.arange(num_classes), "class_name": ("class", np.array(names, dtype=object))},
        attrs=attrs(definition(explainers, target, n_steps, f"{layer} ({layer_size})", baseline_text),
                    checkpoint=checkpoint, dataset=dataset, split=split, n_images=n, batch_size=batch_size,
                    bn_mode="eval", target=target, n_steps=n_steps, gradcam_layer=layer,
                    gradcam_layer_shape=layer_size, baseline=baseline_text, insertion_start=INSERTION_START,
                    random_seed=RANDOM_SEED),
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
