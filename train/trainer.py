"""The training loop: data on the device, autocast, SGD, a schedule in iterations, a run directory.

Reads top to bottom: setup (processes, device, precision, torch's flags), the run's parts (data, model and step,
the BN monitor, what a resumed run restores), one epoch (train, validate and attribute, the files), then `run`
itself: the epoch loop. `start` and `resume` are the two ways in.
"""
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import models
from analyses.bn import recalibrate_bn, running_statistics
from analyses.common import AUTOCAST, model_device, synchronize
from analyses.evaluate import predict
from analyses.monitor import Attribution, BNMonitor, lag_start, prescription, warm_up_steps

from . import checkpoint as ckpt
from . import rundir, schema
from .batches import EvalBatches, TrainBatches, augmented_once, check_augmentation, recalibration_inputs
from .config import Config, config_from_dict, lr_factor, validate
from .datasets import (SPECS, DatasetSpec, Images, folder_classes, folder_spec, get_spec, image_shape, is_folder,
                       load_split)
from .errors import DiskFull, TrainingDiverged, UserError, first_line
from .progress import Progress
from .step import TrainStep, choose_compile, eager_step_seconds

EPOCH_SCALARS = {  # metrics.csv column -> TensorBoard tag, written at the epoch's last step with the row's value
    "train_loss": "train/loss", "train_acc": "train/accuracy", "val_loss": "val/loss", "val_acc": "val/accuracy",
    "lr": "train/lr", "epoch_seconds": "time/epoch_seconds", "images_per_second": "time/images_per_second",
    "bn_warnings": "probe/warnings", "val_loss_recalibrated": "val/loss_recalibrated",
    "val_acc_recalibrated": "val/accuracy_recalibrated", "bn_excess": "val/bn_excess"}
EVENT_FILES = "events.out.tfevents.*"


# ---------------------------------------------------------------------------------------------------------------
# Setup


