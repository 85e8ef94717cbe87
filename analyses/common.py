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

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision's names -> autocast dtype
_STAGE_BLOCK = re.compile(r"^stage(\d+)(?:\.block(\d+))?")
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")


def autocast(device_type: str, dtype: torch.dtype | None):
    """torch.autocast in `dtype`, or off (fp32) where it is None: one context for training and every analysis."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def dtype_name(dtype: torch.dtype | None) -> str:
    """An autocast dtype by the name config.json and the datasets' attrs give it: fp32, bf16 or fp16."""
    return next(name for name, value in AUTOCAST.items() if value == dtype)


def software() -> str:
    return f"resnet-diagnostics {models.__version__}, torch {torch.__version__}"


def attrs(definition: str, *, checkpoint=None, dataset=None, split=None, n_images=None, **extra) -> dict:
    """The attrs of docs/design.md §4. netCDF stores no None, so unknown values are written as empty strings."""
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's; a CPU's is done): before and after anything timed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


@contextmanager
def preserved_state(model: nn.Module, bn_statistics: bool = True):
    """On exit, error or not: every module's train/eval mode and BN momentum as they were, no hook that was
    registered inside left behind (fvcore and Captum leave theirs when a forward fails), and, with
    `bn_statistics`, every BN buffer (running mean, variance, batches tracked) restored."""
    modules = list(model.modules())
    modes = [module.training for module in modules]
    hooks = [{name: set(getattr(module, name, {})) for name in _HOOK_DICTS} for module in modules]
    layers = [module for _, module in models.bn_layers(model)]
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


NORM_CHUNK = 1024  # values per float32 reduction: ~1e-7 at this length (2e-6 for a constant chunk's
# vector_norm), 2e-5 on a million values
RAW_MOMENTS_RATIO = 16  # ChannelMoments reads raw sums while every channel's mean^2 + var <= 16 var


def chunked(rows: torch.Tensor, reduce) -> torch.Tensor:
    """`reduce(chunk)` (a float32 reduction over the last dim) of each row's chunks of at most NORM_CHUNK values
    (rows: (..., L), contiguous in L), the chunks' results added in float64."""
    length = rows.shape[-1]
    whole = length - length % NORM_CHUNK
    if whole == 0:
        return reduce(rows).double()
    total = reduce(rows[..., :whole].unflatten(-1, (whole // NORM_CHUNK, NORM_CHUNK))).double().sum(-1)
    return total + reduce(rows[..., whole:]).double() if whole < length else total


def squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Each row's sum of squares, in float64, from float32 `vector_norm`s over chunks (a long row in one
    reduction loses digits: 2e-5 relative on a 1024x1024 plane)."""
    return chunked(rows, lambda chunk: torch.linalg.vector_norm(chunk, dim=-1).double().square())


def row_sums(rows: torch.Tensor) -> torch.Tensor:
    """Each row's sum, in float64, from float32 sums over chunks."""
    return chunked(rows, lambda chunk: chunk.sum(-1))


class ChannelMoments:
    """Per-channel count, mean and variance of a stream of batches (N, C, ...), statistics over every dim but C.

    Each batch is read as planes, one per (image, channel), in its float32 layout, by reductions along contiguous
    memory over chunks of at most NORM_CHUNK values, their results added in float64. On a CPU, first the values'
    sums and sums of squares: two reads and no copy (BatchNorm's own statistics kernel also writes a normalised
    copy: 3-4x slower). They keep the variance to ~1e-6 relative for smooth activations and ~3e-5 for channels of
    few distinct values (float32's roundings then add up in one direction), while mean^2 + var <= RAW_MOMENTS_RATIO
    var (the trained networks' BN inputs: 1.5 typical, 4 at most). A batch with any channel past that, or with a
    square past float32's range, is read again as deviations from its own per-channel mean, so that nothing cancels
    (five reads and a copy; ~1e-6 for smooth activations, ~3e-6 for few-valued ones); on a GPU always so, which
    needs no wait for the device. The batch's moments are merged into the stream's in float64 with exact counts
    (Chan et al.); nothing but the count and two float64 vectors is kept. Limits: float32's, as in the activations
    themselves (a channel whose squared deviations pass 3e38 on a chunk is inf).
    """

    def __init__(self):
        self.count, self.mean, self.squares = 0, None, None  # squares: the sum of squared deviations (M2)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        x = (x if x.dtype == torch.float64 else x.float()).contiguous()
        planes = x.view(x.shape[0], x.shape[1], -1)
        n = planes.shape[0] * planes.shape[2]
        batch_mean = row_sums(planes).sum(0) / n
        exact = planes.device.type != "cpu"  # a GPU's memory is fast, and the check below would wait for it
        if not exact:
            raw_squares = squared_norms(planes).sum(0)
            batch_squares = raw_squares - n * batch_mean.square()
            exact = not bool((RAW_MOMENTS_RATIO * batch_squares - raw_squares >= 0).all())  # inf - inf: NaN
        if exact:
            shift = batch_mean.to(x.dtype)
            deviations = planes - shift.view(1, -1, 1)
            offset = row_sums(deviations).sum(0) / n  # the batch mean less the shift, free of the shift's size
            batch_mean = shift.double() + offset
            batch_squares = (squared_norms(deviations).sum(0) - n * offset.square()).clamp_min(0)
        if self.mean is None:
            self.count, self.mean, self.squares = n, batch_mean, batch_squares
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.squares = self.squares + batch_squares + delta.square() * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divided by the count, not count - 1)."""
        return (self.squares / self.count).clamp_min(0)


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
