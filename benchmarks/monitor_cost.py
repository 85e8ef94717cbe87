"""Cost of the BN monitor in training: the trainer's own `train_epoch` with and without `BNMonitor`, and the
attribution of each validation (target: both together at most 3% of training time at the trainer's defaults,
`--monitor-every auto` (100 on runs of 5,000 steps and more) `--monitor-images 128 --attribution-images 2000
--recalibration-images 512`, on full Fashion-MNIST epochs).

Same model, batches and optimiser with and without the monitor, in interleaved rounds; the monitor is made as
the trainer makes it (its probe: the first --probe-images training images, augmented once; the training's
autocast dtype). A measurement costs the same whatever the interval, so a shorter --every with fewer steps
measures the same cost per measurement sooner. Two figures for the target at the default interval:
- measured: (epoch with the monitor / epoch without - 1) at --every E, times E / D (D: the trainer's default
  interval, 100);
- from the measurement time: one `BNMonitor.measure` timed alone / (D x the time of a training step).
The attribution: one `BNMonitor.validate` (statistics recomputed over --recalibration-images training images,
--attribution-images validation images evaluated with them; the running-statistics pass is the validation's own) per
epoch of --epoch-images images, as a share of that epoch's training steps.

Run: `python -m benchmarks.monitor_cost [--models resnet56 plain56] [--steps 40] [--every 10] [--bf16]`.
"""
import sys

import torch

import models
from analyses.evaluate import predict
from analyses.monitor import BNMonitor
from diagnostics.common import main_guard
from train.batches import EvalBatches, augmented_once, recalibration_inputs
from train.config import MONITOR_LONGEST, Config
from train.errors import UserError, positive_int

from . import common

TRAINER = Config(model="", dataset="", out="")  # the trainer's defaults: monitor_images, attribution_images
AUTO_EVERY = MONITOR_LONGEST  # --monitor-every auto's interval for runs of 5,000 steps and more


def parser():
    p = common.parser("benchmarks.monitor_cost", __doc__, models_default=["resnet56", "plain56"])
    common.add_data_options(p)
    p.add_argument("--steps", type=positive_int, default=40, help="training steps per timed epoch (default 40)")
    p.add_argument("--every", type=positive_int, default=10,
                   help=f"the monitor's interval in steps (default 10; the trainer's auto: {AUTO_EVERY} on long runs)")
    p.add_argument("--probe-images", type=positive_int, default=TRAINER.monitor_images,
                   help=f"the monitor's probe (default {TRAINER.monitor_images}, as the trainer's)")
    p.add_argument("--attribution-images", type=positive_int, default=TRAINER.attribution_images,
                   help=f"the attribution's images (default {TRAINER.attribution_images}, as the trainer's)")
    p.add_argument("--recalibration-images", type=positive_int, default=TRAINER.recalibration_images,
                   help=f"the attribution's recalibration (default {TRAINER.recalibration_images}, as the trainer's)")
    p.add_argument("--epoch-images", type=positive_int, default=60_000,
                   help="the training epoch the attribution's cost is a share of (default 60000: Fashion-MNIST)")
    p.add_argument("--bf16", action="store_true", help="also time bf16 where the device has no native bf16")
    return p


def time_monitor(name: str, amp_dtype, batches, probe, probe_images, attribution, args, progress
                 ) -> tuple[dict, float]:
    """Median seconds of an epoch without the monitor, with it, of one measurement alone and of one attribution,
    on one model; and how many measurements the monitor made in each epoch with it (counted from its record)."""
    torch.manual_seed(0)
    model = models.build(name, num_classes=batches.spec.num_classes, in_channels=batches.spec.in_channels)
    model.to(batches.device, memory_format=torch.channels_last)
    optimizer = common.sgd(model, fused=batches.device.type == "cuda")
    monitor = BNMonitor(model, probe_images, probe.labels, every=args.every, autocast=amp_dtype,
                        probe=f"the first {len(probe)} training images, augmented once", optimizer=optimizer)
    model.eval()
    running = predict(model, attribution[0], amp_dtype)  # the validation's own pass (no_grad), not timed
    seconds = common.interleaved({
        "without": lambda: common.trainer_epoch(model, batches, optimizer, amp_dtype),
        "with": lambda: common.trainer_epoch(model, batches, optimizer, amp_dtype, monitor),
        "measure": lambda: monitor.measure(0),  # step 0: told apart from the epoch's own in the record
        "attribute": lambda: monitor.validate(*attribution, dtype=amp_dtype, running=running),
    }, args.repeats, batches.device, progress)
    return seconds, sum(step > 0 for step in monitor.records["step"]) / (args.repeats + 1)


