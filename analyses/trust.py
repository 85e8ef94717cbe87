"""Trust every validation, across seeds: how many of a run's validations were BN-statistics events, how large
their excess was, how well the lag model predicted the running statistics' error, and how well an early warning
rule announced the events; per run, per group of runs that differ only in seed (mean and 95% t-interval over
the seeds), and plain minus residual for groups that differ only in the skip connection (Welch interval).

An **event** is a validation whose loss with running statistics exceeds the loss with recomputed statistics on
the same images by `event_factor` times and by `event_margin` nats (`analyses.spikes.gap_mask`, the spike
diagnosis's BN-statistics gap). A warning rule gives every monitor measurement a score; it **announces** a
validation when a measurement since the previous validation scored above the threshold, from the step the
warning is armed (the run's `warn_after`); its lead is the steps from the first such measurement to the
validation. Precision is the share of announced validations that were events, recall the share of events that
were announced. A rule's threshold is chosen on the runs of the `choose_on` seeds (the largest
min(precision, recall), ties to the larger threshold) and scored on the others.

Pure: histories and monitor datasets in, an `xarray.Dataset` out.
"""
import math

import numpy as np
import xarray as xr

from .common import attrs, variable
from .monitor import WARNING_RULES, prescription, warning_scores
from .spikes import gap_mask

STATISTICS = ("mean", "low", "high")  # the `statistic` dim: the mean over seeds and its 95% interval
T_975 = dict(enumerate((12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
                        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
                        2.052, 2.048, 2.045, 2.042), start=1)) | {40: 2.021, 60: 2.000, 120: 1.980}  # t, 97.5%
RUN_METRICS = {  # name: (long name, units)
    "validations": ("validations attributed", "1"),
    "events": ("validations that were BN-statistics events", "1"),
    "event_share": ("share of the validations that were events", "1"),
    "mean_excess": ("mean over the validations of the loss with running minus recomputed statistics", "nats"),
    "max_excess": ("largest excess of a validation", "nats"),
    "final_acc_running": ("last validation's accuracy with running statistics (attributed images)", "1"),
    "final_acc_recalibrated": ("last validation's accuracy with recomputed statistics (attributed images)", "1"),
    "running_error": ("RMS over validations and BN layers of the running statistics' normalisation error "
                      "against the recomputed ones", "normalised activation (RMS)"),
    "drift": ("median over BN layers of the input statistics' drift (lag_inputs)", "normalised activation per step"),
    "diffusion": ("median over BN layers of the input statistics' diffusion, as a spread per sqrt(step)",
                  "normalised activation per sqrt(step)"),
    "batch_noise": ("median over BN layers of batch_noise", "normalised activation (RMS)"),
    "angular_speed": ("median over measurements and conv weights of angular_speed", "radians per step"),
    "angular_equilibrium": ("median of sqrt(2 lr wd / (1 + momentum))", "radians per step"),
    "lag_spearman": ("Spearman correlation of the lag model's predicted and the measured shadow errors", "1"),
    "lag_r2": ("R^2 of log10 measured by log10 predicted shadow errors", "1"),
    "best_momentum_measured": ("the shadow momentum closest to the recomputed statistics over the run", "1"),
    "best_momentum_predicted": ("the lag model's best momentum from the run's median speed and noise", "1"),
}
POSSIBLE = {  # the values a run metric can take; a group's t-interval is intersected with them
    **dict.fromkeys(("validations", "events", "running_error", "drift", "diffusion", "batch_noise", "angular_speed",
                     "angular_equilibrium"), (0.0, math.inf)),
    **dict.fromkeys(("event_share", "final_acc_running", "final_acc_recalibrated", "best_momentum_measured",
                     "best_momentum_predicted"), (0.0, 1.0)),
    "lag_spearman": (-1.0, 1.0), "lag_r2": (-math.inf, 1.0)}
WARNING_RESULTS = {  # per horizon and rule, `warning_NAME`: (long name, units)
    "threshold": ("the rule's threshold, chosen on the choose_on seeds", "1"),
    "precision_chosen": ("precision on the choose_on seeds", "1"),
    "recall_chosen": ("recall on the choose_on seeds", "1"),
    "lead_chosen": ("median lead of announced events on the choose_on seeds", "optimiser steps"),
    "precision_held_out": ("precision on the other seeds", "1"),
    "recall_held_out": ("recall on the other seeds", "1"),
    "lead_held_out": ("median lead of announced events on the other seeds", "optimiser steps"),
    "events_chosen": ("events on the choose_on seeds", "1"),
    "events_held_out": ("events on the other seeds", "1"),
}
HORIZONS = ("epoch", "last")  # a warning announces: any measurement since the last validation, or the last one


