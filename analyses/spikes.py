"""Validation-loss spikes and BatchNorm: is a spike in the BN running statistics or in the weights, and why?

Every epoch checkpoint is evaluated with BN normalising in three ways (the modes of `analyses.evaluate`):
- running: by the running statistics training kept (an EMA): the model as trained;
- recalibrated: by population statistics recomputed over training images with the weights fixed (PreciseBN,
  `analyses.bn.recalibrate_bn`, every BN upstream in train mode as in training);
- batch: by each batch's own statistics.
The loss excess of the running statistics over what these weights score is split by recalibration: the share
it removes says "BN statistics" (all of it), "weights" (none) or "mixed", with a jackknife standard error over
the validation batches. Every statistics error is a normalisation error (`analyses.bn`): per BN layer, the
drift of its running statistics from the population's; in eval mode, the mismatch of its input with its running
statistics, against the floor the same pass shows after recalibration (augmented training images against
un-augmented validation images, and sampling); the excess over that floor is what stale statistics add.

Two optional measurements say where and how: the repair curve (the loss when the statistics of only the first k
BN layers are recomputed, and of single layers) locates the layers that carry a spike causally; amplification
(one layer's statistics perturbed by a fixed normalisation error, with the others exact) measures how an error
in the statistics grows or fades through the depth, the direct test of whether skip connections damp it.
"""
from typing import Iterable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import xarray as xr

import models

from .bn import (COMPONENTS, UNITS, BNStatistics, normalisation_error, recalibrate_bn, running_statistics,
                 set_statistics, statistics_error_table)
from .common import (ChannelMoments, attrs, combine, dtype_name, forward_hooks, inputs_of, layer_coords,
                     model_device, preserved_state, variable)
from .evaluate import BN_MODES, predict, set_bn_mode  # BN_MODES: BN_STATISTICS as evaluate names them

BN_STATISTICS = ("running", "recalibrated", "batch")  # the `bn` dim
PERTURBATIONS = ("mean", "scale")  # the `perturbation` dim of the amplification test
CAUSES = ("BN statistics", "mixed", "weights")
BN_SHARE, WEIGHTS_SHARE = 0.8, 0.2  # a share of the excess removed by recalibration above / below: that cause

DEFINITION = (
    "validation cross-entropy and top-1 accuracy of each checkpoint with BN normalising by its running statistics "
    "(running), by population statistics recomputed over {recal_images} training images augmented as in training, "
    "with the weights fixed (recalibrated; fvcore update_bn_stats, BN in train mode upstream), or by each batch's "
    "own statistics (batch); per BN layer, in normalisation-error units (the RMS error of the normalised "
    "activation, sqrt(mean^2 + scale^2), mean = |mu_true - mu_used| / s_used, scale = sqrt(var_true / (var_true + "
    "eps)) |1 - s_true / s_used|, s = sqrt(var + eps), root-mean-squared over channels): drift = running "
    "statistics used where the population statistics were true; drift_consecutive = against the previous "
    "checkpoint's running statistics; eval_mismatch = the statistics of the layer's input on the validation "
    "images in eval mode (every BN upstream on its running statistics) against its running statistics; "
    "mismatch_floor = the same after recalibration (augmented training images against un-augmented validation "
    "images, and sampling); mismatch_excess = eval_mismatch - mismatch_floor; {rule}"
)
REPAIR_DEFINITION = ("repair_loss = validation loss with the first k BN layers (in forward order) normalising by "
                     "recomputed population statistics and the others by their running statistics; "
                     "single_repair_loss = with one layer alone recomputed")
AMPLIFICATION_DEFINITION = (
    "amplification: starting from recomputed population statistics, one BN layer's statistics are perturbed by a "
    "normalisation error of {size:g} (mean: its running mean moved by {size:g} std, a random sign per channel; "
    "scale: its std divided by 1 - {size:g}); amplification_error = the normalisation error of each BN layer's input "
    "statistics in eval mode against the unperturbed ones, amplification_gain = that at the last BN layer divided "
    "by {size:g}, amplification_loss = the change of validation loss, over {images} validation images")


