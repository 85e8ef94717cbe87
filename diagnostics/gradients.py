"""`python -m diagnostics.gradients [CKPT_OR_RUN ...] [--init MODEL ...]`: the L2 norm of the loss gradient of
every conv and fc weight, by depth, over mini-batches, times the weight's norm (scale invariant: a rescaled weight
that BN follows plots the same; `--quantity raw` for the bare norm); `--init plain56 --init resnet56 --dataset
cifar10` sets plain against residual at initialisation."""
import sys

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

import models
from analyses.gradients import GRADIENT_BN_MODES, definition, gradient_norms
from train import checkpoint as ckpt
from train.errors import UserError, non_negative_int, positive_int
from train.progress import track
from train.trainer import choose_device

from . import common, plotting

NAME = "gradients"
QUANTITIES = {  # --quantity: the variable plotted, its axis label
    "scaled": ("scaled_grad_norm", r"$\|\partial L / \partial W\|_2 \, \|W\|_2$"),
    "raw": ("grad_norm", r"$\|\partial L / \partial W\|_2$"),
}


def parser():
    p = common.parser(NAME, __doc__, inputs_required=False, n_images=None, batch_size=128)  # --init alone will do
    p.add_argument("--init", action="append", default=[], metavar="MODEL",
                   help="also measure this model untrained, as epoch 0 (repeatable), e.g. --init plain56")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the seed the --init models are built with "
                   "(0 to 2^31 - 1, as the trainer's)")
    p.add_argument("--batches", type=positive_int, default=10, help="mini-batches to average over")
    p.add_argument("--bn", choices=GRADIENT_BN_MODES, default="train",
                   help="BN with each batch's statistics as in training (train) or the running ones (eval)")
    p.add_argument("--quantity", choices=tuple(QUANTITIES), default="scaled",
                   help="plot ||dL/dW|| * ||W||, unchanged by the weight's scale (scaled), or ||dL/dW|| (raw); "
                        "the .nc file holds both")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def init_sources(args, sources: list[common.Source]) -> list[common.Source]:
    """A source per `--init` name, labelled `plain56` etc. or `plain56-init` where a checkpoint has that label."""
    taken = {source.label for source in sources}
    added = []
    for name in args.init:
        if args.init.count(name) > 1:
            raise UserError(f"--init {name} is given more than once; an untrained model is the same every time")
        label = models.label(*models.canonical(name))  # an unknown name fails here, before any work
        added.append(common.Source(label + "-init" if label in taken else label, model_name=name))
        taken.add(added[-1].label)
    return added


def init_spec(args, sources: list[common.Source]):
    """The dataset of the `--init` models: `--dataset`, else the first checkpoint's."""
    if args.dataset:
        return common.untrained_spec(args, args.dataset)
    if sources:
        return common.load_checkpoint(sources[0].paths[0], args).spec
    raise UserError("--init needs --dataset NAME (e.g. --dataset cifar10) when no checkpoint is given")


def untrained(name: str, label: str, spec, seed: int, device) -> ckpt.Loaded:
    name, kwargs = models.canonical(name, num_classes=spec.num_classes, in_channels=spec.in_channels)
    torch.manual_seed(seed)
    model = models.build(name, **kwargs).to(device).eval()
    return ckpt.Loaded(model, name, kwargs, label, spec, f"untrained {label}, seed {seed}", epoch=0)


# ---------------------------------------------------------------------------------------------------------------
# Figure