def setup_processes(config: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun each process joins the group and takes its own GPU."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = choose_device(config.device, int(os.environ.get("LOCAL_RANK", 0)))
    want_cuda = device.type == "cuda"
    if world_size > 1:
        if config.batch_size % world_size:
            raise UserError(f"--batch-size {config.batch_size} is the global batch and must divide evenly over "
                            f"{world_size} processes")
        if config.sync_bn and not want_cuda:
            raise UserError("--sync-bn needs GPUs (SyncBatchNorm does not run on the CPU); drop it")
        if want_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return rank, world_size, device


def choose_device(option: str, index: int | None = None) -> torch.device:
    """`--device auto|cpu|cuda` of every command: auto is a GPU where one is visible. `index`: which GPU (a torchrun
    process's LOCAL_RANK), else the current one."""
    if option == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu")
    cuda = option == "cuda" or (option == "auto" and torch.cuda.is_available())
    return torch.device("cuda", index) if cuda else torch.device("cpu")


NATIVE_BF16_VARIABLE = "RESNET_DIAG_NATIVE_BF16"  # 1 or 0: overrides the CPU's flags (tests run both kinds)


def cpu_info(field: str) -> str:
    """The first value of `field` ("flags", "model name") in /proc/cpuinfo; "" where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    pairs = (line.partition(":") for line in text.splitlines())
    return next((value.strip() for name, _, value in pairs if name.strip() == field), "")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (none where they cannot be read)."""
    return set(cpu_info("flags").split())


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether bf16 autocast trains faster than fp32 on this CPU, and why one thinks so: what plain20's training
    step measured, bf16 against fp32 (docs/performance.md). With AMX (amx_bf16) bf16 is native and fast. With
    avx512_bf16 alone it depends on the maker: 1.6x faster on an AMD EPYC (Zen 4) of 2026-12-07, 1.3x slower on an
    Intel Xeon of 2026-12-06. Without bf16 instructions it is emulated (about 10x slower). The environment variable
    RESNET_DIAG_NATIVE_BF16=1|0 overrides the flags (a container that hides them, a CPU not measured yet, or a test
    that runs as the other kind of CPU would)."""
    override = os.environ.get(NATIVE_BF16_VARIABLE)
    if override is not None:
        if override.strip() not in ("0", "1"):
            raise UserError(f"{NATIVE_BF16_VARIABLE} must be 1 (the CPU has native bf16) or 0, not {override!r}")
        return override.strip() == "1", f"{NATIVE_BF16_VARIABLE}={override.strip()}"
    flags = cpu_flags()
    if not flags:
        return False, (f"this CPU's flags could not be read (/proc/cpuinfo); {NATIVE_BF16_VARIABLE}=1 if it has "
                       "native bf16")
    if "amx_bf16" in flags:
        return True, "this CPU has AMX (amx_bf16)"
    if "avx512_bf16" not in flags:
        return False, "this CPU has no bf16 instructions (neither amx_bf16 nor avx512_bf16)"
    if cpu_info("vendor_id") == "AuthenticAMD":
        return True, "this AMD CPU has avx512_bf16, measured 1.6x faster than fp32 on a Zen 4"
    return False, ("this CPU has avx512_bf16 but neither AMX nor an AMD core; "
                   "measured 1.3x slower than fp32 on an Intel Xeon without AMX")


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes in bf16 natively, and why one thinks so."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return native, f"{torch.cuda.get_device_name(device)} {'has' if native else 'lacks'} native bf16"
    return cpu_native_bf16()


def resolve_precision(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). `auto` is bf16 where the device has it natively, fp32 otherwise; the
    choice and its reason go into the config. A resumed run keeps the precision it started with."""
    if not config.precision_used:
        precision, reason = config.precision, "--precision " + config.precision
        if precision == "auto":
            native, why = native_bf16(device)
            precision, reason = ("bf16" if native else "fp32"), f"auto: {why}"
        config.precision_used, config.precision_reason = precision, reason
    if config.precision_used == "bf16" and device.type == "cpu":
        native, why = cpu_native_bf16()
        if not native:
            print(f"warning: training in bf16 where it is not native ({why}): expect it slower than fp32",
                  file=sys.stderr)
    return AUTOCAST[config.precision_used]


def summary_writer_class():
    """torch's TensorBoard `SummaryWriter`, or one line saying how to install the optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install resnet-diagnostics[tensorboard]"
                        ) from None
    return SummaryWriter


@contextmanager
def torch_flags(deterministic: bool):
    """Deterministic algorithms and cuDNN's autotuner off where the run asks for determinism, the autotuner on
    otherwise; restored when the run ends, so that an in-process caller (a test, a benchmark, a notebook) keeps its
    own."""
    saved = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ---------------------------------------------------------------------------------------------------------------
# The run's parts


@dataclass
class RunData:
    """What a run reads once: its images, the spec it normalises with, and the batches made of them."""
    train: Images
    spec: DatasetSpec
    batches: TrainBatches
    val_batches: EvalBatches
    precise_inputs: list | None  # --precise-bn's recalibration batches
    attribution_inputs: list | None  # the attribution's (--precise-bn's where given: the diagnostics' recalibration)
    attribution_batches: EvalBatches | None  # the first --attribution-images validation images


def load_data(config: Config, device: torch.device, rank: int, world_size: int, resume: dict | None) -> RunData:
    """The run's images and batches; the run's length follows from them (`Config.resolve_length`)."""
    train_data = load_split(config.dataset, "train", config.data_dir, config.val_split, config.train_images,
                            image_size=config.image_size)
    val_data = load_split(config.dataset, "val", config.data_dir, config.val_split, image_size=config.image_size)
    spec = run_spec(config, train_data, resume)
    batches = TrainBatches(train_data, spec, config.batch_size, config.augment, device, config.seed, rank,
                           world_size, config.channels_last, config.workers)
    config.resolve_length(len(batches))
    recalibration = lambda n: recalibration_inputs(train_data[:n], spec, config.augment, config.per_device_batch,
                                                   device, config.channels_last)
    precise = recalibration(config.precise_bn) if config.precise_bn else None
    attribution_inputs = attribution_batches = None
    if config.attribution_images:
        attribution_inputs = precise or recalibration(config.recalibration_images)
        attribution_batches = EvalBatches(val_data[:config.attribution_images], spec, config.eval_batch_size,
                                          device, config.channels_last)
    return RunData(train_data, spec, batches, EvalBatches(val_data, spec, config.eval_batch_size, device,
                                                          config.channels_last),
                   precise, attribution_inputs, attribution_batches)


def run_spec(config: Config, train_data, resume: dict | None) -> DatasetSpec:
    """What the run normalises with and stores: the dataset's spec, an image folder's measured over the training
    images; a resumed run keeps the spec it started with (its folder's classes unchanged)."""
    if resume is not None:
        spec = DatasetSpec.from_dict(resume["dataset"])
        if is_folder(config.dataset) and folder_classes(config.dataset) != spec.classes:
            raise UserError(f"the class folders of {config.dataset} are not the ones the run started with "
                            f"({', '.join(spec.classes)}); restore them to resume")
        return spec
    if is_folder(config.dataset):
        return folder_spec(config.dataset, train_data, config.mean, config.std)
    return get_spec(config.dataset).with_statistics(config.mean, config.std)


def build_model(config: Config, spec: DatasetSpec, device: torch.device) -> tuple[dict, nn.Module]:
    """The registry's model (its name and arguments, as checkpoints store them) with the run's BN momentum, on
    `device`. Seeds torch's random stream: the weights, then training, follow from --seed."""
    torch.manual_seed(config.seed)
    name, kwargs = models.canonical(config.model, **config.model_kwargs(spec.num_classes, spec.in_channels))
    model = models.build(name, **kwargs)
    for _, bn in models.bn_layers(model):
        bn.momentum = config.bn_momentum
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    return {"name": name, "kwargs": kwargs}, model


def build_step(config: Config, model: nn.Module, spec: DatasetSpec, amp_dtype: torch.dtype | None,
               world_size: int, write) -> TrainStep:
    """SGD with the run's schedule, wrapped in DDP over several processes, compiled where `--compile` says (the
    choice and its reason go into the config; a resumed run keeps its own)."""
    device = model_device(model)
    step_model = model
    if world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
    if not config.compile_used:
        shape = (config.per_device_batch, spec.in_channels, spec.image_size, spec.image_size)
        timed = lambda: eager_step_seconds(model, shape, spec.num_classes, amp_dtype, config.channels_last)
        compiled, config.compile_reason = choose_compile(config.compile, config.total_steps, device,
                                                         lambda: same_everywhere(timed()), config.deterministic)
        config.compile_used = "on" if compiled else "off"
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return TrainStep(model, step_model, optimizer, scheduler, scaler,
                     nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), amp_dtype,
                     compiled=config.compile_used == "on", write=write, fall_back=world_size == 1)


def same_everywhere(value):
    """The first process's `value` in every process (one choice for all of them), `value` alone otherwise."""
    if not dist.is_initialized():
        return value
    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]


