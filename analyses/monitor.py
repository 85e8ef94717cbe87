"""Watching BatchNorm while a network trains: a fixed probe of images measured every N optimiser steps.

At each measurement, with the weights of that step:
- `probe_loss`, `probe_acc`: the probe's cross-entropy and accuracy with BN normalising by its running
  statistics (eval mode: what validation will see) and by the probe's own batch statistics (train mode, as
  training normalises), the running statistics and the training's random numbers left untouched;
- `bn_gap`: per BN layer, the normalisation error (analyses.bn) of its running statistics against the
  statistics of its input in the train-mode pass: how stale the statistics are;
- `eval_mismatch`: per BN layer, the normalisation error of its running statistics against its input in the
  eval-mode pass, where every BN upstream uses running statistics too: how an error upstream reaches it;
- `grad_norm`, `weight_norm`: per conv and fc weight, the L2 norm of the gradient of the training step itself
  (read from `.grad`, no extra backward) and of the weight after the step. A conv followed by BN computes the
  same function whatever the scale of its weight, and its gradient scales as 1/scale, so `scaled_grad_norm` =
  grad_norm x weight_norm is the measure that compares across layers and across training (for the fc layer,
  which no BN follows, it is only indicative).

What moves the statistics (so that the gap can be predicted, not only measured), at the same measurements:
- `input_shift`, `input_shift2`: per BN layer, the normalisation error between the probe's batch statistics now
  and at the previous measurement (and the one before), `interval` steps ago (twice that): how far the statistics
  the layer should normalise with moved; `input_speed` = input_shift / interval;
- `batch_noise`: per BN layer, the spread of one training batch's statistics around the population's, in the
  same units, from the statistics of consecutive training batches (recovered from the running buffers at every
  step: batch = (new - (1 - m) old) / m, no extra forward), rms(b_t - b_t-1) / sqrt(2);
- `angular_speed`: per conv and fc weight, the angle it turned in the measured step (between the weights before
  and after it; the only copy of the weights the monitor keeps, for one step), beside
  `angular_equilibrium`, sqrt(2 lr wd / (1 + momentum)), the angular update per step at which SGD with weight
  decay settles on weights that BN makes scale-invariant (Wan et al., Spherical Motion Dynamics, 2021);
- shadow running statistics at the momenta SHADOW_MOMENTA and the run's own (buffers only, updated at every step
  from the recovered batch statistics; the weights train exactly as without them, since in train mode BN
  normalises by the batch): `shadow_gap`, each one's normalisation error against the probe's statistics, and
  `predicted_gap`, the lag model's prediction of it (`predicted_error`).

The lag model. A statistic x_t that drifts at v per step and diffuses by q per step (a random walk's variance),
measured by batches with independent noise of spread s, is followed by an exponential moving average y_t =
(1 - m) y_t-1 + m (x_t + noise). The drift leaves a steady lag v (1 - m) / m; the error e_t = y_t - x_t of the
rest obeys e_t = (1 - m)(e_t-1 - w_t) + m n_t, whose stationary variance is ((1 - m)^2 q + m^2 s^2) / (m (2 - m)).
In normalisation-error units:

    predicted error(m) = sqrt((v (1 - m) / m)^2 + ((1 - m)^2 q + m^2 s^2) / (m (2 - m))).

v and q come from the shifts over one and two intervals D: shift^2 = v^2 D^2 + q D, shift2^2 = 4 v^2 D^2 + 2 q D
(`lag_inputs`, mean squares over the measurements since the previous validation, from `lag_from` on, `lag_start`:
earlier ones measure training's first upheaval, not the steady motion the average trails, and one of them can
outweigh a whole run; a record without shift2 is taken as pure diffusion). Drift alone (the first version of
this model) made the error fall as 1/m; on real runs it falls nearer 1/sqrt(m), as diffusion does
(docs/spikes.md). The predicted error is smallest where the lag and the noise balance: `best_momentum`. At each
validation (`BNMonitor.validate`, or the trainer's) the model meets its measurement: every shadow's error against
statistics recomputed over training images (`recalibrate_bn`), and the validation loss with running and with
recomputed statistics on the same images (`attribute`): how much of the validation loss is BN statistics.

An early warning fires when the score of the rule `warn_rule` (WARNING_RULES, each measurement's scores kept in
`warning_score`) exceeds `warn_threshold`, from step `warn_after` on: a validation now would be spoiled by BN
statistics (docs/spikes.md scores the rules on real runs: the gap comes and goes within tens of steps). (The
trainer and the Lightning callback arm it at `warm_up_steps`: once the running statistics' initial values weigh
under 1%, or after half an epoch, whichever comes first; earlier, a gap says only that training has just begun.)

In any training loop (three lines):

    monitor = BNMonitor(model, probe_images, probe_labels, every=50)
    ...     # after loss.backward() and optimizer.step(), before the next zero_grad():
    monitor.step(loss=loss)
    monitor.dataset().to_netcdf("monitor.nc")
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

import models

from .bn import (COMPONENTS, UNITS, BNStatistics, batch_statistics, normalisation_error, recalibrate_bn,
                 running_statistics, statistics_error_table)
from .common import (ChannelMoments, attrs, autocast, dtype_name, forward_hooks, inputs_of, layer_coords,
                     preserved_state, variable)
from .evaluate import predict
from .gradients import kind_of, weight_layers

PROBE_STATISTICS = ("running", "batch")  # the `bn` dim of the probe's loss and accuracy
VALIDATION_BN = ("running", "recalibrated")  # the `val_bn` dim of a validation's loss and accuracy
SHADOW_MOMENTA = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)  # with the run's own: the `momentum` dim
WARNING_RULES = {  # the early warning's candidate scores of a measurement (`warning_scores`), and what they measure
    "probe_excess": "probe loss with running minus with batch statistics (nats)",
    "probe_ratio": "probe loss with running over with batch statistics",
    "departure": "probe_excess over the median probe_excess of the run's previous 10 armed measurements",
    "predicted_gap": "median over BN layers of the lag model's predicted error at the run's momentum",
    "bn_gap": "largest BN layer's normalisation error of running against the probe's batch statistics",
}
# The trainer's rule: a nowcast (a validation now would be spoiled), the best of the rules on the study's held-out
# seeds 2-3 at the last measurement before each validation (precision 0.77, recall 1.00; threshold chosen on
# seeds 0-1); announced a whole epoch ahead no rule reached 0.6 precision held out (docs/spikes.md).
WARNING_RULE, WARNING_THRESHOLD = "probe_excess", 0.15
BASELINE = 10  # measurements in the departure rule's baseline
VARIABLES = {  # every variable a measurement (along `step`) or a validation records: dims, long_name, units
    "probe_loss": (("step", "bn"), "probe cross-entropy", "nats"),
    "probe_acc": (("step", "bn"), "probe top-1 accuracy", "1"),
    "bn_gap": (("step", "depth", "component"), "normalisation error of the running statistics against the probe's "
               "batch statistics at the layer's input", UNITS),
    "eval_mismatch": (("step", "depth", "component"), "normalisation error of the running statistics against the "
                      "layer's input in eval mode", UNITS),
    "grad_norm": (("step", "weight_depth"), "L2 norm of the training step's gradient", "nats per weight unit"),
    "weight_norm": (("step", "weight_depth"), "L2 norm of the weight", "1"),
    "train_loss": (("step",), "training batch loss of the step", "nats"),
    "lr": (("step",), "learning rate of the step", "1"),
    "warning": (("step",), "early warning fired", "1"),
    "warning_score": (("step", "rule"), "each warning rule's score of the measurement (WARNING_RULES)", "1"),
    "input_shift": (("step", "depth"), "normalisation error between the probe's batch statistics at this and the "
                    "previous measurement", UNITS),
    "input_shift2": (("step", "depth"), "normalisation error between the probe's batch statistics at this and the "
                     "measurement before the previous one", UNITS),
    "interval": (("step",), "steps since the previous measurement", "optimiser steps"),
    "input_speed": (("step", "depth"), "normalisation error between the probe's batch statistics at this and the "
                    "previous measurement, per step", f"{UNITS} per optimiser step"),
    "batch_noise": (("step", "depth"), "one training batch's statistics around the population's: rms over the steps "
                    "since the previous measurement and the channels of the normalisation error between consecutive "
                    "batches, / sqrt(2)", UNITS),
    "angular_speed": (("step", "weight_depth"), "angle the weight turned in the measured step",
                      "radians per optimiser step"),
    "angular_equilibrium": (("step",), "sqrt(2 lr weight_decay / (1 + momentum)): the equilibrium angular update of "
                            "scale-invariant weights under SGD (Wan et al. 2021)", "radians per optimiser step"),
    "shadow_gap": (("step", "momentum", "depth"), "normalisation error (rms) against the probe's batch statistics of "
                   "running statistics kept at this BN momentum from the same training batches", UNITS),
    "predicted_gap": (("step", "momentum", "depth"), "lag model from this measurement alone: sqrt((v (1 - m) / m)^2 + "
                      "((1 - m)^2 q + m^2 batch_noise^2) / (m (2 - m))), v and q from input_shift and input_shift2",
                      UNITS),
    "val_loss": (("validation", "val_bn"), "validation cross-entropy with running and with recomputed BN statistics, "
                 "on the same images", "nats"),
    "val_acc": (("validation", "val_bn"), "validation top-1 accuracy", "1"),
    "bn_excess": (("validation",), "validation loss with running minus with recomputed statistics", "nats"),
    "bn_excess_se": (("validation",), "standard error of bn_excess over the images (paired differences)", "nats"),
    "val_images": (("validation",), "validation images attributed", "1"),
    "shadow_error": (("validation", "momentum", "depth"), "normalisation error (rms) against the recomputed "
                     "statistics of running statistics kept at this BN momentum (the run's own momentum: its running "
                     "statistics)", UNITS),
    "predicted_error": (("validation", "momentum", "depth"), "lag model's prediction of shadow_error from the "
                        "measurements since the previous validation (lag_inputs)", UNITS),
}
RECORDED = tuple(name for name, (dims, *_) in VARIABLES.items() if dims[0] == "step")
VALIDATED = ("val_step", "val_epoch", *(name for name, (dims, *_) in VARIABLES.items() if dims[0] == "validation"))


def warning_scores(probe_loss, bn_gap, predicted_gap, armed) -> dict[str, np.ndarray]:
    """Every rule's score (WARNING_RULES) of each of n measurements: `probe_loss` (n, 2) with running and batch
    statistics, `bn_gap` (n, layers) RMS, `predicted_gap` (n, layers) at the run's momentum, `armed` (n,) from
    the warm-up on. The monitor scores its last measurement from its last BASELINE + 1; the study all at once."""
    probe_loss = np.asarray(probe_loss, dtype=np.float64).reshape(-1, 2)
    excess = probe_loss[:, 0] - probe_loss[:, 1]
    armed = np.asarray(armed, dtype=bool)
    baseline = np.full(len(excess), np.nan)
    for i in range(len(excess)):
        previous = excess[:i][armed[:i]][-BASELINE:]
        if len(previous):
            baseline[i] = max(float(np.median(previous)), 1e-3)
    with np.errstate(divide="ignore", invalid="ignore"):  # a probe learnt to a loss of 0: an infinite ratio
        ratio = probe_loss[:, 0] / probe_loss[:, 1]
    return {"probe_excess": excess, "probe_ratio": ratio,
            "departure": excess / baseline, "predicted_gap": _row_statistic(np.nanmedian, predicted_gap),
            "bn_gap": _row_statistic(np.nanmax, bn_gap)}


def _row_statistic(statistic, values) -> np.ndarray:
    """`statistic` of each row over its finite values; NaN for a row with none (no warning about empty slices)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    out = np.full(len(values), np.nan)
    finite = np.isfinite(values).any(axis=1)
    if finite.any():
        out[finite] = statistic(values[finite], axis=1)
    return out


