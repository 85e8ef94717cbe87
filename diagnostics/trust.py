"""`python -m diagnostics.trust RUN [RUN ...]`: across seeds, how many validations BN statistics spoiled, by how
much, why, and whether the early warning announced them.

Reads each run's metrics.csv (the attribution of every validation: running against recomputed statistics) and
monitor.nc (speeds, noise, shadow statistics, the probe). Runs that differ only in seed form a group (as in
`diagnostics.curves`); groups that differ only in the skip connection are contrasted, plain minus residual.
Writes trust.nc and trust.png / .pdf; prints the tables.
"""
import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr

import models
import resnet_diagnostics
from analyses.monitor import WARNING_RULES
from analyses.trust import trust_study
from train.errors import ArgumentParser, bounded_float
from train.progress import track

from . import common, plotting
from .curves import group_labels, group_options, run_labels


def parser():
    p = ArgumentParser(prog=resnet_diagnostics.prog("diagnostics.trust"), description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of python -m train")
    p.add_argument("--event-factor", type=bounded_float(1.0, inclusive=False), default=1.25,
                   help="an event: the running-statistics loss exceeds the recomputed one by this factor (default "
                        "1.25, as diagnostics.spikes' --gap-factor)")
    p.add_argument("--event-margin", type=bounded_float(0.0, inclusive=True), default=0.1,
                   help="... and by at least this many nats (default 0.1)")
    p.add_argument("--choose-on", default="0,1", metavar="SEEDS",
                   help="seeds whose runs choose each warning rule's threshold; the others score it (default 0,1)")
    p.add_argument("--out", help="where trust.nc and trust.png go (default: diagnostics/ in the first run)")
    return p


def skip_pairs(runs, groups: list[str]) -> list[tuple[str, str]]:
    """(plain group, residual group) for groups whose runs differ only in the skip connection."""
    keys = {}
    for run, group in zip(runs, groups):
        kwargs = {"skip": False} if run.config.get("skip") is False else {}  # --no-skip
        name, canonical = models.canonical(run.config["model"], **kwargs)
        options = {k: v for k, v in group_options(run).items() if k != "model"}
        key = json.dumps([name, {k: v for k, v in canonical.items() if k != "skip"}, options], sort_keys=True,
                         default=str)
        keys.setdefault(key, {})[canonical.get("skip", True) is False] = group
    return [(sides[True], sides[False]) for sides in keys.values() if True in sides and False in sides]


def _cell(values, digits: int = 2, scale: float = 1.0) -> str:
    mean, low, high = (scale * v for v in values)
    if not np.isfinite(mean):
        return "?"
    return f"{mean:.{digits}f}" + (f" [{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low) else "")


GROUP_COLUMNS = [("events", "events", 1, 1), ("event_share", "share", 2, 1), ("max_excess", "max excess", 2, 1),
                 ("final_acc_running", "acc running %", 1, 100), ("final_acc_recalibrated", "acc recomputed %", 1, 100),
                 ("running_error", "stats error", 3, 1), ("lag_spearman", "lag model rho", 2, 1),
                 ("best_momentum_measured", "best m", 2, 1)]


def tables(ds: xr.Dataset) -> str:
    lines = [f"events: {ds.attrs['definition']}", "mean [95% interval] over seeds"]
    rows = [[str(group), str(int((ds.group_of_run == group).sum()))]
            + [_cell(ds[f"{name}_by_group"].sel(group=group).values, digits, scale)
               for name, _, digits, scale in GROUP_COLUMNS] for group in ds.group.values]
    lines.append(common.format_table(["group", "runs", *(title for _, title, _, _ in GROUP_COLUMNS)], rows))
    if ds.sizes["pair"]:
        lines.append("plain minus residual [95% Welch interval]")
        rows = [[str(pair)] + [_cell(ds[f"{name}_contrast"].sel(pair=pair).values, digits, scale)
                               for name, _, digits, scale in GROUP_COLUMNS] for pair in ds.pair.values]
        lines.append(common.format_table(["pair", *(title for _, title, _, _ in GROUP_COLUMNS)], rows))
    seeds = ", ".join(map(str, np.atleast_1d(ds.attrs["choose_on"])))
    for horizon, what in (("epoch", "any measurement since the previous validation"),
                          ("last", "the last measurement before the validation")):
        lines.append(f"warning rules announcing by {what}: threshold chosen on seeds {seeds}, scored on the others "
                     "(precision, recall, median lead in steps, events)")
        one = ds.sel(horizon=horizon)
        rows = [[rule, f"{one.warning_threshold.sel(rule=rule).item():.3g}"]
                + [f"{one[f'warning_{q}_{part}'].sel(rule=rule).item():.2f}" for part in ("chosen", "held_out")
                   for q in ("precision", "recall")]
                + [f"{one[f'warning_lead_{part}'].sel(rule=rule).item():.0f}" for part in ("chosen", "held_out")]
                + [f"{one[f'warning_events_{part}'].sel(rule=rule).item():.0f}" for part in ("chosen", "held_out")]
                for rule in WARNING_RULES]
        lines.append(common.format_table(["rule", "threshold", "P chosen", "R chosen", "P held out", "R held out",
                                          "lead chosen", "lead held out", "events chosen", "events held out"], rows))
    caught, missed, false = (int(ds[f"own_warning_{name}"]) for name in ("caught", "missed", "false_alarms"))
    lines.append(f"the warnings the runs printed, at the last measurement before each validation: {caught} of "
                 f"{caught + missed} events announced, {false} false alarms")
    return "\n".join(lines)


DOT = 8  # a seed's dot, points^2 (scatter's s)


def dot_size(fig, axis, n_groups: int) -> tuple[float, float]:
    """A dot's diameter with its edge in x data units and as a fraction of the axis height, from the axis's place
    before tight_layout (which widens it: the estimate errs towards more room)."""
    box, diameter = axis.get_position(), 1.15 * 2 * np.sqrt(DOT / np.pi)
    return (diameter * (n_groups + 0.2) / (box.width * fig.get_figwidth() * 72),
            diameter / (box.height * fig.get_figheight() * 72))


def dodged(values: np.ndarray, step: float, width: float, tolerance: float) -> tuple[np.ndarray, dict]:
    """Horizontal offsets that set seeds whose dots would cover each other (values within `tolerance` of the
    first of their cluster) side by side, centred, `step` (a dot) apart, so that a reader counts every seed; a
    cluster that `width` cannot hold stays in one place, its count written above it: {index: seeds}.
    Missing values have no dot and no offset."""
    offsets, counted = np.zeros(len(values)), {}
    order = [i for i in np.argsort(values) if np.isfinite(values[i])]
    while order:
        cluster = [i for i in order if values[i] - values[order[0]] <= tolerance]
        order = order[len(cluster):]
        if len(cluster) > 1 and (len(cluster) - 1) * step <= width:
            offsets[cluster] = (np.arange(len(cluster)) - (len(cluster) - 1) / 2) * step
        elif len(cluster) > 1:
            counted[cluster[0]] = len(cluster)
    return offsets, counted


@plotting.styled
def figure(ds: xr.Dataset):
    """Per group, seeds as dots (those that would cover each other side by side, or one dot with their count above
    it where a column cannot hold them) and beside them the mean with its 95% interval: (a) events per run, (b)
    every validation's excess (events filled), (c) accuracy with running and recomputed statistics, (d) the
    running statistics' error, (e) the layers' input speed against BN's window, (f) best momentum, measured and
    predicted."""
    panels = [("events", "(a) BN-statistics events per run", 1, False),
              (None, "(b) excess of each validation, nats\n(filled: events; dotted: the margin)", 1, True),
              ("final_acc", "(c) last validation accuracy, %\n(running ●, recomputed ○)", 100, False),
              ("running_error", "(d) running statistics' error\n(RMS over validations and layers)", 1, False),
              ("diffusion", "(e) diffusion of the layers' input\nstatistics per sqrt(step) (median)", 1, False),
              ("best_momentum", "(f) best BN momentum\n(measured ●, predicted ○)", 1, False)]
    fig, axes = plotting.figure(2, 3, width=2 * plotting.COLUMN_WIDTH, height=4.6, sharex=True)
    groups = list(ds.group.values)
    x = np.arange(len(groups))
    model_of = {group: str(group).split(" ")[0] for group in groups}  # a group label starts with its model
    models_ = list(dict.fromkeys(model_of.values()))
    colours = {group: f"C{models_.index(model) % 10}" for group, model in model_of.items()}  # one per model
    upright = len(groups) > 4  # at 30 degrees, more labels overlap
    for axis, (name, title, scale, symlog) in zip(axes.flat, panels):
        axis.set_title(title, loc="left", fontsize=6)
        pairs = ([("final_acc_running", "o"), ("final_acc_recalibrated", "none")] if name == "final_acc" else
                 [("best_momentum_measured", "o"), ("best_momentum_predicted", "none")]
                 if name == "best_momentum" else [(name, "o")])
        every = np.ravel([scale * ds[variable].values for variable, _ in pairs]) if name else np.array([])
        every = every[np.isfinite(every)]
        log = name in ("running_error", "diffusion", "best_momentum") and (every > 0).any()
        # a 0 (the lag model's fit can put all of a run's motion in drift) has no place on a log axis: a triangle
        # at a floor a factor 3 below the smallest positive value, said in the panel (a mean or bound of 0 there too)
        floor = every[every > 0].min() / 3 if log and (every == 0).any() else np.nan
        shown = np.log10(np.where(every > 0, every, floor)) if log else every  # what the axis spaces evenly
        dot_x, dot_y = dot_size(fig, axis, len(groups))
        tolerance = dot_y * 1.1 * (np.ptp(shown) if len(shown) > 1 and np.ptp(shown) > 0 else 1.0)
        for i, group in enumerate(groups):
            runs = ds.group_of_run.values == group
            colour = colours[group]
            if name is None:
                excess, events = ds.excess.values[runs].ravel(), ds.event.values[runs].ravel()
                keep = np.isfinite(excess)
                if not keep.any():
                    continue
                jitter = np.linspace(-0.25, 0.25, max(1, keep.sum()))
                axis.scatter(i + jitter, excess[keep], s=6, facecolors=np.where(events[keep], colour, "none"),
                             edgecolors=colour, linewidths=0.5)
                continue
            for k, (variable, fill) in enumerate(pairs):
                side = 1 if k == len(pairs) - 1 else -1  # the mean's bar outside its dots: the last pair's right
                centre = i + (k - (len(pairs) - 1) / 2) * 0.5
                values = scale * ds[variable].values[runs]
                zero = values == 0 if np.isfinite(floor) else np.zeros(len(values), dtype=bool)
                values = np.where(zero, floor, values)
                with np.errstate(divide="ignore", invalid="ignore"):
                    spaced = np.log10(values) if log else values
                spread, counted = dodged(spaced, dot_x, 0.6 if len(pairs) == 1 else 0.3, tolerance)
                for kept, marker in ((~zero, "o"), (zero, "v")):
                    if kept.any():
                        axis.scatter(centre + spread[kept], values[kept], s=DOT, marker=marker, edgecolors=colour,
                                     linewidths=0.6, facecolors=colour if fill == "o" else "none", zorder=3)
                for index, seeds in counted.items():
                    axis.annotate(f"{seeds}", (centre, values[index]), xytext=(0, 2.5), textcoords="offset points",
                                  ha="center", va="bottom", fontsize=4.5, color=colour)
                mean, low, high = scale * ds[f"{variable}_by_group"].sel(group=group).values
                if np.isfinite(floor):
                    mean, low, high = (floor if value <= 0 else value for value in (mean, low, high))
                if np.isfinite(mean):
                    edge = np.abs(spread).max(initial=0) + 1.2 * dot_x  # half a dot, then the tick's half
                    axis.errorbar(centre + side * edge, mean, fmt="_", markersize=4, capsize=1.5,
                                  yerr=[[mean - low], [high - mean]] if np.isfinite(low) else None, color=colour,
                                  linewidth=0.8)
        if symlog:
            axis.set_yscale("symlog", linthresh=0.1)
            axis.axhline(ds.attrs["event_margin"], color="grey", linewidth=0.5, linestyle=":")
        if log:
            axis.set_yscale("log")
            plotting.plain_log_labels(axis.yaxis)
        if np.isfinite(floor):
            axis.set_title(f"{title}\n(triangles: 0, drawn at the floor)", loc="left", fontsize=6)
        if not axis.has_data():
            axis.text(0.5, 0.5, "no attributed validation (runs of version 2, or --attribution-images 0)",
                      ha="center", va="center", transform=axis.transAxes, fontsize=5, wrap=True)
    for axis in axes[-1]:
        axis.set_xticks(x, [str(g) for g in groups], rotation=90 if upright else 30,
                        ha="center" if upright else "right", fontsize=6)
        axis.set_xlim(-0.6, len(groups) - 0.4)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    choose_on = tuple(common.integer_list(args.choose_on, "--choose-on", "a list of seeds such as 0,1"))
    common.require_run_dirs(args.runs, "trust reads a run's metrics.csv, monitor.nc and config.json")
    paths = list(dict.fromkeys(Path(text) for text in args.runs))
    runs = [common.read_run(str(path)) for path in track(paths, len(paths), "trust", unit="run")]
    monitors = [common.read_monitor(path) for path in paths]
    groups = group_labels(runs)
    ds = trust_study([run.history for run in runs], monitors, run_labels(runs), groups,
                     [int(run.config.get("seed", 0)) for run in runs], skip_pairs(runs, groups),
                     event_factor=args.event_factor, event_margin=args.event_margin, choose_on=choose_on,
                     checkpoint=[str(path) for path in paths],
                     dataset=sorted({str(run.config.get("dataset")) for run in runs}))
    out = common.output_dir(args, [common.Source(paths[0].name, run_dir=paths[0])])
    print(tables(ds))
    common.write_outputs(out, "trust", ds, figure(ds))


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
