"""Validation-loss spikes and BatchNorm: does a spike lie in the BN running statistics or in the weights?

Every epoch checkpoint is evaluated with BN in three ways (the modes of `analyses.evaluate`):
- running: BN normalises with the running statistics training kept (an EMA): the model as trained;
- recalibrated: the same weights, every BN layer's statistics recomputed exactly over training images
  (PreciseBN, fvcore's `update_bn_stats`, which runs BN in train mode upstream as training does);
- batch: BN normalises each batch with that batch's own statistics.
A spike of the running-statistics loss that vanishes when recalibrated lies in the BN running statistics; one
that stays lies in the weights. The recalibrated statistics are the population statistics of each BN layer's
input, so the same pass measures how far each layer's running statistics have drifted from them.
"""
from typing import Iterable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import xarray as xr

import models

from .common import ChannelMoments, attrs, combine, forward_hooks, inputs_of, layer_coords, model_device, preserved_state, variable
from .evaluate import evaluate

BN_STATISTICS = ("running", "recalibrated", "batch")  # the `bn` dim
EVALUATE_MODES = ("eval", "recalibrated", "train")  # the same, as analyses.evaluate names them
STATS = ("mean_shift", "log_var_ratio")  # the `stat` dim

DEFINITION = (
    "validation cross-entropy and top-1 accuracy of each epoch checkpoint with BN normalising by its running "
    "statistics (running), by population statistics recomputed over {recal_images} training images "
    "with the weights fixed (recalibrated; fvcore update_bn_stats, BN in train mode upstream), or by each batch's "
    "own statistics (batch); and per BN layer, over channels (drift: mean, drift_max: max), the distance of the "
    "running statistics from those population statistics, mean_shift = |mu_running - mu_pop| / sqrt(var_pop + "
    "eps) and log_var_ratio = |ln((var_running + eps) / (var_pop + eps))|, and the same for the running "
    "statistics against the previous checkpoint's (drift_consecutive, still in units of the population std), and "
    "the same measures between the statistics of each BN layer's input on the validation images in eval mode "
    "(every BN upstream normalising with its running statistics) and the layer's running statistics "
    "(eval_mismatch, in units of the running std): how a mismatch propagates and grows through the depth; "
    "{rule}"
)


class BNStatistics(NamedTuple):
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic


def spike_rule(window: int, factor: float, min_increase: float) -> str:
    return (f"a spike is a checkpoint whose validation loss with running statistics exceeds {factor:g} x the median "
            f"of the previous {window} checkpoints' (fewer at the start; the first checkpoint is never a spike) and "
            f"exceeds that median by more than {min_increase:g} nats; a NaN loss counts as infinite")


def _as_losses(loss) -> np.ndarray:
    loss = np.asarray(loss, dtype=float)
    return np.where(np.isnan(loss), np.inf, loss)


def previous_medians(loss, window: int) -> np.ndarray:
    """The median of the previous `window` values at each index (NaN at the first)."""
    loss = _as_losses(loss)
    return np.array([np.median(loss[max(0, i - window):i]) if i else np.nan for i in range(len(loss))])


def spike_mask(loss, *, window: int = 3, factor: float = 3.0, min_increase: float = 0.1) -> np.ndarray:
    """Which entries of a loss series are spikes by `spike_rule`."""
    if window < 1 or factor <= 0 or min_increase < 0:
        raise ValueError("window must be >= 1, factor > 0 and min_increase >= 0")
    loss, baseline = _as_losses(loss), previous_medians(loss, window)
    with np.errstate(invalid="ignore"):  # inf - inf where a loss and all before it are NaN: not a spike
        return (loss > factor * baseline) & (loss - baseline > min_increase)


def find_spikes(val_loss, *, window: int = 3, factor: float = 3.0, min_increase: float = 0.1) -> tuple[np.ndarray, str]:
    """Indices of the spikes of a validation-loss series (one value per checkpoint, in order) and the rule."""
    mask = spike_mask(val_loss, window=window, factor=factor, min_increase=min_increase)
    return np.flatnonzero(mask), spike_rule(window, factor, min_increase)


