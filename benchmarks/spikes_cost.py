"""Cost of the spike diagnosis of an N-epoch run against N plain validation passes (target: at most 4x).

The diagnosis evaluates every epoch checkpoint three times (running, recalibrated and batch BN statistics) and
recalibrates once over `--recal-images` training images; the baseline loads each checkpoint and evaluates it
once, BN in eval mode, on the same validation images. Both run in this process after the images are loaded.

Run: `python -m benchmarks.spikes_cost [--run RUN_DIR]` (default: trains a 4-epoch resnet20 on 2,048
Fashion-MNIST images into a temporary folder first).
"""
import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch

from analyses.evaluate import evaluate
from diagnostics import common
from diagnostics.spikes import main as spikes_main
from diagnostics.spikes import parser as spikes_parser
from train import rundir
from train.__main__ import main as train_main

from .common import machine_line, synchronize


def plain_validation(run_dir: Path, args, device) -> float:
    """Seconds to load every epoch checkpoint and evaluate it once."""
    synchronize(device)
    started = time.perf_counter()
    for path in rundir.run_checkpoints(run_dir):
        loaded = common.load_checkpoint(path, args, device)
        evaluate(loaded.model, common.image_batches(loaded, args, device), bn_mode="eval")
    synchronize(device)
    return time.perf_counter() - started


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a run directory (default: train a small one)")
    p.add_argument("--recal-images", type=int, default=2000)
    options = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as folder:
        run = options.run
        if run is None:
            run = Path(folder) / "run"
            with contextlib.redirect_stdout(io.StringIO()):
                train_main(["--model", "resnet20", "--dataset", "fashion-mnist", "--train-images", "2048",
                            "--epochs", "4", "--out", str(run)])
        args = spikes_parser().parse_args([str(run), "--recal-images", str(options.recal_images)])
        epochs = len(rundir.run_checkpoints(run))
        plain_validation(run, args, device)  # warm-up: reads the images once for both
        baseline = plain_validation(run, args, device)
        synchronize(device)
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            spikes_main([str(run), "--recal-images", str(options.recal_images), "--out", str(Path(folder) / "out")])
        synchronize(device)
        diagnosis = time.perf_counter() - started
        n_val = common.image_batches(common.load_checkpoint(rundir.run_checkpoints(run)[0], args, device), args,
                                     device).n_images
    print(machine_line(device))
    print(f"{epochs} epoch checkpoints, {n_val} validation images, {options.recal_images} recalibration images")
    print(f"{'plain validation':<18} {baseline:>8.1f} s")
    print(f"{'spike diagnosis':<18} {diagnosis:>8.1f} s")
    print(f"summary: the spike diagnosis costs {diagnosis / baseline:.2f}x {epochs} plain validation passes "
          "(target 4x)")


if __name__ == "__main__":
    main()