def build_monitor(config: Config, data: RunData, model: nn.Module, train_step: TrainStep, write,
                  resume: dict | None, path: Path) -> BNMonitor | None:
    """The BN monitor (in every process: SyncBatchNorm gathers across them) on its probe, the first
    --monitor-images training images augmented once, its record restored from a resumed run's last.pt (`path`);
    none without BN or where neither it nor the attribution runs."""
    if not (config.monitor_every or config.attribution_images) or not models.bn_layers(model):
        return None
    probe = data.train[:config.monitor_images]
    monitor = BNMonitor(model, augmented_once(probe, data.spec, config.augment, data.batches.device), probe.labels,
                     every=config.monitor_every, autocast=train_step.dtype, optimizer=train_step.optimizer,
                     warn_after=warm_up_steps(model, config.steps_per_epoch),
                     lag_from=lag_start(config.steps_per_epoch),
                     probe=f"the first {len(probe)} training images, augmented once ({config.augment}, seed 0)",
                     on_warning=WarningLines(write) if write is not None else None)
    if resume is not None and resume.get("monitor") is not None:
        with damaged(path):
            monitor.load_state_dict(resume["monitor"])
    return monitor


def restore(state: dict, train_step: TrainStep, path: Path) -> None:
    """Put a run's last.pt back into the objects of the run (the monitor's record: `build_monitor`), each part
    checked against the object it goes into first (`schema.check_resumable` checked its form); what torch itself
    still refuses is one line too."""
    schema.check_against(state, train_step.optimizer, train_step.scheduler, train_step.scaler, path)
    ckpt.check_finite(state["state_dict"], path)
    with damaged(path):
        train_step.model.load_state_dict(state["state_dict"])
        train_step.optimizer.load_state_dict(state["optimizer"])
        train_step.scheduler.load_state_dict(state["scheduler"])
        train_step.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") and model_device(train_step.model).type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


