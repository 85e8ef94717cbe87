"""`python -m diagnostics.flops CKPT_OR_RUN_OR_MODEL [...]`: parameters and multiply-adds of each model.

Inputs are checkpoints, run directories or model names (`resnet56`, `plain110`: the untrained model, built for
`--dataset`'s classes and image shape, CIFAR-10's by default, an image folder's resized to `--image-size`). A run directory counts as its last checkpoint:
the cost of a forward pass does not change with training. No images are read, so `--split`, `--n-images` and
`--batch-size` do nothing here. The output has no `epoch` axis; models of different depth share `depth`.
Prints a table whose columns are named by what they count (a legend above it says exactly), then the paths
written.
"""
import sys

import numpy as np
import xarray as xr
from matplotlib.ticker import MaxNLocator

import models
from analyses.common import attrs, combine
from analyses.flops import DEFINITION, flop_count
from train.progress import track

from . import common, plotting

WEIGHTED_KINDS = ("Conv1d", "Conv2d", "Conv3d", "Linear")


def counted_model(source: common.Source, args, device, spec):
    """(model, dataset spec, checkpoint path or None, whether it is a plain net) of one input; `spec`: the dataset
    a model name is built for."""
    if source.model_name is not None:
        name, kwargs = models.canonical(source.model_name)
        model = models.build(name, **kwargs, num_classes=spec.num_classes, in_channels=spec.in_channels)
        return model.to(device), spec, None, kwargs.get("skip", True) is False
    loaded = common.load_checkpoint(source.paths[-1], args, device)
    return loaded.model, loaded.spec, loaded.path, loaded.kwargs.get("skip", True) is False


LEGEND = """per image, in millions; MACs = multiply-adds (He et al.'s FLOPs count one per multiply-add):
  conv+fc MACs: the convolutions and fc layers of one forward pass (fvcore), the paper's FLOPs
  fvcore all ops: conv+fc MACs plus eval-mode BN (2 per output element) and pooling (1 per input element)
  torch MACs: PyTorch's FlopCounterMode on the same forward pass (its flops / 2), a cross-check of conv+fc MACs
  train 3x MACs: forward + backward of the convolutions and fc layers by convention (backward = 2 x forward)
  train torch MACs: forward + backward as FlopCounterMode measures them (no gradient for the input image)"""


def table_text(ds: xr.Dataset) -> str:
    """The legend and the table the command prints."""
    rows = []
    for label in ds.model.values:
        one = ds.sel(model=label)
        millions = {name: f"{int(one[name]) / 1e6:.2f}" for name in ("conv_fc_flops", "total_flops",
                    "total_flops_torch", "train_conv_fc_flops", "train_flops_torch")}
        conv_fc, torch_count = int(one.conv_fc_flops), int(one.total_flops_torch)
        agreement = "exact" if conv_fc == torch_count else f"{torch_count / conv_fc:.4f}x"
        rows.append([str(label), f"{int(one.total_params):,}", millions["conv_fc_flops"], millions["total_flops"],
                     millions["total_flops_torch"], agreement, millions["train_conv_fc_flops"],
                     millions["train_flops_torch"]])
    return LEGEND + "\n" + common.format_table(["model", "parameters", "conv+fc MACs", "fvcore all ops", "torch MACs",
                                                "agreement", "train 3x MACs", "train torch MACs"], rows)


@plotting.styled
def figure(ds: xr.Dataset, plain: dict[str, bool]):
    """Top: parameters and forward conv + fc multiply-adds (the paper's FLOPs) per model; bottom: those
    multiply-adds summed over the conv and fc layers in forward order (the paper's layer count on the x axis):
    equal slopes where each 3x3 layer costs the same."""
    fig, axes = plotting.figure(2, 2, height=3.8, gridspec_kw={"height_ratios": [1, 1.4]})
    grid = axes[1, 0].get_gridspec()
    for axis in axes[1]:
        axis.remove()
    params_axis, flops_axis = axes[0]
    layers_axis = fig.add_subplot(grid[1, :])
    labels = [str(label) for label in ds.model.values]
    styles = [plotting.model_style(label, i, plain.get(label)) for i, label in enumerate(labels)]
    rows = np.arange(len(labels))[::-1]
    for axis, values, xlabel in ((params_axis, ds.total_params.values / 1e6, "parameters\n(millions)"),
                                 (flops_axis, ds.conv_fc_flops.values / 1e6,
                                  "FLOPs (millions):\nconv + fc multiply-adds")):
        bars = axis.barh(rows, values, color=[s["color"] for s in styles], edgecolor="white", linewidth=0.3)
        for bar, style in zip(bars, styles):
            bar.set_hatch("////" if style["linestyle"] == "--" else None)
        axis.bar_label(bars, [f"{v:.3g}" if v < 1000 else f"{v:,.0f}" for v in values], padding=1.5, fontsize=5)
        axis.set_yticks(rows, labels if axis is params_axis else [])
        axis.set(xlabel=xlabel, xlim=(0, values.max() * 1.3))
        axis.grid(True, axis="x")
    for label, style in zip(labels, styles):
        one = ds.sel(model=label)
        weighted = one.kind.isin(WEIGHTED_KINDS).values
        values = np.cumsum(one.flops.values[weighted]) / 1e6
        on_top = 2 + 1 / len(values)  # shorter (shallower) lines over the longer ones they coincide with
        layers_axis.plot(np.arange(1, len(values) + 1), values, zorder=on_top, **style)
        layers_axis.plot(len(values), values[-1], "o", markersize=2.5, color=style["color"], zorder=on_top)
    layers_axis.set(xlabel="conv or fc layer (forward order)", ylabel="conv + fc multiply-adds,\ncumulative (millions)",
                    xlim=(0, None), ylim=(0, None))
    layers_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    layers_axis.grid(True)
    layers_axis.legend(ncol=2 if len(labels) > 3 else 1)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    args = common.parser("flops", __doc__, inputs="models").parse_args(argv)
    device, sources, out = common.prepare(args, model_names=True)
    names_spec = None
    if any(source.model_name is not None for source in sources):
        names_spec = common.untrained_spec(args, args.dataset or "cifar10")
        common.check_untrained(sources, names_spec)
    datasets, plain = [], {}
    for source in track(sources, len(sources), "flops", unit="model"):
        model, spec, path, plain[source.label] = counted_model(source, args, device, names_spec)
        shape = (1, spec.in_channels, spec.image_size, spec.image_size)
        datasets.append(flop_count(model, shape, checkpoint=path, dataset=spec.name))
    labels = [source.label for source in sources]
    ds = combine(datasets, labels, [0] * len(datasets), attrs(
        DEFINITION, **common.merged_attrs(datasets), bn_mode="eval",
        **{key: ", ".join(sorted({part for d in datasets for part in d.attrs[key].split(", ") if part}))
           for key in ("input_shape", "counted_operators", "skipped_operators")}))
    ds = ds.isel(epoch=0, drop=True)
    ds["flops_by_operator"] = ds.flops_by_operator.fillna(0).astype(np.int64)  # an operator a model lacks costs 0
    print(table_text(ds))
    common.write_outputs(out, "flops", ds, figure(ds, plain))


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
