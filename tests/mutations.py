"""The mutation harness of tests/test_mutations.py: every field of a real checkpoint, last.pt, metrics.csv and
config.json replaced by values of the wrong type, size, sign and encoding, each case run through the command
line it reaches (in-process, in one worker process: `python tests/mutations.py RUN OUT`), with its exit code, its
stderr, whether it wrote anything, and its peak memory (Linux's VmHWM, reset before each case).

A case passes when it exits 0 with the unmutated result, or exits 2 with one `error: ` line and writes nothing.
"""
import contextlib
import copy
import csv
import io
import json
import shutil
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch

HOSTILE = {  # name -> value; each field gets a deterministic sample of these
    "none": None, "string": "x" * 3, "long string": "é" * 5000, "negative": -7, "huge int": 2**62,
    "nan": float("nan"), "inf": float("inf"), "empty list": [], "empty dict": {}, "bool": True,
    "bytes": b"\xff\xfe", "nested": [[[[[1]]]]], "tensor": torch.zeros(3),
    "forged tensor": torch.zeros(1).expand(10**9), "list of a million": [0] * 1_000_000,
}
CSV_HOSTILE = ["", "nan", "abc", "-1", "1e400", "\udcff", "1,2", "4.5"]


def sample(key: str, count: int) -> list[str]:
    """`count` hostile value names for `key`, the same every run (a hash of the key picks them)."""
    names = list(HOSTILE)
    start = zlib.crc32(key.encode()) % len(names)
    return [names[(start + 3 * i) % len(names)] for i in range(count)]


NESTED = ("model", "dataset", "config", "history", "provenance", "scheduler", "scaler", "rng", "monitor")


def checkpoint_cases(state: dict, keys=None, values_per_key: int = 5, values_per_field: int = 1,
                     nested=NESTED) -> list[tuple[str, dict]]:
    """(description, mutated checkpoint): every top-level key (of `keys`, default all) replaced by a sample of
    `values_per_key` hostile values, and deleted; every key of the nested dicts replaced by a sample of
    `values_per_field`; and the state_dict's own failure modes. The samples rotate with the key, so that every
    hostile value is tried on some field."""
    cases = []
    for key in (state if keys is None else [key for key in keys if key in state]):
        for name in sample(key, values_per_key):
            cases.append((f"{key} = {name}", {**state, key: HOSTILE[name]}))
        cases.append((f"{key} deleted", {k: v for k, v in state.items() if k != key}))
    for key in nested:
        if not isinstance(state.get(key), dict):
            continue
        for field in state[key]:
            for name in sample(f"{key}.{field}", values_per_field):
                mutated = copy.copy(state)
                mutated[key] = {**state[key], field: HOSTILE[name]}
                cases.append((f"{key}.{field} = {name}", mutated))
    weights = state["state_dict"]
    first, bias = next(iter(weights)), next(key for key in weights if key.endswith("fc.bias"))
    for description, change in (
            ("state_dict gains a non-string key", {**weights, 7: torch.zeros(1)}),
            ("state_dict gains an extra tensor", {**weights, "extra.weight": torch.zeros(2)}),
            ("state_dict value is a list", {**weights, first: [1.0, 2.0]}),
            ("state_dict tensor of the wrong shape", {**weights, first: torch.zeros(3, 3)}),
            ("state_dict tensor of integers", {**weights, bias: weights[bias].long()}),
            ("state_dict tensor forged (a stride-0 view of 1e9)", {**weights, bias: torch.zeros(1).expand(10**9)}),
            ("state_dict loses a tensor", {k: v for k, v in weights.items() if k != first})):
        cases.append((description, {**state, "state_dict": change}))
    if "optimizer" in state:
        optimizer = state["optimizer"]
        cases.append(("optimizer buffer of the wrong shape", {**state, "optimizer": {
            **optimizer, "state": {0: {"momentum_buffer": torch.zeros(2)}}}}))
        cases.append(("optimizer param group of another model", {**state, "optimizer": {
            **optimizer, "param_groups": [{**optimizer["param_groups"][0], "params": [0, 1]}]}}))
        cases.append(("step history rows of the wrong length", {**state, "step_history": [[1, 2]] * state["step"]}))
    return cases


