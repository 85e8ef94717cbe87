"""`python -m diagnostics.evaluate CKPT_OR_RUN [...]`: loss, accuracy and per-class accuracy of each checkpoint.

BN runs in eval mode (the model as trained) unless `--bn train` (each batch's own statistics) or
`--precise-bn N` (running statistics recomputed over the first N training images, then eval mode).
"""
import sys

import numpy as np
from matplotlib.ticker import MaxNLocator

from analyses.evaluate import evaluate
from train.errors import positive_int

from . import common, plotting

TABLE_HEADER = ["model", "epoch", "loss", "acc %", "worst class", "acc %"]
MAX_BARS = 20  # classes beyond which bars are unreadable at column width: the sorted accuracies are drawn instead


def parser():
    p = common.parser("evaluate", __doc__, n_images=None, batch_size=None)
    p.add_argument("--bn", choices=("eval", "train"), default="eval",
                   help="eval: running statistics (as trained); train: each batch's own statistics")
    p.add_argument("--precise-bn", type=positive_int, metavar="N",
                   help="first recompute BN statistics over the first N training images, then evaluate in eval mode")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Table and figure


def table_rows(ds) -> list[list[str]]:
    """One row per (model, epoch) evaluated: loss, accuracy, and the class with the lowest accuracy."""
    rows = []
    for model in ds.model.values:
        for epoch in ds.epoch.values:
            point = ds.sel(model=model, epoch=epoch)
            if np.isnan(point.accuracy.item()):
                continue  # this model has no checkpoint of that epoch
            worst = int(np.nanargmin(point.class_accuracy.values))
            rows.append([str(model), str(epoch), f"{point.loss.item():.4f}", f"{100 * point.accuracy.item():.2f}",
                         str(point.class_name.values[worst]), f"{100 * point.class_accuracy.values[worst]:.2f}"])
    return rows


@plotting.styled
def figure(ds, plain: dict[str, bool]):
    """One run with several epochs: accuracy (overall and per class) and loss vs epoch. Otherwise: per-class
    accuracy of each model at its last epoch."""
    one_run = ds.sizes["model"] == 1 and ds.sizes["epoch"] > 1
    return _epochs_figure(ds, str(ds.model.values[0]), plain) if one_run else _classes_figure(ds, plain)


def _epochs_figure(ds, label: str, plain: dict[str, bool]):
    fig, axes = plotting.figure(2, 1, height=3.4, sharex=True)
    accuracy, loss = axes[:, 0]
    style = plotting.model_style(label, 0, plain.get(label))
    point = ds.sel(model=label)
    if ds.sizes["class"] <= 10:
        for index in range(ds.sizes["class"]):
            accuracy.plot(ds.epoch, 100 * point.class_accuracy.isel({"class": index}), linewidth=0.6, marker="o",
                          markersize=2, label=str(ds.class_name.values[index]))
    accuracy.plot(ds.epoch, 100 * point.accuracy, color="black", linewidth=1.8, label="all classes")
    loss.plot(ds.epoch, point.loss, **{**style, "label": label})
    accuracy.set_ylabel("accuracy (%)")
    loss.set(ylabel="loss (nats)", xlabel="epoch")
    loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracy.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, title=f"{label}, {ds.attrs['split']} split")
    loss.legend()
    for axis in (accuracy, loss):
        axis.grid(True)
    fig.tight_layout()
    return fig


def _classes_figure(ds, plain: dict[str, bool]):
    fig, axes = plotting.figure(1, 1, height=2.4)
    axis = axes[0, 0]
    labels = [str(label) for label in ds.model.values]
    n_classes = ds.sizes["class"]
    positions = np.arange(n_classes)
    width = 0.8 / len(labels)
    for index, label in enumerate(labels):
        last = ds.sel(model=label).dropna("epoch", subset=["accuracy"]).isel(epoch=-1)  # its last checkpoint
        style = plotting.model_style(label, index, plain.get(label))
        name = f"{label} ep. {last.epoch.item()}: {100 * last.accuracy.item():.1f}%"
        values = 100 * last.class_accuracy.values
        if n_classes <= MAX_BARS:
            axis.bar(positions + (index - (len(labels) - 1) / 2) * width, values, width, color=style["color"],
                     hatch="////" if style["linestyle"] == "--" else None, edgecolor="white", linewidth=0.3,
                     label=name)
        else:
            axis.plot(positions, np.sort(values)[::-1], **{**style, "label": name})
    if n_classes <= MAX_BARS:
        shared = ds.class_name.ndim == 1  # checkpoints of different datasets name their classes apart
        names = [str(name) for name in (ds.class_name.values if shared else ds["class"].values)]
        crowded = n_classes * max(map(len, names)) > 40  # characters that fit side by side at column width
        axis.set_xticks(positions, names, rotation=30 if crowded else 0, ha="right" if crowded else "center",
                        rotation_mode="anchor")
    else:
        axis.set_xlabel("classes, sorted by accuracy")
    axis.set(ylabel=f"accuracy on {ds.attrs['split']} (%)", ylim=(0, 100))
    axis.grid(True, axis="y")
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# The command


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.precise_bn and args.bn == "train":
        p.error("--precise-bn recalibrates the running statistics that --bn train does not use; give one of them")
    bn_mode = "recalibrated" if args.precise_bn else args.bn
    device, sources, out = common.prepare(args)
    results = common.Results()
    for source, loaded in common.checkpoints(sources, args, device):
        batches = common.image_batches(loaded, args, device)
        recalibration = common.run_recal_inputs(loaded, args, device, args.precise_bn) if args.precise_bn else None
        results.add(source.label, loaded, evaluate(
            loaded.model, batches, bn_mode=bn_mode, recalibration=recalibration, dtype=common.run_dtype(loaded),
            num_classes=loaded.spec.num_classes,
            class_names=loaded.spec.classes, checkpoint=loaded.path, dataset=loaded.spec.name, split=args.split))
    definitions = dict.fromkeys(d.attrs["definition"] for d in results.datasets)
    ds = results.combined("; ".join(definitions), args.split, bn_mode=bn_mode,
                          recalibration_images=max(d.attrs["recalibration_images"] for d in results.datasets))
    print(common.format_table(TABLE_HEADER, table_rows(ds)))
    common.write_outputs(out, "evaluate", ds, figure(ds, results.plain))


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
