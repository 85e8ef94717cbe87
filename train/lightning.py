"""The BN monitor in PyTorch Lightning: one line in a user's `Trainer(callbacks=[...])`.

    from train.lightning import BNMonitorCallback
    trainer = pytorch_lightning.Trainer(callbacks=[BNMonitorCallback()], ...)

Every `every` optimiser steps it measures what `analyses.monitor.BNMonitor` measures (the probe's loss with
running and with batch statistics, each BN layer's gap, what moves the statistics, the shadow statistics at other
momenta); at each validation, the first `attribution_images` validation images with the running statistics and
with statistics recomputed over the first `recalibration_images` training images (how much of the validation loss
is BN statistics). Both go to every logger of the trainer (`trainer.loggers`: TensorBoard, CSV, W&B, MLflow),
directly, as Lightning's LearningRateMonitor logs, under the tags our trainer's TensorBoard uses
(`probe/loss_running`, `bn_gap/LAYER`, `val/loss_recalibrated`, `val/bn_excess`). `monitor.nc` goes beside
ModelCheckpoint's `checkpoints/` after every training epoch and at the end of `fit`: what `python -m
diagnostics.spikes` draws the step view from. The running-statistics pass of the attributed images is the module's
own in `validation_step` where that calls the module once a batch (a forward hook, removed after each validation),
else it is made again. At the end of `fit` it prints the prescription (which BN momentum would have kept the
statistics truest), and during training the monitor's warnings, one line an epoch unless the probe loss doubles.

What it needs of the user's code: training and validation batches `(images, labels, ...)` (or `unpack(batch) ->
(images, labels)`), and a LightningModule whose forward maps those images to class logits.

- The probe is the first `probe_images` training images as the loader yields them (augmented as trained), copied
  from the first batches; the monitor starts once it has them (the default 128 in batches of 64: after step 2),
  or at the end of the first epoch with all of its images where it has fewer.
  Its forwards run in eval mode, or with only BN in train mode at momentum 1; every buffer is put back and no
  random number is drawn: training goes exactly as without it.
- Gradient accumulation: the running statistics move at every micro-batch, the weights at optimiser steps;
  the monitor follows the first at every batch and measures after the second (`trainer.global_step` moved).
- Precision: `32-true`, and `16-mixed` / `bf16-mixed`, whose autocast dtype it measures in.
- Resume: its state rides in the Lightning checkpoint (`state_dict`): the probe and the whole record, so that a
  resumed fit measures as if it had not stopped; the recalibration images are taken again from the first
  batches after the resume.
- DDP: every process measures (SyncBatchNorm gathers across them); rank 0 logs, prints and writes.
"""
from pathlib import Path
from typing import Callable

import torch

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - the message is the point
    raise ImportError("the Lightning callback needs PyTorch Lightning: pip install 'resnet-diagnostics[lightning]' "
                      "(or pip install pytorch-lightning)") from None

import models
from analyses.common import AUTOCAST, preserved_state
from analyses.evaluate import scored
from analyses.monitor import WARNING_RULE, WARNING_THRESHOLD, BNMonitor, lag_start, prescription, warm_up_steps

from . import rundir
from .config import monitor_interval
from .trainer import WarningLines

PRECISIONS = {"16-mixed": "fp16", "bf16-mixed": "bf16", "32-true": "fp32", "32": "fp32"}  # Lightning's: ours


