"""What every benchmark shares: its options, the machine it ran on, bf16 or not, the same images, interleaved
timing, and the report (a table, then one `summary:` line per target saying whether it is met).

A figure only means something next to the machine it came from, so every benchmark prints that machine first:
CPU model, torch threads, the kernels torch dispatches to (`torch.backends.cpu.get_cpu_capability()`), the
CPU flags that bear on bf16 (avx512f, avx512_bf16, amx_bf16; which, with the vendor, make it native:
`train.trainer.cpu_native_bf16`) and the GPU.
"""
import argparse
import contextlib
import io
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Callable, Iterable

import torch

import models
from analyses.common import model_device, synchronize
from analyses.monitor import BNMonitor
from diagnostics.common import format_table
from train import datasets
from train.batches import TrainBatches
from train.errors import MAX_INT, ArgumentParser, positive_int
from train.progress import Progress
from train.step import TrainStep
from train.trainer import choose_device, cpu_flags, cpu_info, native_bf16, train_epoch

BF16_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")


# ---------------------------------------------------------------------------------------------------------------
# Options


def model_name(text: str) -> str:
    if text not in models.available():
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose from {', '.join(models.available())}")
    return text


def parser(module: str, doc: str, *, models_default: list[str] | None, repeats: int = 2) -> ArgumentParser:
    """The options every benchmark has: --models (unless `models_default` is None), --repeats, --device. Bad
    values are one line `error: ...` and exit 2. `doc`: the module's docstring; its first paragraph is the
    description."""
    p = ArgumentParser(prog=f"python -m {module}", description=" ".join(doc.split("\n\n")[0].split()))
    if models_default is not None:
        p.add_argument("--models", nargs="+", type=model_name, default=models_default, metavar="MODEL",
                       help=f"default: {' '.join(models_default)}; any of models.available()")
    p.add_argument("--repeats", type=positive_int, default=repeats,
                   help=f"timed rounds after one warm-up round; the median is reported (default {repeats})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def add_data_options(p: ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=128, help="default 128")
    p.add_argument("--dataset", choices=tuple(datasets.SPECS), default="fashion-mnist",
                   help="the images trained on (default fashion-mnist; synthetic needs no files)")
    p.add_argument("--data-dir", default=str(datasets.default_data_dir()))


# ---------------------------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    name = cpu_info("model name")
    return f"{name or platform.processor() or 'unknown CPU'} ({platform.machine()}, {os.cpu_count()} cores)"


def flags_text() -> str:
    """`avx512f no, avx512_bf16 no, amx_bf16 no`: the flags that bear on bf16 on a CPU."""
    present = cpu_flags()
    return ", ".join(f"{flag} {'yes' if flag in present else 'no'}" for flag in BF16_FLAGS)


def gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"none used ({torch.cuda.device_count()} visible)" if torch.cuda.is_available() else "none"


def machine_line(device: torch.device) -> str:
    return (f"# machine: {cpu_model()}, torch threads {torch.get_num_threads()}, capability "
            f"{torch.backends.cpu.get_cpu_capability()}, flags {flags_text()}; GPU: {gpu_name(device)}; "
            f"torch {torch.__version__}, resnet-diagnostics {models.__version__}, {date.today().isoformat()}")


def bf16_plan(device: torch.device, forced: bool) -> tuple[bool, bool, str]:
    """(measure bf16?, native?, why): bf16 is measured where the device has it natively, or when --bf16 forces it.
    `why` completes "bf16 measured: ..." or "bf16 not measured: ..."."""
    native, why = native_bf16(device)
    if native:
        return True, True, why
    if forced:
        return True, False, f"--bf16 was given, though bf16 is not native here: {why}"
    return False, False, f"no native bf16: {why}; --bf16 forces it"


def bf16_note(measured: bool, why: str) -> str:
    return f"bf16 {'measured' if measured else 'not measured'}: {why}"


# ---------------------------------------------------------------------------------------------------------------
# Images and batches


def benchmark_images(name: str, n: int, data_dir) -> tuple[datasets.Images, datasets.DatasetSpec]:
    """The first `n` training images of a dataset, repeated where it has fewer (synthetic has 1,024): what is
    timed is the work per image, not which images."""
    images = datasets.load_split(name, "train", data_dir)
    if len(images) < n:
        copies = -(-n // len(images))
        images = datasets.Images(images.images.repeat(copies, 1, 1, 1), images.labels.repeat(copies))
    return images[:n], datasets.get_spec(name)


def fixed_batches(n_images: int, batch_size: int, device) -> list:
    """Exactly `n_images` random images in batches of `batch_size` (the last one smaller where it does not
    divide): one fixed batch reused, since the data path is not what is measured."""
    batch_size = min(batch_size, n_images)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    full, rest = divmod(n_images, batch_size)
    return [(x, y)] * full + ([(x[:rest], y[:rest])] if rest else [])


# ---------------------------------------------------------------------------------------------------------------
# The trainer's loop


def sgd(model: torch.nn.Module, fused: bool) -> torch.optim.SGD:
    """SGD with momentum and weight decay, the same settings for every loop compared."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=fused)


def trainer_batches(images: datasets.Images, spec: datasets.DatasetSpec, batch_size: int, device) -> TrainBatches:
    """The trainer's batches: uint8 images on the device, crop and flip there, channels_last."""
    return TrainBatches(images, spec, batch_size, "crop-flip", device, seed=0, channels_last=True)


def trainer_step(model: torch.nn.Module, optimizer, amp_dtype: torch.dtype | None, compiled: bool = False,
                 backend: str | None = None) -> TrainStep:
    """The trainer's own `train.step.TrainStep` at a constant learning rate (fp16's scaler off), compiled with
    `backend` where asked; its lines (the compile's warm-up, a fallback) are not printed: `failure` says."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(model_device(model).type, enabled=False)
    return TrainStep(model, model, optimizer, scheduler, scaler, torch.nn.CrossEntropyLoss(), amp_dtype,
                     compiled=compiled, write=lambda line: None, backend=backend)


def trainer_epoch(step_model, batches: TrainBatches, optimizer, amp_dtype: torch.dtype | None,
                  monitor: BNMonitor | None = None) -> None:
    """One epoch of the trainer's own `train.trainer.train_epoch` over all of `batches` (the steps timed), with
    the BN monitor where one is given, at a constant learning rate."""
    train_epoch(trainer_step(step_model, optimizer, amp_dtype), batches, 1, 0, MAX_INT,
                Progress(None, "", enabled=False), monitor)


# ---------------------------------------------------------------------------------------------------------------
# Timing


def timed(function: Callable[[], object], device: torch.device) -> float:
    """Seconds of `function()`, with the device's queue drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device, progress: Progress,
                warm_up: Iterable[str] | None = None, rounds: dict[str, list[float]] | None = None
                ) -> dict[str, float]:
    """Median seconds of each run over `repeats` rounds that take every run in turn, after one warm-up round
    that is not counted (of the runs named in `warm_up`; default all): load that drifts during a benchmark
    affects every run alike. `rounds`, where given, receives each run's seconds round by round."""
    seconds = rounds if rounds is not None else {}
    seconds.update({key: [] for key in runs})
    warm_up = set(runs if warm_up is None else warm_up)
    for round_ in range(repeats + 1):
        for key, function in runs.items():
            if round_ or key in warm_up:
                took = timed(function, device)
                if round_:
                    seconds[key].append(took)
                progress.update(1)
    return {key: statistics.median(values) for key, values in seconds.items()}


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Target:
    """One target of the performance issue and its figure; `figure=None`: not measured, `reason` says why;
    `goal=None`: shown for information, no target applies here. `unit`: "x" (a ratio), "%" (a fraction shown
    in percent) or a unit written after the number in `fmt`."""
    name: str
    figure: float | None
    goal: float | None
    at_most: bool = False
    unit: str = "x"
    reason: str = ""
    fmt: str = ".2f"

    def _number(self, value: float) -> str:
        return f"{100 * value:.1f}%" if self.unit == "%" else f"{value:{self.fmt}}{self.unit}"

    @property
    def verdict(self) -> str:
        if self.figure is None:
            return "not measured"
        if self.goal is None:
            return "no target here"
        return "met" if (self.figure <= self.goal if self.at_most else self.figure >= self.goal) else "MISSED"

    @property
    def figure_text(self) -> str:
        return "-" if self.figure is None else self._number(self.figure)

    @property
    def goal_text(self) -> str:
        return "-" if self.goal is None else f"{'<=' if self.at_most else '>='} {self._number(self.goal)}"

    def line(self) -> str:
        if self.figure is None:
            return f"summary: {self.name}: not measured ({self.reason})"
        goal = f" (target {self.goal_text})" if self.goal is not None else ""
        return (f"summary: {self.name}: {self.figure_text}{goal}: {self.verdict}" +
                (f"; {self.reason}" if self.reason else ""))


MONITOR_BUDGET = 0.03  # the BN monitor and the attribution together, as a share of training (issues 24, 28)


def monitor_budget(label: str, at_default: float | None, from_measure: float, attributing: float,
                   missing: str = "") -> Target:
    """The target both the trainer's monitor and the Lightning callback are held to: the monitor at its default
    interval plus the attribution of each validation, at most MONITOR_BUDGET of training; `at_default` None: no
    measurement was made (`missing` says why)."""
    if at_default is None:
        return Target(label, None, MONITOR_BUDGET, at_most=True, unit="%", reason=missing)
    return Target(label, at_default + attributing, MONITOR_BUDGET, at_most=True, unit="%",
                  reason=f"monitor {at_default:.1%} (from the measurement time {from_measure:.1%}) + attribution "
                         f"{attributing:.1%}")


@dataclass
class Report:
    """What a benchmark found: a heading line, a table, notes under it and its targets."""
    heading: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


def print_report(report: Report) -> None:
    print(report.heading)
    print(format_table(report.header, report.rows))
    for note in report.notes:
        print(note)
    for target in report.targets:
        print(target.line())


def main(parser: Callable[[], ArgumentParser], measure: Callable[..., Report], argv=None) -> None:
    """A benchmark's command: its options, the machine line, then `measure(args, device)`'s report."""
    args = parser().parse_args(argv)
    device = choose_device(args.device)
    print(machine_line(device), flush=True)
    print_report(measure(args, device))


def quietly(command: Callable[[list[str]], int], argv: list[str]) -> None:
    """A command line's `main(argv)` run in this process, its printed lines discarded; a failure ends the benchmark
    with the command's exit code (the command has said why, in one line)."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = command(argv)
    if code:
        raise SystemExit(code)


def progress(total: int, desc: str) -> Progress:
    """Progress of a benchmark, counted in timed runs: a bar on a terminal, a line every 30 s elsewhere."""
    return Progress(total, desc, unit="run")