@contextmanager
def damaged(path: Path):
    """What torch refuses to load from last.pt (a field of another type or shape) as one line."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UserError(f"{path} cannot be resumed ({first_line(exc)}); it is damaged: restore it from a copy"
                        ) from None


# ---------------------------------------------------------------------------------------------------------------
# One epoch


def train_epoch(train_step: TrainStep, batches, epoch: int, step: int, total_steps: int, progress,
                monitor: BNMonitor | None = None):
    """One epoch (or up to `total_steps`). Losses stay on the device until the epoch ends: no sync per step
    (the monitor syncs once per measurement). Returns (step, losses, lrs, train accuracy, BN warnings)."""
    train_step.eager.train()  # the model, or its DDP wrapper and the model
    device = batches.device
    losses = torch.full((len(batches),), float("nan"), device=device)
    lrs, correct, seen, warnings = [], torch.zeros((), dtype=torch.int64, device=device), 0, 0
    for i, (x, y) in enumerate(batches.epoch(epoch)):
        if step >= total_steps:
            break
        lrs.append(train_step.optimizer.param_groups[0]["lr"])
        loss, logits = train_step(x, y)
        losses[i] = loss.detach()
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        step += 1
        if monitor is not None and monitor.step(step, epoch=epoch, loss=losses[i], lr=lrs[-1]) is not None:
            warnings += 1
        progress.update(1)
    losses = losses[:len(lrs)]
    if dist.is_initialized():
        dist.all_reduce(losses)
        losses /= dist.get_world_size()
        dist.all_reduce(correct)
        seen *= dist.get_world_size()
    return step, losses.tolist(), lrs, correct.item() / max(1, seen), warnings


def evaluate(model: nn.Module, batches, dtype: torch.dtype | None) -> tuple:
    """Per-image cross-entropy (no label smoothing), predictions and labels, BN in eval mode:
    `analyses.evaluate.predict`, the pass the diagnostics' running-statistics column makes."""
    model.eval()
    with torch.no_grad():
        return predict(model, batches, dtype)


def validate_epoch(model: nn.Module, data: RunData, monitor: BNMonitor | None, dtype: torch.dtype | None,
                   step: int, epoch: int, is_main: bool) -> tuple[tuple | None, Attribution | None]:
    """(the validation's per-image losses, predictions and labels on the first process, the attribution): after
    --precise-bn's recalibration where asked (the EMA statistics' pass over the attributed images taken first, the
    shadows restarted from the recomputed statistics after the attribution measured them), the attributed images'
    passes shared with the validation's wherever they are the same images and statistics."""
    attributing = data.attribution_batches is not None and monitor is not None
    n_attributed = data.attribution_batches.n_images if attributing else 0
    first = lambda passed: tuple(values[:n_attributed] for values in passed[:3])
    attributed = recalibrated = None  # the attributed images' passes with EMA and recomputed statistics
    if data.precise_inputs is not None:  # on every process: SyncBatchNorm gathers across them
        if attributing:  # what the EMA statistics give
            attributed = evaluate(model, data.attribution_batches, dtype)
        recalibrate_bn(model, data.precise_inputs, dtype)
    validated = evaluate(model, data.val_batches, dtype) if is_main else None
    if attributing and data.precise_inputs is not None:  # recomputed over the attribution's own images already
        passed = validated if validated is not None else evaluate(model, data.attribution_batches, dtype)
        recalibrated = (first(passed), running_statistics(model))  # every process: none recomputes again
    elif attributing and validated is not None:
        attributed = first(validated)
    attribution = None
    if attributing:
        attribution = monitor.validate(data.attribution_batches, data.attribution_inputs, step=step, epoch=epoch,
                                       running=attributed, recalibrated=recalibrated, dtype=dtype)
    if data.precise_inputs is not None and monitor is not None:  # after the attribution measured the shadows
        monitor.statistics_replaced()
    return validated, attribution


