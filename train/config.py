"""Training options: argparse -> `Config` (a dataclass saved whole in config.json and every checkpoint).

Precedence: the dataclass defaults, then the preset, then what the command line says.
"""
import argparse
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import models
import resnet_diagnostics

from .batches import AUGMENTATIONS
from .datasets import SPECS, check_image_size, dataset_name, default_data_dir
from .errors import BAD_INPUT, MAX_INT, ArgumentParser, UserError, finite_float, non_negative_int, positive_int
from .step import COMPILE_MODES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine", "multistep")
MONITOR_MEASUREMENTS, MONITOR_LONGEST = 50, 100  # --monitor-every auto (monitor_interval)
SELECTIONS = ("running", "recalibrated")  # --select: which validation accuracy chooses best.pt
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
    projection_bias: bool = False
    head: str | None = None
    dropout: float | None = None
    data_dir: str = field(default_factory=lambda: str(default_data_dir()))
    image_size: int | None = None  # an image folder's images resized to this side (None: as they are)
    mean: list[float] | None = None  # normalisation per channel (None: the dataset's, an image folder's measured)
    std: list[float] | None = None
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
    compile: str = "auto"  # torch.compile: auto (where the run repays the warm-up), on, off (train.step)
    deterministic: bool = False
    keep: str = "all"
    eval_batch_size: int = 512
    workers: int = 2
    sync_bn: bool = False
    monitor_every: int | str = "auto"  # steps between BN monitor measurements (analyses.monitor); 0 = off; auto:
    # resolved when the run starts (monitor_interval) and stored as the number chosen
    monitor_images: int = 128  # the monitor's probe: the first N training images, augmented once
    attribution_images: int = 2000  # each validation also on its first N images with BN statistics recomputed
    # (analyses.monitor.attribute); 0 = off
    recalibration_images: int = 512  # ... recomputed over the first N training images (within 0.01 nats of 2,000's:
    # study/recalibration_size.py)
    select: str = "running"  # best.pt: the best validation accuracy with running or with recomputed statistics
    tensorboard: str | None = None  # a folder for TensorBoard event files (optional extra); None = off
    # Resolved when the run starts, so that every checkpoint says what the run actually did:
    world_size: int = 1
    per_device_batch: int = 128
    precision_used: str = ""
    precision_reason: str = ""
    compile_used: str = ""  # on or off, and why (--compile auto: the run's length against the warm-up)
    compile_reason: str = ""
    monitor_reason: str = ""  # why monitor_every is what it is (auto: the run's length)
    device_used: str = ""
    steps_per_epoch: int = 0
    total_steps: int = 0
    total_epochs: int = 0

    def model_kwargs(self, num_classes: int, in_channels: int) -> dict:
        """The builder's arguments: the dataset's, and each model option that differs from the builders' default."""
        return {"num_classes": num_classes, "in_channels": in_channels,
                **{name: False for name in ("bn", "skip") if not getattr(self, name)},
                **{name: getattr(self, name) for name in ("shortcut", "head", "dropout")
                   if getattr(self, name) is not None},
                **{name: True for name in ("zero_init_residual", "projection_bias") if getattr(self, name)}}

    def resolve_length(self, steps_per_epoch: int) -> None:
        """Schedules are in iterations; `--epochs N` means N whole epochs of `steps_per_epoch`. `--monitor-every
        auto` becomes the number of steps `monitor_interval` chooses for the run's length."""
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = self.iterations if self.iterations else self.epochs * steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / steps_per_epoch)
        if self.monitor_every == "auto":
            self.monitor_every = monitor_interval(self.total_steps)
            self.monitor_reason = (f"auto: {math.ceil(self.total_steps / self.monitor_every)} measurements over "
                                   f"{self.total_steps:,} steps, at most every {MONITOR_LONGEST} steps")
        elif not self.monitor_reason:
            self.monitor_reason = f"--monitor-every {self.monitor_every}"
        if self.schedule == "multistep" and not self.milestones:
            self.milestones = [self.total_steps // 2, self.total_steps * 3 // 4]
        if self.schedule == "multistep" and max(self.milestones) >= self.total_steps:
            raise UserError(f"--milestones {' '.join(map(str, self.milestones))} reach past the run's "
                            f"{self.total_steps} iterations; give milestones below it")


def monitor_interval(total_steps: int) -> int:
    """`--monitor-every auto`: about MONITOR_MEASUREMENTS measurements over the run, for a step view that reads,
    but at most every MONITOR_LONGEST steps. A measurement costs about 0.85 of a training step
    (docs/performance.md): every 100 steps is 0.85% of training, and a run shorter than 5,000 steps pays more for
    its step view (the demo's 184 steps, every 4: about a fifth)."""
    return min(MONITOR_LONGEST, max(1, math.ceil(total_steps / MONITOR_MEASUREMENTS)))


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
    p = ArgumentParser(prog=resnet_diagnostics.prog("train"), description="Train a plain or residual CNN and write a "
                                "run directory (config.json, metrics.csv, epoch checkpoints).")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"one of: {', '.join(models.available())}; or torchvision:NAME, timm:NAME "
                   "for a classification model of those libraries (untrained)")
    g.add_argument("--no-skip", dest="skip", action="store_false", default=None, help="remove the shortcuts")
    g.add_argument("--shortcut", choices=("A", "B", "C"))
    g.add_argument("--no-bn", dest="bn", action="store_false", default=None, help="BatchNorm -> Identity")
    g.add_argument("--zero-init-residual", action="store_true", default=None)
    g.add_argument("--projection-bias", action="store_true", default=None, help="give the 1x1 projection "
                   "shortcuts (B, C) a bias, as the parameter counts of some published ablations include")
    g.add_argument("--head", choices=("linear", "fc4096"), help="VGG's classifier")
    g.add_argument("--dropout", type=finite_float, help="dropout of VGG's FC-4096 head")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"one of: {', '.join(SPECS)}; or folder:PATH, a folder of images in "
                   "ImageFolder's layout (PATH/train/CLASS/*.png, PATH/val/CLASS/*.png)")
    g.add_argument("--data-dir", help="where datasets live (default ./data or $RESNET_DIAG_DATA)")
    g.add_argument("--image-size", type=positive_int, metavar="N", help="resize an image folder's images: shorter "
                   "side to N, then the centre N x N (default: they must all be one square size)")
    g.add_argument("--mean", type=finite_float, nargs="+", help="normalisation mean per channel (default: the "
                   "dataset's; an image folder's measured over its training images)")
    g.add_argument("--std", type=finite_float, nargs="+", help="normalisation std per channel (as --mean)")
    g.add_argument("--augment", choices=AUGMENTATIONS)
    g.add_argument("--train-images", type=positive_int, help="use the first N training images")
    g.add_argument("--val-split", type=non_negative_int, help="hold out the last N training images for validation "
                   "(default: validate on the test split, as the paper's curves)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--preset", choices=tuple(PRESETS))
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int)
    length.add_argument("--iterations", type=positive_int)
    g.add_argument("--batch-size", type=positive_int)
    g.add_argument("--lr", type=finite_float)
    g.add_argument("--momentum", type=finite_float)
    g.add_argument("--weight-decay", type=finite_float)
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--milestones", type=positive_int, nargs="+", help="iterations at which multistep divides lr by 10")
    g.add_argument("--warmup", type=non_negative_int, help="iterations of linear warm-up")
    g.add_argument("--label-smoothing", type=finite_float)
    g.add_argument("--bn-momentum", type=finite_float)
    g.add_argument("--precise-bn", type=non_negative_int, metavar="N", help="recompute BN statistics over N training images "
                   "before each validation (0 = off)")
    g.add_argument("--seed", type=non_negative_int)
    g = p.add_argument_group("execution")
    g.add_argument("--precision", choices=PRECISIONS, help="auto (default): bf16 autocast where the GPU or CPU has "
                   "native bf16 (a CPU with AMX, or an AMD one with avx512_bf16), fp32 otherwise")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    g.add_argument("--compile", choices=COMPILE_MODES, nargs="?", const="on",
                   help="torch.compile the training step: auto (default) where the run's eager steps add up to at "
                        "least ten times the compile's warm-up, on (alone: --compile), off")
    g.add_argument("--deterministic", action="store_true", default=None)
    g.add_argument("--sync-bn", action="store_true", default=None, help="synchronise BN across GPUs")
    g.add_argument("--eval-batch-size", type=positive_int)
    g.add_argument("--workers", type=non_negative_int, help="DataLoader workers for AutoAugment")
    g.add_argument("--keep", help="epoch checkpoints to keep: all, last, or N (every N-th)")
    g = p.add_argument_group("BN monitor (monitor.nc in the run directory)")
    g.add_argument("--monitor-every", type=monitor_every_option, metavar="N|auto",
                   help="measure the BN statistics on a fixed probe every N steps (0 = off; default auto: about 50 "
                        "measurements over the run, at most every 100 steps)")
    g.add_argument("--monitor-images", type=positive_int, metavar="N", help="the probe: the first N training "
                   "images, augmented once (default 128)")
    g.add_argument("--attribution-images", type=non_negative_int, metavar="N",
                   help="at each validation, also validate the first N validation images with BN statistics "
                        "recomputed over training images: how much of the validation loss is BN statistics (default "
                        "2000; 0 = off)")
    g.add_argument("--recalibration-images", type=positive_int, metavar="N", help="the attribution recomputes BN "
                   "statistics over the first N training images (default 512; --precise-bn's images where given)")
    g.add_argument("--select", choices=SELECTIONS,
                   help="best.pt holds the epoch of the best validation accuracy with BN's running statistics "
                        "(running, the default) or with recomputed ones (recalibrated, on the attributed images)")
    g.add_argument("--out", metavar="RUN_DIR", help="the run directory to create")
    g = p.add_argument_group("TensorBoard (pip install resnet-diagnostics[tensorboard])")
    g.add_argument("--tensorboard", metavar="DIR", help="also write the losses, accuracies, learning rate and the "
                   "BN monitor's measurements as TensorBoard events into DIR, one folder per run (e.g. "
                   "--tensorboard tb/plain56, then tensorboard --logdir tb)")
    return p


