"""Time of the responses analysis against depth: resnet20, 56, 110 and 1202 on the same images.

The analysis hooks every 3x3 layer and streams per-channel moments; its time should grow linearly with the
number of layers, so the time per response layer is the figure to compare (and the bare forward beside it).
No target of the issue applies; 1.0x spread means exactly linear in depth.

Run: `python -m benchmarks.depth_scaling [--models resnet20 resnet56 resnet110 resnet1202] [--images 256]`.
"""
import sys

import torch

import models
from analyses.bn import recalibrate_bn
from analyses.responses import layer_responses
from diagnostics.common import main_guard
from train.errors import positive_int

from . import common
from .analysis_overhead import bare_forward


def parser():
    p = common.parser("benchmarks.depth_scaling", __doc__,
                      models_default=["resnet20", "resnet56", "resnet110", "resnet1202"])
    p.add_argument("--images", type=positive_int, default=256, help="images per timed pass (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="default 128; the last batch is smaller where it does not divide --images")
    return p


def measure(args, device: torch.device) -> common.Report:
    batches = common.fixed_batches(args.images, args.batch_size, device)
    report = common.Report(f"seconds for {args.images} images in batches of {len(batches[0][0])}, median of "
                           f"{args.repeats} interleaved rounds after a warm-up round, fp32",
                           ["model", "layers", "forward", "responses", "ms/layer", "overhead"])
    per_layer = {}
    with common.progress(len(args.models) * (args.repeats + 1) * 2, "depth_scaling") as progress:
        for name in args.models:
            model = models.build(name).to(device)
            # At initialisation every BN normalises by mean 0, var 1 in eval mode, and 600 residual additions
            # overflow to inf: statistics of the model's own activations keep the timed passes finite.
            recalibrate_bn(model, [x for x, _ in batches])
            layers = len(models.response_layers(model))
            t = common.interleaved({"forward": lambda: bare_forward(model, batches),
                                    "responses": lambda: layer_responses(model, batches)},
                                   args.repeats, device, progress)
            per_layer[name] = 1000 * t["responses"] / layers
            report.rows.append([name, str(layers), f"{t['forward']:.2f}", f"{t['responses']:.2f}",
                                f"{per_layer[name]:.1f}", f"{t['responses'] / t['forward']:.2f}x"])
    spread = max(per_layer.values()) / min(per_layer.values())
    report.targets.append(common.Target(f"spread of the time per response layer over {', '.join(args.models)}",
                                        spread, None, reason="1.00x = exactly linear in depth"))
    return report


def main(argv=None) -> None:
    common.main(parser, measure, argv)


if __name__ == "__main__":
    sys.exit(main_guard(main))