def selected_accuracy(config: Config, val_acc: float, recalibrated: float) -> float:
    """What chooses best.pt (`--select`): the validation accuracy with running statistics, or with recomputed ones
    where they were measured (a model without BN has none: the two are one)."""
    return val_acc if config.select == "running" or math.isnan(recalibrated) else recalibrated


def validation_text(loss: float, n_images: int, attribution: Attribution | None) -> str:
    """`val_loss 3.7700 (recalibrated 0.8500: +2.92 ± 0.05 of it is BN statistics)`; where fewer images were
    attributed than validated, which ones and their own running loss."""
    if attribution is None:
        return f"val_loss {loss:.4f}"
    if attribution.n_images < n_images:
        return (f"val_loss {loss:.4f} (first {attribution.n_images:,} images {attribution.loss_running:.4f}, "
                f"{attribution.text()})")
    return f"val_loss {loss:.4f} ({attribution.text()})"


def check_losses(losses: list[float], epoch: int, first_step: int, run_dir: Path) -> None:
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None:
        kept = f"{run_dir / 'last.pt'} (epoch {epoch - 1})" if epoch > 1 else "none (first epoch)"
        raise TrainingDiverged(f"the training loss became {losses[bad]} at step {first_step + bad + 1} "
                               f"(epoch {epoch}); last good checkpoint: {kept}; lower --lr or add --warmup")


def check_weights(model: nn.Module, epoch: int, run_dir: Path) -> None:
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingDiverged(f"{key} became non-finite in epoch {epoch}; last good checkpoint: "
                                   f"{run_dir / 'last.pt'} (epoch {epoch - 1}); lower --lr or add --warmup")


def checkpoint_state(config: Config, model_spec: dict, spec: DatasetSpec, train_step: TrainStep, epoch: int,
                     step: int, history: dict, provenance: dict, step_rows: list,
                     monitor: BNMonitor | None) -> tuple[dict, dict]:
    """(what every checkpoint holds, what last.pt adds to resume from it)."""
    state = {"format": ckpt.FORMAT, "model": model_spec, "state_dict": train_step.model.state_dict(),
             "dataset": spec.to_dict(), "config": asdict(config), "epoch": epoch, "step": step, "history": history,
             "provenance": provenance}
    cuda = model_device(train_step.model).type == "cuda"
    full = {"optimizer": train_step.optimizer.state_dict(), "scheduler": train_step.scheduler.state_dict(),
            "scaler": train_step.scaler.state_dict(), "step_history": step_rows,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else []}}
    if monitor is not None:
        full["monitor"] = monitor.state_dict()
    return state, full


def save_epoch_files(run_dir: Path, state: dict, full: dict, config: Config, epoch: int, is_best: bool,
                     metrics: dict, steps: list, monitor: BNMonitor | None) -> None:
    """epoch_NNN.pt by `--keep`, best.pt when validation accuracy improved, metrics.csv, steps.csv and
    monitor.nc, and last.pt (resumable) last: a run killed before last.pt is written redoes the whole epoch on
    resume, and rewrites the others the same."""
    final = epoch == config.total_epochs
    if config.keep in ("all", "last") or final or epoch % int(config.keep) == 0:
        ckpt.save(state, run_dir / f"epoch_{epoch:03d}.pt")
    if config.keep == "last":
        for old in rundir.epoch_files(run_dir)[:-1]:
            old.unlink()
    if is_best:
        ckpt.save(state, run_dir / "best.pt")
    rundir.write_csv(run_dir / "metrics.csv", rundir.METRICS, list(zip(*(metrics[c] for c in rundir.METRICS))))
    rundir.write_csv(run_dir / "steps.csv", rundir.STEPS, steps)
    if monitor is not None:
        rundir.write_dataset(run_dir / "monitor.nc", monitor.dataset(checkpoint=str(run_dir / "last.pt"),
                                                                    dataset=config.dataset))
    ckpt.save({**state, **full}, run_dir / "last.pt")


