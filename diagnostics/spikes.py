"""`python -m diagnostics.spikes RUN_DIR [...]`: is a validation-loss spike in the BN running statistics or in
the weights? Every epoch checkpoint is evaluated with running, recalibrated (PreciseBN) and batch statistics."""
import argparse
import sys

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

import models
from analyses.spikes import BN_STATISTICS, diagnose_checkpoint, layer_drift, running_statistics, spike_diagnosis
from train import checkpoint as ckpt
from train.errors import UserError, positive_int

from . import common, plotting

COLOURS = {"running": "C3", "recalibrated": "C0", "batch": "C2"}
LABELS = {"running": "(a) running stats", "recalibrated": "(b) recalibrated", "batch": "(c) batch stats"}


def _number(minimum: float, inclusive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"{value:g} must be {'at least' if inclusive else 'above'} {minimum:g}")
        return value
    return parse


def parser():
    p = common.parser("spikes", __doc__, inputs="runs", n_images=None, batch_size=None)
    p.add_argument("--recal-images", type=positive_int, default=2000,
                   help="recompute BN statistics over the first N training images, augmented as the run trained "
                        "(default 2000)")
    p.add_argument("--window", type=positive_int, default=3,
                   help="a spike is measured against the median of this many previous checkpoints (default 3)")
    p.add_argument("--factor", type=_number(1.0, inclusive=False), default=3.0,
                   help="a spike exceeds that median by this factor (default 3)")
    p.add_argument("--min-increase", type=_number(0.0, inclusive=True), default=0.1,
                   help="... and by at least this many nats (default 0.1)")
    return p


def logged_val_loss(loaded: ckpt.Loaded) -> float:
    """The validation loss the trainer wrote for this checkpoint's epoch; NaN where its history has none."""
    history = loaded.history or {}
    logged = dict(zip(history.get("epoch", []), history.get("val_loss", [])))
    return float(logged.get(loaded.epoch, np.nan))


# ---------------------------------------------------------------------------------------------------------------
# The figure


HEAT_MAPS = (  # (variable, colour-bar label): the layer's own drift, then how a mismatch propagates in eval mode
    ("drift", "running vs population stats"),
    ("eval_mismatch", "eval-mode input vs running stats"),
)


@plotting.styled
def figure(ds, plain: dict[str, bool]):
    """Per run (a column): top, validation loss with the three kinds of BN statistics, spikes shaded; then two
    heat maps (BN layer x epoch, both on one log scale of max(|mean shift| / std, |ln var ratio|)): each layer's
    running statistics against the population statistics of its input, and, in eval mode, its input against
    its running statistics, where a mismatch upstream shows up downstream. The largest of each is marked."""
    labels = [str(label) for label in ds.model.values]
    width = plotting.COLUMN_WIDTH if len(labels) == 1 else plotting.FULL_WIDTH
    fig, axes = plotting.figure(3, len(labels), width=width, height=6.0, sharex="col",
                                gridspec_kw={"height_ratios": [1, 1.2, 1.2]})
    values = np.concatenate([layer_drift(ds[name]).values.ravel() for name, _ in HEAT_MAPS])
    positive = values[np.isfinite(values) & (values > 0)]
    low, high = (np.min(positive), np.max(positive)) if len(positive) else (1e-3, 1.0)
    norm = LogNorm(vmin=max(low, 1e-3), vmax=max(high, 10 * max(low, 1e-3)))
    for column, label in enumerate(labels):
        one = ds.sel(model=label)
        one = one.isel(epoch=np.flatnonzero(one.val_acc.sel(bn="running").notnull().values))
        _loss_panel(axes[0, column], one, plotting.model_style(label, column, plain.get(label)))
        for row, (name, title) in enumerate(HEAT_MAPS, start=1):
            mesh = _drift_panel(axes[row, column], layer_drift(one[name]), one.layer.values, norm)
            axes[row, column].set_title(title, loc="left", fontsize=6)
        axes[0, column].set_title(label)
        axes[-1, column].set_xlabel("epoch")
    axes[0, 0].legend(loc="best")
    axes[0, 0].set_ylabel("validation loss (nats)")
    for row in (1, 2):
        axes[row, 0].set_ylabel("BN layer (forward order)")
    fig.tight_layout()
    colour_bar = fig.colorbar(mesh, ax=list(axes[1:, :].ravel()), label="max(|Δmean| / std, |ln var ratio|)",
                              fraction=0.05 if len(labels) == 1 else 0.025, pad=0.02)
    plotting.plain_log_labels(colour_bar.ax.yaxis)
    return fig