@plotting.styled
def figure(ds, plain: dict[str, bool], quantity: str = "scaled"):
    """A single model with several epochs: heat map depth x epoch. Otherwise one line per model at its last
    epoch, shaded +-std over the mini-batches; untrained models (epoch 0) beside trained ones get their own panel
    on the same axis, each model in its twin's colour. `quantity`: a key of QUANTITIES."""
    name, label_text = QUANTITIES[quantity]
    if ds.sizes["model"] == 1 and ds.sizes["epoch"] > 1:
        return heat_map(ds[f"{name}_mean"].isel(model=0), label_text)
    last = {str(label): last_measured(ds.sel(model=label), name) for label in ds.model.values}
    panels = [[label for label, series in last.items() if (series.epoch.item() == 0) == untrained]
              for untrained in (True, False)]
    panels = [labels for labels in panels if labels]
    fig, axes = plotting.figure(cols=len(panels), width=plotting.COLUMN_WIDTH * (1 if len(panels) == 1 else 2),
                                height=2.4, sharey=True)
    for axis, labels in zip(axes[0], panels):
        epochs = {last[label].epoch.item() for label in labels}
        shared = len(panels) > 1 and len(epochs) == 1  # the panel's title names the epoch
        names = [label.removesuffix("-init") if shared else label for label in labels]
        for label, style in zip(labels, plotting.line_styles(names, {n: plain.get(l) for n, l in zip(names, labels)})):
            series = last[label]
            mean, std = series[f"{name}_mean"].values, series[f"{name}_std"].values
            if not shared:
                style["label"] += f" (epoch {series.epoch.item()})"
            axis.plot(series.depth.values, mean, **style)
            # A band reaching zero is cut a decade below the mean, to keep the log axis on the data.
            axis.fill_between(series.depth.values, np.maximum(mean - std, mean / 10), mean + std,
                              color=style["color"], alpha=0.2, linewidth=0)
        if shared:
            epoch = epochs.pop()
            axis.set_title("at initialisation (untrained)" if epoch == 0 else f"trained (epoch {epoch})", pad=2)
        axis.set(yscale="log", xlabel="layer depth (forward order; last = fc)")
        plotting.plain_log_labels(axis.yaxis)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, which="major")
        axis.legend(ncol=2, loc="lower left", bbox_to_anchor=(0, 1.02 if not shared else 1.08), borderaxespad=0)
    axes[0, 0].set_ylabel(label_text)
    fig.tight_layout()
    return fig


def last_measured(series, name: str):
    """A model's last epoch that has values, at the depths it has (models differ in depth)."""
    series = series.dropna("epoch", how="all", subset=[f"{name}_mean"])
    return series.isel(epoch=-1).dropna("depth", subset=[f"{name}_mean"])


@plotting.styled
def heat_map(norms, label_text: str):
    """depth (y) x epoch (x), log colour scale; epochs may be unevenly spaced."""
    fig, axes = plotting.figure(height=2.4)
    axis = axes[0, 0]
    values = norms.transpose("depth", "epoch").values
    mesh = axis.pcolormesh(norms.epoch.values, norms.depth.values, values, shading="nearest", cmap="viridis",
                           norm=LogNorm(vmin=np.nanmin(values[values > 0]), vmax=np.nanmax(values)))
    colour_bar = fig.colorbar(mesh, ax=axis, label=f"{label_text} (mean over batches)")
    plotting.plain_log_labels(colour_bar.ax.yaxis)
    axis.set(title=str(norms.model.item()), xlabel="epoch", ylabel="layer depth (forward order)")
    for axis_ in (axis.xaxis, axis.yaxis):
        axis_.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Command


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if not args.inputs and not args.init:
        raise UserError("give checkpoints or run directories, or --init MODEL (e.g. --init resnet56 --dataset "
                        "cifar10)")
    device = choose_device(args.device)
    sources = common.collect_sources(args) if args.inputs else []
    inits = init_sources(args, sources)
    spec = init_spec(args, sources) if inits else None
    if inits:
        common.check_untrained(inits, spec)
    out = common.output_dir(args, sources + inits)
    n_images = min(args.batches * args.batch_size, args.n_images or sys.maxsize)  # only what is measured

    def measured():
        yield from common.checkpoints(sources, args, device)
        for source in track(inits, len(inits), "gradients --init", unit="model"):
            yield source, untrained(source.model_name, source.label, spec, args.seed, device)

    results = common.Results()
    for source, loaded in measured():
        batches = common.image_batches(loaded, args, device, n_images)
        results.add(source.label, loaded, gradient_norms(loaded.model, batches, args.batches, bn_mode=args.bn,
                                                         checkpoint=loaded.path, dataset=loaded.spec.name,
                                                         split=args.split))
    ds = results.combined(definition(args.bn), args.split, bn_mode=args.bn,
                          n_batches=max(d.attrs["n_batches"] for d in results.datasets))
    common.write_outputs(out, NAME, ds, figure(ds, results.plain, args.quantity))


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
