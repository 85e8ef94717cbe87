"""Loss and accuracy of a model on a split, with BatchNorm in any of the three modes a spike diagnosis needs.

- `eval`: BN normalises with its running statistics (the EMA training kept): the model as trained.
- `recalibrated`: the running statistics are first recomputed exactly over other batches with the weights
  fixed (PreciseBN, fvcore's `update_bn_stats`), then BN runs in eval mode.
- `train`: BN normalises each batch with that batch's own statistics; nothing is updated.

The model is left exactly as it came: its BN buffers are restored whatever the mode.
"""
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

import models

from .bn import recalibrate_bn
from .common import attrs, autocast, dtype_name, inputs_of, model_device, preserved_state, variable

BN_MODES = ("eval", "recalibrated", "train")


def set_bn_mode(model: nn.Module, bn_mode: str) -> None:
    """Everything in eval mode (no dropout); BN layers in train mode for `train`, with momentum 0 so that
    their running statistics stay as they are."""
    model.eval()
    if bn_mode == "train":
        for _, module in models.bn_layers(model):
            module.train()
            module.momentum = 0.0


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, dtype: torch.dtype | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per-image cross-entropy (float64), predictions and labels, accumulated on the device, and the largest
    batch (with BN in train mode the statistics are that batch's). `dtype`: the autocast dtype (None: fp32)."""
    device = model_device(model)

    def logits():
        for x, y in batches:
            with autocast(device.type, dtype):
                yield model(x.to(device)), y

    return scored(logits())


def scored(batches: Iterable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`predict`'s result from `(logits, labels)` batches: also for logits a training loop's own validation pass
    computed. One batch's logits at a time are kept."""
    losses, predictions, labels = [], [], []
    for logits, y in batches:
        logits = logits.float()
        y = y.to(logits.device)
        losses.append(F.cross_entropy(logits, y, reduction="none").double())
        predictions.append(logits.argmax(1))
        labels.append(y)
    return torch.cat(losses), torch.cat(predictions), torch.cat(labels), max(map(len, labels), default=0)


def evaluate(model: nn.Module, batches: Iterable, *, bn_mode: str = "eval", recalibration: Iterable | None = None,
             dtype: torch.dtype | None = None, num_classes: int | None = None, class_names=None, checkpoint=None,
             dataset=None, split=None) -> xr.Dataset:
    """Mean cross-entropy, accuracy and per-class accuracy over `batches` of `(images, labels)`.

    `recalibration`: the batches (images, or `(images, labels)` pairs) whose population statistics replace
    the running ones when `bn_mode="recalibrated"` (`analyses.bn.recalibrate_bn`). `dtype`: the autocast dtype
    of every pass (None: fp32), the run's own for numbers that equal what its trainer computed.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, not {bn_mode!r}")
    if bn_mode == "recalibrated" and recalibration is None:
        raise ValueError("bn_mode='recalibrated' needs the recalibration batches")
    recal_images = 0
    with preserved_state(model):
        if bn_mode == "recalibrated":
            recal_images = recalibrate_bn(model, inputs_of(recalibration), dtype)
        set_bn_mode(model, bn_mode)
        losses, predictions, labels, batch_size = predict(model, batches, dtype)
    if len(labels) == 0:
        raise ValueError("no images were given")
    num_classes = num_classes or int(labels.max()) + 1
    correct = (predictions == labels).double()
    per_class_total = torch.bincount(labels, minlength=num_classes).double()
    per_class_correct = torch.bincount(labels, weights=correct, minlength=num_classes)
    class_accuracy = (per_class_correct / per_class_total).cpu().numpy()  # NaN for an absent class
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    definition = (f"mean cross-entropy (natural log, no label smoothing) and top-1 accuracy over the images, "
                  f"BN in {bn_mode} mode" + (f" after recomputing BN population statistics over {recal_images} "
                                             "images (fvcore update_bn_stats)" if bn_mode == "recalibrated" else "")
                  + f", {'fp32' if dtype is None else dtype_name(dtype) + ' autocast'}")
    return xr.Dataset(
        {
            "loss": variable((), losses.mean().item(), "cross-entropy", "nats"),
            "accuracy": variable((), correct.mean().item(), "top-1 accuracy", "1"),
            "class_accuracy": variable("class", class_accuracy, "top-1 accuracy of the images of each class", "1"),
            "class_count": variable("class", per_class_total.cpu().numpy().astype(np.int64), "images per class",
                                    "1"),
        },
        coords={"class": np.arange(num_classes), "class_name": ("class", np.array(names, dtype=object))},
        attrs=attrs(definition, checkpoint=checkpoint, dataset=dataset, split=split, n_images=len(labels),
                    bn_mode=bn_mode, recalibration_images=recal_images, batch_size=batch_size),
    )
