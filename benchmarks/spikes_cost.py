"""Cost of the spike diagnosis of an N-epoch run against N plain validation passes (target: at most 4x).

The diagnosis is `python -m diagnostics.spikes RUN_DIR` run in this process through its command-line entry
(`diagnostics.spikes.main`), figure and files included; the baseline loads each epoch checkpoint and evaluates
it once, BN in eval mode, on the same validation images (the same --n-images, --batch-size and --data-dir are
given to both). One baseline pass first reads the images; then rounds of both, interleaved, median.

Run: `python -m benchmarks.spikes_cost [--run RUN_DIR]` (default: trains a 4-epoch resnet20 on 2,048
Fashion-MNIST images into a temporary folder first; --model, --dataset, --train-images, --epochs say otherwise).
"""
import sys
import tempfile
from pathlib import Path

import torch

from analyses.evaluate import evaluate
from diagnostics import common as diagnostics_common
from diagnostics.spikes import main as spikes_main
from train import datasets, rundir
from train.__main__ import main as train_main
from train.errors import UserError, positive_int
from train.trainer import choose_device

from . import common


def parser():
    p = common.parser("benchmarks.spikes_cost", __doc__, models_default=None, repeats=3)
    p.add_argument("--run", type=Path, help="a run directory to diagnose (default: train a small one)")
    p.add_argument("--model", type=common.model_name, default="resnet20", help="the model of the run trained")
    p.add_argument("--dataset", choices=tuple(datasets.SPECS), default="fashion-mnist", help="the run's dataset")
    p.add_argument("--data-dir", default=str(datasets.default_data_dir()))
    p.add_argument("--train-images", type=positive_int, default=2048, help="the run's training images")
    p.add_argument("--epochs", type=positive_int, default=4, help="the run's epochs, each with a checkpoint")
    p.add_argument("--n-images", type=positive_int, help="validation images (default: all of the run's split)")
    p.add_argument("--batch-size", type=positive_int, help="evaluation batch (default: the run's training batch)")
    p.add_argument("--recal-images", type=positive_int,
                   help="the diagnosis's recalibration images (default: its own, the run's --recalibration-images)")
    return p


def train_run(args, out: Path) -> Path:
    """A small run of --model on --dataset, one checkpoint an epoch; its lines go nowhere, its errors through."""
    common.quietly(train_main, ["--model", args.model, "--dataset", args.dataset, "--data-dir", args.data_dir,
                                "--train-images", str(args.train_images), "--batch-size",
                                str(min(128, args.train_images)), "--epochs", str(args.epochs), "--device",
                                args.device, "--out", str(out)])
    return out


def baseline_args(run: Path, shared: list[str]):
    return diagnostics_common.parser("spikes", "", inputs="runs", n_images=None, batch_size=None).parse_args(
        [str(run), *shared])


def plain_validation(run: Path, shared: list[str]) -> None:
    """Load every epoch checkpoint and evaluate it once, BN in eval mode."""
    args = baseline_args(run, shared)
    device = choose_device(args.device)
    for path in rundir.run_checkpoints(run):
        loaded = diagnostics_common.load_checkpoint(path, args, device)
        evaluate(loaded.model, diagnostics_common.image_batches(loaded, args, device), bn_mode="eval")


def validation_images(run: Path, shared: list[str]) -> int:
    args = baseline_args(run, shared)
    loaded = diagnostics_common.load_checkpoint(rundir.run_checkpoints(run)[0], args)
    return diagnostics_common.image_batches(loaded, args, "cpu").n_images


def measure(args, device: torch.device) -> common.Report:
    with tempfile.TemporaryDirectory() as folder:
        if args.run is not None and not rundir.is_run_dir(args.run):
            raise UserError(f"--run {args.run} is not a run directory (no config.json); give a folder python -m "
                            "train wrote, or leave --run out to train one")
        run = args.run or train_run(args, Path(folder) / "run")
        epochs = len(rundir.run_checkpoints(run))
        if not epochs:
            raise UserError(f"--run {run} has no epoch checkpoints yet; let it finish an epoch")
        config = rundir.read_config(run)
        batch_size = args.batch_size or config.get("per_device_batch") or 128
        shared = ["--data-dir", args.data_dir, "--device", device.type, "--batch-size", str(batch_size)]
        shared += ["--n-images", str(args.n_images)] if args.n_images else []
        recal = args.recal_images or diagnostics_common.run_recal_images(config)
        runs = {"baseline": lambda: plain_validation(run, shared),
                "diagnosis": lambda: common.quietly(spikes_main, [str(run), *shared, "--recal-images", str(recal),
                                                                  "--out", str(Path(folder) / "out")])}
        rounds = {}
        with common.progress(1 + 2 * args.repeats, "spikes_cost") as progress:
            seconds = common.interleaved(runs, args.repeats, device, progress, warm_up=["baseline"], rounds=rounds)
        n_val = validation_images(run, shared)
    report = common.Report(f"{epochs} epoch checkpoints of {run if args.run else 'a fresh ' + args.model + ' run'}, "
                           f"{n_val} validation images in batches of {batch_size}, {recal} "
                           f"recalibration images; median of {args.repeats} interleaved rounds",
                           ["", "seconds (median)", "each round"],
                           [[f"{epochs} plain validation passes", f"{seconds['baseline']:.1f}",
                             " ".join(f"{t:.1f}" for t in rounds["baseline"])],
                            ["the spike diagnosis", f"{seconds['diagnosis']:.1f}",
                             " ".join(f"{t:.1f}" for t in rounds["diagnosis"])],
                            ["ratio", f"{seconds['diagnosis'] / seconds['baseline']:.2f}x", " ".join(
                                f"{d / b:.2f}x" for b, d in zip(rounds["baseline"], rounds["diagnosis"]))]])
    report.targets.append(common.Target(f"spike diagnosis / {epochs} plain validation passes",
                                        seconds["diagnosis"] / seconds["baseline"], 4.0, at_most=True))
    return report


def main(argv=None) -> None:
    common.main(parser, measure, argv)


if __name__ == "__main__":
    sys.exit(diagnostics_common.main_guard(main))
