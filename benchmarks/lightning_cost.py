"""Cost of the BN monitor as a PyTorch Lightning callback: a real `pytorch_lightning.Trainer` fitting the same
LightningModule with and without `train.lightning.BNMonitorCallback`, and the callback's attribution of each
validation (target: both together at most 3% of training time at the callback's defaults, the BN monitor's own
budget: `every="auto"` (100 on fits of 5,000 steps and more), its probe of 256 images, 2,000 validation images
attributed with statistics recomputed over 2,000 training images, on full Fashion-MNIST epochs).

Each timed run is one `Trainer.fit` of a fresh LightningModule (our model under `self.model`, SGD lr 0.1 momentum
0.9 weight decay 5e-4, fp32) over --steps batches of synthetic 28x28 one-channel images held in memory (the data
path is not what is timed): one epoch, no validation loader, no checkpoint, no progress bar, and a CSVLogger in a
temporary folder in both arms, so that the callback's logging and its monitor.nc (written at the end of the epoch
and of the fit) are counted. Rounds interleave with and without. A measurement costs the same whatever the
interval, so a short --every E measures the cost per measurement sooner; two figures at the default interval D:
- measured: (fit with / fit without - 1) x (--steps / measurements made) / D, the measurements counted from the
  callback's record (it starts once its probe is complete: after the second batch of 128);
- from the measurement time: one `BNMonitor.measure` of the callback's monitor timed alone / (D x a step).
The attribution: one `BNMonitor.validate` called as the callback calls it at a validation (the running-statistics
pass is the validation loop's own, whose logits the callback takes; statistics recomputed over the training images,
the same images evaluated with them) per epoch of --epoch-images images, as a share of that epoch's training steps.

--cpu-time times each run by this process's CPU seconds instead of wall-clock seconds: on a CPU core that other
processes share, wall-clock seconds say who else ran (one fit's steps took 0.33 to 1.6 s on such a core), CPU
seconds what the work cost. Not on a GPU, whose work is not this process's CPU time.

Run: `python -m benchmarks.lightning_cost [--models resnet20 resnet56] [--steps 20] [--every 10] [--cpu-time]`.
"""
import contextlib
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import models
from analyses.evaluate import predict
from diagnostics.common import main_guard
from train.config import MONITOR_LONGEST
from train.errors import UserError, positive_int
from train.lightning import BNMonitorCallback

from . import common

AUTO_EVERY = MONITOR_LONGEST  # every="auto"'s interval for fits of 5,000 steps and more
DEFAULTS = BNMonitorCallback()  # the callback's defaults: its probe, attributed and recalibration images


def parser():
    p = common.parser("benchmarks.lightning_cost", __doc__, models_default=["resnet20"])
    p.add_argument("--batch-size", type=positive_int, default=128, help="default 128")
    p.add_argument("--steps", type=positive_int, default=20, help="training steps per timed fit (default 20)")
    p.add_argument("--every", type=positive_int, default=10,
                   help=f"the callback's interval in steps (default 10; its auto: {AUTO_EVERY} on long fits)")
    p.add_argument("--probe-images", type=positive_int, default=DEFAULTS.probe_images,
                   help=f"the callback's probe (default {DEFAULTS.probe_images}, the callback's)")
    p.add_argument("--attribution-images", type=positive_int, default=DEFAULTS.attribution_images,
                   help=f"validation images attributed (default {DEFAULTS.attribution_images}, the callback's)")
    p.add_argument("--recalibration-images", type=positive_int, default=DEFAULTS.recalibration_images,
                   help=f"training images the statistics are recomputed over (default "
                        f"{DEFAULTS.recalibration_images}, the callback's)")
    p.add_argument("--epoch-images", type=positive_int, default=60_000,
                   help="the training epoch the attribution's cost is a share of (default 60000: Fashion-MNIST)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by this process's CPU seconds, not wall-clock seconds (a CPU shared with other work)")
    return p


class Classifier(pl.LightningModule):
    """A user's module, as in tests/test_lightning.py: the network under `self.model`, SGD with weight decay."""

    def __init__(self, name: str):
        super().__init__()
        self.model = models.build(name, num_classes=10, in_channels=1)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def synthetic(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=generator),
                         torch.randint(0, 10, (n,), generator=generator))


