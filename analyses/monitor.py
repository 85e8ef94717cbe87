"""Watching BatchNorm while a network trains: a fixed probe of images measured every N optimiser steps.

At each measurement, with the weights of that step:
- `probe_loss`, `probe_acc`: the probe's cross-entropy and accuracy with BN normalising by its running
  statistics (eval mode: what validation will see) and by the probe's own batch statistics (train mode, as
  training normalises), the running statistics and the training's random numbers left untouched;
- `bn_gap`: per BN layer, the normalisation error (analyses.bn) of its running statistics against the
  statistics of its input in the train-mode pass: how stale the statistics are;
- `eval_mismatch`: per BN layer, the normalisation error of its running statistics against its input in the
  eval-mode pass, where every BN upstream uses running statistics too: how an error upstream reaches it;
- `grad_norm`, `weight_norm`: per conv and fc weight, the L2 norm of the gradient of the training step itself
  (read from `.grad`, no extra backward) and of the weight after the step. A conv followed by BN computes the
  same function whatever the scale of its weight, and its gradient scales as 1/scale, so `scaled_grad_norm` =
  grad_norm x weight_norm is the measure that compares across layers and across training (for the fc layer,
  which no BN follows, it is only indicative).

An early warning fires when the probe loss with running statistics exceeds the batch-statistics loss by both
`warn_factor` times and `warn_margin` nats, from step `warn_after` on: the validation loss is about to spike from
BN statistics. (The trainer arms it once the running statistics' initial values weigh under 1%, warm_up_steps,
or after half an epoch, whichever comes first: earlier, a gap says only that training has just begun.)

In any training loop (three lines):

    monitor = BNMonitor(model, probe_images, probe_labels, every=50)
    ...     # after loss.backward() and optimizer.step(), before the next zero_grad():
    monitor.step(loss=loss)
    monitor.dataset().to_netcdf("monitor.nc")
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

import models

from .bn import COMPONENTS, UNITS, BNStatistics, batch_statistics, running_statistics, statistics_error_table
from .common import ChannelMoments, attrs, forward_hooks, layer_coords, preserved_state, variable
from .gradients import kind_of, weight_layers

BN_STATISTICS = ("running", "batch")  # the `bn` dim of the probe's loss and accuracy
RECORDED = ("probe_loss", "probe_acc", "bn_gap", "eval_mismatch", "grad_norm", "weight_norm", "train_loss", "lr",
            "warning")


def warning_rule(factor: float, margin: float, after: int = 0) -> str:
    return (f"a warning when the probe loss with running BN statistics exceeds the loss with batch statistics by "
            f"more than {factor:g}x and by more than {margin:g} nats" + (f", from step {after} on" if after else ""))


def warm_up_steps(model: nn.Module, weight: float = 0.01) -> int:
    """Optimiser steps after which the running statistics' initial values weigh less than `weight` in them
    (1 - momentum)^k < weight, for the BN layer of the smallest momentum (0 for a cumulative average): before
    that, a gap says only that training has just begun."""
    momenta = [m.momentum for _, m in models.bn_layers(model) if m.momentum is not None and 0 < m.momentum < 1]
    return math.ceil(math.log(weight) / math.log(1 - min(momenta))) if momenta else 0


def definition(every: int, n_images: int, probe: str, rule: str) -> str:
    return (f"every {every} optimiser steps, with the weights of that step, on a fixed probe of {n_images} images "
            f"({probe}): the probe's cross-entropy (natural log, no label smoothing) and top-1 accuracy with BN "
            "normalising by its running statistics (eval mode) and by the probe's batch statistics (train mode, "
            "running statistics untouched); per BN layer the normalisation error sqrt(mean^2 + scale^2) of the "
            "running statistics against the statistics of the layer's input in the train-mode pass (bn_gap) and "
            "in the eval-mode pass (eval_mismatch), mean = |mu_true - mu_running| / s_running, scale = "
            "sqrt(var_true / (var_true + eps)) |1 - s_true / s_running|, s = sqrt(var + eps), root-mean-squared "
            "over channels; per conv and fc weight the L2 norm of the training step's own gradient (after "
            f"unscaling) and of the weight after the step; {rule}")


@dataclass
class BNWarning:
    step: int
    epoch: int | None
    loss_running: float
    loss_batch: float
    layer: str
    gap: float

    def message(self) -> str:
        where = f"step {self.step}" + (f" (epoch {self.epoch})" if self.epoch is not None else "")
        return (f"warning: {where}: probe loss {self.loss_running:.3g} with running BN statistics against "
                f"{self.loss_batch:.3g} with batch statistics; the largest gap is at {self.layer} "
                f"({self.gap:.3g} normalised units)")


class BNMonitor:
    """The measurements of the module docstring, every `every` calls of `step` (0: never).

    `probe_images`: normalised (N, C, H, W), fixed for the whole run; `probe_labels`: (N,). They go through
    the model in one forward per mode. `autocast`: the dtype training runs in (None: fp32). `probe`: one
    phrase saying which images these are (in the attrs). `writer`: optionally a TensorBoard `SummaryWriter`
    (anything with `add_scalar` and `add_histogram`) that receives every measurement.
    """

    def __init__(self, model: nn.Module, probe_images: torch.Tensor, probe_labels: torch.Tensor, *, every: int = 50,
                 autocast: torch.dtype | None = None, warn_factor: float = 1.5, warn_margin: float = 0.25,
                 warn_after: int = 0, probe: str = "given", writer=None,
                 on_warning: Callable[[BNWarning], None] | None = None):
        if every < 0:
            raise ValueError(f"every must be 0 (off) or a positive number of steps, not {every}")
        if len(probe_images) == 0 or len(probe_images) != len(probe_labels):
            raise ValueError("the probe needs images and as many labels")
        self.model, self.every, self.autocast = model, every, autocast
        self.device = next(model.parameters()).device
        self.images, self.labels = probe_images.to(self.device), probe_labels.to(self.device)
        self.warn_factor, self.warn_margin, self.warn_after, self.probe = warn_factor, warn_margin, warn_after, probe
        self.writer, self.on_warning = writer, on_warning
        self.bn_names = list(running_statistics(model))
        self.weight_names = [name for name, _ in weight_layers(model)]
        self.weight_kinds = [kind_of(module) for _, module in weight_layers(model)]
        self.weights = [module.weight for _, module in weight_layers(model)]
        self.calls = 0
        self.records: dict[str, list] = {name: [] for name in ("step", "epoch", *RECORDED)}

    # -----------------------------------------------------------------------------------------------------------
    # Measuring

    def step(self, step: int | None = None, *, epoch: int | None = None, loss: torch.Tensor | float | None = None,
             lr: float | None = None) -> BNWarning | None:
        """Call once after every optimiser step. `step`: the number of steps done (default: the calls so far);
        `loss`: the training batch's loss; `lr`: the learning rate of the step. Measures when `step` is a
        multiple of `every`; returns the warning if one fired."""
        self.calls += 1
        step = self.calls if step is None else step
        if not self.every or step % self.every:
            return None
        return self.measure(step, epoch=epoch, loss=loss, lr=lr)

    @torch.no_grad()
    def measure(self, step: int, *, epoch: int | None = None, loss=None, lr=None) -> BNWarning | None:
        """One measurement now, whatever the step."""
        grad_norm, weight_norm = self._norms()
        running = running_statistics(self.model)
        as_evaluated = {name: ChannelMoments() for name in self.bn_names}
        hooks = {name: (lambda module, inputs, output, m=as_evaluated[name]: m.update(inputs[0]))
                 for name in self.bn_names}
        autocast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None
                    else torch.autocast(self.device.type, enabled=False))
        with preserved_state(self.model), autocast:
            self.model.eval()
            with forward_hooks(self.model, hooks):
                logits_running = self.model(self.images).float()
            statistics, logits_batch = batch_statistics(self.model, self.images)
        inputs = {name: BNStatistics(m.mean, m.variance, running[name].eps) for name, m in as_evaluated.items()}
        losses = [F.cross_entropy(logits, self.labels).item() for logits in (logits_running, logits_batch.float())]
        accuracy = [(logits.argmax(1) == self.labels).double().mean().item() for logits in (logits_running,
                                                                                             logits_batch)]
        gap = statistics_error_table(running, statistics, self.bn_names).numpy()
        mismatch = statistics_error_table(running, inputs, self.bn_names).numpy()
        fired = (step >= self.warn_after and losses[0] > self.warn_factor * losses[1]
                 and losses[0] - losses[1] > self.warn_margin)
        record = {"step": step, "epoch": -1 if epoch is None else epoch, "probe_loss": losses,
                  "probe_acc": accuracy, "bn_gap": gap, "eval_mismatch": mismatch, "grad_norm": grad_norm,
                  "weight_norm": weight_norm, "lr": np.nan if lr is None else float(lr),
                  "train_loss": np.nan if loss is None else float(loss), "warning": fired}
        for name, value in record.items():
            self.records[name].append(value)
        if self.writer is not None:
            self._write_scalars(record)
        if not fired:
            return None
        worst = int(np.nanargmax(gap[:, 0])) if np.isfinite(gap[:, 0]).any() else 0
        warning = BNWarning(step, epoch, losses[0], losses[1], self.bn_names[worst] if self.bn_names else "",
                            float(gap[worst, 0]) if len(gap) else float("nan"))
        if self.on_warning is not None:
            self.on_warning(warning)
        return warning

    def _norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(gradient norms, weight norms), float64; NaN for a weight without a gradient."""
        grads = [w.grad for w in self.weights]
        present = [g for g in grads if g is not None]
        norms = iter(torch._foreach_norm(present) if present else [])
        grad_norm = [next(norms).double().item() if g is not None else np.nan for g in grads]
        weight_norm = [n.double().item() for n in torch._foreach_norm(self.weights)]
        return np.array(grad_norm), np.array(weight_norm)

    def _write_scalars(self, record: dict) -> None:
        """TensorBoard: one scalar per tag `group/name` and step (a layer's name is the name); per-layer values
        also as one histogram over the layers per step (`layers/...`)."""
        step, writer = record["step"], self.writer
        for name, tag in (("train_loss", "step/loss"), ("lr", "step/lr")):  # the caller's, where it passed them
            if np.isfinite(record[name]):
                writer.add_scalar(tag, record[name], step)
        for k, bn in enumerate(BN_STATISTICS):
            writer.add_scalar(f"probe/loss_{bn}", record["probe_loss"][k], step)
            writer.add_scalar(f"probe/accuracy_{bn}", record["probe_acc"][k], step)
        per_layer = {"bn_gap": (self.bn_names, record["bn_gap"][:, 0]),
                     "eval_mismatch": (self.bn_names, record["eval_mismatch"][:, 0]),
                     "grad_norm": (self.weight_names, record["grad_norm"]),
                     "scaled_grad_norm": (self.weight_names, record["grad_norm"] * record["weight_norm"])}
        for group, (names, values) in per_layer.items():
            for name, value in zip(names, values):
                writer.add_scalar(f"{group}/{name}", value, step)
            finite = values[np.isfinite(values)]
            if len(finite):
                writer.add_histogram(f"layers/{group}", finite, step)

    # -----------------------------------------------------------------------------------------------------------
    # The record

    def state_dict(self) -> dict:
        """The measurements so far, as tensors and lists (a checkpoint with weights_only=True can hold it)."""
        return {"calls": self.calls, "bn_layers": list(self.bn_names), "weight_layers": list(self.weight_names),
                "records": {name: torch.as_tensor(np.asarray(values, dtype=np.float64)) for name, values in
                            self.records.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue the record `state_dict` returned (on resume); the layers must be this model's."""
        if list(state["bn_layers"]) != self.bn_names or list(state["weight_layers"]) != self.weight_names:
            raise ValueError("the monitor's saved state is of another model")
        self.calls = int(state["calls"])
        records = state["records"]
        n = len(records["step"])
        self.records = {name: [] for name in ("step", "epoch", *RECORDED)}
        for i in range(n):
            for name in self.records:
                value = records[name][i].numpy()
                self.records[name].append(value if value.ndim else value.item())
        self.records["step"] = [int(s) for s in self.records["step"]]
        self.records["epoch"] = [int(e) for e in self.records["epoch"]]
        self.records["warning"] = [bool(w) for w in self.records["warning"]]

    def warnings_per_epoch(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for epoch, fired in zip(self.records["epoch"], self.records["warning"]):
            counts[epoch] = counts.get(epoch, 0) + int(fired)
        return counts

    def dataset(self, *, checkpoint=None, dataset=None) -> xr.Dataset:
        """Every measurement so far along `step`; BN layers along `depth`, weights along `weight_depth`."""
        r = self.records
        n, n_bn, n_w = len(r["step"]), len(self.bn_names), len(self.weight_names)

        def stacked(name, shape):
            return np.asarray(r[name], dtype=np.float64).reshape((n, *shape))

        grad_norm, weight_norm = stacked("grad_norm", (n_w,)), stacked("weight_norm", (n_w,))
        weight_coords = layer_coords(self.weight_names)
        coords = {**layer_coords(self.bn_names), "step": ("step", np.asarray(r["step"], dtype=np.int64)),
                  "epoch": ("step", np.asarray(r["epoch"], dtype=np.int64)), "bn": ("bn", list(BN_STATISTICS)),
                  "component": ("component", list(COMPONENTS)),
                  "weight_depth": ("weight_depth", weight_coords["depth"][1]),
                  "weight_layer": ("weight_depth", weight_coords["layer"][1]),
                  "weight_kind": ("weight_depth", np.array(self.weight_kinds, dtype=object))}
        rule = warning_rule(self.warn_factor, self.warn_margin, self.warn_after)
        return xr.Dataset(
            {
                "probe_loss": variable(("step", "bn"), stacked("probe_loss", (2,)), "probe cross-entropy", "nats"),
                "probe_acc": variable(("step", "bn"), stacked("probe_acc", (2,)), "probe top-1 accuracy", "1"),
                "bn_gap": variable(("step", "depth", "component"), stacked("bn_gap", (n_bn, 3)),
                                   "normalisation error of the running statistics against the probe's batch "
                                   "statistics at the layer's input", UNITS),
                "eval_mismatch": variable(("step", "depth", "component"), stacked("eval_mismatch", (n_bn, 3)),
                                          "normalisation error of the running statistics against the layer's "
                                          "input in eval mode", UNITS),
                "grad_norm": variable(("step", "weight_depth"), grad_norm, "L2 norm of the training step's gradient",
                                      "nats per weight unit"),
                "weight_norm": variable(("step", "weight_depth"), weight_norm, "L2 norm of the weight", "1"),
                "scaled_grad_norm": variable(("step", "weight_depth"), grad_norm * weight_norm,
                                             "gradient norm x weight norm (scale invariant under BN)", "nats"),
                "train_loss": variable("step", np.asarray(r["train_loss"], dtype=np.float64),
                                       "training batch loss of the step", "nats"),
                "lr": variable("step", np.asarray(r["lr"], dtype=np.float64), "learning rate of the step", "1"),
                "warning": variable("step", np.asarray(r["warning"], dtype=bool), "early warning fired", "1"),
            },
            coords=coords,
            attrs=attrs(definition(self.every, len(self.labels), self.probe, rule), checkpoint=checkpoint,
                        dataset=dataset, split="train", n_images=len(self.labels), batch_size=len(self.labels),
                        bn_mode="eval and train", every=self.every, rule=rule, warn_factor=self.warn_factor,
                        warn_margin=self.warn_margin, warn_after=self.warn_after, probe=self.probe,
                        autocast=str(self.autocast).replace("torch.", "") if self.autocast else "fp32"),
        )
