"""`python -m diagnostics.curves RUN [RUN ...]`: training and validation curves of several runs, and their summary.

Runs whose options differ only in seed form a group: drawn as the mean with a ±std band, summarised as
mean ± std. A group is defined by every training option of config.json except those that change where or how
fast a run went and not what it learned (seed, out, data_dir, device, workers, keep, eval_batch_size, compile,
channels_last, deterministic, the derived steps_per_epoch, total_steps, total_epochs, compile_used and the
choices' reasons). A run of an older version is read in today's options (`train.config.older_options`). The
precision used, the number of processes and the per-device batch do define a group: they change what BN
normalises over and the arithmetic. `model` and `skip` count through the model label, so `--model plain20` and
`--model resnet20 --no-skip` are one group. A group's label is the model and each option whose value differs
from the one more runs share than any other (`plain20`, `plain20 bn_momentum=0.8`); an option with no such
value (a tie) is named on every label.
"""
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

import models
import resnet_diagnostics
from analyses.curves import training_curves
from analyses.flops import total_cost
from train.config import older_options
from train.errors import ArgumentParser, positive_int
from train.progress import track

from . import common, plotting

NOT_GROUPING = {  # options that change where or how fast a run went, not what it learned
    "seed", "out", "data_dir", "device", "precision", "workers", "keep", "eval_batch_size", "compile",
    "channels_last", "deterministic", "device_used", "steps_per_epoch", "total_steps", "total_epochs",
    "compile_used", "compile_reason", "precision_reason", "monitor_reason"}
TRAIN_STYLE = {"linestyle": "--", "linewidth": 0.8}  # He et al. 2016, Fig. 6: "dashed lines denote training
VAL_STYLE = {"linestyle": "-", "linewidth": 1.6}  # error, and bold lines denote testing error"
SUMMARY_HEADER = ["group", "runs", "best acc %", "last acc %", "early acc %", "s/epoch", "params", "conv+fc MACs"]


def parser() -> ArgumentParser:
    p = ArgumentParser(prog=resnet_diagnostics.prog("diagnostics.curves"), description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the folders python -m train --out wrote)")
    p.add_argument("--early", type=positive_int, default=5, metavar="N",
                   help="judge early stability by the mean and std of validation accuracy over the first N epochs")
    p.add_argument("--out", help="output folder (default: diagnostics/ in the first run directory)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Reading a run


def model_cost(run: common.Run) -> tuple[int, int]:
    """(multiply-adds per image of a forward pass through the convolutions and fc layers, the paper's FLOPs;
    parameters) of the run's model on its dataset's images; counted once per architecture (runs of one model
    that differ in seed are the common case)."""
    spec = run.spec
    shape = (1, spec.in_channels, spec.image_size, spec.image_size)
    key = (run.model_name, json.dumps(run.model_kwargs, sort_keys=True), shape)
    if key not in _COSTS:
        _COSTS[key] = total_cost(models.build(run.model_name, **run.model_kwargs), shape)
    return _COSTS[key]


_COSTS: dict[tuple, tuple[int, int]] = {}


# ---------------------------------------------------------------------------------------------------------------
# Groups and labels


def group_options(run: common.Run) -> dict:
    """What defines the run's group (see the module's docstring)."""
    options = {key: value for key, value in older_options(run.config).items()
               if key not in NOT_GROUPING | {"model", "skip"}}
    return {"model": run.label, **options}


def group_labels(runs: list[common.Run]) -> list[str]:
    """Each run's group label: its model label and every option whose value differs from the one more runs share
    than any other (where two values tie, none is usual), so that a study's baseline reads as the model and each
    intervention as what it changed, whatever the order of the runs. Runs share a label exactly when they share
    their group options."""
    keys = [group_options(run) for run in runs]
    names = list(dict.fromkeys(name for key in keys for name in key if name != "model"))

    def usual(name: str) -> str | None:
        counts = Counter(json.dumps(key.get(name)) for key in keys).most_common(2)
        return counts[0][0] if len(counts) == 1 or counts[0][1] > counts[1][1] else None

    usual_values = {name: usual(name) for name in names}
    return [" ".join([key["model"], *(f"{name}={key.get(name)}" for name in names
                                      if json.dumps(key.get(name)) != usual_values[name])]) for key in keys]


def run_labels(runs: list[common.Run]) -> list[str]:
    """The run directory's name, or its whole path where two runs share a name."""
    names = [Path(run.text).name for run in runs]
    return [name if names.count(name) == 1 else run.text for name, run in zip(names, runs)]


# ---------------------------------------------------------------------------------------------------------------
# Table and figure


def _mean_std(mean: float, std: float, with_std: bool, scale: float = 1.0, digits: int = 2) -> str:
    if np.isnan(mean):
        return "?"
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if with_std else "")