# ---------------------------------------------------------------------------------------------------------------
# The run


def run(config: Config, resume: dict | None = None, lock=None) -> Path:
    """Train `config` into `config.out`; `resume` is the run's last.pt when continuing, read under `lock`."""
    rank, world_size, device = setup_processes(config)
    is_main = rank == 0
    summary_writer = summary_writer_class() if config.tensorboard and is_main else None  # installed? before any work
    config.world_size, config.per_device_batch = world_size, config.batch_size // world_size
    config.device_used = device.type
    amp_dtype = resolve_precision(config, device)
    run_dir = Path(config.out)
    step = resume["step"] if resume is not None else 0
    progress = writer = None
    try:
        with torch_flags(config.deterministic):
            data = load_data(config, device, rank, world_size, resume)
            progress = Progress(config.total_steps, "train", unit="step", initial=step, enabled=is_main)
            write = progress.write if is_main else None
            model_spec, model = build_model(config, data.spec, device)
            train_step = build_step(config, model, data.spec, amp_dtype, world_size, write or (lambda line: None))
            history = {column: [] for column in rundir.METRICS}
            step_rows, start_epoch = [], 1
            if resume is not None:  # checked whole before anything is written
                restore(resume, train_step, run_dir / "last.pt")
                history = {column: list(resume["history"].get(column, [math.nan if column in rundir.ATTRIBUTION
                                                                       else 0] * resume["epoch"]))
                           for column in rundir.METRICS}
                step_rows, start_epoch = [list(row) for row in resume["step_history"]], resume["epoch"] + 1
            monitor = build_monitor(config, data, model, train_step, write, resume, run_dir / "last.pt")
            if is_main:  # config.json says what the run does: written once every choice is made and all of
                # last.pt, the monitor's record included, is accepted
                run_dir.mkdir(parents=True, exist_ok=True)
                lock = lock or rundir.lock(run_dir)
                rundir.remove_stale_temporaries(run_dir)
                rundir.check_outputs(run_dir)
                rundir.write_config(run_dir, asdict(config))
                if summary_writer is not None:  # under the lock: a refused second trainer must not purge this
                    # run's events. Events past the step last.pt holds are from an interrupted epoch, trained again.
                    writer = summary_writer(config.tensorboard, purge_step=step + 1)
                    if monitor is not None:  # built before: a record refused must leave no events file behind
                        monitor.writer = writer
            best_acc = max(map(selected_accuracy, repeat(config), history["val_acc"],
                               history["val_acc_recalibrated"]), default=-1.0)
            provenance = ckpt.provenance()
            if is_main and resume is None:
                progress.write(header_line(config, model_spec, len(data.train), device, monitor is not None, run_dir))
            for epoch in range(start_epoch, config.total_epochs + 1):
                synchronize(device)
                started, first_step = time.perf_counter(), step
                step, losses, lrs, train_acc, warnings = train_epoch(train_step, data.batches, epoch, step,
                                                                     config.total_steps, progress, monitor)
                check_losses(losses, epoch, first_step, run_dir)
                if train_step.failure and config.compile_used == "on":  # what config.json and checkpoints say
                    config.compile_used, config.compile_reason = "off", f"{config.compile_reason}, then it failed"
                    rundir.write_config(run_dir, asdict(config))  # one process: a failure falls back only there
                synchronize(device)
                train_seconds = time.perf_counter() - started
                step_rows += [[first_step + i + 1, epoch, loss, lr] for i, (loss, lr) in enumerate(zip(losses, lrs))]
                check_weights(model, epoch, run_dir)  # on every process: the weights are the same everywhere
                validated, attribution = validate_epoch(model, data, monitor, amp_dtype, step, epoch, is_main)
                if is_main:
                    val_loss = validated[0].mean().item()
                    val_acc = (validated[1] == validated[2]).double().mean().item()
                    row = {"epoch": epoch, "step": step, "train_loss": sum(losses) / len(losses),
                           "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc, "lr": lrs[-1],
                           "epoch_seconds": time.perf_counter() - started,
                           "images_per_second": (step - first_step) * config.batch_size / train_seconds,
                           "bn_warnings": warnings,
                           **dict(zip(rundir.ATTRIBUTION, (attribution.loss_recalibrated, attribution.acc_recalibrated,
                                                           attribution.excess, attribution.excess_se)
                                      if attribution is not None else [math.nan] * 4))}
                    for column in rundir.METRICS:
                        history[column].append(row[column])
                    if writer is not None:
                        for column, tag in EPOCH_SCALARS.items():
                            if math.isfinite(row[column]):
                                writer.add_scalar(tag, row[column], step)
                        writer.flush()  # before last.pt: whatever last.pt holds, its events hold too
                    selected = selected_accuracy(config, val_acc, row["val_acc_recalibrated"])
                    state, full = checkpoint_state(config, model_spec, data.spec, train_step, epoch, step, history,
                                                   provenance, step_rows, monitor)
                    try:
                        save_epoch_files(run_dir, state, full, config, epoch, is_best=selected > best_acc,
                                         metrics=history, steps=step_rows, monitor=monitor)
                    except DiskFull as exc:
                        raise DiskFull(f"{exc}; epoch {epoch} will be trained again by python -m train --resume "
                                       f"{run_dir}") from None
                    best_acc = max(best_acc, selected)
                    progress.write(epoch_line(config, row, len(validated[0]), attribution))
                if world_size > 1:
                    dist.barrier()
            if is_main and monitor is not None:  # the run's end: what the BN statistics cost it, why, what to change
                for line in prescription(monitor.dataset()).lines():
                    progress.write(line)
    finally:
        for opened in (progress, writer, lock):
            if opened is not None:
                opened.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return run_dir


