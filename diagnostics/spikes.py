"""`python -m diagnostics.spikes RUN_DIR [...]`: is a validation-loss spike in the BN running statistics or in the
weights, how much of it, where in the network, and when in training? Every epoch checkpoint is evaluated with
running, recalibrated (PreciseBN) and batch statistics; `--repair` and `--amplification` say where and how."""
import sys
import time

import numpy as np
import xarray as xr
from matplotlib import patheffects
from matplotlib.colors import LogNorm
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

import models
from analyses.spikes import (BN_STATISTICS, PERTURBATIONS, amplification, diagnose_checkpoint, layer_error, repair,
                             repair_depths, running_statistics, spike_diagnosis)
from train import checkpoint as ckpt
from train.errors import UserError, bounded_float, positive_int

from . import common, plotting

COLOURS = {"running": "C3", "recalibrated": "C0", "batch": "C2"}
LABELS = {"running": "(a) running stats", "recalibrated": "(b) recalibrated", "batch": "(c) batch stats"}
SHORT_CAUSE = {"BN statistics": "BN", "weights": "weights", "mixed": "mixed"}


def parser():
    p = common.parser("spikes", __doc__, inputs="runs", n_images=None, batch_size=None)
    p.add_argument("--recal-images", type=positive_int,
                   help="recompute BN statistics over the first N training images, augmented as the run trained "
                        "(default: as many as the run's own attribution did, its --precise-bn or "
                        "--recalibration-images, 512 unless changed: the recalibrated loss its epoch lines printed)")
    p.add_argument("--window", type=positive_int, default=3,
                   help="a spike is measured against the median of this many previous checkpoints (default 3)")
    p.add_argument("--factor", type=bounded_float(1.0, inclusive=False), default=3.0,
                   help="a spike exceeds that median by this factor (default 3)")
    p.add_argument("--gap-factor", type=bounded_float(1.0, inclusive=False), default=1.25,
                   help="a BN-statistics gap: the running-statistics loss exceeds the recalibrated one by this "
                        "factor (default 1.25)")
    p.add_argument("--min-increase", type=bounded_float(0.0, inclusive=True), default=0.1,
                   help="... both by at least this many nats (default 0.1)")
    p.add_argument("--repair", nargs="?", const="flagged", metavar="EPOCHS",
                   help="also recompute the statistics of the first k BN layers only, for k along the depth, and of "
                        "single layers: for the flagged epochs, or the epochs given (5,10); one evaluation per k")
    p.add_argument("--amplification", nargs="?", const="last", metavar="EPOCHS",
                   help="also perturb each BN layer's statistics by --amplification-size and measure what reaches "
                        "the last BN layer: at each run's last epoch, or the epochs given; two evaluations per layer")
    p.add_argument("--amplification-size", type=bounded_float(0.0, inclusive=False, maximum=1.0), default=0.1,
                   help="the normalisation error planted (default 0.1: a mean shift of 0.1 std, a std off by 10%%)")
    p.add_argument("--extra-images", type=positive_int, default=2000,
                   help="validation images for --repair and --amplification (default 2000)")
    return p


def logged_val_loss(loaded: ckpt.Loaded) -> float:
    """The validation loss the trainer wrote for this checkpoint's epoch; NaN where its history has none."""
    history = loaded.history or {}
    logged = dict(zip(history.get("epoch", []), history.get("val_loss", [])))
    return float(logged.get(loaded.epoch, np.nan))


# ---------------------------------------------------------------------------------------------------------------
# The figures


