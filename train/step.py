"""One training step (forward in the run's autocast, backward, SGD, the schedule), and `--compile auto|on|off`.

torch.compile makes a step faster only after a warm-up (41-45 s for resnet20's and resnet56's training steps on
this project's 2-core CPU, 134-144 s on one core beside other work; docs/performance.md) and does not always pay
even then (plain20 ran slower compiled in bf16 on an AMX machine). So `auto` compiles only a run whose eager steps,
timed on a copy of the model before it starts, add up to at least PAYBACK warm-ups: a compiled step that gains
nothing then costs the run at most a tenth. A `--deterministic` run stays eager under auto (inductor picks its
kernels by timing them, so a recompiled resumed run may sum in another order). A model that fails to compile
trains eagerly after one line, its first step taken again exactly; under DDP it stops with one line instead (the
processes' collectives could not be matched again).
"""
import copy
import logging
import time
from typing import Callable

import torch
import torch.nn as nn

from analyses.common import autocast, model_device, synchronize

from .errors import UserError, first_line

COMPILE_MODES = ("auto", "on", "off")
COMPILE_WARM_UP = {"cpu": 90.0, "cuda": 60.0}  # seconds: what `auto` assumes compiling costs, a little above measured
PAYBACK = 10  # auto compiles a run of at least PAYBACK warm-ups of eager steps
SHORTEST_COMPILED_RUN = 500  # steps: auto leaves a shorter run eager without timing it (the demo's has 184)
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests' `aot_eager` traces the same graphs without C++


def choose_compile(mode: str, total_steps: int, device: torch.device, eager_step_seconds: Callable[[], float],
                   deterministic: bool = False) -> tuple[bool, str]:
    """(compile?, why) for `--compile mode`; `eager_step_seconds` is called only where the choice depends on it."""
    if mode != "auto":
        return mode == "on", f"--compile {mode}"
    if deterministic:
        return False, "auto: --deterministic (inductor's kernels are chosen by timing)"
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
    device = model_device(model)
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


def compile_failure(exc: Exception) -> str:
    """`InvalidCxxCompiler: ...`: the compiler's own error, where torch's BackendCompilerFailed wraps it."""
    cause = getattr(exc, "inner_exception", None) or exc
    return f"{type(cause).__name__}: {first_line(cause)}"


class TrainStep:
    """`step(x, y)`: one SGD step of `step_model` (the model, or its DDP wrapper) on a batch, returning the loss and
    the logits. Compiled, its first call is where torch.compile compiles: timed and reported through `write`, and
    where it fails (`failure` says how) the BN buffers and random streams are put back and the step is taken again
    eagerly, its gradients set anew; unless `fall_back` is false (DDP), where it is one error line."""

    def __init__(self, model: nn.Module, step_model: nn.Module, optimizer, scheduler, scaler, criterion,
                 dtype: torch.dtype | None, compiled: bool = False, write: Callable[[str], None] = print,
                 backend: str | None = None, fall_back: bool = True):
        self.model, self.eager, self.optimizer, self.scheduler = model, step_model, optimizer, scheduler
        self.scaler, self.criterion, self.dtype, self.write = scaler, criterion, dtype, write
        self.forward = torch.compile(step_model, backend=backend or COMPILE_BACKEND) if compiled else step_model
        self.compiling, self.fall_back, self.failure = compiled, fall_back, None
        self.amp = autocast(model_device(model).type, dtype)

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
        device = model_device(self.model)
        buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        started, failure = time.perf_counter(), None
        quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on every CPU
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            passed = self._pass(self.forward, x, y)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the compiler raises, the eager model still trains
            failure = compile_failure(exc)
        finally:
            quiet.setLevel(level)
        self.compiling = False
        if failure is None:
            self.write(f"compile: the first compiled step took {time.perf_counter() - started:.1f} s (its warm-up)")
            return passed
        if not self.fall_back:
            raise UserError(f"torch.compile failed ({failure}); train with --compile off")
        self.failure = failure
        self.write(f"compile: torch.compile failed ({failure}); training eagerly")
        with torch.no_grad():  # what the failed attempt's forward pass moved
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        self.forward = self.eager
        return self._pass(self.eager, x, y)