def measure(args, device: torch.device) -> common.Report:
    if args.every > args.steps:
        raise UserError(f"--steps {args.steps} would hold no measurement at --every {args.every}; give --steps at "
                        f"least {args.every}")
    with_bf16, _, bf16_reason = common.bf16_plan(device, args.bf16)
    precisions = {"fp32": None} | ({"bf16": torch.bfloat16} if with_bf16 else {})
    images, spec = common.benchmark_images(args.dataset, max(args.steps * args.batch_size, args.probe_images,
                                                              args.attribution_images, args.recalibration_images),
                                               args.data_dir)
    attributed = images[:args.attribution_images]
    attribution = (EvalBatches(attributed, spec, TRAINER.eval_batch_size, device, channels_last=True),
                   recalibration_inputs(images[:args.recalibration_images], spec, "crop-flip", args.batch_size, device,
                                        channels_last=True))
    epoch_steps = -(-args.epoch_images // args.batch_size)
    batches = common.trainer_batches(images[:args.steps * args.batch_size], spec, args.batch_size, device)
    probe = images[:args.probe_images]
    probe_images = augmented_once(probe, spec, "crop-flip", device)
    default = AUTO_EVERY
    n = args.steps // args.every
    report = common.Report(
        f"seconds, median of {args.repeats} interleaved rounds after a warm-up round: an epoch of {args.steps} "
        f"steps of batch {args.batch_size} on {args.dataset} without and with the monitor every {args.every} steps "
        f"({n} measurements of a {len(probe)}-image probe); cost at the trainer's every {default}",
        ["model", "precision", "s/step", "without", "with", "measured/epoch", "cost", "s/measurement",
         f"at {default}: measured", "from s/measurement", "s/attribution", "attribution/epoch", "together"],
        notes=[common.bf16_note(with_bf16, bf16_reason),
               f"attribution: statistics recomputed over {args.recalibration_images} training images, "
               f"{args.attribution_images} validation images evaluated with them, once per epoch of "
               f"{args.epoch_images:,} images ({epoch_steps} steps)"])
    with common.progress(len(args.models) * len(precisions) * (args.repeats + 1) * 4, "monitor_cost") as progress:
        for name in args.models:
            for precision, amp_dtype in precisions.items():
                t, per_epoch = time_monitor(name, amp_dtype, batches, probe, probe_images, attribution, args,
                                            progress)
                step = t["without"] / args.steps
                cost = t["with"] / t["without"] - 1
                at_default, from_measure = cost * args.every / default, t["measure"] / (default * step)
                attributing = t["attribute"] / (epoch_steps * step)
                report.rows.append([name, precision, f"{step:.3f}", f"{t['without']:.2f}", f"{t['with']:.2f}",
                                    f"{per_epoch:g}", f"{cost:.1%}", f"{t['measure']:.3f}", f"{at_default:.1%}",
                                    f"{from_measure:.1%}", f"{t['attribute']:.2f}", f"{attributing:.1%}",
                                    f"{at_default + attributing:.1%}"])
                report.targets.append(common.monitor_budget(
                    f"{name} {precision} BN monitor at every {default} steps and the attribution, measured",
                    at_default, from_measure, attributing))
    return report


def main(argv=None) -> None:
    common.main(parser, measure, argv)


if __name__ == "__main__":
    sys.exit(main_guard(main))
