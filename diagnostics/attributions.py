"""`python -m diagnostics.attributions CKPT_OR_RUN [...] [--explainer ig saliency gradcam] [--target
label|prediction] [--steps N]`: where each model looks on the first --n-images of the split (Captum's Integrated
Gradients, Saliency and Grad-CAM on the last feature map larger than 1x1), and how faithful each map is:
Petsiuk et al.'s deletion AUC (lower is better) and insertion AUC (higher is better) of the explained class's
probability, mean ± standard error over the images, against a random order. A run directory stands for its
last epoch checkpoint unless --epochs names one epoch."""
import argparse
import sys
import textwrap

import numpy as np
import torch
from matplotlib.colors import Normalize, TwoSlopeNorm

from analyses.attributions import EXPLAINERS, MAX_STEPS, TARGETS, attributions, combine_models, definition
from analyses.common import attrs
from train.errors import UserError, positive_int
from train.progress import track

from . import common, plotting

TITLES = {"ig": "IG", "saliency": "Saliency", "gradcam": "Grad-CAM", "random": "random order"}
COLOURMAPS = {"ig": "RdBu_r", "saliency": "magma", "gradcam": "magma"}  # IG is signed: diverging around 0
CURVE_STYLES = {"ig": {"color": "#1f77b4"}, "saliency": {"color": "#9467bd"}, "gradcam": {"color": "#ff7f0e"},
                "random": {"color": "0.45", "linestyle": "--"}}
RIGHT, WRONG = "#1a7f37", "#c62828"


def parse(argv):
    p = common.parser("attributions", __doc__, n_images=8)
    p.set_defaults(epochs="last")
    p.add_argument("--explainer", "--method", dest="explainer", nargs="+", action="extend", choices=EXPLAINERS,
                   metavar="EXPLAINER", help=f"any of {', '.join(EXPLAINERS)}, given together or repeated "
                   "(default: all)")
    p.add_argument("--target", choices=TARGETS, default="prediction",
                   help="the class whose logit is explained: the model's prediction (default; deletion then "
                   "measures agreement with its own decision, so models of different accuracy compare) or the "
                   "true label (deletion then measures accuracy)")
    p.add_argument("--steps", type=steps, default=32,
                   help=f"Integrated Gradients steps, at most {MAX_STEPS} (default 32)")
    return p.parse_args(argv)


def steps(text: str) -> int:
    """--steps: Integrated Gradients' nodes cost memory as the square of their number, so it is bounded."""
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{value} steps is more than the {MAX_STEPS} allowed (the quadrature's nodes "
                                         f"need memory as the square of their number); give at most {MAX_STEPS}")
    return value


def inputs(sources, args, device) -> list:
    """(checkpoint, image batches) per model: one checkpoint each, all models on the very same images."""
    found = []
    for source in sources:
        if len(source.paths) > 1:
            raise UserError(f"{source.label}: attributions take one checkpoint per model, not {len(source.paths)}; "
                            "give one file, or a run directory with --epochs last or --epochs N")
        loaded = common.load_checkpoint(source.paths[0], args, device)
        found.append((loaded, common.image_batches(loaded, args, device)))
    first = found[0][1]
    for loaded, batches in found[1:]:
        if batches.images.shape != first.images.shape or not torch.equal(batches.images, first.images):
            raise UserError(f"{loaded.path} sees other images than {found[0][0].path} (another dataset, or another "
                            "held-out validation split); compare models of one dataset, or use --split test")
    return found


# ---------------------------------------------------------------------------------------------------------------
# Figure


def _show_image(axis, image: np.ndarray) -> None:
    """(C, H, W) in [0, 1]: grey for one channel, colour for three."""
    if image.shape[0] == 1:
        axis.imshow(image[0], cmap="gray", vmin=0, vmax=1)
    else:
        axis.imshow(np.clip(image.transpose(1, 2, 0), 0, 1))


def _show_map(axis, image: np.ndarray, values: np.ndarray, explainer: str) -> None:
    """The map over a faint grey copy of the image, each map on its own scale (its 99th percentile of |value|)."""
    axis.imshow(image.mean(0), cmap="gray", vmin=0, vmax=1, alpha=0.35)
    top = float(np.percentile(np.abs(values), 99)) or float(np.abs(values).max()) or 1.0
    norm = TwoSlopeNorm(0, -top, top) if explainer == "ig" else Normalize(0, top)
    axis.imshow(values, cmap=COLOURMAPS[explainer], norm=norm, alpha=0.8)


