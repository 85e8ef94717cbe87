"""`python -m diagnostics.attributions CKPT_OR_RUN [...] [--method ig saliency gradcam] [--target label|prediction]
[--steps N]`: where each model looks on the first --n-images of the split (Captum's Integrated Gradients,
Saliency and Grad-CAM on the last stage), and how faithful each map is (deletion AUC, lower is better, against
a random order). A run directory stands for its last epoch checkpoint unless --epochs names one epoch."""
import sys

import numpy as np
import torch
from matplotlib.colors import Normalize, TwoSlopeNorm

from analyses.attributions import METHODS, TARGETS, attributions, combine_models, definition
from analyses.common import attrs
from train.errors import UserError, positive_int
from train.progress import track

from . import common, plotting

TITLES = {"ig": "IG", "saliency": "Saliency", "gradcam": "Grad-CAM"}
COLOURMAPS = {"ig": "RdBu_r", "saliency": "magma", "gradcam": "magma"}  # IG is signed: diverging around 0
RIGHT, WRONG = "#1a7f37", "#c62828"


def parse(argv):
    p = common.parser("attributions", __doc__, n_images=8)
    p.set_defaults(epochs="last")
    p.add_argument("--method", nargs="+", action="extend", choices=METHODS, metavar="METHOD",
                   help=f"any of {', '.join(METHODS)}, given together or repeated (default: all)")
    p.add_argument("--target", choices=TARGETS, default="prediction",
                   help="the class whose logit is explained: the model's prediction (default; deletion then "
                   "measures agreement with its own decision, so models of different accuracy compare) or the "
                   "true label (deletion then measures accuracy)")
    p.add_argument("--steps", type=positive_int, default=32, help="Integrated Gradients steps (default 32)")
    return p.parse_args(argv)


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


def _show_map(axis, image: np.ndarray, values: np.ndarray, method: str) -> None:
    """The map over a faint grey copy of the image, each map on its own scale (its 99th percentile of |value|)."""
    axis.imshow(image.mean(0), cmap="gray", vmin=0, vmax=1, alpha=0.35)
    top = float(np.percentile(np.abs(values), 99)) or float(np.abs(values).max()) or 1.0
    norm = TwoSlopeNorm(0, -top, top) if method == "ig" else Normalize(0, top)
    axis.imshow(values, cmap=COLOURMAPS[method], norm=norm, alpha=0.8)


@plotting.styled
def figure(ds):
    """Rows: images (true class on top); columns: the image, then each model's maps, its prediction on top
    (green right, red wrong); the header holds each method's deletion AUC and the model's random reference.
    Full page width, or narrower where few columns would make the cells larger than 1.1 inches."""
    labels, methods = [str(m) for m in ds.model.values], [str(m) for m in ds.method.values if m != "random"]
    names, n = ds.class_name.values, ds.sizes["sample"]
    # grid columns: the image, then per model a narrow gap and its methods
    widths = [1.0] + ([0.2] + [1.0] * len(methods)) * len(labels)
    cell = min(plotting.FULL_WIDTH / (sum(widths) * 1.05), 1.1)  # inches; wspace: 5% of a cell between columns
    fig = plotting.plt.figure(figsize=(cell * sum(widths) * 1.05, cell * (1.25 * n + 1)))
    grid = fig.add_gridspec(n + 1, len(widths), width_ratios=widths, height_ratios=[0.75] + [1] * n,
                            left=0, right=1, bottom=0, top=1, hspace=0.25, wspace=0.05)
    columns = {(label, method): 2 + m + k * (len(methods) + 1)
               for k, label in enumerate(labels) for m, method in enumerate(methods)}
    for k, label in enumerate(labels):
        first = columns[label, methods[0]]
        header = fig.add_subplot(grid[0, first:first + len(methods)])
        header.axis("off")
        random = ds.deletion_auc.sel({"model": label, "method": "random"}).item()
        header.text(0.5, 0.62, label, ha="center", fontweight="bold", transform=header.transAxes)
        header.text(0.5, 0.42, f"deletion AUC (random order {random:.2f})", ha="center", fontsize=6,
                    transform=header.transAxes)
        for m, method in enumerate(methods):
            auc = ds.deletion_auc.sel({"model": label, "method": method}).item()
            header.text((m + 0.5) / len(methods), 0.0, f"{TITLES[method]}\n{auc:.2f}",
                        ha="center", va="bottom", transform=header.transAxes)
    for row in range(n):
        image, truth = ds.image.isel(sample=row).values, int(ds.label.isel(sample=row))
        axis = fig.add_subplot(grid[row + 1, 0])
        _show_image(axis, image)
        axis.set_title(f"true: {names[truth]}", loc="left", fontsize=6)
        for (label, method), col in columns.items():
            axis = fig.add_subplot(grid[row + 1, col])
            _show_map(axis, image, ds.attribution.sel({"model": label, "method": method}).values[row], method)
            if method == methods[0]:
                predicted = int(ds.prediction.sel(model=label).isel(sample=row))
                axis.set_title(f"pred: {names[predicted]}", loc="left", fontsize=6,
                               color=RIGHT if predicted == truth else WRONG)
    for axis in fig.axes:
        axis.set_xticks([])
        axis.set_yticks([])
    note = fig.add_subplot(grid[0, 0])
    note.axis("off")
    explained = "true" if ds.attrs["target"] == "label" else "predicted"
    note.text(0, 0, "maps on their own scale\n(99th pct of |value|)" + (
        f"\nIG: red for, blue against\nthe {explained} class" if "ig" in methods else ""),
        fontsize=5, va="bottom", transform=note.transAxes)
    return fig


def print_table(ds) -> None:
    rows = [[str(label), str(method), f"{ds.deletion_auc.sel({'model': label, 'method': method}).item():.3f}"]
            for label in ds.model.values for method in ds.method.values]
    common.print_table(["model", "method", "deletion AUC (lower = more faithful)"], rows)


def main(argv=None) -> None:
    args = parse(argv)
    methods = list(dict.fromkeys(args.method or METHODS))
    device, sources, out = common.prepare(args)
    datasets = []
    for loaded, batches in track(inputs(sources, args, device), len(sources), "attributions", unit="model"):
        images, labels = (torch.cat(parts) for parts in zip(*batches))
        spec = loaded.spec
        datasets.append(attributions(loaded.model, images, labels, methods, target=args.target, n_steps=args.steps,
                                     batch_size=args.batch_size, mean=spec.mean, std=spec.std,
                                     class_names=spec.classes, checkpoint=loaded.path, dataset=spec.name,
                                     split=args.split))
    first = datasets[0].attrs
    layers = [ds.attrs["gradcam_layer"] for ds in datasets]
    ds = combine_models(datasets, [source.label for source in sources], attrs(
        definition(methods, args.target, args.steps, ", ".join(dict.fromkeys(layers)), first["baseline"]),
        checkpoint=[d.attrs["checkpoint"] for d in datasets], dataset=first["dataset"], split=args.split,
        n_images=first["n_images"], batch_size=args.batch_size, bn_mode="eval", target=args.target,
        n_steps=args.steps, gradcam_layer=layers, baseline=first["baseline"], random_seed=first["random_seed"]))
    print_table(ds)
    common.write_outputs(out, "attributions", ds, figure(ds))


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
