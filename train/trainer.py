"""The training loop: data on the device, autocast, SGD, a schedule in iterations, a run directory.

Reads top to bottom: setup (processes, device, data, model, optimiser), then one epoch at a time: train,
optionally recompute BN statistics, validate, write metrics and checkpoints.
"""
import csv
import fcntl
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import models

from . import checkpoint as ckpt
from .config import Config, lr_factor, validate
from .data import EvalBatches, TrainBatches, get_spec, load_split
from .errors import TrainingDiverged, UserError

METRICS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
           "images_per_second"]
STEPS = ["step", "epoch", "train_loss", "lr"]


# ---------------------------------------------------------------------------------------------------------------
# Setup


def setup_processes(config: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun each process joins the group and takes its own GPU."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if want_cuda else "cpu")
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


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: without them bf16 autocast on a CPU is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. auto: bf16 (fp16 on GPUs without bf16) on a GPU, fp32 on a CPU."""
    precision = config.precision
    if precision == "auto":  # bf16 where the GPU has it natively (Ampere on), fp16 with loss scaling before
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        precision = "fp32" if device.type == "cpu" else "bf16" if native_bf16 else "fp16"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print("warning: this CPU has no native bf16 (avx512_bf16/AMX); bf16 autocast will be slower than fp32",
              file=sys.stderr)
    config.precision_used = precision
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lock_run_dir(run_dir: Path):
    """An OS lock on the run directory: a second trainer refuses; a killed one releases it."""
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise UserError(f"another trainer (pid {handle.read().strip() or '?'}) is using {run_dir}; wait for it "
                        "or stop it") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


# ---------------------------------------------------------------------------------------------------------------
# Train and evaluate


def evaluate(model: nn.Module, batches, autocast) -> tuple[float, float]:
    """Cross-entropy (no label smoothing) and accuracy, BN in eval mode, summed in float64 on the device."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode():
        for x, y in batches:
            with autocast:
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    n = batches.n_images
    return loss_sum.item() / n, correct.item() / n


def train_epoch(step_model, optimizer, scheduler, scaler, criterion, batches, epoch, step, config, autocast,
                progress):
    """One epoch (or up to `total_steps`). Losses stay on the device until the epoch ends: no sync per step."""
    step_model.train()
    device = batches.device
    losses = torch.full((len(batches),), float("nan"), device=device)
    lrs, correct, seen = [], torch.zeros((), dtype=torch.int64, device=device), 0
    for i, (x, y) in enumerate(batches.epoch(epoch)):
        if step >= config.total_steps:
            break
        lrs.append(optimizer.param_groups[0]["lr"])
        with autocast:
            logits = step_model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses[i] = loss.detach()
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        step += 1
        progress.update(1)
    losses = losses[:len(lrs)]
    if dist.is_initialized():
        dist.all_reduce(losses)
        losses /= dist.get_world_size()
        dist.all_reduce(correct)
        seen *= dist.get_world_size()
    return step, losses.tolist(), lrs, correct.item() / max(1, seen)


class Progress:
    """tqdm on a terminal; nothing otherwise (the per-epoch summary line is printed either way)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Files


def write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    with ckpt.atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            writer.writerows(rows)


def save_epoch_files(run_dir: Path, state: dict, full: dict, config: Config, epoch: int, is_best: bool,
                     metrics: dict, steps: list) -> None:
    """epoch_NNN.pt by `--keep`, best.pt when validation accuracy improved, metrics.csv and steps.csv, and
    last.pt (resumable) last: a run killed before last.pt is written redoes the whole epoch on resume."""
    final = epoch == config.total_epochs
    if config.keep in ("all", "last") or final or epoch % int(config.keep) == 0:
        ckpt.save(state, run_dir / f"epoch_{epoch:03d}.pt")
    if config.keep == "last":
        for old in ckpt.epoch_files(run_dir)[:-1]:
            old.unlink()
    if is_best:
        ckpt.save(state, run_dir / "best.pt")
    write_csv(run_dir / "metrics.csv", METRICS, list(zip(*metrics.values())))
    write_csv(run_dir / "steps.csv", STEPS, steps)
    ckpt.save({**state, **full}, run_dir / "last.pt")


# ---------------------------------------------------------------------------------------------------------------
# The run


def run(config: Config, resume: dict | None = None, lock=None) -> Path:
    """Train `config` into `config.out`; `resume` is the run's last.pt when continuing, read under `lock`."""
    rank, world_size, device = setup_processes(config)
    is_main = rank == 0
    config.world_size, config.per_device_batch = world_size, config.batch_size // world_size
    config.device_used = device.type
    amp_dtype = resolve_precision(config, device)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not config.deterministic

    spec = get_spec(config.dataset)
    train_data = load_split(config.dataset, "train", config.data_dir, config.val_split, config.train_images)
    val_data = load_split(config.dataset, "val", config.data_dir, config.val_split)
    batches = TrainBatches(train_data, spec, config.batch_size, config.augment, device, config.seed, rank,
                           world_size, config.channels_last, config.workers)
    config.resolve_length(len(batches))
    val_batches = EvalBatches(val_data, spec, config.eval_batch_size, device, config.channels_last)
    recal_inputs = None
    if config.precise_bn:  # the same augmented images every time: statistics of what training normalised
        recal_images = train_data[:config.precise_bn]
        recal_inputs = [x for x, _ in TrainBatches(recal_images, spec, min(config.per_device_batch, len(recal_images)),
                                                   config.augment, device, seed=0, channels_last=config.channels_last,
                                                   workers=config.workers).epoch(0)]

    torch.manual_seed(config.seed)
    model_kwargs = config.model_kwargs(spec.num_classes, spec.in_channels)
    name, model_kwargs = models.canonical(config.model, **model_kwargs)
    model = models.build(name, **model_kwargs)
    for _, bn in models.bn_layers(model):
        bn.momentum = config.bn_momentum
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    step_model = model
    if world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
    if config.compile:
        step_model = torch.compile(step_model)

    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    run_dir = Path(config.out)
    history = {column: [] for column in METRICS}
    step_rows, start_epoch, step = [], 1, 0
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"]["torch"])
        if device.type == "cuda" and resume["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        history = {column: list(values) for column, values in resume["history"].items()}
        step_rows = [list(row) for row in resume["step_history"]]
        start_epoch, step = resume["epoch"] + 1, resume["step"]
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock or lock_run_dir(run_dir)
        with ckpt.atomic_path(run_dir / "config.json") as temporary:
            temporary.write_text(json.dumps(asdict(config), indent=2) + "\n")
    best_acc = max(history["val_acc"], default=-1.0)
    model_spec = {"name": name, "kwargs": model_kwargs}
    provenance = ckpt.provenance()
    progress = Progress(is_main, config.total_steps, step)
    if is_main and resume is None:
        progress.write(f"training {models.label(name, model_kwargs)} on {config.dataset} "
                       f"({len(train_data):,} images, {config.steps_per_epoch} steps/epoch, {config.total_epochs} "
                       f"epochs) on {device.type} in {config.precision_used} -> {run_dir}")
    try:
        for epoch in range(start_epoch, config.total_epochs + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            first_step = step
            step, losses, lrs, train_acc = train_epoch(step_model, optimizer, scheduler, scaler, criterion, batches,
                                                       epoch, step, config, autocast, progress)
            bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
            if bad is not None:
                kept = f"{run_dir / 'last.pt'} (epoch {epoch - 1})" if epoch > 1 else "none (first epoch)"
                raise TrainingDiverged(f"the training loss became {losses[bad]} at step {first_step + bad + 1} "
                                       f"(epoch {epoch}); last good checkpoint: {kept}; lower --lr or add --warmup")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - started
            step_rows += [[first_step + i + 1, epoch, loss, lr] for i, (loss, lr) in enumerate(zip(losses, lrs))]
            check_weights(model, epoch, run_dir)  # on every process: the weights are the same everywhere
            if recal_inputs is not None:  # on every process too: SyncBatchNorm gathers across them
                with autocast:
                    models.recalibrate_bn(model, iter(recal_inputs), len(recal_inputs))
            if is_main:
                val_loss, val_acc = evaluate(model, val_batches, autocast)
                row = [epoch, step, sum(losses) / len(losses), train_acc, val_loss, val_acc, lrs[-1],
                       time.perf_counter() - started, (step - first_step) * config.batch_size / train_seconds]
                for column, value in zip(METRICS, row):
                    history[column].append(value)
                state = {
                    "format": ckpt.FORMAT, "model": model_spec, "state_dict": model.state_dict(),
                    "dataset": spec.to_dict(), "config": asdict(config), "epoch": epoch, "step": step,
                    "history": history, "provenance": provenance,
                }
                full = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "step_history": step_rows,
                        "rng": {"torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}}
                save_epoch_files(run_dir, state, full, config, epoch, is_best=val_acc > best_acc, metrics=history,
                                 steps=step_rows)
                best_acc = max(best_acc, val_acc)
                progress.write(f"epoch {epoch}/{config.total_epochs}  step {step}  train_loss {row[2]:.4f}  "
                               f"train_acc {train_acc:.2%}  val_loss {val_loss:.4f}  val_acc {val_acc:.2%}  "
                               f"lr {lrs[-1]:.4g}  {row[7]:.1f}s  {row[8]:,.0f} img/s")
            if world_size > 1:
                dist.barrier()
    finally:
        progress.close()
        if lock is not None:
            lock.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return run_dir


def check_weights(model: nn.Module, epoch: int, run_dir: Path) -> None:
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingDiverged(f"{key} became non-finite in epoch {epoch}; last good checkpoint: "
                                   f"{run_dir / 'last.pt'} (epoch {epoch - 1}); lower --lr or add --warmup")


def start(config: Config) -> Path:
    """A new run: refuse an --out that already holds something, then train."""
    validate(config)
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        hint = f"use --resume {out} to continue it" if ckpt.is_run_dir(out) else "choose an empty or new folder"
        raise UserError(f"--out {out} already exists and is not empty; {hint}")
    ckpt.check_writable(out)
    return run(config)


def resume(run_dir) -> Path:
    """Continue the run in `run_dir` from its last.pt, exactly as if it had not stopped."""
    run_dir = Path(run_dir)
    if not ckpt.is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a run directory (no config.json); give the folder `--out` named")
    lock = lock_run_dir(run_dir) if int(os.environ.get("RANK", 0)) == 0 else None  # before reading last.pt
    try:
        last = run_dir / "last.pt"
        if not last.is_file():
            raise UserError(f"{run_dir} has no last.pt (it stopped before its first epoch ended); start it again "
                            "with a new --out")
        state = ckpt.read(last)
        if not ckpt.is_own(state) or "optimizer" not in state:
            raise UserError(f"{last} is not a resumable resnet-diagnostics checkpoint")
        config = Config(**{k: v for k, v in state["config"].items() if k in Config.__dataclass_fields__})
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