def monitor_every_option(text: str) -> int | str:
    return "auto" if text == "auto" else non_negative_int(text)


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
    # Absolute, so that the run resumes from any working directory and its checkpoints say where it lived (and
    # where an image folder's images are).
    config.data_dir, config.out = (str(Path(path).expanduser().absolute()) for path in (config.data_dir, config.out))
    config.dataset = dataset_name(config.dataset)
    if config.tensorboard is not None:
        config.tensorboard = str(Path(config.tensorboard).expanduser().absolute())
    return config


def validate(config: Config) -> None:
    """Every option in range, before any work: from the command line, a config.json or a checkpoint alike."""
    models.canonical(config.model, **config.model_kwargs(1, 1))  # name and arguments, before any work
    check_image_size(dataset_name(config.dataset), config.image_size)
    if not config.out.strip():
        raise UserError("--out is empty; give the folder to create, e.g. --out runs/resnet56")
    if config.tensorboard is not None and not config.tensorboard.strip():
        raise UserError("--tensorboard is empty; give a folder for this run's events, e.g. --tensorboard tb/resnet56")
    positive = {"--batch-size": config.batch_size, "--eval-batch-size": config.eval_batch_size,
                "--epochs": config.epochs if config.iterations is None else 1,
                "--iterations": config.iterations if config.epochs is None else 1,
                "--monitor-images": config.monitor_images, "--recalibration-images": config.recalibration_images}
    for option, value in positive.items():
        if value is None or not 1 <= value <= MAX_INT:
            raise UserError(f"{option} must be a positive integer up to {MAX_INT}, not {value}")
    for option, value in {"--lr": config.lr, "--momentum": config.momentum,
                          "--weight-decay": config.weight_decay}.items():
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{option} must be a finite number, not negative, not {value}")
    if isinstance(config.monitor_every, str) and config.monitor_every != "auto":
        raise UserError(f"--monitor-every must be a number of steps or auto, not {config.monitor_every!r}")
    counts = {"--warmup": config.warmup, "--precise-bn": config.precise_bn, "--val-split": config.val_split,
              "--workers": config.workers, "--seed": config.seed,
              "--monitor-every": 0 if config.monitor_every == "auto" else config.monitor_every,
              "--attribution-images": config.attribution_images}
    for option, value in counts.items():
        if not 0 <= value <= MAX_INT:
            raise UserError(f"{option} must be an integer from 0 to {MAX_INT}, not {value}")
    if config.lr == 0:
        raise UserError("--lr 0 would not train; give a positive learning rate such as 0.1")
    if not 0 <= config.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), not {config.label_smoothing}")
    for name, value, choices in (("--compile", config.compile, COMPILE_MODES), ("--select", config.select, SELECTIONS)):
        if value not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    if config.select == "recalibrated" and not config.attribution_images:
        raise UserError("--select recalibrated needs the attribution: drop --attribution-images 0")
    if not 0 < config.bn_momentum <= 1:
        raise UserError(f"--bn-momentum must be in (0, 1], not {config.bn_momentum}")
    if config.dropout is not None and not 0 <= config.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), not {config.dropout}")
    if config.keep not in ("all", "last") and not (config.keep.isascii() and config.keep.isdigit()
                                                   and 0 < int(config.keep) <= MAX_INT):
        raise UserError(f"--keep must be all, last or a positive integer, not {config.keep!r}")
    if config.train_images is not None and not 1 <= config.train_images <= MAX_INT:
        raise UserError(f"--train-images must be a positive integer, not {config.train_images}")
    if (config.mean is None) != (config.std is None) or config.std is not None and (
            len(config.mean) != len(config.std) or not all(math.isfinite(v) for v in config.mean + config.std)
            or min(config.std) <= 0):
        raise UserError("--mean and --std go together, one finite value per channel each, --std positive")
    if any(not 1 <= milestone <= MAX_INT for milestone in config.milestones):
        raise UserError(f"--milestones must be positive iteration counts, not {config.milestones}")


