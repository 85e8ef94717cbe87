"""Cost of the analyses against the bare passes they wrap, and their memory against the number of images.

- responses (hooks, streamed per-channel moments) against a bare eval-mode forward over the same batches
  (target: at most 1.3x);
- gradients (one backward per batch, norms of every weight's gradient) against a bare forward + backward
  (target: at most 1.1x);
- memory: the peak memory of a fresh process that streams one batch and then `--memory-batches` batches
  through an analysis should not grow with the number of batches (statistics are streamed, activations never
  kept): peak resident memory on a CPU, peak allocated GPU memory on a GPU.

The analyses run in fp32 (they take no autocast), so there is no bf16 column. Run:
`python -m benchmarks.analysis_overhead [--models resnet56 plain56] [--images 512] [--batch-size 128] [--repeats 2]`.
"""
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import models
from analyses.gradients import gradient_norms
from analyses.responses import layer_responses
from diagnostics.common import main_guard
from train.errors import positive_int

from . import common

ANALYSES = {"responses": layer_responses, "gradients": gradient_norms}


@torch.no_grad()
def bare_forward(model, batches) -> None:
    model.eval()
    for x, _ in batches:
        model(x)


def bare_backward(model, batches) -> None:
    model.train()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------------
# Memory, in a fresh process


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_probe(model_name: str, analysis: str, batch_size: int, n_batches: int, device: str) -> None:
    """In a fresh process: one batch through the analysis, then `n_batches`; prints the peak memory (MiB) after
    each as JSON. The batches are made one at a time, so the analysis alone decides what is kept."""
    device = torch.device(device)
    model = models.build(model_name).to(device)
    batches = common.fixed_batches(batch_size, batch_size, device)
    peaks = []
    for count in (1, n_batches):
        ANALYSES[analysis](model, (batch for _ in range(count) for batch in batches))
        peaks.append(peak_memory_mib(device))
    print(json.dumps(peaks))


def memory_growth(model_name: str, analysis: str, batch_size: int, n_batches: int, device) -> tuple[float, float]:
    code = (f"from benchmarks.analysis_overhead import memory_probe; "
            f"memory_probe({model_name!r}, {analysis!r}, {batch_size}, {n_batches}, {str(device)!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1],  # where `benchmarks` imports from
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if result.returncode:
        raise RuntimeError(f"the memory probe of {analysis} failed:\n{result.stderr}")
    small, large = json.loads(result.stdout.splitlines()[-1])
    return small, large


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def parser():
    p = common.parser("benchmarks.analysis_overhead", __doc__, models_default=["resnet20", "resnet56", "plain56"])
    p.add_argument("--images", type=positive_int, default=512, help="images per timed pass (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="default 128; the last batch is smaller where it does not divide --images")
    p.add_argument("--memory-batches", type=positive_int, default=8,
                   help="the memory probe compares 1 batch with this many (default 8; 1 skips the probe)")
    return p


def measure(args, device: torch.device) -> common.Report:
    batch_size = min(args.batch_size, args.images)
    report = common.Report(f"seconds for {args.images} images in batches of {batch_size}, median of {args.repeats} "
                           "interleaved rounds after a warm-up round, fp32",
                           ["model", "forward", "responses", "ratio", "fwd+bwd", "gradients", "ratio"])
    worst = {"responses": 0.0, "gradients": 0.0}
    with common.progress(len(args.models) * (args.repeats + 1) * 4, "analysis_overhead") as progress:
        for name in args.models:
            model = models.build(name).to(device)
            batches = common.fixed_batches(args.images, batch_size, device)
            runs = {"forward": lambda: bare_forward(model, batches),
                    "responses": lambda: layer_responses(model, batches),
                    "backward": lambda: bare_backward(model, batches),
                    "gradients": lambda: gradient_norms(model, batches)}
            t = common.interleaved(runs, args.repeats, device, progress)
            ratios = {"responses": t["responses"] / t["forward"], "gradients": t["gradients"] / t["backward"]}
            worst = {key: max(worst[key], ratios[key]) for key in worst}
            report.rows.append([name, f"{t['forward']:.2f}", f"{t['responses']:.2f}", f"{ratios['responses']:.2f}x",
                                f"{t['backward']:.2f}", f"{t['gradients']:.2f}", f"{ratios['gradients']:.2f}x"])
    report.targets += [
        common.Target(f"responses / bare eval forward, worst of {', '.join(args.models)}", worst["responses"], 1.3,
                      at_most=True),
        common.Target(f"gradients / bare forward+backward, worst of {', '.join(args.models)}", worst["gradients"],
                      1.1, at_most=True)]
    if args.memory_batches > 1:
        what = "peak allocated GPU memory" if device.type == "cuda" else "peak resident memory"
        for analysis in ANALYSES:
            small, large = memory_growth(args.models[0], analysis, batch_size, args.memory_batches, device)
            report.notes.append(f"{what} of {analysis} on {args.models[0]}: {small:.0f} MiB after 1 batch of "
                                f"{batch_size}, {large:.0f} MiB after a pass over {args.memory_batches}")
            report.targets.append(common.Target(f"{what} of {analysis}, {args.memory_batches} batches / 1 batch",
                                                large / small, 1.1, at_most=True))
    return report


def main(argv=None) -> None:
    common.main(parser, measure, argv)


if __name__ == "__main__":
    sys.exit(main_guard(main))
