"""`python -m diagnostics.responses CKPT_OR_RUN [...]`: the paper's Fig. 7, std of each 3x3 layer's response."""
import sys

import numpy as np
from matplotlib.ticker import MaxNLocator

from analyses.responses import DEFINITION, layer_responses

from . import common, plotting


@plotting.styled
def figure(ds, plain: dict[str, bool]):
    """Top: std per layer in the network's order; bottom: sorted by magnitude; one line per model at its last
    epoch, or for a single model one line per epoch."""
    fig, axes = plotting.figure(2, 1, height=3.6)
    top, bottom = axes[:, 0]
    lines = []
    if ds.sizes["model"] == 1 and ds.sizes["epoch"] > 1:
        import matplotlib.cm as cm
        colours = cm.viridis(np.linspace(0, 1, ds.sizes["epoch"]))
        for colour, epoch in zip(colours, ds.epoch.values):
            values = ds.response_std.sel(model=ds.model.values[0], epoch=epoch).values
            lines.append((values, {"color": colour, "label": f"epoch {epoch}"}))
    else:
        labels = [str(label) for label in ds.model.values]
        for label, style in zip(labels, plotting.line_styles(labels, plain)):
            series = ds.response_std.sel(model=label).dropna("epoch", how="all")
            lines.append((series.isel(epoch=-1).values, style))
    for values, style in lines:
        values = values[~np.isnan(values)]
        top.plot(np.arange(1, len(values) + 1), values, **style)
        bottom.plot(np.arange(1, len(values) + 1), np.sort(values)[::-1], **style)
    for axis in (top, bottom):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for axis in (top, bottom):
        axis.set_ylabel("std")
        axis.grid(True)
    top.legend(ncol=2 if len(lines) > 3 else 1)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    p = common.parser("responses", __doc__)
    p.add_argument("--layers", nargs="+", metavar="PATTERN", help="measure the outputs of the modules whose names "
                   "match (fnmatch: * and ?), e.g. 'features.*', instead of the BN after each 3x3 conv")
    args = p.parse_args(argv)
    device, sources, out = common.prepare(args)
    results = common.Results()
    for source, loaded in common.checkpoints(sources, args, device):
        batches = common.image_batches(loaded, args, device)
        layers = common.response_layers(loaded, args.layers, next(iter(batches))[0])
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