def _loss_axis(axis, values) -> None:
    """Log scale where the losses span more than a factor 3 (ticks at 1-2-5, 1-3 or 1 x 10^k, every one labelled
    plainly), linear otherwise; headroom above for the labels of flagged epochs."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > 3:
        axis.set_yscale("log")
        low, high = np.log10(values.min()), np.log10(values.max())
        subs = (1, 2, 5) if high - low <= 1.5 else (1, 3) if high - low <= 3 else (1,)
        ticks = [m * 10.0 ** e for e in np.arange(np.floor(low), np.ceil(high) + 1) for m in subs]
        axis.yaxis.set_major_locator(FixedLocator([t for t in ticks if values.min() / 1.2 <= t <= values.max() * 1.6]))
        axis.yaxis.set_minor_locator(NullLocator())
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_ylim(values.min() / 1.3, values.max() * 1.8)
    elif len(values):
        span = values.max() - values.min() or abs(values.max()) or 1.0
        axis.set_ylim(values.min() - 0.05 * span, values.max() + 0.2 * span)
    axis.grid(True, which="major")


def _loss_panel(axis, one, style: dict) -> None:
    epochs = one.epoch.values
    for bn in BN_STATISTICS:
        axis.plot(epochs, one.val_loss.sel(bn=bn).values, color=COLOURS[bn], linestyle=style["linestyle"],
                  marker="o", markersize=2, label=LABELS[bn])
    axis.plot(epochs, one.history_val_loss.values, "x", color="0.4", markersize=3, label="logged in training")
    running = one.val_loss.sel(bn="running").values
    for k, i in enumerate(np.flatnonzero(one.flagged.values)):
        epoch = epochs[i]
        axis.axvspan(epoch - 0.5, epoch + 0.5, color="C1", alpha=0.2, linewidth=0,
                     label="flagged (share removed)" if k == 0 else None)
        share = one.share.values[i]
        text = f"{SHORT_CAUSE.get(one.cause.values[i], '?')} {share:.0%}" if np.isfinite(share) else "?"
        axis.annotate(text, (epoch, running[i]), xytext=(0, 4 + 7 * (k % 2)), textcoords="offset points",
                      ha="center", va="bottom", fontsize=5, color="C1", annotation_clip=True)  # neighbours apart
    _loss_axis(axis, np.concatenate([one.val_loss.values.ravel(), one.history_val_loss.values]))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mark_largest(axis, x, y, values) -> None:
    """Circle the largest cell and write its value right beside it, inside the axes."""
    if not np.isfinite(values).any():
        return
    d, e = np.unravel_index(np.nanargmax(values), values.shape)
    axis.plot(x[e], y[d], "o", markerfacecolor="none", markeredgecolor="red", markersize=6)
    right = e < len(x) / 2
    label = axis.annotate(f"{values[d, e]:.2g}", (x[e], y[d]), xytext=(6 if right else -6, 0),
                          textcoords="offset points", ha="left" if right else "right", va="center", fontsize=5,
                          color="red")
    label.set_path_effects([patheffects.withStroke(linewidth=1.5, foreground="white")])


def _heat_map(axis, values, x, y, norm):
    mesh = axis.pcolormesh(x, y, np.clip(values, norm.vmin, None), norm=norm, cmap="viridis", shading="nearest")
    _mark_largest(axis, x, y, values)
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    return mesh


def _shared_norm(arrays) -> LogNorm:
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    positive = values[np.isfinite(values) & (values > 0)]
    high = np.max(positive) if len(positive) else 1.0
    low = max(np.min(positive) if len(positive) else 1e-3, high * 1e-4, 1e-4)
    return LogNorm(vmin=low, vmax=max(high, 10 * low))


@plotting.styled
def figure(ds, plain: dict[str, bool]):
    """Per run (a column): validation loss with the three kinds of BN statistics, flagged epochs shaded and
    labelled with their cause and the share recalibration removes; then two (BN layer x epoch) maps on one log
    scale of the normalisation error: each layer's running statistics against the population's (drift), and in
    eval mode the mismatch of its input beyond the floor that recalibration leaves (excess). Where the runs have a
    BN monitor, two rows more at step resolution: the probe's loss with running and with batch statistics (epoch
    boundaries dotted, warnings marked), and the (step x layer) map of the running statistics' gap."""
    labels = [str(label) for label in ds.model.values]
    with_monitor = "monitor_probe_loss" in ds
    rows = 5 if with_monitor else 3
    width = plotting.COLUMN_WIDTH if len(labels) == 1 else plotting.FULL_WIDTH
    fig, axes = plotting.figure(rows, len(labels), width=width, height=1.75 * rows + 0.4,
                                gridspec_kw={"height_ratios": [1, 1.2, 1.2, 1, 1.2][:rows]})
    maps = [layer_error(ds.drift), layer_error(ds.mismatch_excess)]
    norm = _shared_norm([m.values for m in maps] + ([ds.monitor_bn_gap.values] if with_monitor else []))
    for column, label in enumerate(labels):
        one = ds.sel(model=label)
        one = one.isel(epoch=np.flatnonzero(one.val_acc.sel(bn="running").notnull().values))
        style = plotting.model_style(label, column, plain.get(label))
        _loss_panel(axes[0, column], one, style)
        axes[0, column].set_title(label)
        depth = one.depth.values[one.layer.values != ""]
        for row, (values, title) in enumerate(((layer_error(one.drift), "drift: running vs population statistics"),
                                               (layer_error(one.mismatch_excess),
                                                "eval-mode mismatch beyond its floor")), start=1):
            values = values.transpose("depth", "epoch").sel(depth=depth)
            mesh = _heat_map(axes[row, column], values.values, one.epoch.values, depth, norm)
            axes[row, column].set_title(title, loc="left", fontsize=6)
            axes[row, column].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2, column].set_xlabel("epoch")
        if with_monitor:
            _monitor_panels(axes[3, column], axes[4, column], one, depth, norm, style)
    axes[0, 0].legend(loc="best", fontsize=5)
    for row, ylabel in enumerate(("validation loss (nats)", "BN layer (depth)", "BN layer (depth)", "probe loss (nats)",
                                  "BN layer (depth)")[:rows]):
        axes[row, 0].set_ylabel(ylabel)
    fig.tight_layout()
    colour_bar = fig.colorbar(mesh, ax=list(axes[1:, :].ravel()), fraction=0.05 if len(labels) == 1 else 0.025,
                              pad=0.02, label="normalisation error (RMS, normalised units)")
    plotting.plain_log_labels(colour_bar.ax.yaxis)
    return fig


