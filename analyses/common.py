"""What every analysis shares: hooks that always go away, streaming moments, self-describing datasets.

Analyses are pure: a model and batches in, an `xarray.Dataset` out. No printing, files or plots here.
"""
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import xarray as xr

import models

_STAGE_BLOCK = re.compile(r"^stage(\d+)(?:\.block(\d+))?")


def software() -> str:
    return f"resnet-diagnostics {models.__version__}, torch {torch.__version__}"


def attrs(definition: str, *, checkpoint=None, dataset=None, split=None, n_images=None, **extra) -> dict:
    """The attrs of DESIGN.md §4. netCDF stores no None, so unknown values are written as empty strings."""
    values = {"definition": definition, "checkpoint": checkpoint, "dataset": dataset, "split": split,
              "n_images": n_images, "software": software(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}
    return {key: _netcdf_value(value) for key, value in values.items()}


def _netcdf_value(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value] if any(isinstance(v, str) for v in value) else list(value)
    return value


def variable(dims, values, long_name: str, units: str) -> xr.Variable:
    return xr.Variable(dims, np.asarray(values), {"long_name": long_name, "units": units})


def stage_and_block(layer: str) -> tuple[int, int]:
    """(stage, block) from a layer name of this package: stem layers are stage 0; unknown names (-1, -1)."""
    if layer.startswith("stem"):
        return 0, 0
    match = _STAGE_BLOCK.match(layer)
    if not match:
        return -1, -1
    return int(match.group(1)), int(match.group(2) or 0)


def layer_coords(layers: list[str]) -> dict:
    """Coordinates along `depth` (1-based, forward order): the module name, its stage and block."""
    stages, blocks = zip(*(stage_and_block(layer) for layer in layers)) if layers else ((), ())
    return {"depth": ("depth", np.arange(1, len(layers) + 1)), "layer": ("depth", np.array(layers, dtype=object)),
            "stage": ("depth", np.array(stages)), "block": ("depth", np.array(blocks))}


def inputs_of(batches: Iterable) -> Iterable[torch.Tensor]:
    """The images of batches given as `(images, labels)` pairs or as bare image tensors."""
    for batch in batches:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def forward_hooks(model: nn.Module, hooks: dict[str, Callable]):
    """Register `hook(module, inputs, output)` on the named modules; removed on exit, error or not."""
    modules = dict(model.named_modules())
    missing = [name for name in hooks if name not in modules]
    if missing:
        raise ValueError(f"the model has no module named {', '.join(missing)}")
    handles = []
    try:
        for name, hook in hooks.items():
            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class ChannelMoments:
    """Per-channel count, mean and variance of a stream of batches, from three float64 vectors on the tensor's
    device: the count and the sums of the deviations, and of their squares, from a fixed per-channel shift
    near the mean (the first image's first value). Nothing else is kept.

    The sums are taken in float64 straight from the activation as it is (float32, in its memory format): one
    pass, no float64 copy of the activation, no cancellation (the shift is near the mean), and the same result
    whatever the batch size up to float64 rounding."""

    def __init__(self):
        self.count, self.shift, self.total, self.squares = 0, None, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        """x: (N, C, ...) -> statistics over every dim but C."""
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):  # bf16/fp16 activations under autocast
            x = x.float()
        if self.shift is None:
            self.shift = x[(0, slice(None)) + (0,) * (x.dim() - 2)].clone()
        deviation = x - self.shift.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        dims = [0, *range(2, x.dim())]
        self.total = self.total + deviation.sum(dims, dtype=torch.float64)
        self.squares = self.squares + deviation.square().sum(dims, dtype=torch.float64)
        self.count += x.numel() // x.shape[1]

    @property
    def mean(self) -> torch.Tensor | None:
        return None if self.shift is None else self.shift.double() + self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divided by the count, not count - 1)."""
        return (self.squares / self.count - (self.total / self.count).square()).clamp_min(0)


def combine(datasets: list[xr.Dataset], models_: list[str], epochs: list[int], dataset_attrs: dict) -> xr.Dataset:
    """One dataset along `model` and `epoch` from per-checkpoint datasets that share dims.

    Models of different depth are aligned on `depth` (missing entries NaN); per-depth coordinates such as
    `layer` become (model, depth) coordinates, with "" (strings) or -1 (integers) where a model has no layer.
    """
    pairs = list(zip(models_, epochs))
    if len(set(pairs)) < len(pairs):
        raise ValueError(f"two datasets share a (model, epoch): {sorted(p for p in pairs if pairs.count(p) > 1)[0]}")
    keyed = {}
    for ds, model_label, epoch in zip(datasets, models_, epochs):
        keyed.setdefault(model_label, []).append(ds.expand_dims(epoch=[epoch]))
    per_model = []
    for model_label, parts in keyed.items():
        ds = xr.concat(parts, dim="epoch") if len(parts) > 1 else parts[0]
        per_model.append(ds.expand_dims(model=[model_label]))
    depth_coords = {name for ds in datasets for name, coord in ds.coords.items()
                    if coord.dims == ("depth",) and name != "depth"}
    per_model = [_lift_depth_coords(ds, depth_coords) for ds in per_model]
    combined = xr.concat(per_model, dim="model", join="outer", coords="different", compat="equals",
                         combine_attrs="drop")
    for name in depth_coords:
        coord = combined[name]
        if coord.dtype == object:
            combined = combined.assign_coords({name: coord.fillna("")})
        elif np.issubdtype(coord.dtype, np.floating):
            combined = combined.assign_coords({name: coord.fillna(-1).astype(int)})
    for name in combined.data_vars:  # concat drops nothing but attrs of coordinates can be lost
        source = next((ds[name].attrs for ds in datasets if name in ds), {})
        combined[name].attrs = dict(source)
    combined.attrs = dataset_attrs
    return combined


def _lift_depth_coords(ds: xr.Dataset, names: set[str]) -> xr.Dataset:
    """Make per-depth coordinates depend on `model` too, so models of different depth keep their own."""
    lifted = {name: ds[name].expand_dims(model=ds["model"].values) for name in names if name in ds.coords}
    return ds.assign_coords(lifted)