class EvaluationPass(NamedTuple):
    """One pass over the validation batches: the per-batch mean losses, the batch sizes, the accuracy, and the
    statistics of each BN layer's input (when asked for)."""
    batch_loss: np.ndarray
    batch_images: np.ndarray
    accuracy: float
    inputs: dict[str, BNStatistics]

    @property
    def loss(self) -> float:
        return float(np.average(self.batch_loss, weights=self.batch_images))


# ---------------------------------------------------------------------------------------------------------------
# The rule and the share


def spike_rule(window: int, factor: float, min_increase: float, gap_factor: float) -> str:
    return (f"a checkpoint is flagged when its validation loss with running statistics exceeds {factor:g} x the "
            f"median of the previous {window} checkpoints' (a spike; fewer at the start, none for the first) or "
            f"exceeds the recalibrated loss of the same weights {gap_factor:g} x (a BN-statistics gap), in both "
            f"cases by more than {min_increase:g} nats (a NaN loss counts as infinite); its excess is the running "
            f"loss minus the lower of the recalibrated loss and the median of the previous recalibrated losses, and "
            f"the share of that excess recalibration removes calls it BN statistics (share >= {BN_SHARE:g}), "
            f"weights (<= {WEIGHTS_SHARE:g}) or mixed; the share's uncertainty is its jackknife standard error over "
            "the validation batches")


def _as_losses(loss) -> np.ndarray:
    loss = np.asarray(loss, dtype=float)
    return np.where(np.isnan(loss), np.inf, loss)


def previous_medians(loss, window: int) -> np.ndarray:
    """The median of the previous `window` values at each index (NaN at the first)."""
    loss = _as_losses(loss)
    return np.array([np.median(loss[max(0, i - window):i]) if i else np.nan for i in range(len(loss))])


def spike_mask(loss, *, window: int = 3, factor: float = 3.0, min_increase: float = 0.1) -> np.ndarray:
    """Which entries of a loss series jump above the median of the previous `window` ones."""
    if window < 1 or factor <= 0 or min_increase < 0:
        raise ValueError("window must be >= 1, factor > 0 and min_increase >= 0")
    loss, baseline = _as_losses(loss), previous_medians(loss, window)
    with np.errstate(invalid="ignore"):  # inf - inf where a loss and all before it are NaN: not a spike
        return (loss > factor * baseline) & (loss - baseline > min_increase)


def gap_mask(running, recalibrated, *, gap_factor: float = 1.25, min_increase: float = 0.1) -> np.ndarray:
    """Which checkpoints lose clearly more with their running statistics than with recomputed ones: a
    BN-statistics gap, whatever came before (the first checkpoint too)."""
    running, recalibrated = _as_losses(running), np.asarray(recalibrated, dtype=float)
    with np.errstate(invalid="ignore"):
        return (running > gap_factor * recalibrated) & (running - recalibrated > min_increase)


def excess_and_share(running: float, recalibrated: float, trend: float) -> tuple[float, float, float]:
    """(reference, excess, share): the loss these weights should score (the lower of their recalibrated loss and
    the trend of the previous recalibrated losses), the running loss's excess over it, and the share of that
    excess recalibration removes, clipped to [0, 1]; NaN share where there is no excess."""
    reference = recalibrated if not np.isfinite(trend) else min(recalibrated, trend)
    excess = running - reference
    share = float(np.clip((running - recalibrated) / excess, 0, 1)) if excess > 0 else float("nan")
    return reference, excess, share


def jackknife_share(batch_running: np.ndarray, batch_recalibrated: np.ndarray, counts: np.ndarray,
                    trend: float) -> float:
    """Standard error of `excess_and_share`'s share over the validation batches (leave one batch out)."""
    n = len(counts)
    if n < 2:
        return float("nan")
    shares = []
    for left_out in range(n):
        keep = np.arange(n) != left_out
        running = np.average(batch_running[keep], weights=counts[keep])
        recalibrated = np.average(batch_recalibrated[keep], weights=counts[keep])
        shares.append(excess_and_share(running, recalibrated, trend)[2])
    shares = np.asarray(shares)
    if not np.isfinite(shares).all():
        return float("nan")
    return float(np.sqrt((n - 1) / n * np.sum((shares - shares.mean()) ** 2)))


