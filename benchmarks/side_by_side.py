"""Two of our processes side by side on one machine: how much of its solo speed does each keep?

A user trains today's run while diagnosing yesterday's checkpoints. Two processes: one training (the trainer's
work: forward, backward and SGD steps of --model on resident random images, fp32) and one diagnosing (eval
forward passes, as responses and evaluate make them), each timed alone and then both at once, under each
thread setting of --settings:
- ours: what our commands do when nothing is set (torch takes every core; OpenMP threads spin 10,000 times
  before they sleep, resnet_diagnostics.OPENMP_SPIN);
- libgomp: libgomp's own default, GOMP_SPINCOUNT=300000 (what our commands did before);
- passive: OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep at once);
- split: OMP_NUM_THREADS=cores/2 for each.
Both processes of a pair start together and each counts its steps over --seconds after one warm-up step. The
target (issue 30): each keeps at least 40% of its solo speed with ours. The figures of one machine vary by tens of
percent between runs (a shared VM): compare settings within one run, and run it twice.

Run: `python -m benchmarks.side_by_side [--model resnet20] [--seconds 15] [--settings ours libgomp passive split]`.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from diagnostics.common import main_guard
from train.errors import positive_float

from . import common

SETTINGS = {"ours": {}, "libgomp": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "split": {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}}
KINDS = ("train", "diagnose")
TARGET = 0.4


def parser():
    p = common.parser("benchmarks.side_by_side", __doc__, models_default=None, repeats=1)
    p.add_argument("--model", type=common.model_name, default="resnet20")
    p.add_argument("--seconds", type=positive_float, default=15.0, help="timed seconds of each run (default 15)")
    p.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS),
                   help="thread settings to compare (default: all)")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)  # one process of a pair
    return p


def work(kind: str, model_name: str, seconds: float) -> float:
    """Steps per second of one kind of work, after one warm-up step."""
    import models
    torch.manual_seed(0)
    model = models.build(model_name, num_classes=10)
    images, labels = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        if kind == "train":
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad():
                model.eval()
                model(images)

    step()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        count += 1
    return count / (time.perf_counter() - started)


def launch(kind: str, args, setting: str) -> subprocess.Popen:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    environment.update(SETTINGS[setting])
    return subprocess.Popen([sys.executable, "-m", "benchmarks.side_by_side", "--worker", kind, "--model",
                             args.model, "--seconds", str(args.seconds)], env=environment, stdout=subprocess.PIPE,
                            text=True)


def rates(processes: list[subprocess.Popen]) -> list[float]:
    return [json.loads(process.communicate()[0].strip().splitlines()[-1])["rate"] for process in processes]


def measure(args, device) -> common.Report:
    rows, targets = [], []
    for setting in args.settings:
        solo = {kind: rates([launch(kind, args, setting)])[0] for kind in KINDS}
        paired = dict(zip(KINDS, rates([launch(kind, args, setting) for kind in KINDS])))
        shares = {kind: paired[kind] / solo[kind] for kind in KINDS}
        rows.append([setting, *(f"{solo[kind]:.2f}" for kind in KINDS), *(f"{paired[kind]:.2f}" for kind in KINDS),
                     *(f"{100 * shares[kind]:.0f}%" for kind in KINDS)])
        if setting == "ours":
            targets += [common.Target(f"{kind} beside the other, share of its solo speed ({args.model}, fp32, "
                                      f"{os.cpu_count()} cores)", shares[kind], TARGET, unit="%") for kind in KINDS]
    return common.Report(
        heading=f"{args.model}, batch 128, fp32: steps per second alone and side by side ({args.seconds:g} s each)",
        header=["setting", "train alone", "diagnose alone", "train paired", "diagnose paired", "train kept",
                "diagnose kept"],
        rows=rows, targets=targets)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        print(json.dumps({"rate": work(args.worker, args.model, args.seconds)}))
        return 0
    return main_guard(lambda: common.main(parser, measure, argv))


if __name__ == "__main__":
    sys.exit(main())