def summary_rows(ds) -> list[list[str]]:
    """One row per group: mean ± std over its runs (a single run: its value). The early column is always
    mean ± std over the first epochs (averaged over a group's runs); params and FLOPs are one model's."""
    rows = []
    for group in ds.group.values:
        g = ds.sel(group=group)
        n = int(g.n_runs)

        def over_runs(name, scale=1.0, digits=2):
            return _mean_std(g[f"{name}_group_mean"].item(), g[f"{name}_group_std"].item(), n > 1, scale, digits)

        early = _mean_std(g.early_val_acc_mean_group_mean.item(), g.early_val_acc_std_group_mean.item(), True, 100)
        rows.append([str(group), str(n), over_runs("best_val_acc", 100), over_runs("last_val_acc", 100), early,
                     over_runs("seconds_per_epoch", digits=1), f"{g.params_group_mean.item():,.0f}",
                     _mean_std(g.flops_group_mean.item(), 0.0, False, 1e-6, 1)])  # one model per group
    return rows


@plotting.styled
def figure(ds):
    """Loss (top, log scale) and accuracy (bottom) per epoch: one colour per group, training thin dashed,
    validation bold solid; a group of several runs is its mean with a ±std band."""
    fig, axes = plotting.figure(2, 1, height=3.8, sharex=True)
    loss_axis, accuracy_axis = axes[:, 0]
    colours = plotting.plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for index, group in enumerate(ds.group.values):
        g, colour = ds.sel(group=group), colours[index % len(colours)]
        n = int(g.n_runs)
        for axis, quantity, scale in ((loss_axis, "loss", 1), (accuracy_axis, "acc", 100)):
            for split, style, alpha in (("train", TRAIN_STYLE, 0.08), ("val", VAL_STYLE, 0.2)):
                mean = scale * g[f"{split}_{quantity}_group_mean"].values
                axis.plot(ds.epoch, mean, color=colour, **style)
                if n > 1:
                    std = scale * g[f"{split}_{quantity}_group_std"].values
                    axis.fill_between(ds.epoch, mean - std, mean + std, color=colour, alpha=alpha, linewidth=0)
        handles.append(Line2D([], [], color=colour, **VAL_STYLE, label=f"{group}" + (f" (n={n})" if n > 1 else "")))
    handles += [Line2D([], [], color="grey", **TRAIN_STYLE, label="training"),
                Line2D([], [], color="grey", **VAL_STYLE, label="validation")]
    loss_axis.set(yscale="log", ylabel="loss (nats)")
    plotting.plain_log_labels(loss_axis.yaxis)
    accuracy_axis.set(ylabel="accuracy (%)", xlabel="epoch")
    accuracy_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(True)
    long_labels = max(len(handle.get_label()) for handle in handles) > 24  # two columns overflow the width
    loss_axis.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=1 if long_labels else 2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# The command


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    common.require_run_dirs(args.runs, "curves reads a run's metrics.csv and config.json")
    paths = list(dict.fromkeys(Path(text) for text in args.runs))
    runs = [common.read_run(str(path)) for path in track(paths, len(paths), "curves", unit="run")]
    costs = [model_cost(run) for run in runs]
    out = common.output_dir(args, [common.Source(paths[0].name, run_dir=paths[0])])
    ds = training_curves([run.history for run in runs], run_labels(runs), group_labels(runs), early=args.early,
                         params=[params for _, params in costs], flops=[flops for flops, _ in costs],
                         checkpoint=[str(path) for path in paths],
                         dataset=sorted({str(run.config.get("dataset")) for run in runs}))
    early = min(args.early, max(len(run.history["epoch"]) for run in runs))
    print(f"early: validation accuracy over epochs 1-{early}, mean ± std over the epochs (averaged over a "
          "group's runs); other ± are the std over a group's runs; conv+fc MACs: millions of multiply-adds per "
          "image of a forward pass through the convolutions and fc layers (the paper's FLOPs)")
    print(common.format_table(SUMMARY_HEADER, summary_rows(ds)))
    common.write_outputs(out, "curves", ds, figure(ds))


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
