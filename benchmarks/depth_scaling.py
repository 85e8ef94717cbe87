"""Time of the responses analysis against depth: resnet20, 56, 110 and 1202 on the same images.

The analysis hooks every 3x3 layer and streams per-channel moments; its time should grow linearly with the
number of layers, so the time per response layer is the figure to compare (and the bare forward beside it).

Run: `python -m benchmarks.depth_scaling [--models resnet20 resnet56 resnet110 resnet1202] [--images 256]`.
"""
import argparse
import statistics

import torch

import models
from analyses.responses import layer_responses

from .analysis_overhead import bare_forward, batches, timed
from .common import machine_line


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet110", "resnet1202"])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = batches(args.images, args.batch_size, device)
    print(machine_line(device))
    print(f"seconds for {args.images} images in batches of {args.batch_size}, median of {args.repeats}")
    print(f"{'model':<11} {'layers':>6} {'forward':>8} {'responses':>10} {'ms/layer':>9} {'overhead':>9}")
    per_layer = {}
    for name in args.models:
        model = models.build(name).to(device)
        # At initialisation every BN normalises by mean 0, var 1 in eval mode, and 600 residual additions
        # overflow to inf: statistics of the model's own activations keep the timed passes finite.
        models.recalibrate_bn(model, (x for x, _ in data), len(data))
        layers = len(models.response_layers(model))
        forward, responses = [], []
        for repeat in range(args.repeats + 1):
            f, r = timed(lambda: bare_forward(model, data), device), timed(lambda: layer_responses(model, data), device)
            if repeat:
                forward.append(f)
                responses.append(r)
        f, r = statistics.median(forward), statistics.median(responses)
        per_layer[name] = 1000 * r / layers
        print(f"{name:<11} {layers:>6} {f:>8.2f} {r:>10.2f} {per_layer[name]:>9.1f} {r / f:>8.2f}x")
    spread = max(per_layer.values()) / min(per_layer.values())
    print(f"summary: time per response layer varies {spread:.2f}x from {args.models[0]} to {args.models[-1]} "
          "(1.0x = exactly linear in depth)")


if __name__ == "__main__":
    main()