def lightning_checkpoint(state: dict) -> dict:
    """The run's weights as PyTorch Lightning's ModelCheckpoint writes them: under the LightningModule's
    attribute (`self.model = ...`), beside the loops', callbacks' and optimisers' states."""
    return {"epoch": state["epoch"] - 1, "global_step": state["step"], "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"model.{key}": value for key, value in state["state_dict"].items()},
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": state["epoch"]}}}},
            "callbacks": {"BNMonitorCallback": {}}, "optimizer_states": [], "lr_schedulers": [],
            "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.05}}


def lightning_cases(checkpoint: dict) -> list[tuple[str, dict]]:
    """Every field of a Lightning checkpoint made wrong, and the ways its attribute prefix can mislead: a second
    attribute holding convolutions, weights without any prefix, one tensor outside the model's attribute."""
    weights = checkpoint["state_dict"]
    bare = {key.removeprefix("model."): value for key, value in weights.items()}
    first = next(key for key in weights if key.endswith("conv.weight"))
    return [(f"lightning {description}", mutated) for description, mutated in [
        *checkpoint_cases(checkpoint, values_per_key=3, nested=("loops", "callbacks", "hyper_parameters")),
        ("a second attribute holding convolutions", {**checkpoint, "state_dict": {
            **weights, "teacher.conv.weight": weights[first].clone()}}),
        ("weights without the attribute's prefix", {**checkpoint, "state_dict": bare}),
        ("a tensor of another attribute (a loss's weight)", {**checkpoint, "state_dict": {
            **weights, "criterion.weight": torch.ones(4)}}),
        ("epoch a bool", {**checkpoint, "epoch": True})]]


def csv_cases(text: str) -> list[tuple[str, str]]:
    """(description, mutated metrics.csv): every cell of the last row replaced by two hostile strings (a
    deterministic sample), each column dropped, the rows reversed, another encoding."""
    rows = list(csv.reader(io.StringIO(text)))
    header, cases = rows[0], []
    for column, name in enumerate(header):
        start = zlib.crc32(name.encode()) % len(CSV_HOSTILE)
        for value in [CSV_HOSTILE[(start + i) % len(CSV_HOSTILE)] for i in range(2)]:
            mutated = [row[:] for row in rows]
            mutated[-1][column] = value
            cases.append((f"metrics.csv {name} = {value!r}", _csv(mutated)))
        dropped = [[cell for i, cell in enumerate(row) if i != column] for row in rows]
        cases.append((f"metrics.csv without {name}", _csv(dropped)))
    cases.append(("metrics.csv with its rows reversed", _csv([header, *rows[:0:-1]])))
    cases.append(("metrics.csv in UTF-16", text.encode("utf-16").decode("latin-1")))
    return cases


def _csv(rows) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def config_cases(config: dict) -> list[tuple[str, str]]:
    cases = [("config.json is a list", "[]"), ("config.json is truncated", json.dumps(config)[:40]),
             ("config.json nested 10,000 deep", "[" * 10_000 + "]" * 10_000)]
    for key in list(config)[::2]:  # every other option: the config's own checks are one function for all
        for name in sample(f"config.json {key}", 1):
            value = HOSTILE[name]
            if isinstance(value, (torch.Tensor, bytes)):
                value = str(value)
            cases.append((f"config.json {key} = {name}", json.dumps({**config, key: value}, allow_nan=True)))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Running the cases (in the worker process)


def peak_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def run_case(function, out: Path) -> dict:
    """Run one command line in-process: its exit code, stderr lines, whether it left files in `out`, its
    peak memory, and the traceback of anything that escaped."""
    stderr, stdout = io.StringIO(), io.StringIO()
    reset_peak()
    started = time.perf_counter()
    escaped = ""
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            code = function()
        except SystemExit as exc:  # argparse
            code = exc.code
        except BaseException:  # noqa: BLE001 - the harness reports what escaped, whatever it is
            code, escaped = 1, traceback.format_exc()
    return {"code": code, "stderr": stderr.getvalue().strip().splitlines(), "escaped": escaped[-3000:],
            "wrote": out.exists() and any(out.iterdir()), "peak_mib": peak_mib(),
            "seconds": time.perf_counter() - started}


def main(run: Path, work: Path) -> None:
    from diagnostics import curves, evaluate
    from diagnostics.common import main_guard
    from train.__main__ import main as train_main

    results = []
    reference = evaluate_result(work / "reference", run / "epoch_001.pt", evaluate, main_guard)
    baseline = peak_mib()

    def record(description, result, check=None):
        result["case"] = description
        if result["code"] == 0 and check is not None:
            result["correct"] = check()
        results.append(result)

    state = torch.load(run / "epoch_001.pt", weights_only=True)
    for k, (description, mutated) in enumerate(checkpoint_cases(state)):
        path, out = work / f"c{k}.pt", work / f"c{k}-out"
        torch.save(mutated, path)
        result = run_case(lambda: main_guard(lambda: evaluate.main(
            [str(path), "--n-images", "16", "--batch-size", "16", "--out", str(out)])), out)
        record(description, result, check=lambda: _loss(out) == reference)
        path.unlink()
        shutil.rmtree(out, ignore_errors=True)

    lightning = lightning_checkpoint(state)  # the same weights: the same result, read with --model and --dataset
    foreign = ["--model", "resnet20", "--dataset", "synthetic", "--n-images", "16", "--batch-size", "16"]
    for k, (description, mutated) in enumerate(lightning_cases(lightning)):
        path, out = work / f"l{k}.ckpt", work / f"l{k}-out"
        torch.save(mutated, path)
        result = run_case(lambda: main_guard(lambda: evaluate.main([str(path), *foreign, "--out", str(out)])), out)
        record(description, result, check=lambda: _loss(out) == reference)
        path.unlink()
        shutil.rmtree(out, ignore_errors=True)

    last = torch.load(run / "last.pt", weights_only=True)
    resumable = ("epoch", "step", "config", "history", "state_dict", "optimizer", "scheduler", "scaler", "rng",
                 "step_history", "monitor")  # what resuming reads beyond what every checkpoint has
    cases = checkpoint_cases(last, keys=resumable, values_per_key=3, nested=("scheduler", "scaler", "rng", "monitor"))
    for k, (description, mutated) in enumerate(cases):
        copy_dir = work / f"r{k}"
        shutil.copytree(run, copy_dir)
        torch.save(mutated, copy_dir / "last.pt")
        before = sorted(p.name for p in copy_dir.iterdir())
        result = run_case(lambda: train_main(["--resume", str(copy_dir)]), work / "nothing")
        result["wrote"] = result["code"] != 0 and sorted(p.name for p in copy_dir.iterdir()) != before
        record(f"last.pt {description}", result,
               check=lambda: len(torch.load(copy_dir / "last.pt", weights_only=True)["history"]["epoch"]) == 2)
        shutil.rmtree(copy_dir)

    for cases, name in ((csv_cases((run / "metrics.csv").read_text()), "metrics.csv"),
                        (config_cases(json.loads((run / "config.json").read_text())), "config.json")):
        for k, (description, text) in enumerate(cases):
            copy_dir, out = work / f"t{k}", work / f"t{k}-out"
            shutil.copytree(run, copy_dir)
            (copy_dir / name).write_text(text, errors="surrogateescape")
            result = run_case(lambda: main_guard(lambda: curves.main([str(copy_dir), "--out", str(out)])), out)
            record(description, result)
            shutil.rmtree(copy_dir)
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"baseline_mib": baseline, "results": results}))


def evaluate_result(out: Path, path: Path, evaluate, main_guard) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main_guard(lambda: evaluate.main([str(path), "--n-images", "16", "--batch-size", "16", "--out",
                                                 str(out)])) == 0
    return _loss(out)


def _loss(out: Path) -> float:
    import xarray as xr
    with xr.open_dataset(out / "evaluate.nc") as ds:
        return float(ds.loss.values.ravel()[0])


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