def predicted_error(drift, diffusion, noise, momentum):
    """The lag model (module docstring): the normalisation error of running statistics of BN momentum `momentum`
    that follow a statistic drifting `drift` per step and diffusing `diffusion` per step, measured with batch
    noise `noise`. Broadcasts."""
    m = np.asarray(momentum, dtype=np.float64)
    drift, diffusion, noise = (np.asarray(a, dtype=np.float64) for a in (drift, diffusion, noise))
    return np.sqrt((drift * (1 - m) / m) ** 2 + ((1 - m) ** 2 * diffusion + m ** 2 * noise ** 2) / (m * (2 - m)))


def lag_inputs(shift, shift2, noise, interval) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer (drift, diffusion, noise) from n measurements' `shift`, `shift2`, `noise` (n, layers) and their
    `interval` (n,): mean squares over the measurements, then shift^2 = v^2 D^2 + q D and shift2^2 = 4 v^2 D^2 +
    2 q D solved for v and q (each at least 0). Where shift2 was not measured, all of the shift is diffusion."""
    shift, shift2, noise = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (shift, shift2, noise))
    interval = np.asarray(interval, dtype=np.float64).reshape(-1, 1) * np.ones_like(shift)
    rows = np.isfinite(shift).any(axis=1) & np.isfinite(interval).all(axis=1)
    if not rows.any():
        nan = np.full(shift.shape[1], np.nan)
        return nan, nan, np.sqrt(_mean_square(noise))
    d = float(np.median(interval[rows, 0]))
    d1, d2 = _mean_square(shift[rows]), _mean_square(shift2[rows])
    drift = np.where(np.isfinite(d2), np.sqrt(np.clip((d2 - 2 * d1) / (2 * d * d), 0, None)), 0.0)
    diffusion = np.where(np.isfinite(d2), np.clip((2 * d1 - d2 / 2) / d, 0, None), d1 / d)
    return drift, diffusion, np.sqrt(_mean_square(noise))


def _mean_square(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    counted = np.isfinite(values).sum(axis=0)
    return np.where(counted > 0, np.nansum(values ** 2, axis=0) / np.maximum(counted, 1), np.nan)


def recorded_shifts(ds: xr.Dataset) -> tuple[np.ndarray, ...]:
    """(input_shift, input_shift2, batch_noise, interval) of a monitor dataset; one recorded before input_shift
    gives input_speed x its interval and no shift2 (taken as pure diffusion)."""
    if "input_shift" in ds:
        return ds.input_shift.values, ds.input_shift2.values, ds.batch_noise.values, ds.interval.values
    every = float(ds.attrs.get("every", 1) or 1)
    return (ds.input_speed.values * every, np.full(ds.input_speed.shape, np.nan), ds.batch_noise.values,
            np.full(ds.sizes["step"], every))


def validation_predictions(ds: xr.Dataset) -> np.ndarray:
    """(validation, momentum, depth): the lag model's error at each validation, from the measurements since the
    previous one, from `lag_from(ds)` on (a monitor dataset; one of a run recorded before input_shift: from
    input_speed x interval)."""
    steps = ds.step.values
    read = steps >= lag_from(ds)
    shift, shift2, noise, interval = recorded_shifts(ds)
    out = np.full((ds.sizes.get("validation", 0), ds.sizes["momentum"], ds.sizes["depth"]), np.nan)
    previous = -1
    for i, val_step in enumerate(ds.val_step.values if "val_step" in ds else []):
        window = (steps > previous) & (steps <= val_step) & read
        if window.any():
            inputs = lag_inputs(shift[window], shift2[window], noise[window], interval[window])
            out[i] = predicted_error(*inputs, ds.momentum.values[:, None])
        previous = val_step
    return out


def best_momentum(drift, diffusion, noise) -> float:
    """The momentum in (0, 1] that minimises the predicted squared error summed over layers (one value per
    layer in each argument), on a fine logarithmic grid. NaN without finite values."""
    drift, diffusion, noise = (np.asarray(a, dtype=np.float64) for a in (drift, diffusion, noise))
    keep = np.isfinite(drift) & np.isfinite(diffusion) & np.isfinite(noise)
    if not keep.any():
        return float("nan")
    grid = np.geomspace(1e-3, 1.0, 601)
    cost = (predicted_error(drift[keep, None], diffusion[keep, None], noise[keep, None], grid[None, :]) ** 2).sum(0)
    return float(grid[np.argmin(cost)])


@dataclass
class Attribution:
    """One validation, on the same images, with BN's running statistics and with statistics recomputed over
    training images: the losses and accuracies, and the excess (running minus recomputed loss) with its standard
    error over the images (per-image paired differences)."""
    loss_running: float
    loss_recalibrated: float
    acc_running: float
    acc_recalibrated: float
    excess: float
    excess_se: float
    n_images: int

    def scalars(self) -> dict[str, float]:
        """One scalar per tag, as the trainer's TensorBoard names them (`val/loss_running` is these images' own)."""
        return {"val/loss_running": self.loss_running, "val/loss_recalibrated": self.loss_recalibrated,
                "val/accuracy_running": self.acc_running, "val/accuracy_recalibrated": self.acc_recalibrated,
                "val/bn_excess": self.excess, "val/bn_excess_se": self.excess_se}

    def text(self) -> str:
        """`recalibrated 0.85: 2.92 ± 0.04 of it is BN statistics` (the `val_loss ...` line's parenthesis)."""
        return (f"recalibrated {self.loss_recalibrated:.4f}: {self.excess:+.2f} ± {self.excess_se:.2f} of it is BN "
                "statistics")


def attribute(running, recalibrated) -> Attribution:
    """The attribution of two `analyses.evaluate.predict` results (per-image losses, predictions, labels) of the
    same images, in the same order: with running and with recomputed statistics."""
    (loss_a, pred_a, labels_a, *_), (loss_b, pred_b, labels_b, *_) = running, recalibrated
    if len(loss_a) != len(loss_b) or not torch.equal(labels_a, labels_b):
        raise ValueError("the two passes must be of the same images, in the same order")
    difference = (loss_a - loss_b).double()
    n = len(difference)
    se = difference.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return Attribution(loss_a.double().mean().item(), loss_b.double().mean().item(),
                       (pred_a == labels_a).double().mean().item(), (pred_b == labels_b).double().mean().item(),
                       difference.mean().item(), se, n)


@torch.no_grad()
def recalibrated_predictions(model: nn.Module, batches, recalibration, dtype: torch.dtype | None = None):
    """`predict` over `batches` (BN in eval mode) with every BN layer's statistics recomputed over the images of
    `recalibration` (images, or `(images, labels)` pairs; `recalibrate_bn`, as the diagnostics and `--precise-bn`
    do), and those statistics. The
    model's own statistics, modes and hooks are as they were after; no random number is drawn."""
    with preserved_state(model):
        recalibrate_bn(model, inputs_of(recalibration), dtype)
        statistics = running_statistics(model)
        model.eval()
        return predict(model, batches, dtype), statistics


def warning_rule(rule: str, threshold: float, after: int = 0) -> str:
    return (f"a warning when {rule} ({WARNING_RULES[rule]}) exceeds {threshold:g}"
            + (f", from step {after} on" if after else ""))


def forgetting_steps(momentum: float, weight: float = 0.01) -> int:
    """Steps after which an exponential average of `momentum` keeps less than `weight` of its start:
    (1 - momentum)^k < weight."""
    return math.ceil(math.log(weight) / math.log(1 - momentum))


def lag_start(steps_per_epoch: float = math.inf) -> int:
    """The first step whose measurement the lag model reads: past training's first upheaval, which is the same
    whatever the BN momentum (training never reads the running statistics), so runs at different momenta are
    modelled over the same steps: those after which an average at PyTorch's default momentum 0.1 keeps under 1% of
    its start (44), at most half an epoch. Earlier measurements (plain56's first: a batch noise of 78 normalised
    units, 0.03 later) would outweigh a whole run in the model's mean squares."""
    return int(min(forgetting_steps(0.1), steps_per_epoch / 2))


def lag_from(ds: xr.Dataset) -> int:
    """The first step the lag model reads in a monitor dataset: its `lag_from`; a record of an earlier version,
    `lag_start` of its first validation's step (the trainer validates once an epoch), 0 without one."""
    if "lag_from" in ds.attrs:
        return int(ds.attrs["lag_from"])
    return lag_start(int(ds.val_step.values[0])) if ds.sizes.get("validation", 0) else 0


def warm_up_steps(model: nn.Module, steps_per_epoch: float = math.inf, weight: float = 0.01) -> int:
    """Optimiser steps after which the running statistics' initial values weigh less than `weight` in them
    (`forgetting_steps`), for the BN layer of the smallest momentum (0 for a cumulative average), at most half an
    epoch (`steps_per_epoch` optimiser steps; infinite for a loader of unknown length, no cap): before that, a gap
    says only that training has just begun; a run at a small momentum still gets its warnings from its first
    epoch on."""
    momenta = [m.momentum for _, m in models.bn_layers(model) if m.momentum is not None and 0 < m.momentum < 1]
    return int(min(forgetting_steps(min(momenta), weight) if momenta else 0, steps_per_epoch / 2))


def definition(every: int, n_images: int, probe: str, rule: str) -> str:
    return (f"every {every} optimiser steps, with the weights of that step, on a fixed probe of {n_images} images "
            f"({probe}): the probe's cross-entropy (natural log, no label smoothing) and top-1 accuracy with BN "
            "normalising by its running statistics (eval mode) and by the probe's batch statistics (train mode, "
            "running statistics untouched); per BN layer the normalisation error sqrt(mean^2 + scale^2) of the "
            "running statistics against the statistics of the layer's input in the train-mode pass (bn_gap) and "
            "in the eval-mode pass (eval_mismatch), mean = |mu_true - mu_running| / s_running, scale = "
            "sqrt(var_true / (var_true + eps)) |1 - s_true / s_running|, s = sqrt(var + eps), root-mean-squared "
            "over channels; per conv and fc weight the L2 norm of the training step's own gradient (after "
            f"unscaling) and of the weight after the step; {rule}")


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equally long sequences (ties ranked in order)."""
    rank = lambda values: np.argsort(np.argsort(np.asarray(values, dtype=np.float64))).astype(np.float64)
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def agreement(predicted, measured) -> tuple[float, float, int]:
    """(Spearman rank correlation, R^2 of log10 measured by log10 predicted, points) over the entries where both
    are finite and positive: how well the lag model's predictions rank and match the measured errors."""
    predicted = np.asarray(predicted, dtype=np.float64).ravel()
    measured = np.asarray(measured, dtype=np.float64).ravel()
    keep = np.isfinite(predicted) & np.isfinite(measured) & (predicted > 0) & (measured > 0)
    if keep.sum() < 3:
        return float("nan"), float("nan"), int(keep.sum())
    x, y = np.log10(predicted[keep]), np.log10(measured[keep])
    r2 = float(1 - ((y - x) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return spearman(x, y), r2, int(keep.sum())


@dataclass
class Prescription:
    """What the run's BN statistics cost its validations, where, why and what to change (`prescription`)."""
    worst: dict | None  # epoch, running, recalibrated, excess, se of the validation of the largest excess
    layers: list[tuple[str, float]]  # the layers furthest off at that validation, with their error
    momentum: float  # the run's BN momentum
    drift: float  # median over layers of the drift per step, from step lag_from on (lag_inputs)
    diffusion: float  # median over layers of the diffusion per step
    noise: float  # median over layers of the batch noise
    angular_speed: float  # median over conv weights and measurements
    angular_equilibrium: float
    replaced: bool  # the running statistics were recomputed before each validation (--precise-bn)
    measured_best: float  # the shadow momentum closest to the recomputed statistics over the validations
    measured_error: dict  # momentum -> RMS error over validations and layers
    predicted_best: float
    fit: tuple[float, float, int]  # agreement(predicted_error, shadow_error)
    drift_measured: bool = True  # False: a record without input_shift2, its shifts all taken as diffusion

    def lines(self) -> list[str]:
        out = []
        if self.worst is None:
            out.append("BN statistics: no validation was attributed (none ran, or --attribution-images 0)")
        else:
            w = self.worst
            out.append(f"BN statistics: the worst validation, epoch {w['epoch']}, read {w['running']:.4f} with running "
                       f"statistics{' (before --precise-bn replaced them)' if self.replaced else ''} and "
                       f"{w['recalibrated']:.4f} with recomputed ones ({w['excess']:+.2f} ± {w['se']:.2f} nats)")
        if self.layers:
            out.append("  where: the running statistics were furthest off at " + ", ".join(
                f"{name} ({error:.2g})" for name, error in self.layers) + " (normalisation error, RMS)")
        m = self.momentum
        if np.isfinite(self.diffusion) and np.isfinite(self.noise):
            lag = predicted_error(self.drift, self.diffusion, 0.0, m)
            out.append(f"  why: each layer's input statistics {self.motion()} (medians over layers) against a batch "
                       f"noise of {self.noise:.2g}; BN momentum {m:g} averages over ~{1 / m:.0f} steps, so the running "
                       f"statistics trail by ~{lag:.2g} and keep ~{self.noise * math.sqrt(m / (2 - m)):.2g} of "
                       f"noise; the weights turned {self.angular_speed:.2g} rad/step (SGD's equilibrium "
                       f"{self.angular_equilibrium:.2g})")
        if np.isfinite(self.measured_best):
            out.append("  what: " + self.what())
        return out

    def motion(self) -> str:
        """How the layers' input statistics moved, in the lag model's two terms; a term the fit put at 0 (shifts
        over two intervals at least twice those over one leave no room for diffusion, at most sqrt(2) times none
        for drift) is said to be unmeasurable, not a rate of 0; a record without shift2 never measured drift."""
        diffusion = f"diffuse {math.sqrt(self.diffusion):.2g} per sqrt(step)" if self.diffusion > 0 else ""
        if not self.drift_measured:
            return f"{diffusion or 'did not diffuse measurably'} (drift not measured: a record without input_shift2)"
        drift = f"drift {self.drift:.2g} per step" if self.drift > 0 else ""
        if drift and diffusion:
            return f"{drift} and {diffusion}"
        if drift or diffusion:
            return f"{drift or diffusion}, no {'diffusion' if drift else 'drift'} measurable beside it"
        return "did not move measurably"

    def confirmed(self) -> bool:
        """A momentum to change to: the shadows' best differs from the run's, and the lag model, fitted to these
        measurements (finite agreement), puts its own best within a factor 2 of it."""
        return (np.isfinite(self.measured_best) and self.measured_best != self.momentum
                and np.isfinite(self.fit[0]) and np.isfinite(self.predicted_best)
                and 0.5 <= self.predicted_best / self.measured_best <= 2)

    def what(self) -> str:
        m, best = self.momentum, self.measured_best
        rho, r2, n = self.fit
        measured = (f"RMS error against the recomputed statistics {self.measured_error[best]:.2g} at {best:g}, "
                    f"{self.measured_error.get(m, float('nan')):.2g} at the run's {m:g}")
        model = (f"the lag model's best is {self.predicted_best:.2g} (Spearman {rho:.2f}, R^2 {r2:.2f} of log errors, "
                 f"{n} points)")
        if self.replaced:
            return (f"nothing: the run recomputed its statistics before each validation (--precise-bn), so its "
                    f"validations and checkpoints did not use the moving average; without that, of the shadows "
                    f"(each restarted at every recomputation) BN momentum {best:g} came closest ({measured}), and "
                    f"{model}")
        if best == m:
            return f"BN momentum {m:g} was already the truest of the shadows; nothing to change ({measured})"
        if not self.confirmed():
            return (f"of the shadows, BN momentum {best:g} came closest ({measured}), but {model}: not confirmed, "
                    "so no prescription")
        return (f"train with BN momentum {best:g} (--bn-momentum {best:g}): of the shadows it came closest "
                f"({measured}), and {model}; or recompute the statistics before each validation (--precise-bn N, "
                "fvcore's PreciseBN)")


def prescription(ds: xr.Dataset, n_layers: int = 3) -> Prescription:
    """From a monitor dataset (`BNMonitor.dataset()` or monitor.nc): the worst attributed validation, the layers
    whose running statistics were furthest from the recomputed ones there, the measured drift, diffusion and noise,
    the shadow
    momentum that came closest over all validations, the lag model's best momentum and how well it fitted."""
    own = [float(m) for m in np.atleast_1d(ds.attrs.get("bn_momentum", []))]
    momentum = own[0] if own else 0.1
    worst, layers, measured, measured_best = None, [], {}, float("nan")
    if ds.sizes.get("validation", 0):
        excess = ds.bn_excess.values
        if np.isfinite(excess).any():
            i = int(np.nanargmax(excess))
            worst = {"epoch": int(ds.val_epoch.values[i]), "running": float(ds.val_loss.values[i, 0]),
                     "recalibrated": float(ds.val_loss.values[i, 1]), "excess": float(excess[i]),
                     "se": float(ds.bn_excess_se.values[i])}
            if momentum in ds.momentum.values:
                errors = ds.shadow_error.sel(momentum=momentum).values[i]
                order = [j for j in np.argsort(-np.nan_to_num(errors, nan=-1.0)) if np.isfinite(errors[j])]
                layers = [(str(ds.layer.values[j]), float(errors[j])) for j in order[:n_layers]]
        armed = ds.val_step.values >= int(ds.attrs.get("warn_after", 0))  # before: the shadows' initial values
        errors = ds.shadow_error.values[armed if armed.any() else slice(None)]
        rms = (np.sqrt(np.nanmean(errors ** 2, axis=(0, 2))) if np.isfinite(errors).any()
               else np.full(ds.sizes["momentum"], np.nan))
        measured = {float(m): float(e) for m, e in zip(ds.momentum.values, rms)}
        if np.isfinite(rms).any() and np.nanmax(rms) > 0:  # all 0: a record that measured after a replacement
            measured_best = float(ds.momentum.values[int(np.nanargmin(rms))])
    median = lambda values: float(np.nanmedian(values)) if np.isfinite(values).any() else float("nan")
    read = ds.step.values >= lag_from(ds)  # before: training's first upheaval; none read: NaN
    shifts = [values[read] for values in recorded_shifts(ds)]
    drift, diffusion, noise = lag_inputs(*shifts)
    conv = np.array([str(kind).startswith("conv") for kind in ds.weight_kind.values], dtype=bool)
    return Prescription(
        worst=worst, layers=layers, momentum=momentum, replaced=int(ds.attrs.get("statistics_replaced", 0)) > 0,
        drift=median(drift), diffusion=median(diffusion),
        noise=median(noise), angular_speed=median(ds.angular_speed.values[:, conv]),
        angular_equilibrium=median(ds.angular_equilibrium.values), measured_best=measured_best,
        measured_error=measured, predicted_best=best_momentum(drift, diffusion, noise),
        fit=agreement(validation_predictions(ds), ds.shadow_error.values) if ds.sizes.get("validation", 0)
        else (float("nan"), float("nan"), 0), drift_measured=bool(np.isfinite(shifts[1]).any()))


@dataclass
class BNWarning:
    step: int
    epoch: int | None
    loss_running: float
    loss_batch: float
    layer: str
    gap: float
    rule: str = WARNING_RULE
    score: float = float("nan")
    threshold: float = WARNING_THRESHOLD

    def message(self) -> str:
        where = f"step {self.step}" + (f" (epoch {self.epoch})" if self.epoch is not None else "")
        return (f"warning: {where}: probe loss {self.loss_running:.3g} with running BN statistics against "
                f"{self.loss_batch:.3g} with batch statistics ({self.rule} {self.score:.3g} > {self.threshold:g}); "
                f"the largest gap is at {self.layer} ({self.gap:.3g} normalised units)")


class StatisticsTracker:
    """Every BN layer's batch statistics at every step, recovered from its running buffers (batch = (new - (1 - m)
    old) / m: no forward, no hook), the shadow running statistics they give at other momenta, and the
    batch-to-batch noise. All channels of all layers in one flat vector, so that a step costs a few tensor
    operations, and nothing waits for the device. Layers without running statistics or with a cumulative average
    (momentum None) leave it unusable: every shadow is then NaN."""

    def __init__(self, model: nn.Module, momenta: tuple[float, ...]):
        self.layers = [module for _, module in models.bn_layers(model) if module.running_mean is not None]
        own = {float(module.momentum) for module in self.layers if module.momentum is not None}
        self.momenta = tuple(sorted(set(momenta) | own))
        self.usable = bool(self.layers) and all(module.momentum is not None and 0 < module.momentum <= 1
                                                 for module in self.layers)
        if not self.usable:
            return
        device = self.layers[0].running_mean.device
        self.sizes = [module.running_mean.numel() for module in self.layers]
        per_channel = lambda values: torch.cat([torch.full((n,), float(v), device=device)
                                                for v, n in zip(values, self.sizes)])
        self.momentum = per_channel(module.momentum for module in self.layers)
        self.eps = per_channel(module.eps for module in self.layers)
        self.shadow_momentum = torch.tensor(self.momenta, device=device)[:, None]
        self.resync()
        self.previous = None
        self.noise_sum, self.noise_count = torch.zeros_like(self.last_mean, dtype=torch.float64), 0

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([module.running_mean.detach().float() for module in self.layers]),
                torch.cat([module.running_var.detach().float() for module in self.layers]))

    def resync(self) -> None:
        """Take the running buffers as they are now as the last step's, and as every shadow (after something
        replaced them)."""
        if self.usable:
            self.last_mean, self.last_var = self._buffers()
            self.shadow_mean = self.last_mean.expand(len(self.momenta), -1).clone()
            self.shadow_var = self.last_var.expand(len(self.momenta), -1).clone()

    @torch.no_grad()
    def update(self) -> None:
        if not self.usable:
            return
        mean, var = self._buffers()
        batch_mean = (mean - (1 - self.momentum) * self.last_mean) / self.momentum
        batch_var = (var - (1 - self.momentum) * self.last_var) / self.momentum
        self.shadow_mean += self.shadow_momentum * (batch_mean - self.shadow_mean)
        self.shadow_var += self.shadow_momentum * (batch_var - self.shadow_var)
        if self.previous is not None:
            error = normalisation_error(BNStatistics(*self.previous, self.eps), BNStatistics(batch_mean, batch_var,
                                                                                               self.eps))
            self.noise_sum += error["rms"].square()
            self.noise_count += 1
        self.previous = (batch_mean, batch_var.clamp_min(0))
        self.last_mean, self.last_var = mean, var

    def noise(self, reset: bool = False) -> np.ndarray:
        """Per layer, one batch's spread around the population, rms(b_t - b_t-1) / sqrt(2) over the steps since
        the last reset and the layer's channels; NaN before two steps."""
        if not self.usable or not self.noise_count:
            return np.full(len(self.layers), np.nan)
        per_channel = (self.noise_sum / self.noise_count / 2).split(self.sizes)
        noise = np.array([part.mean().sqrt().item() for part in per_channel])
        if reset:
            self.noise_sum.zero_()
            self.noise_count = 0
        return noise

    def shadow_statistics(self, names: list[str]) -> list[dict[str, BNStatistics]]:
        """Per shadow momentum, the statistics of each layer (named as `names`, in the model's order)."""
        if not self.usable:
            return []
        return [{name: BNStatistics(m, v.clamp_min(0), module.eps) for name, m, v, module in
                 zip(names, mean.split(self.sizes), var.split(self.sizes), self.layers)}
                for mean, var in zip(self.shadow_mean, self.shadow_var)]

    def state_dict(self) -> dict:
        if not self.usable:
            return {}
        return {"shadow_mean": self.shadow_mean.cpu(), "shadow_var": self.shadow_var.cpu(),
                "previous": [t.cpu() for t in self.previous] if self.previous is not None else [],
                "noise_sum": self.noise_sum.cpu(), "noise_count": self.noise_count, "momenta": list(self.momenta)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after a resume (the model's buffers already restored); a state of other momenta or of an
        older version starts the shadows afresh from the running statistics."""
        if not self.usable:
            return
        self.resync()
        if not state or list(state.get("momenta", [])) != list(self.momenta):
            return
        channels, device = len(self.last_mean), self.last_mean.device
        shadows = (len(self.momenta), channels)
        previous = list(state.get("previous") or [])
        if (tuple(state["shadow_mean"].shape) != shadows or tuple(state["shadow_var"].shape) != shadows
                or tuple(state["noise_sum"].shape) != (channels,) or len(previous) not in (0, 2)
                or any(tuple(t.shape) != (channels,) for t in previous)):
            raise ValueError("the monitor's saved shadow statistics are not of this model's BN layers")
        self.shadow_mean = state["shadow_mean"].to(device).float()
        self.shadow_var = state["shadow_var"].to(device).float()
        self.previous = tuple(t.to(device).float() for t in previous) or None
        self.noise_sum, self.noise_count = state["noise_sum"].to(device).double(), int(state["noise_count"])


class BNMonitor:
    """The measurements of the module docstring, every `every` calls of `step` (0: never).

    `probe_images`: normalised (N, C, H, W), fixed for the whole run; `probe_labels`: (N,). They go through
    the model in one forward per mode. `autocast`: the dtype training runs in (None: fp32). `probe`: one
    phrase saying which images these are (in the attrs). `writer`: optionally a TensorBoard `SummaryWriter`
    (anything with `add_scalar` and `add_histogram`) that receives every measurement. `optimizer`: the run's
    SGD (optional), whose learning rate, weight decay and momentum give `angular_equilibrium`. `warn_after`: the
    first step a warning may fire; `lag_from`: the first step whose measurement the lag model reads (`lag_start`).

    `step` must be called after every optimiser step (it follows the running buffers from step to step); after
    anything else replaces the running statistics (a recalibration), call `statistics_replaced()`.
    """

    def __init__(self, model: nn.Module, probe_images: torch.Tensor, probe_labels: torch.Tensor, *, every: int = 50,
                 autocast: torch.dtype | None = None, warn_rule: str = WARNING_RULE,
                 warn_threshold: float = WARNING_THRESHOLD,
                 warn_after: int = 0, lag_from: int = 0, probe: str = "given", writer=None,
                 on_warning: Callable[[BNWarning], None] | None = None, optimizer=None):
        if every < 0:
            raise ValueError(f"every must be 0 (off) or a positive number of steps, not {every}")
        if len(probe_images) == 0 or len(probe_images) != len(probe_labels):
            raise ValueError("the probe needs images and as many labels")
        self.model, self.every, self.autocast = model, every, autocast
        self.device = next(model.parameters()).device
        self.images, self.labels = probe_images.to(self.device), probe_labels.to(self.device)
        if warn_rule not in WARNING_RULES:
            raise ValueError(f"warn_rule must be one of {', '.join(WARNING_RULES)}, not {warn_rule!r}")
        self.warn_rule, self.warn_threshold, self.warn_after, self.probe = warn_rule, warn_threshold, warn_after, probe
        self.lag_from = lag_from
        self.writer, self.on_warning = writer, on_warning
        self.bn_names = list(running_statistics(model))
        self.weight_names = [name for name, _ in weight_layers(model)]
        self.weight_kinds = [kind_of(module) for _, module in weight_layers(model)]
        self.weights = [module.weight for _, module in weight_layers(model)]
        self.optimizer = optimizer
        self.calls = 0
        self.replacements = 0  # statistics_replaced calls: a --precise-bn run validates with recomputed statistics
        self.records: dict[str, list] = {name: [] for name in ("step", "epoch", *RECORDED)}
        self.validations: dict[str, list] = {name: [] for name in VALIDATED}
        self.tracker = StatisticsTracker(model, SHADOW_MOMENTA)
        self.momenta = self.tracker.momenta
        self.own_momenta = sorted({float(m.momentum) for _, m in models.bn_layers(model) if m.momentum is not None})
        self._own_momentum = self.own_momenta[0] if self.own_momenta else None  # the shadow that is running
        self._previous = []  # (step, the probe's batch statistics) of the last two measurements
        self._before = None  # (step, a copy of the weights) one step before a measurement

    # -----------------------------------------------------------------------------------------------------------
    # Measuring

    def step(self, step: int | None = None, *, epoch: int | None = None, loss: torch.Tensor | float | None = None,
             lr: float | None = None) -> BNWarning | None:
        """Call once after every optimiser step. `step`: the number of steps done (default: the calls so far);
        `loss`: the training batch's loss; `lr`: the learning rate of the step. Measures when `step` is a
        multiple of `every`; returns the warning if one fired."""
        self.calls += 1
        step = self.calls if step is None else step
        self.tracker.update()
        warning = self.measure(step, epoch=epoch, loss=loss, lr=lr) if self.every and step % self.every == 0 else None
        if self.every and (step + 1) % self.every == 0:  # the weights before the next step's update
            self._before = (step, [w.detach().clone() for w in self.weights])
        return warning

    @torch.no_grad()
    def measure(self, step: int, *, epoch: int | None = None, loss=None, lr=None) -> BNWarning | None:
        """One measurement now, whatever the step."""
        grad_norm, weight_norm = self._norms()
        running = running_statistics(self.model)
        as_evaluated = {name: ChannelMoments() for name in self.bn_names}
        hooks = {name: (lambda module, inputs, output, m=as_evaluated[name]: m.update(inputs[0]))
                 for name in self.bn_names}
        with preserved_state(self.model), autocast(self.device.type, self.autocast):
            self.model.eval()
            with forward_hooks(self.model, hooks):
                logits_running = self.model(self.images).float()
            statistics, logits_batch = batch_statistics(self.model, self.images)
        inputs = {name: BNStatistics(m.mean, m.variance, running[name].eps) for name, m in as_evaluated.items()}
        losses = [F.cross_entropy(logits, self.labels).item() for logits in (logits_running, logits_batch.float())]
        accuracy = [(logits.argmax(1) == self.labels).double().mean().item() for logits in (logits_running,
                                                                                             logits_batch)]
        gap = statistics_error_table(running, statistics, self.bn_names).numpy()
        mismatch = statistics_error_table(running, inputs, self.bn_names).numpy()
        record = {"step": step, "epoch": -1 if epoch is None else epoch, "probe_loss": losses,
                  "probe_acc": accuracy, "bn_gap": gap, "eval_mismatch": mismatch, "grad_norm": grad_norm,
                  "weight_norm": weight_norm, "lr": np.nan if lr is None else float(lr),
                  "train_loss": np.nan if loss is None else float(loss), **self._motion(step, statistics, lr)}
        record["warning_score"] = self._scores(record)
        score = record["warning_score"][list(WARNING_RULES).index(self.warn_rule)]
        fired = record["warning"] = bool(step >= self.warn_after and score > self.warn_threshold)
        for name, value in record.items():
            self.records[name].append(value)
        if self.writer is not None:
            self._write_scalars(record)
        if not fired:
            return None
        worst = int(np.nanargmax(gap[:, 0])) if np.isfinite(gap[:, 0]).any() else 0
        warning = BNWarning(step, epoch, losses[0], losses[1], self.bn_names[worst] if self.bn_names else "",
                            float(gap[worst, 0]) if len(gap) else float("nan"), self.warn_rule, float(score),
                            self.warn_threshold)
        if self.on_warning is not None:
            self.on_warning(warning)
        return warning

    def _scores(self, record: dict) -> np.ndarray:
        """Every rule's score of this measurement, from it and the previous BASELINE."""
        own = list(self.momenta).index(self._own_momentum) if self._own_momentum in self.momenta else None
        tail = {name: [*self.records[name][-BASELINE:], record[name]] for name in ("step", "probe_loss", "bn_gap",
                                                                                   "predicted_gap")}
        predicted = (np.array(tail["predicted_gap"])[:, own] if own is not None
                     else np.full((len(tail["step"]), len(self.bn_names)), np.nan))
        scores = warning_scores(tail["probe_loss"], np.array(tail["bn_gap"])[..., 0], predicted,
                                np.array(tail["step"]) >= self.warn_after)
        return np.array([scores[rule][-1] for rule in WARNING_RULES])

    def _motion(self, step: int, statistics: dict[str, BNStatistics], lr: float | None) -> dict:
        """What moves the statistics since the last measurements (module docstring): NaN where there is none."""
        n_bn, n_w = len(self.bn_names), len(self.weights)
        shifts, interval, angle = [np.full(n_bn, np.nan), np.full(n_bn, np.nan)], np.nan, np.full(n_w, np.nan)
        for k, (then, statistics_then) in enumerate(reversed(self._previous)):  # the last measurement, the one before
            if step > then:
                shifts[k] = statistics_error_table(statistics_then, statistics, self.bn_names)[:, 0].numpy()
        if self._previous and step > self._previous[-1][0]:
            interval = step - self._previous[-1][0]
        if self._before is not None and self._before[0] == step - 1:
            cosines = [F.cosine_similarity(before.flatten().double(), now.detach().flatten().double(), dim=0)
                       for before, now in zip(self._before[1], self.weights)]
            angle = np.array([math.acos(max(-1.0, min(1.0, c.item()))) for c in cosines])
        self._previous, self._before = [*self._previous[-1:], (step, statistics)], None
        noise = self.tracker.noise(reset=True)
        shadow_gap = self._shadow_errors(statistics)
        drift, diffusion, _ = lag_inputs(shifts[0], shifts[1], noise, [interval])
        return {"input_shift": shifts[0], "input_shift2": shifts[1], "interval": interval,
                "input_speed": shifts[0] / interval, "batch_noise": noise, "angular_speed": angle,
                "angular_equilibrium": self._equilibrium(lr), "shadow_gap": shadow_gap,
                "predicted_gap": predicted_error(drift, diffusion, noise, np.asarray(self.momenta)[:, None])}

    def _shadow_errors(self, statistics: dict[str, BNStatistics]) -> np.ndarray:
        """(momentum, layer): each shadow's normalisation error (RMS) against `statistics`; NaN without shadows."""
        shadows = self.tracker.shadow_statistics(self.bn_names)
        if not shadows:
            return np.full((len(self.momenta), len(self.bn_names)), np.nan)
        return np.stack([statistics_error_table(shadow, statistics, self.bn_names)[:, 0].numpy() for shadow in shadows])

    def _equilibrium(self, lr: float | None) -> float:
        """sqrt(2 lr wd / (1 + momentum)) of the optimiser's first group, at the step's own `lr` where the caller
        gave it (the group's holds the next step's once the scheduler stepped); NaN without an SGD-like one."""
        group = self.optimizer.param_groups[0] if self.optimizer is not None else {}
        if not all(key in group for key in ("lr", "weight_decay", "momentum")):
            return float("nan")
        lr = float(group["lr"]) if lr is None else float(lr)
        return math.sqrt(2 * lr * float(group["weight_decay"]) / (1 + float(group["momentum"])))

    def statistics_updated(self) -> None:
        """Call after a training forward that moved the running statistics with no optimiser step after it (each
        micro-batch but the last under gradient accumulation): the shadows follow every update of the buffers."""
        self.tracker.update()

    def statistics_replaced(self) -> None:
        """Call after something replaced the running statistics between steps (`--precise-bn`): every shadow
        starts again from them, as a run at its momentum would have been recalibrated too. Call it after
        `validate`, which measures the shadows as they were, like the running statistics it attributes."""
        self.replacements += 1
        self.tracker.resync()

    # -----------------------------------------------------------------------------------------------------------
    # Validations

    @torch.no_grad()
    def validate(self, batches, recalibration, *, step: int | None = None, epoch: int | None = None,
                 running=None, recalibrated=None, dtype: torch.dtype | None = None) -> Attribution:
        """At a validation: the loss and accuracy over `batches` with running and with recomputed statistics (over
        the images of `recalibration`), every shadow's and the running statistics' error against the recomputed
        ones, and the lag model's prediction of those errors; recorded (`dataset()`) and returned. `running`:
        `predict`'s result for the same batches where the caller already has it; `recalibrated`: `(predict's
        result, running_statistics)` of the model whose statistics the caller has just recomputed over the same
        images (`--precise-bn`), so that they are not recomputed twice. The model's weights, buffers, modes and
        random state are left as they were. `dtype`: the autocast dtype (default: the monitor's)."""
        dtype = self.autocast if dtype is None else dtype
        if running is None:
            with preserved_state(self.model):
                self.model.eval()
                running = predict(self.model, batches, dtype)
        recalibrated, statistics = recalibrated or recalibrated_predictions(self.model, batches, recalibration, dtype)
        result = attribute(running, recalibrated)
        errors = self._shadow_errors(statistics)
        val_step = self.calls if step is None else step
        steps = np.asarray(self.records["step"])
        since = (steps > (self.validations["val_step"][-1] if self.validations["val_step"] else -1)) & (
            steps <= val_step) & (steps >= self.lag_from)
        predicted = np.full((len(self.momenta), len(self.bn_names)), np.nan)
        if since.any():
            inputs = lag_inputs(*(self._stacked(self.records, name)[since] for name in (
                "input_shift", "input_shift2", "batch_noise", "interval")))
            predicted = predicted_error(*inputs, np.asarray(self.momenta)[:, None])
        record = {"val_step": val_step, "val_epoch": -1 if epoch is None else epoch,
                  "val_loss": [result.loss_running, result.loss_recalibrated],
                  "val_acc": [result.acc_running, result.acc_recalibrated], "bn_excess": result.excess,
                  "bn_excess_se": result.excess_se, "val_images": result.n_images, "shadow_error": errors,
                  "predicted_error": predicted}
        for name, value in record.items():
            self.validations[name].append(value)
        return result

    def _norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(gradient norms, weight norms), float64; NaN for a weight without a gradient."""
        grads = [w.grad for w in self.weights]
        present = [g for g in grads if g is not None]
        norms = iter(torch._foreach_norm(present) if present else [])
        grad_norm = [next(norms).double().item() if g is not None else np.nan for g in grads]
        weight_norm = [n.double().item() for n in torch._foreach_norm(self.weights)]
        return np.array(grad_norm), np.array(weight_norm)

    def scalars(self) -> dict[str, float]:
        """The last measurement as one scalar per tag `group/name` (a layer's name is the name): what the
        TensorBoard writer and the Lightning callback's loggers receive. Empty before the first measurement."""
        if not self.records["step"]:
            return {}
        record = {name: values[-1] for name, values in self.records.items()}
        scalars = {tag: float(record[name]) for name, tag in (("train_loss", "step/loss"), ("lr", "step/lr"))
                   if np.isfinite(record[name])}  # the caller's, where it passed them
        for k, bn in enumerate(PROBE_STATISTICS):
            scalars[f"probe/loss_{bn}"] = float(record["probe_loss"][k])
            scalars[f"probe/accuracy_{bn}"] = float(record["probe_acc"][k])
        scalars["probe/warning"] = float(record["warning"])
        for group, (names, values) in self._per_layer(record).items():
            scalars |= {f"{group}/{name}": float(value) for name, value in zip(names, values)}
        return scalars

    def _per_layer(self, record: dict) -> dict[str, tuple[list[str], np.ndarray]]:
        return {"bn_gap": (self.bn_names, record["bn_gap"][:, 0]),
                "eval_mismatch": (self.bn_names, record["eval_mismatch"][:, 0]),
                "grad_norm": (self.weight_names, record["grad_norm"]),
                "scaled_grad_norm": (self.weight_names, record["grad_norm"] * record["weight_norm"])}

    def _write_scalars(self, record: dict) -> None:
        """TensorBoard: every scalar of `scalars()`, and the per-layer values also as one histogram over the
        layers per step (`layers/...`)."""
        step, writer = record["step"], self.writer
        for tag, value in self.scalars().items():
            writer.add_scalar(tag, value, step)
        for group, (_, values) in self._per_layer(record).items():
            finite = values[np.isfinite(values)]
            if len(finite):
                writer.add_histogram(f"layers/{group}", finite, step)

    # -----------------------------------------------------------------------------------------------------------
    # The record

    def _shapes(self) -> dict[str, tuple]:
        """The shape of one entry of every record (the first dim of each variable is the measurement's)."""
        sizes = {"bn": 2, "val_bn": 2, "component": len(COMPONENTS), "depth": len(self.bn_names),
                 "weight_depth": len(self.weight_names), "momentum": len(self.momenta), "rule": len(WARNING_RULES)}
        return {name: tuple(sizes[dim] for dim in VARIABLES[name][0][1:]) if name in VARIABLES else ()
                for name in (*self.records, *self.validations)}

    def _stacked(self, records: dict, name: str) -> np.ndarray:
        shape = self._shapes()[name]
        return np.asarray(records[name], dtype=np.float64).reshape((len(records[name]), *shape))

    def state_dict(self) -> dict:
        """The measurements and validations so far, the shadow statistics and what the next measurement compares
        with, as tensors and lists (a checkpoint with weights_only=True can hold it): a resumed run measures as
        if it had not stopped."""
        return {"calls": self.calls, "replacements": self.replacements, "bn_layers": list(self.bn_names),
                "weight_layers": list(self.weight_names),
                "records": {name: torch.as_tensor(self._stacked(self.records, name)) for name in self.records},
                "validations": {name: torch.as_tensor(self._stacked(self.validations, name))
                                for name in self.validations},
                "tracker": self.tracker.state_dict(),
                "previous": [{"step": step, "mean": [stats[n].mean.cpu() for n in self.bn_names],
                              "var": [stats[n].var.cpu() for n in self.bn_names]} for step, stats in self._previous],
                "before": ({"step": self._before[0], "weights": [w.cpu() for w in self._before[1]]}
                           if self._before is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        """Continue the record `state_dict` returned (on resume); the layers must be this model's. A record of an
        older version lacks the newer measurements: NaN there (its warnings: none fired)."""
        if list(state["bn_layers"]) != self.bn_names or list(state["weight_layers"]) != self.weight_names:
            raise ValueError("the monitor's saved state is of another model")
        for key, kind in (("records", dict), ("validations", dict), ("tracker", dict), ("previous", list),
                          ("before", dict)):
            if state.get(key) is not None and not isinstance(state[key], kind):
                raise ValueError(f"the monitor's saved {key} is a {type(state[key]).__name__}, not a {kind.__name__}")
        self.calls = int(state["calls"])
        replacements = state.get("replacements", 0)  # a record of an older version: none counted
        if not isinstance(replacements, int) or isinstance(replacements, bool) or replacements < 0:
            raise ValueError(f"the monitor's saved replacements is {replacements!r}, not a count")
        self.replacements = replacements
        shapes = self._shapes()
        for target, saved in ((self.records, state["records"]), (self.validations, state.get("validations", {}))):
            n = len(saved[next(iter(target))]) if next(iter(target)) in saved else 0
            for name in target:
                values = saved[name].numpy() if name in saved else np.full((n, *shapes[name]), np.nan)
                if n == 0 and values.size == 0:  # an empty record of any shape (version 2 saved them flat)
                    values = np.empty((0, *shapes[name]))
                if values.shape != (n, *shapes[name]):
                    raise ValueError(f"the monitor's saved {name} has the shape {values.shape}")
                target[name] = [value if value.ndim else value.item() for value in values]
        for name in ("step", "epoch", "val_step", "val_epoch", "val_images"):  # an older record's missing: NaN
            target = self.records if name in self.records else self.validations
            target[name] = [int(value) if np.isfinite(value) else value for value in target[name]]
        # an older record that did not keep whether a warning fired: none counted (NaN would read as fired)
        self.records["warning"] = [bool(w) if np.isfinite(w) else False for w in self.records["warning"]]
        self.tracker.load_state_dict(state.get("tracker", {}))
        previous, before = state.get("previous") or [], state.get("before") or {}
        eps = {name: module.eps for name, module in models.bn_layers(self.model)}
        previous = previous if isinstance(previous, list) else [previous]
        sizes = [len(statistics.mean) for statistics in running_statistics(self.model).values()]
        if len(previous) > 2 or any(len(p["mean"]) != len(sizes) or len(p["var"]) != len(sizes)
                                    or any(len(t) != n for t, n in zip([*p["mean"], *p["var"]], sizes * 2))
                                    for p in previous):
            raise ValueError("the monitor's saved probe statistics are not of this model's BN layers")
        self._previous = [(int(p["step"]), {name: BNStatistics(m.to(self.device), v.to(self.device), eps[name])
                                            for name, m, v in zip(self.bn_names, p["mean"], p["var"])})
                          for p in previous]
        if before and [tuple(w.shape) for w in before["weights"]] != [tuple(w.shape) for w in self.weights]:
            raise ValueError("the monitor's saved weights are not this model's")
        self._before = ((int(before["step"]), [w.to(self.device) for w in before["weights"]]) if before else None)

    def dataset(self, *, checkpoint=None, dataset=None) -> xr.Dataset:
        """Every measurement so far along `step`, every validation along `validation`; BN layers along `depth`,
        weights along `weight_depth`, the shadow statistics' momenta along `momentum`."""
        r, v = self.records, self.validations
        stacked = lambda name: self._stacked(r if name in r else v, name)
        grad_norm, weight_norm = stacked("grad_norm"), stacked("weight_norm")
        weight_coords = layer_coords(self.weight_names)
        coords = {**layer_coords(self.bn_names), "step": ("step", np.asarray(r["step"], dtype=np.int64)),
                  "epoch": ("step", np.asarray(r["epoch"], dtype=np.int64)), "bn": ("bn", list(PROBE_STATISTICS)),
                  "component": ("component", list(COMPONENTS)),
                  "weight_depth": ("weight_depth", weight_coords["depth"][1]),
                  "weight_layer": ("weight_depth", weight_coords["layer"][1]),
                  "weight_kind": ("weight_depth", np.array(self.weight_kinds, dtype=object)),
                  "momentum": ("momentum", np.asarray(self.momenta, dtype=np.float64)),
                  "validation": ("validation", np.arange(1, len(v["val_step"]) + 1)),
                  "val_step": ("validation", np.asarray(v["val_step"], dtype=np.int64)),
                  "val_epoch": ("validation", np.asarray(v["val_epoch"], dtype=np.int64)),
                  "val_bn": ("val_bn", list(VALIDATION_BN)), "rule": ("rule", list(WARNING_RULES))}
        rule = warning_rule(self.warn_rule, self.warn_threshold, self.warn_after)
        data = {name: variable(dims, stacked(name), long_name, units)
                for name, (dims, long_name, units) in VARIABLES.items()}
        data["warning"] = data["warning"].astype(bool)
        data["scaled_grad_norm"] = variable(("step", "weight_depth"), grad_norm * weight_norm,
                                            "gradient norm x weight norm (scale invariant under BN)", "nats")
        return xr.Dataset(
            data,
            coords=coords,
            attrs=attrs(definition(self.every, len(self.labels), self.probe, rule), checkpoint=checkpoint,
                        dataset=dataset, split="train", n_images=len(self.labels), batch_size=len(self.labels),
                        bn_mode="eval and train", every=self.every, rule=rule, warn_rule=self.warn_rule,
                        warn_threshold=self.warn_threshold, warn_after=self.warn_after, lag_from=self.lag_from,
                        probe=self.probe, bn_momentum=self.own_momenta, autocast=dtype_name(self.autocast),
                        statistics_replaced=self.replacements),
        )