def header_line(config: Config, model_spec: dict, n_images: int, device: torch.device, monitoring: bool,
                run_dir: Path) -> str:
    """What a new run trains, on what, and each choice the run made with its reason."""
    monitor = (f", BN monitor every {config.monitor_every:,} step{'s' * (config.monitor_every != 1)} "
               f"({config.monitor_reason})" if monitoring and config.monitor_every else "")
    return (f"training {models.label(model_spec['name'], model_spec['kwargs'])} on {config.dataset} ({n_images:,} "
            f"images, {config.steps_per_epoch} steps/epoch, {config.total_epochs} epochs) on {device.type} in "
            f"{config.precision_used} ({config.precision_reason}), compile {config.compile_used} "
            f"({config.compile_reason}){monitor} -> {run_dir}")


def epoch_line(config: Config, row: dict, n_validated: int, attribution: Attribution | None) -> str:
    return (f"epoch {row['epoch']}/{config.total_epochs}  step {row['step']}  train_loss {row['train_loss']:.4f}  "
            f"train_acc {row['train_acc']:.2%}  {validation_text(row['val_loss'], n_validated, attribution)}  "
            f"val_acc {row['val_acc']:.2%}  lr {row['lr']:.4g}  {row['epoch_seconds']:.1f}s  "
            f"{row['images_per_second']:,.0f} img/s" + (f"  BN warnings {row['bn_warnings']}" if row['bn_warnings']
                                                         else ""))


# ---------------------------------------------------------------------------------------------------------------
# The ways in