def _monitor_panels(loss_axis, map_axis, one, depth, norm, style) -> None:
    steps = one.monitor_step.values
    present = np.isfinite(one.monitor_probe_loss.sel(probe_bn="running").values)
    if not present.any():
        for axis in (loss_axis, map_axis):
            axis.text(0.5, 0.5, "no BN monitor in this run", ha="center", va="center", transform=axis.transAxes,
                      fontsize=6)
            axis.set(xticks=[], yticks=[])
        return
    steps = steps[present]
    probe = one.monitor_probe_loss.isel(monitor_step=np.flatnonzero(present))
    for bn, colour in (("running", COLOURS["running"]), ("batch", COLOURS["batch"])):
        loss_axis.plot(steps, probe.sel(probe_bn=bn).values, color=colour, linestyle=style["linestyle"], linewidth=0.8,
                       label=f"probe, {bn} statistics")
    shown = [probe.values]
    if "monitor_val_loss" in one and np.isfinite(one.monitor_val_loss.values).any():
        validated = np.isfinite(one.monitor_val_step.values)
        for bn, fill in (("running", COLOURS["running"]), ("recalibrated", "none")):
            losses = one.monitor_val_loss.sel(val_bn=bn).values[validated]
            loss_axis.plot(one.monitor_val_step.values[validated], losses,
                           "o", markersize=2.5, markerfacecolor=fill, markeredgecolor=COLOURS[bn], markeredgewidth=0.6,
                           label=f"validation, {bn}")
        shown.append(one.monitor_val_loss.values)
    armed_from = float(one.monitor_armed_from) if "monitor_armed_from" in one else 0.0
    armed = steps >= armed_from  # before the warm-up the initial statistics set a scale the run never sees again
    boundaries = [int(s) for s in one.monitor_epoch_end.values if np.isfinite(s)]
    for axis, colour in ((loss_axis, "0.5"), (map_axis, "white")):
        for boundary in boundaries:
            axis.axvline(boundary, color=colour, linestyle=":", linewidth=0.6)
    _loss_axis(loss_axis, np.concatenate([probe.values[armed].ravel(), *(v.ravel() for v in shown[1:])]))
    warned = one.monitor_warning.values[present].astype(bool)
    if warned.any():  # a rug along the bottom, so that a reader can count them on a long run
        loss_axis.plot(steps[warned], np.zeros(warned.sum()), "|", color="C1", markersize=4, markeredgewidth=0.6,
                       transform=loss_axis.get_xaxis_transform(), label=f"early warning ({warned.sum()} of "
                                                                         f"{len(warned)} measurements)")
    loss_axis.legend(loc="best", fontsize=4.5, ncol=2)
    note = f"; y: from step {armed_from:g}, armed" if armed_from > steps[0] else ""
    loss_axis.set_title(f"BN monitor by step (dotted: epoch ends{note})", loc="left", fontsize=6)
    gap = one.monitor_bn_gap.isel(monitor_step=np.flatnonzero(present)).transpose("depth", "monitor_step")
    _heat_map(map_axis, gap.sel(depth=depth).values, steps, depth, norm)
    map_axis.set_title("running statistics vs the probe's batch statistics", loc="left", fontsize=6)
    map_axis.set_xlabel("training step")


