"""One training step (forward in the run's autocast, backward, SGD, the schedule), and `--compile auto|on|off`.

torch.compile makes a step faster only after a warm-up (58 s for resnet20's training step on one core of this
project's CPU, 84 s for resnet56's on two; docs/performance.md) and does not always pay even then (plain20 ran
slower compiled in one measurement). So `auto` compiles only a run whose eager steps, timed on a copy of the model
before it starts, add up to at least PAYBACK warm-ups: a compiled step that gains nothing then costs the run at
most a tenth. A model that fails to compile trains eagerly after one line, its first step taken again exactly.
"""
import copy
import logging
import time
from typing import Callable

import torch
import torch.nn as nn

from analyses.common import autocast

from .errors import first_line

COMPILE_MODES = ("auto", "on", "off")
COMPILE_WARM_UP = {"cpu": 90.0, "cuda": 60.0}  # seconds: what `auto` assumes compiling costs, a little above measured
PAYBACK = 10  # auto compiles a run of at least PAYBACK warm-ups of eager steps
SHORTEST_COMPILED_RUN = 500  # steps: auto leaves a shorter run eager without timing it (the demo's has 184)
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests' `aot_eager` traces the same graphs without C++


def choose_compile(mode: str, total_steps: int, device: torch.device,
                   eager_step_seconds: Callable[[], float]) -> tuple[bool, str]:
    """(compile?, why) for `--compile mode`; `eager_step_seconds` is called only where the choice depends on it."""
    if mode != "auto":
        return mode == "on", f"--compile {mode}"
    if total_steps < SHORTEST_COMPILED_RUN:
        return False, f"auto: {total_steps:,} steps, too few to repay compiling"
    seconds = eager_step_seconds()
    warm_up = COMPILE_WARM_UP[device.type]
    pays = seconds * total_steps >= PAYBACK * warm_up
    return pays, (f"auto: {total_steps:,} steps of {seconds:.3g} s eager {'repay' if pays else 'would not repay'} "
                  f"a ~{warm_up:.0f} s compile")


def eager_step_seconds(model: nn.Module, shape: tuple[int, ...], num_classes: int, dtype: torch.dtype | None,
                       channels_last: bool, repeats: int = 3) -> float:
    """Seconds of one eager forward and backward pass of a random batch of `shape`, on a copy of `model`, the
    fastest of `repeats` after one untimed pass: the run's model, buffers and random streams are untouched."""
    copied = copy.deepcopy(model).train()
    device = next(model.parameters()).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        generator = torch.Generator(device).manual_seed(0)
        x = torch.randn(shape, generator=generator, device=device)
        x = x.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        y = torch.randint(0, num_classes, (shape[0],), generator=generator, device=device)
        seconds = []
        for _ in range(repeats + 1):
            synchronize(device)
            started = time.perf_counter()
            with autocast(device.type, dtype):
                loss = nn.functional.cross_entropy(copied(x), y)
            loss.backward()
            synchronize(device)
            seconds.append(time.perf_counter() - started)
    return min(seconds[1:])


class TrainStep:
    """`step(x, y)`: one SGD step of `step_model` (the model, or its DDP wrapper) on a batch, returning the loss and
    the logits. Compiled, its first call is where torch.compile compiles: timed and reported through `write`, and
    where it fails the BN buffers are put back and the step is taken again eagerly (its gradients set anew)."""

    def __init__(self, model: nn.Module, step_model: nn.Module, optimizer, scheduler, scaler, criterion,
                 dtype: torch.dtype | None, compiled: bool = False, write: Callable[[str], None] = print,
                 backend: str | None = None):
        self.model, self.eager, self.optimizer, self.scheduler = model, step_model, optimizer, scheduler
        self.scaler, self.criterion, self.dtype, self.write = scaler, criterion, dtype, write
        self.forward = torch.compile(step_model, backend=backend or COMPILE_BACKEND) if compiled else step_model
        self.compiling = compiled
        self.amp = autocast(next(model.parameters()).device.type, dtype)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiling:
            loss, logits = self._first_compiled_pass(x, y)
        else:
            loss, logits = self._pass(self.forward, x, y)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss, logits

    def _pass(self, forward, x, y):
        with self.amp:
            logits = forward(x)
            loss = self.criterion(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss, logits

    def _first_compiled_pass(self, x, y):
        self.compiling = False
        buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        started = time.perf_counter()
        quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on every CPU
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            passed = self._pass(self.forward, x, y)
        except Exception as exc:  # noqa: BLE001 - whatever the compiler raises, the eager model still trains
            self.write(f"compile: torch.compile failed ({type(exc).__name__}: {first_line(exc)}); training eagerly")
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(buffers[name])
            self.forward = self.eager
            return self._pass(self.eager, x, y)
        finally:
            quiet.setLevel(level)
        self.write(f"compile: the first compiled step took {time.perf_counter() - started:.1f} s (its warm-up)")
        return passed