def batches(dataset: TensorDataset, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of a loader over `dataset`, as the callback keeps them (on the CPU)."""
    return list(DataLoader(dataset, batch_size=batch_size))


@contextlib.contextmanager
def quiet():
    """Lightning's banner and advice (workers, logging interval: about real data sets, not batches in memory) and
    the callback's prescription would fill the output once per fit; printing them is still timed."""
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", module="pytorch_lightning")
            yield
    finally:
        logger.setLevel(level)


def fit(name: str, train: TensorDataset, args, device: torch.device, callback: BNMonitorCallback | None) -> None:
    """One epoch of a fresh module (the same initial weights in every fit), the callback given or none."""
    torch.manual_seed(0)
    module = Classifier(name)
    with tempfile.TemporaryDirectory() as folder, quiet():
        trainer = pl.Trainer(max_epochs=1, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                             logger=pl.loggers.CSVLogger(folder), callbacks=[callback] if callback else [],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0)
        trainer.fit(module, DataLoader(train, batch_size=args.batch_size))


def time_callback(name: str, train, attribution, args, device, progress) -> tuple[dict, int]:
    """Median seconds of a fit without the callback, with it, of one measurement alone and of one attribution;
    and how many measurements the callback made in a fit (counted from its record)."""
    made = []  # the callbacks of the fits with one: the latest one's monitor is timed alone
    own = predict(Classifier(name).to(device).eval(), attribution[0])  # untimed: its values do not change the cost

    def with_callback():
        made.append(BNMonitorCallback(args.every, probe_images=args.probe_images,
                                      attribution_images=args.attribution_images,
                                      recalibration_images=args.recalibration_images))
        fit(name, train, args, device, made[-1])

    runs = {
        "without": lambda: fit(name, train, args, device, None),
        "with": with_callback,
        "measure": lambda: made[-1].monitor.measure(0),  # step 0: told apart from the fit's own in the record
        # as at a validation: the running-statistics pass is the validation loop's own (the callback takes the
        # module's logits from it), so only the recomputation and the pass with its statistics are the callback's
        "attribute": lambda: made[-1].monitor.validate(*attribution, running=own, step=0, epoch=1),
    }
    cpu_seconds = {key: [] for key in runs}
    if args.cpu_time:
        runs = {key: on_cpu_clock(function, cpu_seconds[key]) for key, function in runs.items()}
    seconds = common.interleaved(runs, args.repeats, device, progress)
    if args.cpu_time:  # the same rounds; the first of each run is the warm-up round's
        seconds = {key: statistics.median(values[1:]) for key, values in cpu_seconds.items()}
    return seconds, sum(step > 0 for step in made[-1].monitor.records["step"])


def on_cpu_clock(function, seconds: list):
    """`function`, appending the CPU seconds it took this process to `seconds`."""
    def run():
        started = time.process_time()
        function()
        seconds.append(time.process_time() - started)
    return run


def measure(args, device: torch.device) -> common.Report:
    if args.cpu_time and device.type != "cpu":
        raise UserError("--cpu-time times work on the CPU; on a GPU give wall-clock seconds (leave it out)")
    if args.every > args.steps:
        raise UserError(f"--steps {args.steps} would hold no measurement at --every {args.every}; give --steps at "
                        f"least {args.every}")
    train = synthetic(args.steps * args.batch_size, 0)
    # The callback keeps the first training and validation batches of their loaders for the attribution.
    attribution = (batches(synthetic(args.attribution_images, 1), args.batch_size),
                   batches(synthetic(args.recalibration_images, 2), args.batch_size))
    epoch_steps = -(-args.epoch_images // args.batch_size)
    default = AUTO_EVERY
    percent = lambda share: "-" if share is None else f"{share:.1%}"
    clock = "CPU seconds" if args.cpu_time else "seconds"
    report = common.Report(
        f"{clock}, median of {args.repeats} interleaved rounds after a warm-up round: a Lightning fit of "
        f"{args.steps} steps of batch {args.batch_size} (synthetic 28x28, one channel) without and with "
        f"BNMonitorCallback every {args.every} steps ({args.probe_images}-image probe); cost at its every {default}",
        ["model", "precision", "s/step", "without", "with", "measured/fit", "cost", "s/measurement",
         f"at {default}: measured", "from s/measurement", "s/attribution", "attribution/epoch", "together"],
        notes=[f"attribution: {args.attribution_images} validation images, statistics recomputed over "
               f"{args.recalibration_images} training images, once per epoch of {args.epoch_images:,} images "
               f"({epoch_steps} steps); precision 32-true (fp32) only"])
    with common.progress(len(args.models) * (args.repeats + 1) * 4, "lightning_cost") as progress:
        for name in args.models:
            t, n = time_callback(name, train, attribution, args, device, progress)
            step = t["without"] / args.steps
            cost = t["with"] / t["without"] - 1
            at_default = cost * args.steps / (n * default) if n else None
            from_measure = t["measure"] / (default * step)
            attributing = t["attribute"] / (epoch_steps * step)
            together = at_default + attributing if n else None
            report.rows.append([name, "fp32", f"{step:.3f}", f"{t['without']:.2f}", f"{t['with']:.2f}", f"{n}",
                                f"{cost:.1%}", f"{t['measure']:.3f}", percent(at_default), f"{from_measure:.1%}",
                                f"{t['attribute']:.2f}", f"{attributing:.1%}", percent(together)])
            report.targets.append(common.monitor_budget(
                f"{name} fp32 BNMonitorCallback at every {default} steps and the attribution, measured", at_default,
                from_measure, attributing, missing=f"no measurement in a fit of {args.steps} steps: give more --steps"))
    return report


def main(argv=None) -> None:
    common.main(parser, measure, argv)


if __name__ == "__main__":
    sys.exit(main_guard(main))