@plotting.styled
def repair_figure(ds, plain: dict[str, bool]):
    """Per run: the validation loss as the statistics of the first k BN layers are recomputed (k = 0: as
    trained, k = all: recalibrated), one line per repaired epoch; a layer repaired alone is a marker at its
    depth."""
    labels = [str(label) for label in ds.model.values]
    fig, axes = plotting.figure(1, len(labels), width=plotting.COLUMN_WIDTH if len(labels) == 1 else
                                plotting.FULL_WIDTH, height=2.2)
    for column, label in enumerate(labels):
        axis = axes[0, column]
        one = ds.sel(model=label)
        colours = iter(plotting.plt.rcParams["axes.prop_cycle"].by_key()["color"])
        for epoch in one.epoch.values:
            curve = one.repair_loss.sel(epoch=epoch).dropna("repaired")
            if curve.sizes["repaired"] == 0:
                continue
            colour = next(colours)
            axis.plot(curve.repaired.values, curve.values, color=colour, marker="o", markersize=1.5,
                      linestyle=plotting.model_style(label, column, plain.get(label))["linestyle"],
                      label=f"epoch {epoch}: first k recomputed")
            single = one.single_repair_loss.sel(epoch=epoch)
            measured = np.flatnonzero(np.isfinite(single.values))
            if len(measured):
                axis.plot(single.depth.values[measured], single.values[measured], "s", color=colour,
                          markerfacecolor="none", markersize=3, label=f"epoch {epoch}: that layer alone")
        axis.set(title=label, xlabel="k: BN layers recomputed, in forward order")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not np.isfinite(one.repair_loss.values).any():
            axis.text(0.5, 0.5, "no epoch repaired (none flagged)", ha="center", va="center",
                      transform=axis.transAxes, fontsize=6)
            continue
        _loss_axis(axis, one.repair_loss.values)
        axis.legend(fontsize=5)
    axes[0, 0].set_ylabel("validation loss (nats)")
    fig.tight_layout()
    return fig


@plotting.styled
def amplification_figure(ds, plain: dict[str, bool]):
    """Plain and residual side by side: for a normalisation error planted at one BN layer (x axis), what reaches
    the last BN layer's input per unit planted (top; 1 = carried unchanged, below 1 = damped), and the change of
    validation loss (bottom); left a mean shift, right a scale error."""
    fig, axes = plotting.figure(2, len(PERTURBATIONS), width=plotting.FULL_WIDTH, height=3.6, sharex="col")
    labels = [str(label) for label in ds.model.values]
    for label, style in zip(labels, plotting.line_styles(labels, plain)):
        one = ds.sel(model=label)
        for epoch in one.epoch.values:
            gain = one.amplification_gain.sel(epoch=epoch)
            if not np.isfinite(gain.values).any():
                continue
            for column, kind in enumerate(PERTURBATIONS):
                g = gain.sel(perturbation=kind).dropna("source_depth")
                loss = one.amplification_loss.sel(epoch=epoch, perturbation=kind).dropna("source_depth")
                name = {**style, "label": f"{label} (epoch {epoch})"}
                axes[0, column].plot(g.source_depth.values, g.values, marker="o", markersize=1.5, **name)
                axes[1, column].plot(loss.source_depth.values, loss.values, marker="o", markersize=1.5, **name)
    size = ds.attrs.get("amplification_size", "")
    for column, kind in enumerate(PERTURBATIONS):
        what = f"mean shifted by {size} std" if kind == "mean" else f"std off by a factor 1/(1 - {size})"
        axes[0, column].set_title(f"planted at one layer: {what}", loc="left", fontsize=6)
        axes[0, column].axhline(1, color="0.5", linewidth=0.5, linestyle=":")
        axes[1, column].set_xlabel("BN layer perturbed (depth)")
        for row in (0, 1):
            axes[row, column].grid(True)
            axes[row, column].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel("error at the last BN layer\nper unit planted")
    axes[1, 0].set_ylabel("validation loss change (nats)")
    axes[0, 0].legend(fontsize=5)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# The command