def cause_of(share: float) -> str:
    if not np.isfinite(share):
        return ""
    return CAUSES[0] if share >= BN_SHARE else CAUSES[2] if share <= WEIGHTS_SHARE else CAUSES[1]


# ---------------------------------------------------------------------------------------------------------------
# Passes over the validation images


def evaluation_pass(model: nn.Module, batches: Iterable, bn_mode: str, dtype=None,
                    measure_inputs: bool = False) -> EvaluationPass:
    """Per-batch losses with BN in `bn_mode` ("eval" or "train", running statistics untouched), and with
    `measure_inputs` the statistics of every BN layer's input over all batches."""
    layers = [name for name, module in models.bn_layers(model) if module.running_mean is not None]
    moments = {name: ChannelMoments() for name in layers} if measure_inputs else {}
    hooks = {name: (lambda module, inputs, output, m=m: m.update(inputs[0])) for name, m in moments.items()}
    with preserved_state(model), forward_hooks(model, hooks):
        set_bn_mode(model, bn_mode)
        losses, predictions, labels, _ = predict(model, batches, dtype)
    sizes = np.array([len(y) for _, y in batches])
    batch_loss = np.array([part.mean().item() for part in losses.split(sizes.tolist())])
    eps = {name: module.eps for name, module in models.bn_layers(model)}
    inputs = {name: BNStatistics(m.mean, m.variance, eps[name]) for name, m in moments.items()}
    return EvaluationPass(batch_loss, sizes, (predictions == labels).double().mean().item(), inputs)


# ---------------------------------------------------------------------------------------------------------------
# One checkpoint


def _max_over_channels(used: dict[str, BNStatistics], true: dict[str, BNStatistics], layers: list[str]) -> np.ndarray:
    table = np.full((len(layers), len(COMPONENTS)), np.nan)
    for i, name in enumerate(layers):
        error = normalisation_error(used[name], true[name])
        table[i] = [error[component].max().item() for component in COMPONENTS]
    return table