def t_interval(values, possible: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float, float]:
    """(mean, low, high): the 95% interval of the mean by Student's t, intersected with the `possible` values (two
    seeds' interval of a count would otherwise reach below 0); NaN bounds for one value."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = _t(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, max(mean - half, possible[0]), min(mean + half, possible[1])


def welch_interval(a, b) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): 95% interval by Welch's t with the Welch-Satterthwaite degrees of
    freedom; NaN bounds where either has fewer than two values."""
    a = np.asarray([v for v in a if np.isfinite(v)], dtype=np.float64)
    b = np.asarray([v for v in b if np.isfinite(v)], dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan
    difference = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return difference, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return difference, difference, difference
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = _t(df) * math.sqrt(va + vb)
    return difference, difference - half, difference + half


def _t(df: float) -> float:
    """Student's t 97.5% quantile at the tabulated degrees of freedom at or below `df`: an interval a little
    wider than exact between table entries, never narrower."""
    return T_975[max(k for k in T_975 if k <= max(1, math.floor(df)))]


def events_of(history: dict, factor: float, margin: float) -> np.ndarray:
    """Per epoch of a metrics history: was its validation a BN-statistics event (running against recomputed loss
    on the attributed images: val_loss_recalibrated + bn_excess is their running loss)."""
    recalibrated = np.asarray(history["val_loss_recalibrated"], dtype=np.float64)
    running = recalibrated + np.asarray(history["bn_excess"], dtype=np.float64)
    return gap_mask(running, recalibrated, gap_factor=factor, min_increase=margin) & np.isfinite(recalibrated)


def rule_scores(monitor: xr.Dataset) -> dict[str, np.ndarray]:
    """Each rule's score (WARNING_RULES) of every measurement of a monitor dataset, in step order: as the monitor
    scored them where it kept them, otherwise (a run recorded before it did) by the same `warning_scores`."""
    if "warning_score" in monitor:
        return {rule: monitor.warning_score.sel(rule=rule).values for rule in WARNING_RULES}
    if "momentum" not in monitor.coords:  # version 2: no lag model
        monitor = monitor.assign(predicted_gap=(("step", "momentum", "depth"),
                                                np.full((monitor.sizes["step"], 1, monitor.sizes["depth"]), np.nan)),
                                 momentum=[0.1])
    own = np.atleast_1d(monitor.attrs.get("bn_momentum", [0.1]))
    momentum = float(own[0]) if len(own) else 0.1
    predicted = (monitor.predicted_gap.sel(momentum=momentum).values if momentum in monitor.momentum.values
                 else np.full((monitor.sizes["step"], monitor.sizes["depth"]), np.nan))
    return warning_scores(monitor.probe_loss.values, monitor.bn_gap.sel(component="rms").values, predicted,
                          monitor.step.values >= int(monitor.attrs.get("warn_after", 0)))


def announced(steps, scores, armed_from: int, val_steps, threshold: float, within: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per validation: announced by a score above `threshold` since the previous validation (from step
    `armed_from`; with `within`, only in the last `within` steps before the validation), and the lead in steps
    (NaN where not announced)."""
    steps, scores = np.asarray(steps), np.asarray(scores, dtype=np.float64)
    fired = np.zeros(len(val_steps), dtype=bool)
    lead = np.full(len(val_steps), np.nan)
    previous = -1
    for j, val_step in enumerate(val_steps):
        start = previous if within is None else max(previous, val_step - within)
        window = (steps > start) & (steps <= val_step) & (steps >= armed_from) & (scores > threshold)
        if window.any():
            fired[j], lead[j] = True, val_step - steps[window][0]
        previous = val_step
    return fired, lead


def precision_recall(fired, events) -> tuple[float, float]:
    fired, events = np.asarray(fired, dtype=bool), np.asarray(events, dtype=bool)
    hits = (fired & events).sum()
    return (float(hits / fired.sum()) if fired.sum() else math.nan,
            float(hits / events.sum()) if events.sum() else math.nan)


def trust_study(histories: list[dict], monitors: list[xr.Dataset | None], labels: list[str], groups: list[str],
                seeds: list[int], pairs: list[tuple[str, str]], *, event_factor: float = 1.25,
                event_margin: float = 0.1, choose_on: tuple[int, ...] = (0, 1), checkpoint=None,
                dataset=None) -> xr.Dataset:
    """The study of the module docstring over runs `labels` (their metrics histories and monitor datasets, None
    where a run has no monitor), each in group `groups[i]` with seed `seeds[i]`; `pairs`: (plain group, residual
    group) to contrast."""
    per_run = {name: np.full(len(labels), np.nan) for name in RUN_METRICS}
    events = [events_of(history, event_factor, event_margin) for history in histories]
    for i, (history, monitor) in enumerate(zip(histories, monitors)):
        excess = np.asarray(history["bn_excess"], dtype=np.float64)
        finite = np.isfinite(excess)
        values = {"validations": finite.sum(), "events": events[i].sum(),
                  "event_share": events[i].sum() / finite.sum() if finite.any() else np.nan,
                  "mean_excess": excess[finite].mean() if finite.any() else np.nan,
                  "max_excess": excess[finite].max() if finite.any() else np.nan,
                  "final_acc_running": history["val_acc"][-1],
                  "final_acc_recalibrated": history["val_acc_recalibrated"][-1]}
        if monitor is not None and monitor.sizes.get("validation", 0):  # a monitor of version 3 that validated
            found = prescription(monitor)
            own = found.momentum
            errors = monitor.shadow_error.sel(momentum=own).values if own in monitor.momentum.values else [np.nan]
            rho, r2, _ = found.fit
            values.update(running_error=float(np.sqrt(np.nanmean(np.square(errors)))) if np.isfinite(errors).any()
                          else np.nan, drift=found.drift, diffusion=math.sqrt(found.diffusion), batch_noise=found.noise,
                          angular_speed=found.angular_speed, angular_equilibrium=found.angular_equilibrium,
                          lag_spearman=rho, lag_r2=r2, best_momentum_measured=found.measured_best,
                          best_momentum_predicted=found.predicted_best,
                          # both accuracies on the same (attributed) images
                          final_acc_running=float(monitor.val_acc.values[-1, 0]),
                          final_acc_recalibrated=float(monitor.val_acc.values[-1, 1]))
        for name, value in values.items():
            per_run[name][i] = value
    group_names = list(dict.fromkeys(groups))
    by_group = {name: np.array([t_interval(per_run[name][[g == group for g in groups]], POSSIBLE.get(
        name, (-math.inf, math.inf))) for group in group_names]) for name in RUN_METRICS}
    contrast = {name: np.array([welch_interval(per_run[name][[g == plain for g in groups]],
                                               per_run[name][[g == residual for g in groups]])
                                for plain, residual in pairs]).reshape(len(pairs), 3) for name in RUN_METRICS}
    scores = _warning_scores(histories, monitors, events, seeds, choose_on)
    data = {name: variable("run", per_run[name], long_name, units) for name, (long_name, units) in
            RUN_METRICS.items()}
    data.update({f"{name}_by_group": variable(("group", "statistic"), by_group[name],
                                              f"{long_name}: mean over the group's seeds and 95% t-interval"
                                              + (" within the possible values" if name in POSSIBLE else ""), units)
                 for name, (long_name, units) in RUN_METRICS.items()})
    data.update({f"{name}_contrast": variable(("pair", "statistic"), contrast[name],
                                              f"{long_name}: plain minus residual, 95% Welch interval", units)
                 for name, (long_name, units) in RUN_METRICS.items()})
    data.update(scores)
    data.update(own_warnings(histories, monitors, events))
    validation_excess = [np.asarray(history["bn_excess"], dtype=np.float64) for history in histories]
    longest = max((len(v) for v in validation_excess), default=0)
    padded = np.full((len(labels), longest), np.nan)
    flags = np.zeros((len(labels), longest), dtype=bool)
    for i, values in enumerate(validation_excess):
        padded[i, :len(values)], flags[i, :len(values)] = values, events[i]
    data["excess"] = variable(("run", "epoch"), padded, "validation loss with running minus recomputed statistics",
                              "nats")
    data["event"] = variable(("run", "epoch"), flags, "the validation was a BN-statistics event", "1")
    coords = {"run": ("run", np.array(labels, dtype=object)), "group_of_run": ("run", np.array(groups, dtype=object)),
              "seed": ("run", np.asarray(seeds, dtype=np.int64)),
              "group": ("group", np.array(group_names, dtype=object)),
              "statistic": ("statistic", list(STATISTICS)),
              "pair": ("pair", np.array([f"{p} - {r}" for p, r in pairs], dtype=object)),
              "epoch": ("epoch", np.arange(1, longest + 1)), "rule": ("rule", list(WARNING_RULES)),
              "horizon": ("horizon", list(HORIZONS))}
    definition = (f"an event: a validation whose loss with running BN statistics exceeds the loss with statistics "
                  f"recomputed over training images, on the same validation images, by {event_factor:g} x and by "
                  f"{event_margin:g} nats; intervals: 95% Student t over a group's seeds (within the values a quantity "
                  f"can take: counts, errors, speeds and noise from 0, shares, accuracies and momenta 0-1, Spearman "
                  f"-1 to 1, R^2 to 1), Welch for plain minus "
                  f"residual; warning rules scored per validation (announced by a measurement above the threshold "
                  f"since the previous validation), thresholds chosen on seeds {', '.join(map(str, choose_on))} "
                  "and scored on the others")
    return xr.Dataset(data, coords=coords, attrs=attrs(
        definition, checkpoint=checkpoint, dataset=dataset, split="val", event_factor=event_factor,
        event_margin=event_margin, choose_on=list(choose_on),
        rules=[f"{k}: {v}" for k, v in WARNING_RULES.items()]))


def attributed(history: dict, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The steps and event flags of a run's attributed validations (those with a finite excess)."""
    finite = np.isfinite(np.asarray(history["bn_excess"], dtype=np.float64))
    return np.asarray(history["step"])[finite], flags[finite]


def own_warnings(histories, monitors, events) -> dict:
    """The warnings the runs printed (monitor.nc `warning`, each run's rule as its trainer applied it) scored at
    the last measurement before each attributed validation, over all runs: no threshold is chosen here."""
    caught = missed = false_alarms = 0
    for history, monitor, flags in zip(histories, monitors, events):
        if monitor is None or not monitor.sizes.get("step", 0) or "warning" not in monitor:
            continue
        val_steps, flags = attributed(history, flags)
        fired, _ = announced(monitor.step.values, monitor.warning.values.astype(np.float64), 0, val_steps, 0.5,
                             int(monitor.attrs.get("every", 1)))
        caught += int((fired & flags).sum())
        missed += int((~fired & flags).sum())
        false_alarms += int((fired & ~flags).sum())
    what = "validations announced by a warning the run printed at its last measurement before them"
    return {"own_warning_caught": variable((), caught, f"events among the {what}", "1"),
            "own_warning_missed": variable((), missed, "events not announced so", "1"),
            "own_warning_false_alarms": variable((), false_alarms, f"{what} that were not events", "1")}


def _warning_scores(histories, monitors, events, seeds, choose_on) -> dict:
    """Per horizon (`epoch`: any measurement since the previous validation; `last`: the last measurement before
    the validation, within the monitor's interval) and rule: the threshold chosen on the `choose_on` seeds, and
    precision, recall and median lead on those (`chosen`) and on the other seeds (`held_out`)."""
    parts = [_horizon_scores(histories, monitors, events, seeds, choose_on, last) for last in (False, True)]
    return {name: xr.Variable(("horizon", "rule"), np.stack([part[name].values for part in parts]),
                              parts[0][name].attrs) for name in parts[0]}


def _horizon_scores(histories, monitors, events, seeds, choose_on, last: bool) -> dict:
    runs = []
    for history, monitor, flags, seed in zip(histories, monitors, events, seeds):
        if monitor is None or not monitor.sizes.get("step", 0):
            continue
        within = int(monitor.attrs.get("every", 1)) if last else None
        runs.append((monitor.step.values, rule_scores(monitor), int(monitor.attrs.get("warn_after", 0)),
                     *attributed(history, flags), seed in choose_on, within))
    results = {key: np.full(len(WARNING_RULES), np.nan) for key in WARNING_RESULTS}

    def pooled(rule, threshold, chosen):
        fired, flags, leads = [], [], []
        for steps, scores, armed, val_steps, run_events, in_chosen, within in runs:
            if in_chosen != chosen:
                continue
            hit, lead = announced(steps, scores[rule], armed, val_steps, threshold, within)
            fired.append(hit), flags.append(run_events), leads.append(lead[hit & run_events])
        if not fired:
            return math.nan, math.nan, math.nan, 0
        fired, flags, leads = np.concatenate(fired), np.concatenate(flags), np.concatenate(leads)
        precision, recall = precision_recall(fired, flags)
        return precision, recall, float(np.median(leads)) if len(leads) else math.nan, int(flags.sum())

    for k, rule in enumerate(WARNING_RULES):
        values = [scores[rule][np.isfinite(scores[rule])] for _, scores, _, _, _, chosen, _ in runs if chosen]
        candidates = np.unique(np.concatenate(values)) if values else np.array([])
        best, best_value = math.nan, -1.0
        for threshold in candidates[::-1]:  # from the largest: ties keep the larger threshold
            below = float(np.nextafter(threshold, -np.inf))  # scores above it: this one included
            precision, recall, _, _ = pooled(rule, below, True)
            value = min(np.nan_to_num(precision), np.nan_to_num(recall))
            if value > best_value:
                best, best_value = below, value
        results["threshold"][k] = best
        if np.isfinite(best):
            for chosen, suffix in ((True, "chosen"), (False, "held_out")):
                precision, recall, lead, n_events = pooled(rule, best, chosen)
                results[f"precision_{suffix}"][k], results[f"recall_{suffix}"][k] = precision, recall
                results[f"lead_{suffix}"][k], results[f"events_{suffix}"][k] = lead, n_events
    return {f"warning_{key}": variable("rule", values, *WARNING_RESULTS[key]) for key, values in results.items()}