def _with_monitor(ds: xr.Dataset, monitors: dict[str, xr.Dataset], epoch_ends: dict[str, list]) -> xr.Dataset:
    """The monitors' probe losses, gap maps (RMS component) and warnings along `monitor_step`, and each run's
    last step of every epoch (from its metrics) along `epoch_end_index`."""
    parts = []
    for label in ds.model.values:
        monitor = monitors.get(str(label))
        if monitor is None or monitor.sizes.get("step", 0) == 0:
            continue
        ends = np.asarray(epoch_ends.get(str(label), []), dtype=float)
        part = xr.Dataset({
            "monitor_probe_loss": monitor.probe_loss.rename(step="monitor_step", bn="probe_bn"),
            "monitor_bn_gap": monitor.bn_gap.sel(component="rms", drop=True).rename(step="monitor_step"),
            "monitor_warning": monitor.warning.astype(float).rename(step="monitor_step"),
            "monitor_armed_from": float(monitor.attrs.get("warn_after", 0)),
        }).drop_vars(["epoch", "layer", "stage", "block"], errors="ignore")
        if monitor.sizes.get("validation", 0):  # the attributed validations, at their steps
            part = part.assign(monitor_val_step=monitor.val_step.astype(float).rename(validation="monitor_validation"),
                               monitor_val_loss=monitor.val_loss.rename(validation="monitor_validation")
                               ).drop_vars(["val_step", "val_epoch", "validation"], errors="ignore")
        part = part.assign(monitor_epoch_end=xr.DataArray(ends, dims="epoch_end_index"))
        parts.append(part.expand_dims(model=[label]))
    if not parts:
        return ds
    merged = xr.concat(parts, dim="model", join="outer")
    for name, (long_name, units) in {
            "monitor_probe_loss": ("BN monitor: probe cross-entropy", "nats"),
            "monitor_bn_gap": ("BN monitor: normalisation error of running against batch statistics", "1"),
            "monitor_warning": ("BN monitor: early warning fired (1)", "1"),
            "monitor_armed_from": ("BN monitor: the step from which its warning is armed", "1"),
            "monitor_val_step": ("BN monitor: step of each attributed validation", "1"),
            "monitor_val_loss": ("BN monitor: validation loss with running and recomputed statistics", "nats"),
            "monitor_epoch_end": ("last training step of each epoch (metrics.csv)", "1")}.items():
        if name in merged:
            merged[name].attrs = {"long_name": long_name, "units": units}
    return ds.merge(merged, join="left", compat="override")


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    common.require_run_dirs(args.inputs, "the spike diagnosis needs a run's epoch checkpoints", lightning=True)
    epochs = "a list of epochs such as 5,10"
    repair_epochs = (None if args.repair in (None, "flagged")
                     else set(common.integer_list(args.repair, "--repair", epochs)))
    amplification_epochs = (None if args.amplification in (None, "last")
                            else set(common.integer_list(args.amplification, "--amplification", epochs)))
    device, sources, out = common.prepare(args)
    results, logged, per_run, monitors, recal_of = common.Results(), [], {}, {}, {}
    for source, loaded in common.checkpoints(sources, args, device):
        if source.label not in recal_of:  # a new run: its own recalibration images, no previous epoch
            recal_of[source.label] = common.run_recal_inputs(loaded, args, device,
                                                             args.recal_images or common.run_recal_images(loaded.config))
            previous = None
            config = loaded.config or {}
            per_run[source.label] = {"bn_momentum": config.get("bn_momentum", np.nan),
                                     "precise_bn": config.get("precise_bn", np.nan),
                                     "recal_augment": config.get("augment", "none")}
            if source.run_dir is not None and (monitor := common.read_monitor(source.run_dir)) is not None:
                monitors[source.label] = monitor
        if not models.bn_layers(loaded.model):
            raise UserError(f"{loaded.path} has no BatchNorm layers (trained with --no-bn); there are no BN "
                            "statistics to diagnose")
        val = common.image_batches(loaded, args, device)
        results.add(source.label, loaded, diagnose_checkpoint(
            loaded.model, val, recal_of[source.label], previous=previous, dtype=common.run_dtype(loaded),
            checkpoint=loaded.path, dataset=loaded.spec.name, split=args.split))
        previous = running_statistics(loaded.model)
        logged.append(logged_val_loss(loaded))
        per_run[source.label]["epoch_ends"] = (loaded.history or {}).get("step", [])
    settings = dict(window=args.window, factor=args.factor, min_increase=args.min_increase, gap_factor=args.gap_factor,
                    monitors=monitors, split=args.split, **common.merged_attrs(results.datasets),
                    **{name: [run[name] for run in per_run.values()] for name in ("bn_momentum", "precise_bn",
                                                                                  "recal_augment")})
    ds = spike_diagnosis(results.datasets, results.labels, results.epochs, history_val_loss=logged, **settings)
    if args.repair is not None or args.amplification is not None:
        extra = _where_and_how(ds, results, args, device, repair_epochs, amplification_epochs, recal_of)
        if extra:
            parts = [part.merge(extra[key], compat="no_conflicts") if key in extra else part
                     for part, key in zip(results.datasets, zip(results.labels, results.epochs))]
            if args.amplification is not None:
                settings |= {"amplification_size": args.amplification_size, "amplification_images": args.extra_images}
            ds = spike_diagnosis(parts, results.labels, results.epochs, history_val_loss=logged, **settings)
    ds = _with_monitor(ds, monitors, {label: run["epoch_ends"] for label, run in per_run.items()})
    for line in ds.attrs["verdict"]:
        print(line)
    figures = {"": figure(ds, results.plain)}
    if "repair_loss" in ds:
        figures["repair"] = repair_figure(ds, results.plain)
    if "amplification_gain" in ds:
        figures["amplification"] = amplification_figure(ds, results.plain)
    common.write_outputs(out, "spikes", ds, figures)


