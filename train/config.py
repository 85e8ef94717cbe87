"""Training options: argparse -> `Config` (a dataclass saved whole in config.json and every checkpoint).

Precedence: the dataclass defaults, then the preset, then what the command line says.
"""
import argparse
import math
from dataclasses import dataclass, field, fields

import models

from .data import AUGMENTATIONS, SPECS, default_data_dir
from .errors import ArgumentParser, UserError, positive_int

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine", "multistep")
PRESETS = {
    # He et al. 2016, Sec. 4.2: 64k iterations of batch 128, lr /10 at 32k and 48k, all 50k training images.
    "he2016": dict(lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128, schedule="multistep",
                   milestones=[32000, 48000], iterations=64000, epochs=None, augment="crop-flip", warmup=0,
                   keep="5"),
    # The short skip / no-skip studies this toolkit explains: 20 epochs cosine to 0, no warm-up.
    "ablation": dict(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128, schedule="cosine",
                     milestones=[], epochs=20, iterations=None, augment="crop-flip", warmup=0, keep="all"),
}


@dataclass
class Config:
    model: str
    dataset: str
    out: str
    skip: bool = True
    shortcut: str | None = None  # None: the model's default (A for CIFAR ResNets, B for ResNet-18..101)
    bn: bool = True
    zero_init_residual: bool = False
    head: str | None = None
    dropout: float | None = None
    data_dir: str = field(default_factory=lambda: str(default_data_dir()))
    preset: str = "ablation"
    augment: str = "crop-flip"
    epochs: int | None = 20
    iterations: int | None = None
    batch_size: int = 128  # global: split evenly across processes
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)  # iterations; multistep divides the lr by 10 at each
    warmup: int = 0  # iterations of linear warm-up
    label_smoothing: float = 0.0
    bn_momentum: float = 0.1  # PyTorch's convention: running = (1 - m) * running + m * batch
    precise_bn: int = 0  # training images used to recompute BN statistics before each validation; 0 = off
    seed: int = 0
    train_images: int | None = None
    val_split: int = 0
    precision: str = "auto"
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    keep: str = "all"
    eval_batch_size: int = 512
    workers: int = 2
    sync_bn: bool = False
    # Resolved when the run starts, so that every checkpoint says what the run actually did:
    world_size: int = 1
    per_device_batch: int = 128
    precision_used: str = ""
    device_used: str = ""
    steps_per_epoch: int = 0
    total_steps: int = 0
    total_epochs: int = 0

    def model_kwargs(self, num_classes: int, in_channels: int) -> dict:
        kwargs = {"num_classes": num_classes, "in_channels": in_channels}
        if not self.bn:
            kwargs["bn"] = False
        if not self.skip:
            kwargs["skip"] = False
        for name in ("shortcut", "head", "dropout"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.zero_init_residual:
            kwargs["zero_init_residual"] = True
        return kwargs

    def resolve_length(self, steps_per_epoch: int) -> None:
        """Schedules are in iterations; `--epochs N` means N whole epochs of `steps_per_epoch`."""
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = self.iterations if self.iterations else self.epochs * steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / steps_per_epoch)
        if self.schedule == "multistep" and not self.milestones:
            self.milestones = [self.total_steps // 2, self.total_steps * 3 // 4]
        if self.schedule == "multistep" and max(self.milestones) >= self.total_steps:
            raise UserError(f"--milestones {' '.join(map(str, self.milestones))} reach past the run's "
                            f"{self.total_steps} iterations; give milestones below it")


def lr_factor(config: Config, step: int) -> float:
    """The learning rate of step `step` (0-based) as a fraction of `config.lr`."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "cosine":
        progress = (step - config.warmup) / max(1, config.total_steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "multistep":
        return 0.1 ** sum(step >= milestone for milestone in config.milestones)
    return 1.0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m train", description="Train a plain or residual CNN and write a "
                                "run directory (config.json, metrics.csv, epoch checkpoints).")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"one of: {', '.join(models.available())}")
    g.add_argument("--no-skip", dest="skip", action="store_false", default=None, help="remove the shortcuts")
    g.add_argument("--shortcut", choices=("A", "B", "C"))
    g.add_argument("--no-bn", dest="bn", action="store_false", default=None, help="BatchNorm -> Identity")
    g.add_argument("--zero-init-residual", action="store_true", default=None)
    g.add_argument("--head", choices=("linear", "fc4096"), help="VGG's classifier")
    g.add_argument("--dropout", type=float, help="dropout of VGG's FC-4096 head")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"one of: {', '.join(SPECS)}")
    g.add_argument("--data-dir", help="where datasets live (default ./data or $RESNET_DIAG_DATA)")
    g.add_argument("--augment", choices=AUGMENTATIONS)
    g.add_argument("--train-images", type=positive_int, help="use the first N training images")
    g.add_argument("--val-split", type=int, help="hold out the last N training images for validation "
                   "(default: validate on the test split, as the paper's curves)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--preset", choices=tuple(PRESETS))
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int)
    length.add_argument("--iterations", type=positive_int)
    g.add_argument("--batch-size", type=positive_int)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--milestones", type=int, nargs="+", help="iterations at which multistep divides lr by 10")
    g.add_argument("--warmup", type=int, help="iterations of linear warm-up")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--bn-momentum", type=float)
    g.add_argument("--precise-bn", type=int, metavar="N", help="recompute BN statistics over N training images "
                   "before each validation (0 = off)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("execution")
    g.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    g.add_argument("--compile", action="store_true", default=None)
    g.add_argument("--deterministic", action="store_true", default=None)
    g.add_argument("--sync-bn", action="store_true", default=None, help="synchronise BN across GPUs")
    g.add_argument("--eval-batch-size", type=positive_int)
    g.add_argument("--workers", type=int, help="DataLoader workers for AutoAugment")
    g.add_argument("--keep", help="epoch checkpoints to keep: all, last, or N (every N-th)")
    g.add_argument("--out", metavar="RUN_DIR", help="the run directory to create")
    return p


def from_args(args: argparse.Namespace) -> Config:
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    for required in ("model", "dataset", "out"):
        if required not in given:
            raise UserError(f"--{required} is required (or --resume RUN_DIR to continue a run)")
    preset = given.get("preset", "ablation")
    values = {**PRESETS[preset], **given}
    if "epochs" in given:
        values["iterations"] = None
    if "iterations" in given:
        values["epochs"] = None
    if ("epochs" in given or "iterations" in given) and "milestones" not in given:
        values["milestones"] = []  # the preset's are for its own length: derive them for the new one
    config = Config(**values)
    validate(config)
    return config


def validate(config: Config) -> None:
    models.canonical(config.model, **config.model_kwargs(1, 1))  # name and arguments, before any work
    if config.dataset not in SPECS:
        raise UserError(f"unknown dataset {config.dataset!r}; choose one of: {', '.join(SPECS)}")
    positive = {"--batch-size": config.batch_size, "--eval-batch-size": config.eval_batch_size,
                "--epochs": config.epochs if config.iterations is None else 1,
                "--iterations": config.iterations if config.epochs is None else 1}
    for option, value in positive.items():
        if value is None or value < 1:
            raise UserError(f"{option} must be a positive integer, not {value}")
    non_negative = {"--lr": config.lr, "--momentum": config.momentum, "--weight-decay": config.weight_decay,
                    "--warmup": config.warmup, "--precise-bn": config.precise_bn, "--val-split": config.val_split,
                    "--workers": config.workers}
    for option, value in non_negative.items():
        if value < 0:
            raise UserError(f"{option} must not be negative, not {value}")
    if not 0 <= config.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), not {config.label_smoothing}")
    if not 0 < config.bn_momentum <= 1:
        raise UserError(f"--bn-momentum must be in (0, 1], not {config.bn_momentum}")
    if config.keep not in ("all", "last") and not (config.keep.isdigit() and int(config.keep) > 0):
        raise UserError(f"--keep must be all, last or a positive integer, not {config.keep!r}")
    if config.train_images is not None and config.train_images < 1:
        raise UserError(f"--train-images must be a positive integer, not {config.train_images}")