def bn_drift(mean: torch.Tensor, var: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor, eps: float,
             unit_var: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per channel, in float64: `mean_shift` = |mean - ref_mean| / sqrt(unit_var + eps), where `unit_var`
    defaults to `ref_var`, and `log_var_ratio` = |ln((var + eps) / (ref_var + eps))|."""
    mean, var, ref_mean, ref_var = (t.double() for t in (mean, var, ref_mean, ref_var))
    unit_var = ref_var if unit_var is None else unit_var.double()
    return {"mean_shift": (mean - ref_mean).abs() / (unit_var + eps).sqrt(),
            "log_var_ratio": ((var + eps) / (ref_var + eps)).log().abs()}


# ---------------------------------------------------------------------------------------------------------------
# One checkpoint


def running_statistics(model: nn.Module) -> dict[str, BNStatistics]:
    """A copy of every BN layer's running mean and variance (layers that keep none are left out)."""
    return {name: BNStatistics(module.running_mean.detach().clone(), module.running_var.detach().clone(), module.eps)
            for name, module in models.bn_layers(model) if module.running_mean is not None}


def _drift_table(stats: dict[str, BNStatistics], reference: dict[str, BNStatistics],
                 population: dict[str, BNStatistics]) -> tuple[np.ndarray, np.ndarray]:
    """(depth, stat) mean and max over channels of `bn_drift(stats, reference)` in population-std units; NaN
    for layers `reference` lacks."""
    mean, peak = np.full((len(stats), len(STATS)), np.nan), np.full((len(stats), len(STATS)), np.nan)
    for i, (name, s) in enumerate(stats.items()):
        if name not in reference:
            continue
        r = reference[name]
        drift = bn_drift(s.mean, s.var, r.mean, r.var, s.eps, unit_var=population[name].var)
        mean[i] = [drift[stat].mean().item() for stat in STATS]
        peak[i] = [drift[stat].max().item() for stat in STATS]
    return mean, peak


def diagnose_checkpoint(model: nn.Module, val_batches: Iterable, recal_batches: Iterable, *,
                        previous: dict[str, BNStatistics] | None = None, checkpoint=None, dataset=None,
                        split=None) -> xr.Dataset:
    """Validation loss and accuracy with running, recalibrated and batch BN statistics, and per BN layer the
    drift of its running statistics from the population statistics of its input (and from `previous`, the
    `running_statistics` of the checkpoint before).

    `val_batches`: re-iterable `(images, labels)` batches (evaluated three times); `recal_batches`: training
    images, bare or as `(images, labels)`. The model comes back exactly as it came.
    Cost: three passes over `val_batches` and one over `recal_batches`.
    """
    running = running_statistics(model)
    if not running:
        raise ValueError("the model has no BatchNorm layer with running statistics")
    device = model_device(model)
    recal = [x.to(device) for x in inputs_of(recal_batches)]
    if not recal:
        raise ValueError("no recalibration images were given")
    scores, as_evaluated = {}, {name: ChannelMoments() for name in running}
    hooks = {name: (lambda module, inputs, output, m=as_evaluated[name]: m.update(inputs[0])) for name in running}
    with forward_hooks(model, hooks):
        scores["running"] = evaluate(model, val_batches, bn_mode="eval")
    scores["batch"] = evaluate(model, val_batches, bn_mode="train")
    with preserved_state(model):
        models.recalibrate_bn(model, iter(recal), len(recal))
        population = running_statistics(model)
        scores["recalibrated"] = evaluate(model, val_batches, bn_mode="eval")
    drift, drift_max = _drift_table(running, population, population)
    consecutive, _ = _drift_table(running, previous or {}, population)
    inputs = {name: BNStatistics(m.mean, m.variance, running[name].eps) for name, m in as_evaluated.items()}
    mismatch, mismatch_max = _drift_table(inputs, running, running)
    recal_images = sum(len(x) for x in recal)
    layers = list(running)
    return xr.Dataset(
        {
            "val_loss": variable("bn", [scores[bn].loss.item() for bn in BN_STATISTICS], "validation cross-entropy",
                                 "nats"),
            "val_acc": variable("bn", [scores[bn].accuracy.item() for bn in BN_STATISTICS],
                                "validation top-1 accuracy", "1"),
            "drift": variable(("depth", "stat"), drift, "drift of BN running statistics from the population "
                              "statistics of the layer's input, mean over channels", "1"),
            "drift_max": variable(("depth", "stat"), drift_max, "drift of BN running statistics from the "
                                  "population statistics of the layer's input, max over channels", "1"),
            "drift_consecutive": variable(("depth", "stat"), consecutive, "change of BN running statistics since "
                                          "the previous checkpoint, mean over channels", "1"),
            "eval_mismatch": variable(("depth", "stat"), mismatch, "mismatch of the layer's input in eval mode with "
                                      "its running statistics, mean over channels", "1"),
            "eval_mismatch_max": variable(("depth", "stat"), mismatch_max, "mismatch of the layer's input in eval "
                                          "mode with its running statistics, max over channels", "1"),
        },
        coords={**layer_coords(layers), "bn": ("bn", list(BN_STATISTICS)), "bn_mode": ("bn", list(EVALUATE_MODES)),
                "stat": ("stat", list(STATS))},
        attrs=attrs(DEFINITION.format(recal_images=recal_images, rule="no spike rule applied to one checkpoint"),
                    checkpoint=checkpoint, dataset=dataset, split=split,
                    n_images=scores["running"].attrs["n_images"], batch_size=scores["batch"].attrs["batch_size"],
                    recal_images=recal_images, recal_batch_size=max(len(x) for x in recal)),
    )


# ---------------------------------------------------------------------------------------------------------------
# A run: spikes and the verdict


def spike_diagnosis(parts: list[xr.Dataset], models_: list[str], epochs: list[int], *, history_val_loss: list[float],
                    window: int = 3, factor: float = 3.0, min_increase: float = 0.1, **dataset_attrs) -> xr.Dataset:
    """The `diagnose_checkpoint` datasets of one or more runs along `model` and `epoch`, with `spike` marked by
    `spike_rule` on the running-statistics loss, the trainer's logged `history_val_loss` beside it, and the
    `verdict` in attrs. `dataset_attrs`: docs/design.md §4 attrs and the runs' bn_momentum and precise_bn."""
    rule = spike_rule(window, factor, min_increase)
    parts = [part.assign(history_val_loss=variable((), logged, "validation cross-entropy logged by the trainer "
                                                   "(metrics.csv)", "nats"))
             for part, logged in zip(parts, history_val_loss)]
    ds = combine(parts, models_, epochs, {})
    spike = np.zeros((ds.sizes["model"], ds.sizes["epoch"]), dtype=bool)
    for i, label in enumerate(ds.model.values):
        present = _present(ds.sel(model=label))
        loss = ds.val_loss.sel(model=label, bn="running").values[present]
        spike[i, np.flatnonzero(present)] = spike_mask(loss, window=window, factor=factor, min_increase=min_increase)
    ds["spike"] = variable(("model", "epoch"), spike, "validation-loss spike with running BN statistics", "1")
    recal_images = parts[0].attrs["recal_images"]
    ds.attrs = attrs(DEFINITION.format(recal_images=recal_images, rule=rule), rule=rule, spike_window=window,
                     spike_factor=factor, spike_min_increase=min_increase, recal_images=recal_images,
                     recal_batch_size=parts[0].attrs["recal_batch_size"], **dataset_attrs)
    ds.attrs["verdict"] = verdict(ds)
    return ds


def _present(one: xr.Dataset) -> np.ndarray:
    """The epochs a model has checkpoints of (an accuracy is never NaN where one was evaluated)."""
    return one.val_acc.sel(bn="running").notnull().values


def verdict(ds: xr.Dataset) -> list[str]:
    """One sentence per spike with its evidence, or one per model without a spike."""
    rule = dict(window=int(ds.attrs["spike_window"]), factor=float(ds.attrs["spike_factor"]),
                min_increase=float(ds.attrs["spike_min_increase"]))
    lines = []
    for label in ds.model.values:
        one = ds.sel(model=label)
        one = one.isel(epoch=np.flatnonzero(_present(one)))
        loss = {bn: one.val_loss.sel(bn=bn).values for bn in BN_STATISTICS}
        spikes = np.flatnonzero(one.spike.values)
        if len(spikes) == 0:
            lines.append(_no_spike(str(label), one, loss, rule))
        lines += [_spike_sentence(str(label), one, loss, i, rule) for i in spikes]
    return lines


def _spike_sentence(label: str, one: xr.Dataset, loss: dict, i: int, rule: dict) -> str:
    base = {bn: previous_medians(series, rule["window"])[i] for bn, series in loss.items()}
    still = {bn: spike_mask(loss[bn], **rule)[i] for bn in ("recalibrated", "batch")}
    evidence = (f"{label}, epoch {one.epoch.values[i]}: val loss {loss['running'][i]:.3g} with running stats "
                f"(median of the previous epochs {base['running']:.3g}), {loss['recalibrated'][i]:.3g} recalibrated "
                f"({base['recalibrated']:.3g}), {loss['batch'][i]:.3g} with batch stats ({base['batch']:.3g})")
    if not still["recalibrated"]:
        cause = "the spike is BN running statistics: recomputing them for the same weights removes it"
    else:
        removed = 1 - (loss["recalibrated"][i] - base["recalibrated"]) / (loss["running"][i] - base["running"])
        cause = ("the spike stays under recalibration, so it is in the weights, not the BN running statistics"
                 + (f" (recalibration removes {removed:.0%} of the excess)" if removed >= 0.05 else ""))
    batch = "batch statistics spike too" if still["batch"] else "batch statistics do not spike"
    return f"{evidence}: {cause}; {batch}; {_largest_drift(one, i)}"


def layer_drift(drift: xr.DataArray) -> xr.DataArray:
    """One drift per layer: the larger of the two measures, both deviations of the normalisation in natural
    units (a shift in population std, a log ratio of variances)."""
    return np.fmax(drift.sel(stat="mean_shift", drop=True), drift.sel(stat="log_var_ratio", drop=True))


def _largest_drift(one: xr.Dataset, i: int) -> str:
    """The layer whose running statistics are furthest from the population's, and whether it stands out from
    the others or the mismatch is spread over the depth."""
    shift = one.drift.sel(stat="mean_shift").isel(epoch=i).values
    ratio = one.drift.sel(stat="log_var_ratio").isel(epoch=i).values
    combined = layer_drift(one.drift.isel(epoch=i)).values
    j = int(np.nanargmax(combined))
    median = float(np.nanmedian(combined))
    spread = ("it stands out from the other layers" if combined[j] > 3 * median else
              f"no single layer stands out (median over the {int(np.isfinite(combined).sum())} BN layers "
              f"{median:.2g}): many small mismatches add up through the depth")
    return (f"the largest drift is in {one.layer.values[j]} (running mean {shift[j]:.3g} population std off, log "
            f"variance ratio {ratio[j]:.2g}); {spread}; {_propagation(one, i)}")


def _propagation(one: xr.Dataset, i: int) -> str:
    """How far, in eval mode, each layer's input is from its running statistics at epoch `i`, against the
    previous epochs: where the mismatch grows through the depth, the largest is deep."""
    mismatch = layer_drift(one.eval_mismatch).values  # (epoch, depth)
    now = mismatch[i]
    j = int(np.nanargmax(now))
    before = np.nanmax(mismatch[max(0, i - 3):i]) if i else np.nan
    text = (f"in eval mode the inputs of the BN layers are off their running statistics by {np.nanmin(now):.2g} to "
            f"{now[j]:.3g} (largest at {one.layer.values[j]}, depth {j + 1} of {int(np.isfinite(now).sum())}")
    return text + (f"; at most {before:.3g} in the previous epochs)" if np.isfinite(before) else ")")


def _no_spike(label: str, one: xr.Dataset, loss: dict, rule: dict) -> str:
    epochs = one.epoch.values
    if len(epochs) < 2:
        return f"{label}: no validation-loss spike can be found in a single checkpoint (epoch {epochs[0]})"
    shift = one.drift.sel(stat="mean_shift").values  # (epoch, depth)
    e, d = np.unravel_index(np.nanargmax(shift), shift.shape)
    text = (f"{label}: no validation-loss spike over epochs {epochs[0]}-{epochs[-1]} (factor {rule['factor']:g}, "
            f"window {rule['window']}): val loss {np.min(loss['running']):.3g}-{np.max(loss['running']):.3g} with "
            f"running stats, {np.min(loss['recalibrated']):.3g}-{np.max(loss['recalibrated']):.3g} recalibrated, "
            f"{np.min(loss['batch']):.3g}-{np.max(loss['batch']):.3g} with batch stats; the largest drift is in "
            f"{one.layer.values[d]} at epoch {epochs[e]} (running mean {shift[e, d]:.3g} population std off)")
    gap = loss["running"] - loss["recalibrated"]
    k = int(np.nanargmax(gap))
    if gap[k] > rule["min_increase"]:
        text += (f"; the running statistics cost most at epoch {epochs[k]}: {loss['running'][k]:.3g} against "
                 f"{loss['recalibrated'][k]:.3g} recalibrated, which the spike rule does not flag")
    else:
        text += f"; the running statistics never cost more than {max(gap[k], 0):.2f} nats over recalibrated ones"
    excess = np.median(loss["running"] / loss["recalibrated"])
    if excess > rule["factor"]:
        text += (f"; but the running statistics are off throughout: the loss with them is a median "
                 f"{excess:.3g} x the recalibrated one")
    return text
