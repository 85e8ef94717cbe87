"""The GPU check: on a machine with a GPU, every figure the performance issue asks of one, in about 5 minutes,
ending in one summary table.

1. training throughput, ours against the typical DataLoader loop, resnet56 and plain56, fp32 and bf16, with
   and without torch.compile (`benchmarks.train_throughput`);
2. the BN monitor's cost at the trainer's default interval, with the attribution of each validation
   (`benchmarks.monitor_cost`);
3. what `--compile auto` chooses against what compiling gives: warm-up, compiled and eager steps
   (`benchmarks.compile_choice`);
4. the analyses' overhead (`benchmarks.analysis_overhead`);
5. a short he2016 run (`python -m train --preset he2016 --iterations N --compile on`, in this process: compiled,
   as auto compiles the full recipe on a GPU) to time the recipe, extrapolated to its 64,000 iterations (the
   first epoch, with the compile's warm-up, left out).

It installs nothing and needs no network: the project's dependencies must be there. Fashion-MNIST is used where
it is on disk, the synthetic dataset otherwise (the table says which). `--shrink` runs the same parts with tiny
sizes, on a CPU too, in well under a minute: the test suite's check that the script works.

Run: `python -m benchmarks.gpu [--shrink] [--data-dir DIR]` or `make bench-gpu`.
"""
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from train.errors import ArgumentParser, UserError

# The project's dependencies that these parts import, by module name: checked before anything is imported.
NEEDED = ("torch", "torchvision", "numpy", "xarray", "netCDF4", "fvcore", "tqdm", "PIL")

FULL = {  # the options of each part on a GPU
    "throughput": ["--models", "resnet56", "plain56", "--steps", "50", "--repeats", "2", "--compile"],
    "monitor": ["--models", "resnet56", "plain56", "--steps", "200", "--every", "100", "--repeats", "2"],
    "compile": ["--models", "resnet56", "--steps", "50", "--repeats", "2"],
    "overhead": ["--models", "resnet56", "plain56", "--images", "2048", "--batch-size", "256", "--repeats", "2"],
    "he2016": ["--model", "resnet56", "--iterations", "1000", "--compile", "on"],
}
SHRUNK = {  # the same parts, tiny: the code paths, not the figures (the eager backend traces without compiling)
    "throughput": ["--models", "resnet20", "--steps", "2", "--batch-size", "8", "--repeats", "1", "--workers",
                   "0", "--compile", "--compile-backend", "eager"],
    "monitor": ["--models", "resnet20", "--steps", "2", "--every", "1", "--batch-size", "8", "--probe-images", "8",
                "--repeats", "1"],
    "compile": ["--models", "resnet20", "--steps", "2", "--batch-size", "4", "--repeats", "1", "--backend",
                "aot_eager"],
    "overhead": ["--models", "resnet20", "--images", "16", "--batch-size", "8", "--memory-batches", "1",
                 "--repeats", "1"],
    "he2016": ["--model", "resnet20", "--iterations", "4", "--train-images", "32", "--batch-size", "8",
               "--eval-batch-size", "64", "--monitor-every", "2", "--monitor-images", "8"],
}


def parser():
    p = ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--shrink", action="store_true", help="tiny sizes, on a CPU too: checks that the script works")
    p.add_argument("--data-dir", help="where Fashion-MNIST may be (default ./data or $RESNET_DIAG_DATA)")
    return p


def missing_packages() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def check_packages() -> None:
    missing = missing_packages()
    if missing:
        raise UserError(f"missing Python packages: {', '.join(missing)}; this script installs nothing: install the "
                        "project's dependencies first (pip install -e .)")


def dataset_available(name: str, data_dir) -> bool:
    from train import datasets
    try:
        datasets.load_split(name, "train", data_dir, download=False)
    except UserError:
        return False
    return True


