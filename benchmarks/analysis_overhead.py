"""Cost of the analyses against the bare passes they wrap, and their memory against the number of images.

- responses (hooks, per-channel float64 moments) against a bare eval-mode forward over the same batches;
- gradients (one backward per batch, norms of every weight's gradient) against a bare forward + backward.
Target: at most 1.3x. Memory: the peak resident memory of a fresh process that streams N batches through the
analysis should not grow with N (statistics are streamed, activations never kept).

Run: `python -m benchmarks.analysis_overhead [--models resnet56 plain56] [--images 1024] [--repeats 3]`.
"""
import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import models
from analyses.gradients import gradient_norms
from analyses.responses import layer_responses

from .common import machine_line, synchronize


def batches(n_images: int, batch_size: int, device, in_channels: int = 3):
    """The same fixed random batch, `n_images // batch_size` times: the data path is not what is measured."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, in_channels, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    return [(x, y)] * (n_images // batch_size)


@torch.no_grad()
def bare_forward(model, data) -> None:
    model.eval()
    for x, _ in data:
        model(x)


def bare_backward(model, data) -> None:
    model.train()
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def timed(function, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def peak_memory_mib(model_name: str, n_images: int, batch_size: int, analysis: str) -> float:
    """Peak resident memory (MiB) of a fresh process running one analysis over `n_images`."""
    code = ("import resource, torch, models; from benchmarks.analysis_overhead import run_analysis; "
            f"run_analysis({model_name!r}, {n_images}, {batch_size}, {analysis!r}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024


def run_analysis(model_name: str, n_images: int, batch_size: int, analysis: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.build(model_name).to(device)
    data = (batch for batch in batches(n_images, batch_size, device))  # produced one at a time
    if analysis == "responses":
        layer_responses(model, data)
    else:
        gradient_norms(model, data)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "plain56"])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(machine_line(device))
    print(f"seconds for {args.images} images in batches of {args.batch_size}, median of {args.repeats} interleaved "
          "repetitions after one warm-up")
    print(f"{'model':<10} {'forward':>8} {'responses':>10} {'ratio':>6} {'fwd+bwd':>8} {'gradients':>10} {'ratio':>6}")
    worst = 0.0
    for name in args.models:
        model = models.build(name).to(device)
        data = batches(args.images, args.batch_size, device)
        runs = {"forward": lambda: bare_forward(model, data), "responses": lambda: layer_responses(model, data),
                "backward": lambda: bare_backward(model, data), "gradients": lambda: gradient_norms(model, data)}
        times = {key: [] for key in runs}
        for repeat in range(args.repeats + 1):
            for key, function in runs.items():
                seconds = timed(function, device)
                if repeat:
                    times[key].append(seconds)
        t = {key: statistics.median(values) for key, values in times.items()}
        ratios = (t["responses"] / t["forward"], t["gradients"] / t["backward"])
        worst = max(worst, *ratios)
        print(f"{name:<10} {t['forward']:>8.2f} {t['responses']:>10.2f} {ratios[0]:>5.2f}x {t['backward']:>8.2f} "
              f"{t['gradients']:>10.2f} {ratios[1]:>5.2f}x")
    small, large = args.images // 4, args.images * 2
    memory = {(analysis, n): peak_memory_mib(args.models[0], n, args.batch_size, analysis)
              for analysis in ("responses", "gradients") for n in (small, large)}
    for analysis in ("responses", "gradients"):
        print(f"peak memory of {analysis} on {args.models[0]}: {memory[analysis, small]:.0f} MiB for {small} images, "
              f"{memory[analysis, large]:.0f} MiB for {large} images")
    growth = max(memory[a, large] / memory[a, small] for a in ("responses", "gradients"))
    print(f"summary: worst overhead {worst:.2f}x a bare pass (target 1.3x); peak memory x{growth:.2f} for "
          f"{large // small}x the images (target: flat)")


if __name__ == "__main__":
    main()
