"""`python -m diagnostics.responses CKPT_OR_RUN [...]`: the paper's Fig. 7 (std of each 3x3 layer's response),
what it is made of (BN's |gamma|, stale running statistics), and ||F(x)|| / ||x|| per residual block."""
import sys

import matplotlib.cm as cm
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, MaxNLocator

from analyses.responses import DEFINITION, layer_responses

from . import common, plotting


GAMMA_STYLE = {"linewidth": 0.6, "alpha": 0.5}  # BN's |gamma| drawn faintly under the response it scales


def lines(ds, plain: dict[str, bool]) -> list[tuple]:
    """(one line's slice of `ds`, its style): each model at its last epoch, or for a single model each epoch."""
    if ds.sizes["model"] == 1 and ds.sizes["epoch"] > 1:
        colours = cm.viridis(np.linspace(0, 1, ds.sizes["epoch"]))
        return [(ds.isel(model=0).sel(epoch=epoch), {"color": colour, "label": f"epoch {epoch}"})
                for colour, epoch in zip(colours, ds.epoch.values)]
    labels = [str(label) for label in ds.model.values]
    return [(ds.sel(model=label).dropna("epoch", how="all", subset=["response_std"]).isel(epoch=-1), style)
            for label, style in zip(labels, plotting.line_styles(labels, plain))]


def finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[~np.isnan(values)]


def by_index(axis, values, style: dict, **kwargs) -> None:
    values = finite(values)
    axis.plot(np.arange(1, len(values) + 1), values, **{**style, **kwargs})


@plotting.styled
def figure(ds, plain: dict[str, bool]):
    """Left, Fig. 7: response std per layer in the network's order (thin: the layer's mean |gamma|) and sorted
    by magnitude. Right, where the dataset holds them: the BN input's std over these images against the running
    one, per layer, and ||F(x)|| / ||x|| per residual block."""
    parts = lines(ds, plain)
    full = "branch_ratio" in ds.data_vars
    fig, axes = plotting.figure(2, 2 if full else 1, width=plotting.FULL_WIDTH if full else plotting.COLUMN_WIDTH,
                                height=4.2 if full else 3.6)
    top, bottom = axes[:, 0]
    for part, style in parts:
        by_index(top, part.response_std.values, style)
        by_index(bottom, np.sort(finite(part.response_std.values))[::-1], style)
    top.set(xlabel="layer index (original)", ylabel="std of response")
    bottom.set(xlabel="layer index (sorted by magnitude)", ylabel="std of response")
    handles, _ = top.get_legend_handles_labels()
    if full:
        staleness, blocks = axes[:, 1]
        for part, style in parts:
            by_index(top, part.bn_scale.values, {**style, "label": None}, **GAMMA_STYLE)
        if any(finite(part.bn_scale.values).size for part, _ in parts):
            handles.append(Line2D([], [], color="black", **GAMMA_STYLE, label=r"thin: mean $|\gamma|$ of its BN"))
        draw_staleness(staleness, parts)
        draw_branches(blocks, parts)
    for axis in axes.flat:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, which="major")
    top.legend(handles=handles, ncol=min(len(handles), 3), loc="lower left", bbox_to_anchor=(0, 1.02),
               borderaxespad=0)  # above the axes: the lines fill them
    fig.tight_layout()
    return fig


def draw_staleness(axis, parts) -> None:
    """sigma_pop / sigma_running per layer: 1 where the running statistics describe these images."""
    for part, style in parts:
        by_index(axis, part.bn_std_ratio.values, style)
    axis.axhline(1, color="black", linewidth=0.6)
    axis.set(yscale="log", xlabel="layer index (original)",
             ylabel=r"$\sigma_\mathrm{images} / \sigma_\mathrm{running}$ of BN input" + "\n(mean over channels)")
    plotting.plain_log_labels(axis.yaxis)


def draw_branches(axis, parts) -> None:
    """||F(x)|| / ||x|| per block, plain and residual alike (x through the option-A shortcut)."""
    drawn = [(part, style) for part, style in parts
             if "block_depth" in part.dims and finite(part.branch_ratio.values).size]
    for part, style in drawn:
        by_index(axis, part.branch_ratio.values, style)
    if not drawn:
        axis.text(0.5, 0.5, "no residual blocks", transform=axis.transAxes, ha="center", va="center")
        return
    axis.axhline(1, color="black", linewidth=0.6)
    axis.set(yscale="log", xlabel="block index (forward order)",
             ylabel=r"$\|F(x)\| \,/\, \|x\|$ per block" + "\n(branch output / block input)")
    axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # ratios span less than a decade or many
    plotting.plain_log_labels(axis.yaxis)


def main(argv=None) -> None:
    p = common.parser("responses", __doc__)
    p.add_argument("--layers", nargs="+", metavar="PATTERN", help="measure the outputs of the modules whose names "
                   "match (fnmatch: * and ?), e.g. 'features.*', instead of the BN after each 3x3 conv")
    args = p.parse_args(argv)
    device, sources, out = common.prepare(args)
    results = common.Results()
    for source, loaded in common.checkpoints(sources, args, device):
        batches = common.image_batches(loaded, args, device)
        layers = common.chosen_layers(loaded, args.layers, next(iter(batches))[0])
        results.add(source.label, loaded, layer_responses(loaded.model, batches, layers, checkpoint=loaded.path,
                                                          dataset=loaded.spec.name, split=args.split))
    definition = DEFINITION if not args.layers else (
        f"standard deviation of the output of each module whose name matches {' '.join(args.layers)} (in forward "
        "order), per channel over all images and spatial positions, with BN in eval mode; response_std is its mean "
        "over channels")
    ds = results.combined(definition, args.split, bn_mode="eval")
    common.write_outputs(out, "responses", ds, figure(ds, results.plain))


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