def recipe(options: list[str], dataset: str, data_dir: str, device):
    """A short he2016 run, timed: training images per second, and the full recipe extrapolated from the epochs
    after the first (the first includes the warm-up): its iterations at that speed plus, for each of its
    epochs, the validation and checkpoint time these epochs had."""
    from train import rundir
    from train.__main__ import main as train_main
    from train.config import PRESETS

    from . import common
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        started = time.perf_counter()
        common.quietly(train_main, ["--preset", "he2016", *options, "--dataset", dataset, "--data-dir", data_dir,
                                    "--device", device.type, "--out", str(out)])
        wall = time.perf_counter() - started
        history, config = rundir.read_metrics(out), rundir.read_config(out)
    batch, per_epoch, full = config["batch_size"], config["steps_per_epoch"], PRESETS["he2016"]["iterations"]
    steps = [int(b - a) for a, b in zip([0] + history["step"][:-1], history["step"])]
    warm = slice(1, None) if len(steps) > 1 else slice(None)
    seconds_per_step = statistics.median(batch / rate for rate in history["images_per_second"][warm])
    overhead = statistics.median(total - n * batch / rate for total, n, rate in zip(
        history["epoch_seconds"][warm], steps[warm], history["images_per_second"][warm]))
    minutes = (full * seconds_per_step + math.ceil(full / per_epoch) * overhead) / 60
    report = common.Report(
        f"python -m train --preset he2016 {' '.join(options)} --dataset {dataset}: {config['total_steps']} "
        f"iterations of batch {batch} in {wall:.1f} s, {config['precision_used']} ({config['precision_reason']}), "
        f"compile {config['compile_used']} ({config['compile_reason']})",
        ["epoch", "steps", "epoch s", "train img/s"],
        [[str(e), str(n), f"{s:.1f}", f"{r:,.0f}"] for e, n, s, r in zip(history["epoch"], steps,
                                                                       history["epoch_seconds"],
                                                                       history["images_per_second"])])
    report.targets.append(common.Target(f"he2016 training speed ({config['model']}, {config['precision_used']})",
                                        batch / seconds_per_step, None, unit=" img/s", fmt=",.0f"))
    report.targets.append(common.Target(f"he2016 full recipe ({full:,} iterations, {per_epoch} steps an epoch), "
                                        "extrapolated", minutes, None, unit=" min", fmt=".1f",
                                        reason=f"{seconds_per_step * 1000:.1f} ms a step, {overhead:.1f} s of "
                                               "validation and checkpoints an epoch"))
    return report


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    check_packages()
    import torch

    from train import datasets
    from train.trainer import choose_device

    from . import analysis_overhead, common, compile_choice, monitor_cost, train_throughput
    if not torch.cuda.is_available() and not args.shrink:
        raise UserError("no GPU is visible; run this on a machine with one, or give --shrink for a quick "
                               "check of the script on a CPU")
    device = choose_device("auto")
    data_dir = args.data_dir or str(datasets.default_data_dir())
    if args.shrink:
        dataset, why = "synthetic", "shrunk: tiny sizes on the synthetic dataset; these figures measure nothing"
    elif dataset_available("fashion-mnist", data_dir):
        dataset, why = "fashion-mnist", "found on disk"
    else:
        dataset, why = "synthetic", (f"Fashion-MNIST is not in {data_dir} or {datasets.DEBIAN_FASHION_MNIST}, so the "
                                     "synthetic dataset (1,024 images, repeated) stands in")
    sizes = SHRUNK if args.shrink else FULL
    shared = ["--dataset", dataset, "--data-dir", data_dir, "--device", device.type]
    print(common.machine_line(device), flush=True)
    print(f"# data: {dataset} ({why})", flush=True)
    parts = {
        "throughput": lambda: train_throughput.measure(
            train_throughput.parser().parse_args(sizes["throughput"] + shared), device),
        "monitor": lambda: monitor_cost.measure(monitor_cost.parser().parse_args(sizes["monitor"] + shared), device),
        "compile": lambda: compile_choice.measure(
            compile_choice.parser().parse_args(sizes["compile"] + ["--device", device.type]), device),
        "overhead": lambda: analysis_overhead.measure(
            analysis_overhead.parser().parse_args(sizes["overhead"] + ["--device", device.type]), device),
        "he2016": lambda: recipe(sizes["he2016"], dataset, data_dir, device),
    }
    started = time.perf_counter()
    summary = []
    for name, part in parts.items():
        part_started = time.perf_counter()
        print(f"\n## {name}", flush=True)
        report = part()
        common.print_report(report)
        print(f"({name}: {time.perf_counter() - part_started:.0f} s)", flush=True)
        summary += [[name, target.name, target.figure_text, target.goal_text, target.verdict]
                    for target in report.targets]
    total = common.Target("the GPU check's wall time", (time.perf_counter() - started) / 60, 5.0, at_most=True,
                          unit=" min", fmt=".1f")
    summary.append(["all", total.name, total.figure_text, total.goal_text, total.verdict])
    print("\n## summary", flush=True)
    print(common.format_table(["part", "target", "figure", "goal", "verdict"], summary))


if __name__ == "__main__":
    try:
        check_packages()  # before main_guard's own imports could fail on them
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    from diagnostics.common import main_guard
    sys.exit(main_guard(main))
