"""Training curves of several runs and the summary ablation reports give under them.

Pure: the per-epoch histories come in as lists named as the metrics.csv columns; nothing is read here. Runs
that differ only in seed share a group, and a group's numbers are the mean and the sample standard deviation
over its runs (the "mean ± std over n runs" of ablation tables; NaN for a group of one).
"""
import numpy as np
import xarray as xr

from .common import attrs, variable

CURVES = {  # metrics.csv column -> (long_name, units)
    "train_loss": ("training loss, mean over the epoch's augmented batches", "nats"),
    "train_acc": ("training accuracy over the epoch's augmented batches", "1"),
    "val_loss": ("validation loss", "nats"),
    "val_acc": ("validation accuracy", "1"),
    "lr": ("learning rate of the epoch's last step", "1"),
    "step": ("iterations done at the end of the epoch", "1"),
    "epoch_seconds": ("wall-clock time of the epoch, validation included", "s"),
    "images_per_second": ("training images per second", "s-1"),
}
LOSS_AND_ACCURACY = ("train_loss", "train_acc", "val_loss", "val_acc")


def _summaries(early: int) -> dict:
    """Per-run summary name -> (long_name, units)."""
    return {
        "best_val_acc": ("highest validation accuracy", "1"),
        "best_epoch": ("epoch of the highest validation accuracy", "1"),
        "last_val_acc": ("validation accuracy at the last epoch", "1"),
        "early_val_acc_mean": (f"mean validation accuracy over the first {early} epochs", "1"),
        "early_val_acc_std": (f"population std of validation accuracy over the first {early} epochs", "1"),
        "seconds_per_epoch": ("median wall-clock seconds per epoch, validation included", "s"),
        "params": ("trainable and fixed parameters", "1"),
        "flops": ("multiply-adds per image of one forward pass through the convolutions and fc layers (He et "
                  "al.'s FLOPs; BN, pooling and additions not counted)", "multiply-adds"),
    }


def definition(early: int) -> str:
    return ("training and validation loss and accuracy per epoch as the trainer logged them (metrics.csv); per "
            "run the highest and the last validation accuracy, the mean and population std of validation "
            f"accuracy over the first {early} epochs, the median seconds per epoch, parameters and the "
            "multiply-adds per image of a forward pass through the convolutions and fc layers; runs whose "
            "options differ only in seed form a group, summarised by the mean and the sample std (ddof=1) over its "
            "runs")


def run_summary(history: dict[str, list], early: int) -> dict[str, float]:
    """The per-run numbers of the summary table from one run's per-epoch lists."""
    epochs = np.asarray(history["epoch"])
    val_acc = np.asarray(history["val_acc"], dtype=float)
    first = val_acc[:early]
    best = int(np.nanargmax(val_acc))
    return {"best_val_acc": val_acc[best], "best_epoch": epochs[best], "last_val_acc": val_acc[-1],
            "early_val_acc_mean": first.mean(), "early_val_acc_std": first.std(),
            "seconds_per_epoch": np.median(history["epoch_seconds"])}


def training_curves(histories: list[dict[str, list]], runs: list[str], groups: list[str], *, early: int = 5,
                    params=None, flops=None, checkpoint=None, dataset=None) -> xr.Dataset:
    """Per-epoch curves along (`run`, `epoch`), outer-joined on epoch (NaN where a run is shorter), per-run
    summaries along `run`, and their group mean and std along `group` (`*_group_mean`, `*_group_std`).

    `histories`: one dict per run of equal-length lists keyed by the metrics.csv columns. `groups`: each run's
    group label, in the order groups are to appear. `params`, `flops`: one number per run, or None (NaN).
    """
    if not histories:
        raise ValueError("no runs were given")
    if not len(histories) == len(runs) == len(groups):
        raise ValueError("histories, runs and groups must have one entry per run")
    if early < 1:
        raise ValueError(f"early must be a positive number of epochs, not {early}")
    epochs = np.array(sorted({int(e) for history in histories for e in history["epoch"]}))
    curves = {name: np.full((len(runs), len(epochs)), np.nan) for name in CURVES}
    for i, history in enumerate(histories):
        columns = np.searchsorted(epochs, np.asarray(history["epoch"], dtype=int))
        for name in CURVES:
            curves[name][i, columns] = history[name]
    summary_names = _summaries(early)
    summaries = [run_summary(history, early) for history in histories]
    per_run = {name: [summary[name] for summary in summaries] for name in summaries[0]}
    unknown = [np.nan] * len(runs)
    per_run |= {"params": unknown if params is None else params, "flops": unknown if flops is None else flops}
    data = {name: variable(("run", "epoch"), curves[name], *CURVES[name]) for name in CURVES}
    data |= {name: variable("run", np.asarray(per_run[name], dtype=float), *summary_names[name])
             for name in summary_names}
    data["early_epochs"] = variable("run", [min(early, len(h["epoch"])) for h in histories],
                                    "epochs the early statistics are taken over", "1")
    ds = xr.Dataset(data, coords={"run": np.array(runs, dtype=object), "epoch": epochs,
                                  "run_group": ("run", np.array(groups, dtype=object))})
    return ds.merge(_group_statistics(ds, list(summary_names) + list(LOSS_AND_ACCURACY), groups)).assign_attrs(
        attrs(definition(early), checkpoint=checkpoint, dataset=dataset, split="val", n_images="", early=early))


def _group_statistics(ds: xr.Dataset, names: list[str], groups: list[str]) -> xr.Dataset:
    """`{name}_group_mean` and `{name}_group_std` along `group`, groups in their order of first appearance; a
    curve's statistics at an epoch are over the group's runs that reached it."""
    order = list(dict.fromkeys(groups))
    grouped = ds[names].groupby("run_group")
    statistics = {"mean": grouped.mean(), "std": grouped.std(ddof=1)}
    out = {}
    for statistic, values in statistics.items():
        values = values.rename(run_group="group").sel(group=order)
        for name in names:
            long_name = f"{ds[name].attrs['long_name']}, {statistic} over the group's runs"
            out[f"{name}_group_{statistic}"] = variable(values[name].dims, values[name].values, long_name,
                                                          ds[name].attrs["units"])
    counts = [groups.count(group) for group in order]
    return xr.Dataset(out, coords={"group": np.array(order, dtype=object), "n_runs": ("group", counts)})