def diagnose_checkpoint(model: nn.Module, val_batches: Iterable, recal_inputs: Iterable, *,
                        previous: dict[str, BNStatistics] | None = None, dtype: torch.dtype | None = None,
                        checkpoint=None, dataset=None, split=None) -> xr.Dataset:
    """Validation loss and accuracy with running, recalibrated and batch BN statistics (per batch too), and per
    BN layer the drift, consecutive drift (against `previous`, the `running_statistics` of the checkpoint
    before), eval-mode mismatch, its floor and its excess, in normalisation-error units.

    `val_batches`: re-iterable `(images, labels)` batches (evaluated three times); `recal_inputs`: training
    images (bare tensors or `(images, labels)`), augmented as in training. `dtype`: the run's autocast dtype.
    The model comes back exactly as it came. Cost: three passes over `val_batches`, one over `recal_inputs`.
    """
    running = running_statistics(model)
    if not running:
        raise ValueError("the model has no BatchNorm layer with running statistics")
    device = model_device(model)
    val_batches = [(x.to(device), y.to(device)) for x, y in val_batches]
    recal = [x.to(device) for x in inputs_of(recal_inputs)]
    if not val_batches:
        raise ValueError("no validation images were given")
    passes = {"running": evaluation_pass(model, val_batches, "eval", dtype, measure_inputs=True),
              "batch": evaluation_pass(model, val_batches, "train", dtype)}
    with preserved_state(model):
        recal_images = recalibrate_bn(model, recal, dtype)
        population = running_statistics(model)
        passes["recalibrated"] = evaluation_pass(model, val_batches, "eval", dtype, measure_inputs=True)
    layers = list(running)
    mismatch = statistics_error_table(running, passes["running"].inputs, layers).numpy()
    floor = statistics_error_table(population, passes["recalibrated"].inputs, layers).numpy()
    previous = previous or {}
    consecutive = statistics_error_table(previous, running, layers).numpy()
    return xr.Dataset(
        {
            "val_loss": variable("bn", [passes[bn].loss for bn in BN_STATISTICS], "validation cross-entropy", "nats"),
            "val_acc": variable("bn", [passes[bn].accuracy for bn in BN_STATISTICS], "validation top-1 accuracy",
                                "1"),
            "val_batch_loss": variable(("bn", "val_batch"), [passes[bn].batch_loss for bn in BN_STATISTICS],
                                       "validation cross-entropy of each batch", "nats"),
            "val_batch_images": variable("val_batch", passes["running"].batch_images, "images in the batch", "1"),
            "drift": variable(("depth", "component"), statistics_error_table(running, population, layers).numpy(),
                              "normalisation error of the running statistics against the population's", UNITS),
            "drift_max": variable(("depth", "component"), _max_over_channels(running, population, layers),
                                  "normalisation error of the running statistics against the population's, "
                                  "largest channel", UNITS),
            "drift_consecutive": variable(("depth", "component"), consecutive, "normalisation error of the previous "
                                          "checkpoint's running statistics as used for this one's", UNITS),
            "eval_mismatch": variable(("depth", "component"), mismatch, "normalisation error of the running "
                                      "statistics against the layer's input in eval mode", UNITS),
            "mismatch_floor": variable(("depth", "component"), floor, "normalisation error of the recomputed "
                                       "statistics against the layer's input in eval mode after recalibration", UNITS),
            "mismatch_excess": variable(("depth", "component"), mismatch - floor,
                                        "eval-mode mismatch minus its floor", UNITS),
        },
        coords={**layer_coords(layers), "bn": ("bn", list(BN_STATISTICS)), "bn_mode": ("bn", list(BN_MODES)),
                "component": ("component", list(COMPONENTS)),
                "val_batch": ("val_batch", np.arange(len(val_batches)))},
        attrs=attrs(DEFINITION.format(recal_images=recal_images, rule="no rule applied to one checkpoint"),
                    checkpoint=checkpoint, dataset=dataset, split=split,
                    n_images=int(passes["running"].batch_images.sum()),
                    batch_size=int(passes["running"].batch_images.max()), recal_images=recal_images,
                    recal_batch_size=max(len(x) for x in recal),
                    autocast=dtype_name(dtype)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Where and how: repair by depth, amplification


def repair_depths(n_layers: int, most: int = 64) -> np.ndarray:
    """k = 0..n_layers for the repair curve: every layer up to `most` layers, else `most` + 1 even steps."""
    if n_layers <= most:
        return np.arange(n_layers + 1)
    return np.unique(np.linspace(0, n_layers, most + 1).round().astype(int))


@torch.no_grad()
def repair(model: nn.Module, val_batches: Iterable, recal_inputs: Iterable, *, dtype=None,
           singles: int = 3) -> xr.Dataset:
    """`repair_loss` (by `repaired`, the number of first BN layers recomputed) and `single_repair_loss` (by
    `depth`, NaN where not measured) for the layers whose repair lowers the curve most (`singles` of them)."""
    running = running_statistics(model)
    layers = list(running)
    device = model_device(model)
    val_batches = [(x.to(device), y.to(device)) for x, y in val_batches]
    depths = repair_depths(len(layers))
    with preserved_state(model):
        recalibrate_bn(model, [x.to(device) for x in inputs_of(recal_inputs)], dtype)
        population = running_statistics(model)

        def loss_with(repaired: set[str]) -> float:
            set_statistics(model, {name: population[name] if name in repaired else running[name] for name in layers})
            return evaluation_pass(model, val_batches, "eval", dtype).loss

        curve = np.array([loss_with(set(layers[:k])) for k in depths])
        drops = np.full(len(layers), np.nan)  # by the first layer of each step of the curve
        for k0, l0, l1 in zip(depths[:-1], curve[:-1], curve[1:]):
            drops[k0] = l0 - l1
        single = np.full(len(layers), np.nan)
        for j in [int(j) for j in np.argsort(-np.nan_to_num(drops, nan=-np.inf))[:singles] if np.isfinite(drops[j])]:
            single[j] = loss_with({layers[j]})
    return xr.Dataset(
        {"repair_loss": variable("repaired", curve, "validation loss with the first k BN layers recomputed", "nats"),
         "single_repair_loss": variable("depth", single, "validation loss with this BN layer alone recomputed",
                                        "nats")},
        coords={"repaired": ("repaired", depths), **layer_coords(layers)},
    )


def _perturbed(stats: BNStatistics, kind: str, size: float, signs: torch.Tensor) -> BNStatistics:
    """Statistics whose use, for an input of statistics `stats`, makes a normalisation error of `size` in one
    component: the mean moved by `size` std (a sign per channel), or the std divided by 1 - `size`."""
    std = (stats.var.double() + stats.eps).sqrt()
    if kind == "mean":
        return stats._replace(mean=(stats.mean.double() + size * std * signs).to(stats.mean.dtype))
    return stats._replace(var=((std / (1 - size)).square() - stats.eps).to(stats.var.dtype))


@torch.no_grad()
def amplification(model: nn.Module, val_batches: Iterable, recal_inputs: Iterable, *, size: float = 0.1,
                  dtype=None) -> xr.Dataset:
    """For each source layer (`source_depth`) and perturbation kind: the normalisation error it causes at every
    BN layer's input (`amplification_error`, by `depth`), its gain at the last BN layer, and the loss change.
    All BN layers start from recomputed population statistics, so the unperturbed model is the reference."""
    if not 0 < size < 1:
        raise ValueError(f"the perturbation size must be in (0, 1), not {size}")
    device = model_device(model)
    val_batches = [(x.to(device), y.to(device)) for x, y in val_batches]
    layers = list(running_statistics(model))
    sources = np.arange(1, len(layers) + 1)
    error = np.full((len(PERTURBATIONS), len(sources), len(layers)), np.nan)
    loss_change = np.full((len(PERTURBATIONS), len(sources)), np.nan)
    with preserved_state(model):
        recalibrate_bn(model, [x.to(device) for x in inputs_of(recal_inputs)], dtype)
        population = running_statistics(model)
        clean = evaluation_pass(model, val_batches, "eval", dtype, measure_inputs=True)
        generator = torch.Generator().manual_seed(0)
        for i, source in enumerate(sources):
            name = layers[source - 1]
            signs = (torch.randint(0, 2, population[name].mean.shape, generator=generator) * 2 - 1).double()
            for p, kind in enumerate(PERTURBATIONS):
                set_statistics(model, {**population, name: _perturbed(population[name], kind, size, signs)})
                perturbed = evaluation_pass(model, val_batches, "eval", dtype, measure_inputs=True)
                error[p, i] = statistics_error_table(clean.inputs, perturbed.inputs, layers)[:, 0].numpy()
                loss_change[p, i] = perturbed.loss - clean.loss
        set_statistics(model, population)
    n_images = int(clean.batch_images.sum())
    return xr.Dataset(
        {"amplification_error": variable(("perturbation", "source_depth", "depth"), error,
                                         "normalisation error of the layer's input statistics caused by the "
                                         "perturbed layer", UNITS),
         "amplification_gain": variable(("perturbation", "source_depth"),
                                        np.where(sources == len(layers), np.nan, error[:, :, -1] / size),
                                        "normalisation error at the last BN layer's input per unit of the "
                                        "perturbation (none for the last layer itself)", "1"),
         "amplification_loss": variable(("perturbation", "source_depth"), loss_change,
                                        "change of validation loss caused by the perturbation", "nats")},
        coords={"perturbation": ("perturbation", list(PERTURBATIONS)), "source_depth": ("source_depth", sources),
                **layer_coords(layers)},
        attrs={"amplification_size": size, "amplification_images": n_images},
    )  # the attrs are for the caller's dataset attrs: combine drops a part's own


# ---------------------------------------------------------------------------------------------------------------
# A run: flags, shares and the verdict


def spike_diagnosis(parts: list[xr.Dataset], models_: list[str], epochs: list[int], *, history_val_loss: list[float],
                    window: int = 3, factor: float = 3.0, min_increase: float = 0.1, gap_factor: float = 1.25,
                    monitors: dict[str, xr.Dataset] | None = None, **dataset_attrs) -> xr.Dataset:
    """The `diagnose_checkpoint` datasets (optionally merged with `repair` and `amplification` ones) of one or
    more runs along `model` and `epoch`: per checkpoint `spike`, `bn_gap`, `flagged`, the `trend`, `reference`,
    `excess`, `share` and `share_se` and the `cause`; the trainer's logged loss beside; the `verdict` in attrs.
    `monitors`: a run's monitor.nc by model label, for the verdict's step view. `dataset_attrs`: docs/design.md
    §4 attrs and the runs' bn_momentum and precise_bn."""
    rule = spike_rule(window, factor, min_increase, gap_factor)
    parts = [part.assign(history_val_loss=variable((), logged, "validation cross-entropy logged by the trainer "
                                                   "(metrics.csv)", "nats"))
             for part, logged in zip(parts, history_val_loss)]
    ds = combine(parts, models_, epochs, {})
    shape = (ds.sizes["model"], ds.sizes["epoch"])
    found = {name: np.full(shape, np.nan) for name in ("trend", "reference", "excess", "share", "share_se")}
    flags = {name: np.zeros(shape, dtype=bool) for name in ("spike", "bn_gap")}
    cause = np.full(shape, "", dtype=object)
    for m, label in enumerate(ds.model.values):
        one = ds.sel(model=label)
        present = np.flatnonzero(_present(one))
        loss = {bn: one.val_loss.sel(bn=bn).values[present] for bn in BN_STATISTICS}
        trend = previous_medians(loss["recalibrated"], window)
        flags["spike"][m, present] = spike_mask(loss["running"], window=window, factor=factor,
                                                min_increase=min_increase)
        flags["bn_gap"][m, present] = gap_mask(loss["running"], loss["recalibrated"], gap_factor=gap_factor,
                                               min_increase=min_increase)
        for i, e in enumerate(present):
            reference, excess, share = excess_and_share(loss["running"][i], loss["recalibrated"][i], trend[i])
            batch = one.isel(epoch=e)
            counts = batch.val_batch_images.values
            valid = np.isfinite(counts)
            se = jackknife_share(batch.val_batch_loss.sel(bn="running").values[valid],
                                 batch.val_batch_loss.sel(bn="recalibrated").values[valid], counts[valid], trend[i])
            for name, value in zip(("trend", "reference", "excess", "share", "share_se"),
                                   (trend[i], reference, excess, share, se)):
                found[name][m, e] = value
            cause[m, e] = cause_of(share) if flags["spike"][m, e] or flags["bn_gap"][m, e] else ""
    names = {"trend": ("median of the previous checkpoints' recalibrated validation losses", "nats"),
             "reference": ("the loss these weights should score: the lower of recalibrated and trend", "nats"),
             "excess": ("validation loss with running statistics minus the reference", "nats"),
             "share": ("share of the excess that recalibration removes", "1"),
             "share_se": ("jackknife standard error of the share over validation batches", "1")}
    for name, (long_name, units) in names.items():
        ds[name] = variable(("model", "epoch"), found[name], long_name, units)
    ds["spike"] = variable(("model", "epoch"), flags["spike"], "validation-loss spike with running statistics", "1")
    ds["bn_gap"] = variable(("model", "epoch"), flags["bn_gap"], "running statistics cost more than the rule allows",
                            "1")
    ds["flagged"] = variable(("model", "epoch"), flags["spike"] | flags["bn_gap"], "spike or BN-statistics gap", "1")
    ds["cause"] = variable(("model", "epoch"), cause, "BN statistics, weights or mixed (flagged checkpoints)", "1")
    recal_images = parts[0].attrs["recal_images"]
    definition = DEFINITION.format(recal_images=recal_images, rule=rule)
    if "repair_loss" in ds:
        definition += "; " + REPAIR_DEFINITION
    if "amplification_error" in ds:
        definition += "; " + AMPLIFICATION_DEFINITION.format(size=dataset_attrs["amplification_size"],
                                                             images=dataset_attrs["amplification_images"])
    ds.attrs = attrs(definition, rule=rule, spike_window=window, spike_factor=factor, spike_min_increase=min_increase,
                     gap_factor=gap_factor, bn_share=BN_SHARE, weights_share=WEIGHTS_SHARE, recal_images=recal_images,
                     recal_batch_size=parts[0].attrs["recal_batch_size"], autocast=parts[0].attrs["autocast"],
                     **dataset_attrs)
    ds.attrs["verdict"] = verdict(ds, monitors or {})
    return ds


def _present(one: xr.Dataset) -> np.ndarray:
    """The epochs a model has checkpoints of (an accuracy is never NaN where one was evaluated)."""
    return one.val_acc.sel(bn="running").notnull().values


def layer_error(error: xr.DataArray) -> xr.DataArray:
    """The normalisation error's RMS component, the one number per layer the figures and verdicts use."""
    return error.sel(component="rms", drop=True)


def verdict(ds: xr.Dataset, monitors: dict[str, xr.Dataset]) -> list[str]:
    """One sentence per flagged checkpoint with its evidence and share, or one per model without any."""
    lines = []
    for label in ds.model.values:
        one = ds.sel(model=label)
        one = one.isel(epoch=np.flatnonzero(_present(one)))
        flagged = np.flatnonzero(one.flagged.values)
        if len(flagged) == 0:
            lines.append(_nothing_flagged(str(label), one))
        lines += [_flagged_sentence(str(label), one, i, monitors.get(str(label))) for i in flagged]
    return lines


def _share_text(one: xr.Dataset, i: int) -> str:
    share, se = one.share.values[i], one.share_se.values[i]
    if not np.isfinite(share):
        return "there is no excess over what these weights score"
    return f"recalibration removes {share:.0%}" + (f" ± {se:.0%}" if np.isfinite(se) else "") + " of the excess"


def _flagged_sentence(label: str, one: xr.Dataset, i: int, monitor: xr.Dataset | None) -> str:
    loss = {bn: one.val_loss.sel(bn=bn).values[i] for bn in BN_STATISTICS}
    kind = ("spike" if one.spike.values[i] else "") + (" and " if one.spike.values[i] and one.bn_gap.values[i]
                                                       else "") + ("BN-statistics gap" if one.bn_gap.values[i] else "")
    trend = one.trend.values[i]
    head = (f"{label}, epoch {one.epoch.values[i]} ({kind}): validation loss {loss['running']:.3g} with running "
            f"statistics, {loss['recalibrated']:.3g} recalibrated, {loss['batch']:.3g} with batch statistics"
            + (f" (trend {trend:.3g})" if np.isfinite(trend) else " (first checkpoint)")
            + f"; {_share_text(one, i)}: {one.cause.values[i] or 'no excess'}")
    return "; ".join(part for part in (head, _where(one, i), _repair_text(one, i), _monitor_text(one, i, monitor))
                     if part)


def _where(one: xr.Dataset, i: int) -> str:
    """The layer whose running statistics are furthest off, and how the mismatch grows through the depth."""
    drift = layer_error(one.drift.isel(epoch=i)).values
    excess = layer_error(one.mismatch_excess.isel(epoch=i)).values
    floor = layer_error(one.mismatch_floor.isel(epoch=i)).values
    if not np.isfinite(drift).any():
        return ""
    j, k = int(np.nanargmax(drift)), int(np.nanargmax(excess))
    layers = one.layer.values
    median = float(np.nanmedian(drift))
    stands_out = ("it stands out" if drift[j] > 3 * median else
                  f"no single layer stands out (median {median:.2g})")
    last = int(np.flatnonzero(np.isfinite(excess))[-1])
    return (f"the largest drift of the running statistics is {drift[j]:.3g} at {layers[j]} (depth {j + 1}), "
            f"{stands_out}; in eval mode the mismatch exceeds its floor most at {layers[k]} (depth {k + 1}: "
            f"{excess[k]:.3g} over a floor of {floor[k]:.3g}) and by {excess[last]:.3g} at the last BN layer")


def _repair_text(one: xr.Dataset, i: int) -> str:
    if "repair_loss" not in one or not np.isfinite(one.repair_loss.isel(epoch=i).values).any():
        return ""
    curve = one.repair_loss.isel(epoch=i).dropna("repaired")
    k, losses = curve.repaired.values, curve.values
    start, end = losses[0], losses[-1]
    if not start - end > 0:
        return "recomputing the statistics layer by layer does not lower the loss"
    half = int(k[np.flatnonzero(losses <= start - (start - end) / 2)[0]])
    layers = one.layer.values
    single = one.single_repair_loss.isel(epoch=i).values
    best = int(np.nanargmin(single)) if np.isfinite(single).any() else None
    text = (f"recomputing the first k BN layers' statistics halves the loss gap at k = {half} "
            f"({layers[half - 1] if half else 'none'}) and closes it at k = {int(k[-1])}")
    if best is not None:
        text += (f"; repairing {layers[best]} alone gives {single[best]:.3g} (of {start:.3g} -> {end:.3g})")
    return text


def _monitor_text(one: xr.Dataset, i: int, monitor: xr.Dataset | None) -> str:
    """When the BN monitor of the run warned before this checkpoint's validation."""
    if monitor is None or monitor.sizes.get("step", 0) == 0:
        return ""
    epoch = int(one.epoch.values[i])
    within = monitor.where(monitor.epoch == epoch, drop=True)
    if within.sizes.get("step", 0) == 0:
        return f"the BN monitor has no measurement in epoch {epoch}"
    last_step = int(monitor.step.where(monitor.epoch <= epoch, drop=True).max())
    gap = within.probe_loss.sel(bn="running") - within.probe_loss.sel(bn="batch")
    fired = within.step.values[within.warning.values.astype(bool)]
    peak = int(within.step.values[int(np.nanargmax(gap.values))])
    if len(fired):
        return (f"the BN monitor warned first at step {int(fired[0])}, {last_step - int(fired[0])} steps before this "
                f"epoch's validation ({len(fired)} of {within.sizes['step']} measurements in the epoch warned; the "
                f"probe's running-statistics loss exceeded its batch-statistics loss most, by {float(gap.max()):.3g} "
                f"nats, at step {peak})")
    return (f"the BN monitor did not warn in epoch {epoch} (largest probe gap {float(gap.max()):.3g} nats at step "
            f"{peak})")


def _nothing_flagged(label: str, one: xr.Dataset) -> str:
    epochs = one.epoch.values
    loss = {bn: one.val_loss.sel(bn=bn).values for bn in BN_STATISTICS}
    gap = loss["running"] - loss["recalibrated"]
    k = int(np.nanargmax(gap))
    span = f"epochs {epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else f"epoch {epochs[0]}"
    text = (f"{label}: no spike or BN-statistics gap over {span}: validation loss "
            f"{np.min(loss['running']):.3g}-{np.max(loss['running']):.3g} with running statistics, "
            f"{np.min(loss['recalibrated']):.3g}-{np.max(loss['recalibrated']):.3g} recalibrated, "
            f"{np.min(loss['batch']):.3g}-{np.max(loss['batch']):.3g} with batch statistics; the running statistics "
            f"cost most at epoch {epochs[k]}: {max(gap[k], 0):.3g} nats ({_share_text(one, k)})")
    drift = layer_error(one.drift).values  # (epoch, depth)
    if np.isfinite(drift).any():
        e, d = np.unravel_index(np.nanargmax(drift), drift.shape)
        text += (f"; the largest drift is {drift[e, d]:.3g} at {one.layer.values[d]} (epoch {epochs[e]})")
    return text