def auc_text(ds, curve: str, label: str, explainer: str, digits: int = 2) -> str:
    """`mean ± sem` of one model's deletion or insertion AUC for one explainer."""
    where = {"model": label, "explainer": explainer}
    mean, sem = (ds[f"{curve}_auc_{statistic}"].sel(where).item() for statistic in ("mean", "sem"))
    return f"{mean:.{digits}f} ± {sem:.{digits}f}"


def _header(fig, cell, ds, label: str, explainers: list[str], layer: str) -> None:
    """A model's name, Grad-CAM's layer, the random order's scores, and each explainer's above its column."""
    header = fig.add_subplot(cell)
    header.axis("off")
    lines = [f"AUC ± s.e.m. over {ds.sizes['sample']} images;", "deletion: lower is better, insertion: higher",
             f"random order: del {auc_text(ds, 'deletion', label, 'random')}, "
             f"ins {auc_text(ds, 'insertion', label, 'random')}"]
    if "gradcam" in explainers:
        lines.insert(0, f"Grad-CAM at {layer}")
    header.text(0.5, 1.0, label, ha="center", va="top", fontweight="bold", transform=header.transAxes)
    header.text(0.5, 0.8, "\n".join(lines), ha="center", va="top", fontsize=5, transform=header.transAxes)
    for m, explainer in enumerate(explainers):
        scores = [f"{short} {auc_text(ds, curve, label, explainer)}" for short, curve in (("del", "deletion"),
                                                                                            ("ins", "insertion"))]
        header.text((m + 0.5) / len(explainers), 0.0, "\n".join([TITLES[explainer], *scores]), ha="center",
                    va="bottom", fontsize=6, transform=header.transAxes)


def _curves(axis, ds, label: str, curve: str) -> None:
    """One model's deletion or insertion curves, the mean over the images of each explainer and of random."""
    for explainer in ds.explainer.values:
        mean = ds[f"{curve}_probability"].sel(model=label, explainer=explainer).mean("sample")
        axis.plot(100 * ds.fraction, mean, label=TITLES[str(explainer)], **CURVE_STYLES[str(explainer)])
    axis.set(ylim=(0, 1), xlim=(0, 100), xticks=[0, 25, 50, 75, 100])
    axis.grid(True)
    better = "lower" if curve == "deletion" else "higher"
    axis.set_title(f"{curve} (area: {better} is better)", loc="left", fontsize=6, pad=2)


MIN_CELL = 0.8  # inches: an explainer's AUC line ("del 0.16 ± 0.05", 6 pt) needs 0.7


@plotting.styled
def figure(ds):
    """Rows: images (true class on top); columns: the image, then each model's maps, its prediction on top
    (green right, red wrong); the header holds each explainer's deletion and insertion AUC (mean ± s.e.m.) and
    the model's random reference; the last two rows are each model's mean deletion and insertion curves.
    Full page width; narrower where few columns would make the cells larger than 1.1 inches, wider where many
    would make them narrower than MIN_CELL."""
    labels = [str(m) for m in ds.model.values]
    explainers = [str(e) for e in ds.explainer.values if e != "random"]
    layers = dict(zip(labels, _per_model(ds.attrs["gradcam_layer"], labels)))
    shapes = dict(zip(labels, _per_model(ds.attrs["gradcam_layer_shape"], labels)))
    names, n = ds.class_name.values, ds.sizes["sample"]
    # grid columns: the image, then per model a narrow gap and its explainers
    widths = [1.0] + ([0.2] + [1.0] * len(explainers)) * len(labels)
    cell = min(max(plotting.FULL_WIDTH / (sum(widths) * 1.05), MIN_CELL), 1.1)  # inches; wspace: 5% of a cell
    # header, images, the two curve rows; the header's text has a fixed size in inches, so narrower cells
    # (three models or more) need more of them for it
    heights = [1.1 * max(1.0, 1.1 / cell)] + [1] * n + [1.1, 1.1]
    fig = plotting.plt.figure(figsize=(cell * sum(widths) * 1.05, cell * sum(heights) * 1.25))
    grid = fig.add_gridspec(len(heights), len(widths), width_ratios=widths, height_ratios=heights,
                            left=0, right=1, bottom=0, top=1, hspace=0.25, wspace=0.05)
    columns = {(label, explainer): 2 + m + k * (len(explainers) + 1)
               for k, label in enumerate(labels) for m, explainer in enumerate(explainers)}
    pictures, bottom_left = [], None
    for k, label in enumerate(labels):
        first = columns[label, explainers[0]]
        span = slice(first, first + len(explainers))
        _header(fig, grid[0, span], ds, label, explainers, f"{layers[label]} ({shapes[label]} map)")
        deletion = fig.add_subplot(grid[n + 1, span])
        insertion = fig.add_subplot(grid[n + 2, span], sharex=deletion, sharey=deletion)
        _curves(deletion, ds, label, "deletion")
        _curves(insertion, ds, label, "insertion")
        deletion.tick_params(labelbottom=False)
        insertion.set_xlabel("pixels, most important first (%)", fontsize=6)
        if k == 0:
            deletion.set_ylabel("p(explained\nclass)")
            insertion.set_ylabel("p(explained\nclass)")
            bottom_left = insertion
        else:
            deletion.tick_params(labelleft=False)
            insertion.tick_params(labelleft=False)
    for row in range(n):
        image, truth = ds.image.isel(sample=row).values, int(ds.label.isel(sample=row))
        axis = fig.add_subplot(grid[row + 1, 0])
        pictures.append(axis)
        _show_image(axis, image)
        axis.set_title(f"true: {names[truth]}", loc="left", fontsize=6)
        for (label, explainer), col in columns.items():
            axis = fig.add_subplot(grid[row + 1, col])
            pictures.append(axis)
            _show_map(axis, image, ds.attribution.sel(model=label, explainer=explainer).values[row], explainer)
            if explainer == explainers[0]:
                predicted = int(ds.prediction.sel(model=label).isel(sample=row))
                axis.set_title(f"pred: {names[predicted]}", loc="left", fontsize=6,
                               color=RIGHT if predicted == truth else WRONG)
    for axis in pictures:
        axis.set(xticks=[], yticks=[])
    note = fig.add_subplot(grid[0, 0])
    note.axis("off")
    explained = "true" if ds.attrs["target"] == "label" else "predicted"
    note.text(0, 0, "maps on their own scale\n(99th pct of |value|)" + (
        f"\nIG: red for, blue against\nthe {explained} class" if "ig" in explainers else ""),
        fontsize=5, va="bottom", transform=note.transAxes)
    fig.legend(*deletion.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(0, -0.4),
               bbox_transform=bottom_left.transAxes, ncol=len(ds.explainer), title="curves: mean over the images",
               title_fontsize=6, alignment="left")  # under the x label, where it covers no data
    return fig