def config_from_dict(values, path) -> Config:
    """A `Config` from a config.json or a checkpoint's `config`, every field of the type the dataclass says
    and in range (`validate`); unknown keys (from a newer version) are ignored, missing ones take defaults."""
    if not isinstance(values, dict):
        raise UserError(f"{path} holds no training options (its config is a {type(values).__name__}); it is "
                        "damaged: restore it from a copy")
    hints = typing.get_type_hints(Config)
    values = older_options(values)
    known = {}
    for f in fields(Config):
        if f.name not in values:
            continue
        value = values[f.name]
        if not _has_type(value, hints[f.name]):
            raise UserError(f"{path} has {f.name} = {str(value)[:40]!r}, which is not a {_type_name(hints[f.name])}; "
                            "it is damaged: restore it from a copy")
        known[f.name] = list(value) if isinstance(value, list) else value
    for required in ("model", "dataset", "out"):
        if required not in known:
            raise UserError(f"{path} lacks the option {required!r}; it is damaged: restore it from a copy")
    config = Config(**known)
    try:
        validate(config)
    except BAD_INPUT as exc:
        raise UserError(f"{path} holds an option out of range ({exc}); it is damaged: restore it from a copy") from None
    return config


def older_options(values: dict) -> dict:
    """A run of an older version, in today's options: `compile` was true or false; the attribution recomputed
    its statistics over as many training images as it validated."""
    values = dict(values)
    if isinstance(values.get("compile"), bool):
        values["compile"] = "on" if values["compile"] else "off"
    if "recalibration_images" not in values and isinstance(values.get("attribution_images"), int) \
            and values["attribution_images"] > 0:
        values["recalibration_images"] = values["attribution_images"]
    return values


def _has_type(value, hint) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and len(value) <= 10_000 and all(_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