def check_images(config: Config) -> None:
    """The model takes the dataset's images, and the augmentation leaves something of them: refused before a run
    writes config.json and the lock, or trains (a model that cannot would fail at its first step)."""
    channels, side = image_shape(config.dataset, config.image_size)
    check_augmentation(config.augment, side)
    classes = len(folder_classes(config.dataset)) if is_folder(config.dataset) else SPECS[config.dataset].num_classes
    models.check_input(config.model, config.model_kwargs(classes, channels), channels, side)


def start(config: Config) -> Path:
    """A new run into an empty or new --out, or into a run directory that never finished its first epoch
    (nothing in it to keep: it is simply started again)."""
    validate(config)
    check_images(config)
    out = Path(config.out)
    if config.tensorboard is not None:
        check_tensorboard_folder(Path(config.tensorboard), restart=rundir.is_run_dir(out))
    lock = None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not rundir.is_run_dir(out):
            raise UserError(f"--out {out} already exists and is not empty; choose an empty or new folder")
        lock = rundir.lock(out)  # is another trainer in its first epoch there?
        if rundir.has_checkpoints(out):
            lock.close()
            raise UserError(f"--out {out} already holds a run; use --resume {out} to continue it, or choose a new "
                            "folder")
    ckpt.check_writable(out)
    return run(config, lock=lock)


class WarningLines:
    """Prints the BN monitor's first warning of each epoch, and a later one only where its probe loss has doubled
    since the last printed: a run that stays in a gap is one line an epoch, not one every --monitor-every steps
    (the epoch's line and metrics.csv's bn_warnings count them all)."""

    def __init__(self, write):
        self.write, self.epoch, self.printed_loss = write, None, 0.0

    def __call__(self, warning) -> None:
        if warning.epoch != self.epoch or warning.loss_running >= 2 * self.printed_loss:
            more = "" if warning.epoch != self.epoch else " (it has doubled since the last line)"
            self.epoch, self.printed_loss = warning.epoch, warning.loss_running
            self.write(warning.message() + more)


def check_tensorboard_folder(folder: Path, restart: bool) -> None:
    """A new run's events go into a folder of their own (a run started again after dying in its first epoch
    finds its own there, which it purges; one whose run directory holds checkpoints is refused next)."""
    events = sorted(folder.glob(EVENT_FILES)) if folder.is_dir() else []
    if events and not restart:
        raise UserError(f"--tensorboard {folder} already holds TensorBoard events ({events[0].name}); give each run "
                        "a folder of its own, e.g. --tensorboard tb/NAME, and see them together with tensorboard "
                        "--logdir tb")
    ckpt.check_writable(folder)


def resume(run_dir) -> Path:
    """Continue the run in `run_dir` from its last.pt, exactly as if it had not stopped; a run that stopped
    before its first last.pt is started again from step 0 with the options of its config.json."""
    run_dir = Path(run_dir)
    if not rundir.is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a run directory (no config.json); give the folder `--out` named")
    lock = rundir.lock(run_dir) if int(os.environ.get("RANK", 0)) == 0 else None  # before reading last.pt
    try:
        last = run_dir / "last.pt"
        if not last.is_file():
            config = config_from_dict(rundir.read_config(run_dir), run_dir / "config.json")
            config.out = str(run_dir)
            for derived in ("precision_used", "precision_reason", "compile_used", "compile_reason"):
                setattr(config, derived, "")
            check_images(config)  # a config.json of an older version, or edited: checked as a new run's
            print(f"{run_dir} stopped before its first epoch ended (no last.pt); training it again from step 0")
            return run(config, lock=lock)
        state = ckpt.read(last)
        schema.check_resumable(state, last)
        config = config_from_dict(state["config"], last)
        config.out = str(run_dir)
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size != config.world_size:  # the per-device batch is what BN normalises over
            raise UserError(f"{run_dir} was trained by {config.world_size} process(es); resume it with as many, "
                            f"not {world_size}")
        if state["epoch"] >= config.total_epochs:
            print(f"{run_dir} finished all {config.total_epochs} epochs; nothing to resume")
            return run_dir
        return run(config, resume=state, lock=lock)
    finally:
        if lock is not None:
            lock.close()