def _where_and_how(ds, results, args, device, repair_epochs, amplification_epochs, recal_of) -> dict:
    """Repair curves and amplification tests for the epochs asked for, each with its cost printed first; by
    (label, epoch), a dataset to merge into that checkpoint's part."""
    wanted = {}
    for label in ds.model.values:
        one = ds.sel(model=label)
        epochs = one.epoch.values[one.val_acc.sel(bn="running").notnull().values]
        flagged = set(epochs[one.flagged.sel(epoch=epochs).values])
        for task, option, asked, default in (("repair", args.repair, repair_epochs, flagged),
                                             ("amplification", args.amplification, amplification_epochs,
                                              {epochs[-1]})):
            if option is not None:
                for epoch in (default if asked is None else asked & set(epochs)):
                    wanted.setdefault((str(label), int(epoch)), set()).add(task)
    if not wanted:
        print("--repair/--amplification: no epoch to measure (none flagged, or none of those asked for)")
        return {}
    found = {}
    for part, key in zip(results.datasets, zip(results.labels, results.epochs)):
        if key not in wanted:
            continue
        loaded = common.load_checkpoint(part.attrs["checkpoint"], args, device)
        val = common.image_batches(loaded, args, device, args.extra_images)
        layers = len(running_statistics(loaded.model))
        dtype, recal = common.run_dtype(loaded), recal_of[key[0]]
        measured = []
        for task, passes in (("repair", len(repair_depths(layers)) + 3), ("amplification", 2 * layers + 1)):
            if task not in wanted[key]:
                continue
            print(f"{task}, {key[0]} epoch {key[1]}: about {passes} evaluations of {val.n_images:,} validation images",
                  flush=True)
            started = time.perf_counter()
            measured.append(repair(loaded.model, val, recal, dtype=dtype) if task == "repair" else
                            amplification(loaded.model, val, recal, size=args.amplification_size, dtype=dtype))
            print(f"{task}, {key[0]} epoch {key[1]}: {time.perf_counter() - started:.0f} s", flush=True)
        found[key] = xr.merge(measured, compat="no_conflicts", combine_attrs="drop")
    return found


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