def images_and_labels(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """`(images, labels, ...)` as most datasets give them."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(map(torch.is_tensor, batch[:2])):
        return batch[0], batch[1]
    raise ValueError("BNMonitorCallback reads batches of (images, labels); give unpack=lambda batch: (images, "
                     f"labels) for batches of another shape (this one is a {type(batch).__name__})")


class _Images:
    """The first `limit` images and labels of the batches it is shown, as the batches came, kept on the CPU."""

    def __init__(self, limit: int):
        self.limit, self.batches, self.count = limit, [], 0

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        take = min(len(images), self.limit - self.count)
        if take > 0:
            # copies: a view would keep the whole batch alive, and a loader that refills its batch tensors in place
            # (DALI, FFCV, a preallocated buffer) would change the images under it
            self.batches.append((images[:take].detach().to("cpu", copy=True),
                                 labels[:take].detach().to("cpu", copy=True)))
            self.count += take

    @property
    def full(self) -> bool:
        return self.count >= self.limit

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([x for x, _ in self.batches]), torch.cat([y for _, y in self.batches])


class BNMonitorCallback(pl.Callback):
    """The module docstring. `every`: optimiser steps between measurements, or "auto" (about 50 over the fit, at
    most every 100: `--monitor-every auto`, worked out for each fit; a resumed fit keeps the record's unless given
    a number); 0 measures nothing but still attributes validations (those of `fit`, not of `trainer.validate`).
    `attribution_images`: validation images attributed at each validation (0: none); `recalibration_images`:
    training images the statistics are recomputed over (512: on the study's checkpoints, spikes included, the
    recomputed validation loss was within 0.01 nats of 2,000 images' from 256 on; docs/performance.md); `filename`: the record in the log directory (None: not
    written); `warn_rule`, `warn_threshold`: the early warning (analyses.monitor.WARNING_RULES)."""

    def __init__(self, every: int | str = "auto", *, probe_images: int = 128, attribution_images: int = 2000,
                 recalibration_images: int = 512, filename: str | None = "monitor.nc",
                 unpack: Callable = images_and_labels, warn_rule: str = WARNING_RULE,
                 warn_threshold: float = WARNING_THRESHOLD, print_warnings: bool = True):
        if not (every == "auto" or (isinstance(every, int) and every >= 0)):
            raise ValueError(f"every must be 'auto' or a number of optimiser steps (0: off), not {every!r}")
        for name, value in (("probe_images", probe_images), ("recalibration_images", recalibration_images),
                            ("attribution_images", attribution_images)):
            if not isinstance(value, int) or value < (0 if name == "attribution_images" else 1):
                raise ValueError(f"{name} must be a positive number of images, not {value!r}")
        self.every, self.probe_images, self.filename, self.unpack = every, probe_images, filename, unpack
        self.attribution_images, self.recalibration_images = attribution_images, recalibration_images
        self.warn_rule, self.warn_threshold, self.print_warnings = warn_rule, warn_threshold, print_warnings
        self.monitor: BNMonitor | None = None
        self._saved: dict | None = None  # a checkpoint's state, until the monitor exists to take it
        self._every = 0  # this fit's `every`: "auto" resolved anew for each fit, a resumed record's own kept
        self._lr = None  # the learning rate of the optimiser step, read before the step (a scheduler moves it after)
        self._training, self._validation, self._last_step = _Images(0), _Images(0), None
        self._hook, self._outputs, self._logits = None, [], []

    # -----------------------------------------------------------------------------------------------------------
    # Training

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if str(trainer.precision) not in PRECISIONS:
            raise ValueError(f"BNMonitorCallback measures in fp32 or under autocast (precision 32-true, 16-mixed, "
                             f"bf16-mixed), not in {trainer.precision}")
        if not models.bn_layers(pl_module):
            raise ValueError(f"{type(pl_module).__name__} has no BatchNorm layers: there is nothing to monitor")
        if self.every != "auto":
            self._every = self.every
        elif self._saved is not None:
            self._every = int(self._saved["every"])
        else:
            steps = trainer.estimated_stepping_batches
            self._every = monitor_interval(int(steps) if steps != float("inf") else 5000)
        self.monitor, self._last_step, self._lr = None, trainer.global_step, None
        self._training = _Images(max(self.probe_images, self.recalibration_images))
        if self._saved is not None:
            saved, self._saved = self._saved, None
            self._start(trainer, pl_module, saved["probe_images"], saved["probe_labels"])
            self.monitor.load_state_dict(saved["monitor"])

    def _start(self, trainer, pl_module, images: torch.Tensor, labels: torch.Tensor) -> None:
        write = trainer.progress_bar_callback.print if trainer.progress_bar_callback is not None else print
        warn = self.print_warnings and trainer.is_global_zero
        _check_logits(pl_module, images[:1], labels)
        batches = trainer.num_training_batches  # an iterable's is infinite
        steps = batches if batches == float("inf") else int(batches) // max(1, trainer.accumulate_grad_batches)
        self.monitor = BNMonitor(
            pl_module, images, labels, every=self._every, autocast=AUTOCAST[PRECISIONS[str(trainer.precision)]],
            optimizer=trainer.optimizers[0] if trainer.optimizers else None, warn_rule=self.warn_rule,
            warn_threshold=self.warn_threshold,
            warn_after=warm_up_steps(pl_module, steps), lag_from=lag_start(steps),
            probe=f"the first {len(labels)} training images, as the loader gave them",
            on_warning=WarningLines(write) if warn else None)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        if trainer.optimizers and optimizer is trainer.optimizers[0]:
            self._lr = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx: int) -> None:
        if not self._training.full:
            self._training.add(*self.unpack(batch))
        step = trainer.global_step
        if self.monitor is None:
            if self._training.count >= self.probe_images or batch_idx + 1 >= trainer.num_training_batches:
                images, labels = self._training.tensors()
                self._start(trainer, pl_module, images[:self.probe_images], labels[:self.probe_images])
            self._last_step = step
            return
        if step == self._last_step:  # a micro-batch: the statistics moved, the weights did not
            self.monitor.statistics_updated()
            return
        self._last_step = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.monitor.step(step, epoch=trainer.current_epoch + 1, loss=loss, lr=self._lr)  # 1-based, as ours
        if self.monitor.records["step"] and self.monitor.records["step"][-1] == step:  # it measured
            self._log(trainer, self.monitor.scalars(), step)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._write(trainer)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._write(trainer)
        if self.monitor is not None and trainer.is_global_zero and self.monitor.records["step"]:
            for line in prescription(self.monitor.dataset()).lines():
                print(line)

    # -----------------------------------------------------------------------------------------------------------
    # Validation

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # the record's validations are fit's: trainer.validate() after fit would repeat its last step's
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking and self.monitor is not None
        self._validation = _Images(self.attribution_images if fitting else 0)
        self._remove_hook()
        self._outputs, self._logits = [], []
        if fitting:  # the module's own logits of the attributed images: the running-statistics pass, not made twice
            self._hook = pl_module.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        if torch.is_tensor(output) and not self._validation.full:
            self._outputs.append(output.detach())

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        forwards, self._outputs = self._outputs, []
        if dataloader_idx == 0 and not self._validation.full:
            images, labels = self.unpack(batch)
            take = min(len(images), self._validation.limit - self._validation.count)
            # one forward of this batch through the module, or the pass is made again (validation_step called a
            # submodule, or more than once: test-time augmentation)
            one = len(forwards) == 1 and forwards[0].ndim == 2 and len(forwards[0]) == len(images)
            self._logits.append(forwards[0][:take] if one else None)
            self._validation.add(images, labels)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hook()
        if self.monitor is None or not self._validation.count or not self._training.batches:
            return
        running = None
        if self._logits and all(logits is not None for logits in self._logits):
            running = scored(zip(self._logits, (y for _, y in self._validation.batches)))
        attribution = self.monitor.validate(self._validation.batches, self._training.batches, running=running,
                                            step=trainer.global_step, epoch=trainer.current_epoch + 1)
        self._validation, self._logits = _Images(0), []
        self._log(trainer, attribution.scalars(), trainer.global_step)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception) -> None:
        self._remove_hook()  # a failed validation leaves no hook on the user's module

    # -----------------------------------------------------------------------------------------------------------
    # Logs, the record, resume

    def _log(self, trainer, scalars: dict[str, float], step: int) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)

    def monitor_path(self, trainer: "pl.Trainer") -> Path | None:
        """Beside ModelCheckpoint's `checkpoints/`: the first logger's save_dir/name/version (TensorBoard's and
        CSV's log_dir; W&B's and MLflow's log_dir is their save_dir alone), or default_root_dir without one."""
        if self.filename is None:
            return None
        if not trainer.loggers:
            return Path(trainer.default_root_dir) / self.filename
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version, self.filename)

    def _write(self, trainer) -> None:
        path = self.monitor_path(trainer)
        if self.monitor is None or path is None or not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_dataset(path, self.monitor.dataset(checkpoint=str(path.parent), dataset=_data_name(trainer)))

    def state_dict(self) -> dict:
        if self.monitor is None:
            return {}
        return {"every": self.monitor.every, "probe_images": self.monitor.images.cpu(),
                "probe_labels": self.monitor.labels.cpu(), "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._saved = state_dict


@torch.no_grad()
def _check_logits(pl_module: "pl.LightningModule", image: torch.Tensor, labels: torch.Tensor) -> None:
    """One image through the module's forward, as the monitor will pass its probe: class logits, or one clear
    error now rather than an AttributeError deep in the first measurement."""
    with preserved_state(pl_module):
        pl_module.eval()
        out = pl_module(image.to(pl_module.device))
    name = type(pl_module).__name__
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape[1] <= int(labels.max()):
        got = (f"a tensor of shape {tuple(out.shape)}" if torch.is_tensor(out) else
               f"a {type(out).__name__}" + (f" of {', '.join(map(str, out))}" if isinstance(out, dict) else ""))
        raise ValueError(f"BNMonitorCallback passes images through {name}'s forward and reads class logits (images "
                         f"x classes, more than the largest label {int(labels.max())}); it gave {got}: make forward "
                         "return the logits")


def _data_name(trainer) -> str | None:
    datamodule = getattr(trainer, "datamodule", None)
    return type(datamodule).__name__ if datamodule is not None else None