def _per_model(value, labels: list[str]) -> list[str]:
    """An attr that holds one entry per model (a list), or one string for a single model's dataset."""
    return [str(v) for v in value] if isinstance(value, (list, tuple, np.ndarray)) else [str(value)] * len(labels)


def table_text(ds) -> str:
    """The explanation and the table the command prints."""
    rows = [[str(label), str(explainer), auc_text(ds, "deletion", label, explainer, 3),
             auc_text(ds, "insertion", label, explainer, 3)]
            for label in ds.model.values for explainer in ds.explainer.values]
    explanation = textwrap.fill(f"AUC of the explained class's probability as 0-100% of the pixels are deleted (set to "
                                f"the baseline) or inserted (into the baseline), most important first: mean ± standard "
                                f"error over {ds.sizes['sample']} images; random: a random order, the reference",
                                width=100)
    return explanation + "\n" + common.format_table(["model", "explainer", "deletion AUC (lower = more faithful)",
                                                     "insertion AUC (higher = more faithful)"], rows)


def main(argv=None) -> None:
    args = parse(argv)
    explainers = list(dict.fromkeys(args.explainer or EXPLAINERS))
    device, sources, out = common.prepare(args)
    datasets = []
    for loaded, batches in track(inputs(sources, args, device), len(sources), "attributions", unit="model"):
        images, labels = (torch.cat(parts) for parts in zip(*batches))
        spec = loaded.spec
        datasets.append(attributions(loaded.model, images, labels, explainers, target=args.target,
                                     n_steps=args.steps, batch_size=args.batch_size, mean=spec.mean, std=spec.std,
                                     class_names=spec.classes, checkpoint=loaded.path, dataset=spec.name,
                                     split=args.split))
    first = datasets[0].attrs
    layers = [ds.attrs["gradcam_layer"] for ds in datasets]
    shapes = [ds.attrs["gradcam_layer_shape"] for ds in datasets]
    described = ", ".join(dict.fromkeys(f"{layer} ({shape})" for layer, shape in zip(layers, shapes)))
    ds = combine_models(datasets, [source.label for source in sources], attrs(
        definition(explainers, args.target, args.steps, described, first["baseline"]),
        split=args.split, **common.merged_attrs(datasets), bn_mode="eval", target=args.target,
        n_steps=args.steps, gradcam_layer=layers, gradcam_layer_shape=shapes, baseline=first["baseline"],
        insertion_start=first["insertion_start"], random_seed=first["random_seed"]))
    print(table_text(ds))
    common.write_outputs(out, "attributions", ds, figure(ds))


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