def _loss_panel(axis, one, style: dict) -> None:
    epochs = one.epoch.values
    for bn in BN_STATISTICS:
        axis.plot(epochs, one.val_loss.sel(bn=bn).values, color=COLOURS[bn], linestyle=style["linestyle"],
                  marker="o", markersize=2, label=LABELS[bn])
    axis.plot(epochs, one.history_val_loss.values, "x", color="0.4", markersize=3, label="logged in training")
    for k, epoch in enumerate(epochs[one.spike.values]):
        axis.axvspan(epoch - 0.5, epoch + 0.5, color="C1", alpha=0.25, linewidth=0, label="spike" if k == 0 else None)
    axis.set_yscale("log")
    plotting.plain_log_labels(axis.yaxis)
    axis.grid(True)


def _drift_panel(axis, drift, layers, norm):
    """A (depth, epoch) heat map of one run's drift; the largest value circled and named."""
    drift = drift.transpose("depth", "epoch").isel(depth=np.flatnonzero(layers != ""))
    epochs, depths = drift.epoch.values, drift.depth.values
    mesh = axis.pcolormesh(epochs, depths, np.clip(drift.values, norm.vmin, None), norm=norm, cmap="viridis",
                           shading="nearest")  # centred on the epochs, which --keep N spaces unevenly
    d, e = np.unravel_index(np.nanargmax(drift.values), drift.shape)
    if drift.values[d, e] > norm.vmin:  # below the colour scale it is rounding, not a layer to point at
        axis.plot(epochs[e], depths[d], "o", markerfacecolor="none", markeredgecolor="red", markersize=6)
        axis.annotate(f"{layers[d]} ({drift.values[d, e]:.3g})", (epochs[e], depths[d]), xytext=(0.98, 1.02),
                      textcoords="axes fraction", ha="right", va="bottom", fontsize=6, color="red",
                      arrowprops={"arrowstyle": "-", "color": "red", "linewidth": 0.5})
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    return mesh


# ---------------------------------------------------------------------------------------------------------------
# The command


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    common.require_run_dirs(args.inputs, "the spike diagnosis needs a run's epoch checkpoints")
    device, sources, out = common.prepare(args)
    results, logged, bn_momentum, precise_bn, recal_augment = common.Results(), [], [], [], []
    previous, recal, current = None, None, None
    for source, loaded in common.checkpoints(sources, args, device):
        if source is not current:  # a new run: its own recalibration images, no previous epoch
            current, previous = source, None
            recal = common.training_batches(loaded, args, device, args.recal_images)
            bn_momentum.append((loaded.config or {}).get("bn_momentum", np.nan))
            precise_bn.append((loaded.config or {}).get("precise_bn", np.nan))
            recal_augment.append((loaded.config or {}).get("augment", "none"))
        if not models.bn_layers(loaded.model):
            raise UserError(f"{loaded.path} has no BatchNorm layers (trained with --no-bn); there are no BN "
                            "statistics to diagnose")
        val = common.image_batches(loaded, args, device)
        results.add(source.label, loaded, diagnose_checkpoint(loaded.model, val, recal, previous=previous,
                                                              checkpoint=loaded.path, dataset=loaded.spec.name,
                                                              split=args.split))
        previous = running_statistics(loaded.model)
        logged.append(logged_val_loss(loaded))
    parts = results.datasets
    ds = spike_diagnosis(parts, results.labels, results.epochs, history_val_loss=logged, window=args.window,
                         factor=args.factor, min_increase=args.min_increase,
                         checkpoint=[part.attrs["checkpoint"] for part in parts],
                         dataset=sorted({part.attrs["dataset"] for part in parts}), split=args.split,
                         n_images=max(part.attrs["n_images"] for part in parts),
                         batch_size=max(part.attrs["batch_size"] for part in parts),
                         bn_momentum=bn_momentum, precise_bn=precise_bn, recal_augment=recal_augment)
    for line in ds.attrs["verdict"]:
        print(line)
    common.write_outputs(out, "spikes", ds, figure(ds, results.plain))


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
