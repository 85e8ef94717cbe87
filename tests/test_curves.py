"""Training curves: hand-computed summaries and group statistics, what defines a group, bad run directories,
and the command on runs that differ only in seed."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr

import models
from analyses.curves import CURVES, training_curves
from diagnostics import common
from diagnostics import curves as command
from train.errors import UserError
from train import rundir
from train.rundir import METRICS

from conftest import read_csv, train_tiny

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--train-images", "64", "--batch-size", "32", "--val-split", "64"]  # 2 steps an epoch, 64 to validate
RESNET20_4_CLASSES = 269_722 - 6 * 65  # 269,722 with 10 classes; the fc keeps 4 of its 10 rows of 64 + 1


def history(val_acc, seconds) -> dict[str, list]:
    n = len(val_acc)
    return {"epoch": list(range(1, n + 1)), "step": [4 * e for e in range(1, n + 1)], "train_loss": [1.0] * n,
            "train_acc": [0.5] * n, "val_loss": [2.0] * n, "val_acc": val_acc, "lr": [0.1] * n,
            "epoch_seconds": seconds, "images_per_second": [100.0] * n}


def test_summaries_and_group_statistics_by_hand():
    runs = [history([0.2, 0.6, 0.5], [10, 30, 20]), history([0.4, 0.4], [5, 7]), history([0.7], [3])]
    ds = training_curves(runs, ["a", "b", "c"], ["zeta", "zeta", "alpha"], early=2, params=[1, 1, 2],
                         checkpoint=["ra", "rb", "rc"], dataset="synthetic")
    assert ds.epoch.values.tolist() == [1, 2, 3] and np.isnan(ds.val_acc.sel(run="b", epoch=3))
    assert ds.best_val_acc.values.tolist() == [0.6, 0.4, 0.7]
    assert ds.best_epoch.values.tolist() == [2, 1, 1]  # b's first of two equal epochs
    assert ds.last_val_acc.values.tolist() == [0.5, 0.4, 0.7]
    assert ds.early_val_acc_mean.values == pytest.approx([0.4, 0.4, 0.7])
    assert ds.early_val_acc_std.values == pytest.approx([0.2, 0.0, 0.0])  # population std of (0.2, 0.6)
    assert ds.early_epochs.values.tolist() == [2, 2, 1]
    assert ds.seconds_per_epoch.values.tolist() == [20, 6, 3]  # medians
    assert ds.group.values.tolist() == ["zeta", "alpha"] and ds.n_runs.values.tolist() == [2, 1]
    assert ds.run_group.values.tolist() == ["zeta", "zeta", "alpha"]
    # zeta: best (0.6, 0.4) -> 0.5 ± 0.1·√2 (ddof 1); last (0.5, 0.4) -> 0.45 ± 0.05·√2; one run: std NaN.
    assert ds.best_val_acc_group_mean.values == pytest.approx([0.5, 0.7])
    assert ds.best_val_acc_group_std.values[0] == pytest.approx(0.1 * 2 ** 0.5)
    assert ds.last_val_acc_group_std.values[0] == pytest.approx(0.05 * 2 ** 0.5)
    assert np.isnan(ds.best_val_acc_group_std.values[1])
    # Curves: epoch 1 is over both runs of zeta, epoch 3 over the one that reached it.
    assert ds.val_acc_group_mean.sel(group="zeta").values == pytest.approx([0.3, 0.5, 0.5])
    assert ds.val_acc_group_std.sel(group="zeta", epoch=1) == pytest.approx(0.1 * 2 ** 0.5)
    assert np.isnan(ds.val_acc_group_std.sel(group="zeta", epoch=3))
    assert ds.params_group_mean.values.tolist() == [1, 2] and np.isnan(ds.flops).all()
    for name in ds.data_vars:
        assert ds[name].attrs["long_name"] and ds[name].attrs["units"], name
    for key in ("definition", "checkpoint", "dataset", "split", "software", "created"):
        assert ds.attrs[key] != ""
    assert ds.attrs["early"] == 2 and ds.attrs["checkpoint"] == ["ra", "rb", "rc"]
    with pytest.raises(ValueError, match="one entry per run"):
        training_curves(runs, ["a", "b"], ["g", "g", "h"])


def run_with_config(name: str, label: str, **config) -> common.Run:
    base = {"model": "resnet20", "skip": True, "augment": "crop-flip", "seed": 0, "out": name, "data_dir": "data",
            "device_used": "cpu", "total_steps": 100}
    return common.Run(name, Path(name).resolve(), {}, {**base, **config}, label, {}, label, None)


def test_seed_output_folder_and_machine_do_not_define_a_group():
    runs = [run_with_config("r1", "resnet20"),
            run_with_config("r2", "resnet20", seed=1, data_dir="/elsewhere", device_used="cuda", total_steps=90),
            run_with_config("r3", "resnet20", augment="none"),
            run_with_config("r4", "plain20", model="plain20"),
            run_with_config("r5", "plain20", skip=False),  # the same network as r4, named the other way
            run_with_config("r6", "resnet20", monitor_reason="--monitor-every 10")]  # a description, not an option
    assert command.group_labels(runs) == ["resnet20", "resnet20", "resnet20 augment=none", "plain20", "plain20",
                                          "resnet20"]


def test_a_group_label_names_what_differs_from_the_usual_value():
    """A study: baselines read as the model, each intervention as the option it changed; no two groups share a
    label, also where an older run's config.json lacks an option."""
    runs = [run_with_config(f"{model}-s{seed}", model, model=model, bn_momentum=0.1, lr=0.2, seed=seed)
            for model in ("plain20", "resnet20") for seed in range(3)]
    runs += [run_with_config("p-m0.8", "plain20", model="plain20", bn_momentum=0.8, lr=0.2),
             run_with_config("r-lr", "resnet20", bn_momentum=0.1, lr=0.05),
             run_with_config("old", "resnet20", lr=0.2)]  # bn_momentum not recorded
    assert command.group_labels(runs)[2:] == ["plain20", "resnet20", "resnet20", "resnet20",
                                              "plain20 bn_momentum=0.8", "resnet20 lr=0.05",
                                              "resnet20 bn_momentum=None"]


def test_a_tie_names_the_option_on_every_label_whatever_the_order():
    runs = [run_with_config(f"m{m}-s{seed}", "plain20", bn_momentum=m, seed=seed) for m in (0.8, 0.1)
            for seed in (0, 1)]
    expected = ["plain20 bn_momentum=0.8"] * 2 + ["plain20 bn_momentum=0.1"] * 2
    assert command.group_labels(runs) == expected
    assert command.group_labels(runs[::-1]) == expected[::-1]


def test_two_versions_of_one_recipe_are_one_group():
    """A seed run before the trainer recorded its choices' reasons, compile_used and recalibration_images (it
    recomputed over as many images as it attributed), and one after: the same training, one group."""
    old = run_with_config("s0", "plain20", compile=False, attribution_images=2000, monitor_reason="--monitor-every 10")
    new = run_with_config("s1", "plain20", seed=1, compile="off", compile_used="off", compile_reason="--compile off",
                          precision_reason="--precision fp32", attribution_images=2000, recalibration_images=2000,
                          monitor_reason="--monitor-every 10")
    other = run_with_config("s2", "plain20", seed=2, compile="off", attribution_images=2000, recalibration_images=512)
    assert command.group_labels([old, new, other]) == ["plain20", "plain20", "plain20 recalibration_images=512"]
    assert command.run_labels([run_with_config("a/x", ""), run_with_config("b/x", ""),
                               run_with_config("c/y", "")]) == ["a/x", "b/x", "y"]


def write_run(folder: Path, metrics: str | None) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": "resnet20"}))
    if metrics is not None:
        (folder / "metrics.csv").write_text(metrics)
    return folder


HEADER = ",".join(METRICS[:10])  # a metrics.csv of version 2: no attribution columns


@pytest.mark.parametrize("metrics, phrase", [
    (None, "has no metrics.csv"),
    ("", "no column epoch"),
    ("time,loss\n1,2\n", "not a metrics.csv of python -m train"),
    (HEADER + "\n", "has no epochs yet"),
    (HEADER + "\n1,4,2.0,0.3,2.1,0.25,0.1,10,50,0\n2,8,1.0,0.5", "line 3 is damaged (4 fields instead of 10)"),
    (HEADER + "\n1,4,2.0,0.3,2.1,n/a,0.1,10,50,0\n", "line 2 is damaged"),
])
def test_bad_metrics_are_one_line_errors(tmp_path, metrics, phrase):
    with pytest.raises(UserError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        rundir.read_metrics(write_run(tmp_path / "run", metrics))


def test_a_checkpoint_or_a_missing_folder_asks_for_a_run_directory(tmp_path, capsys):
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"not read: a file is refused before it is opened")
    for given in (checkpoint, tmp_path / "nowhere"):
        assert common.main_guard(lambda: command.main([str(given), "--out", str(tmp_path / "out")])) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {given} ") and "give the folder `python -m train --out` wrote" in error
        assert error.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory) -> list[Path]:
    """Two runs that differ only in --seed (and --out)."""
    root = tmp_path_factory.mktemp("seeds")
    return [train_tiny(root / f"s{seed}", "resnet20", *SMALL, "--seed", str(seed)) for seed in (1, 2)]


def metric_columns(run_dir: Path) -> dict[str, list[float]]:
    """A run's metrics.csv by column, as numbers: what the curves are computed from."""
    rows = read_csv(run_dir / "metrics.csv")
    return {column: [float(row[column]) for row in rows] for column in rows[0]}


def test_command_groups_runs_that_differ_only_in_seed(tiny_runs, seed_runs, tmp_path):
    out = tmp_path / "out"
    runs = [tiny_runs["plain20"], tiny_runs["resnet20"], *seed_runs]
    result = subprocess.run([sys.executable, "-m", "diagnostics.curves", *map(str, runs), "--early", "2", "--out",
                             str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-3:] == [str(out / f"curves.{ext}") for ext in ("nc", "png", "pdf")]
    ds = xr.open_dataset(out / "curves.nc")
    assert ds.run.values.tolist() == ["plain20", "resnet20", "s1", "s2"]
    assert ds.n_runs.values.tolist() == [1, 1, 2] and ds.group.values[2] == ds.run_group.sel(run="s1")
    assert ds.run_group.sel(run="s1") == ds.run_group.sel(run="s2") != ds.run_group.sel(run="resnet20")
    assert ds.attrs["checkpoint"] == [str(run) for run in runs] and ds.attrs["early"] == 2
    # The seed group's numbers from the two metrics.csv files, by hand (std over runs: ddof 1).
    seeds = [metric_columns(run) for run in seed_runs]
    best = [max(m["val_acc"]) for m in seeds]
    last = [m["val_acc"][-1] for m in seeds]
    early_std = [statistics.pstdev(m["val_acc"][:2]) for m in seeds]
    seconds = [statistics.median(m["epoch_seconds"]) for m in seeds]
    group = ds.sel(group=ds.group.values[2])
    assert group.best_val_acc_group_mean.item() == pytest.approx(statistics.mean(best))
    assert group.best_val_acc_group_std.item() == pytest.approx(statistics.stdev(best))
    assert group.last_val_acc_group_std.item() == pytest.approx(statistics.stdev(last))
    assert group.early_val_acc_std_group_mean.item() == pytest.approx(statistics.mean(early_std))
    assert group.seconds_per_epoch_group_std.item() == pytest.approx(statistics.stdev(seconds))
    assert group.train_loss_group_mean.values == pytest.approx(np.mean([m["train_loss"] for m in seeds], axis=0))
    assert ds.val_acc.sel(run="plain20").values.tolist() == metric_columns(tiny_runs["plain20"])["val_acc"]
    # The table: one row per group, the seed group's best accuracy as mean ± std in percent.
    seed_row = next(line for line in lines if line.startswith(str(group.group.item())))
    assert f"{100 * statistics.mean(best):.2f} ± {100 * statistics.stdev(best):.2f}" in seed_row
    assert ds.params.values.tolist() == [RESNET20_4_CLASSES] * 4
    from analyses.flops import total_cost  # ours: a broken import fails this test, it must not skip it
    expected, _ = total_cost(models.build("resnet20", num_classes=4), (1, 3, 32, 32))
    assert ds.flops.values.tolist() == [expected] * 4 and f"{expected / 1e6:.1f}" in seed_row


def test_figure_draws_training_dashed_validation_bold_and_a_band_for_seeds():
    ds = training_curves([history([0.2, 0.6], [1, 1]), history([0.4, 0.4], [1, 1]), history([0.5, 0.5], [1, 1])],
                         ["a", "b", "c"], ["seeds", "seeds", "single"])
    fig = command.figure(ds)
    loss_axis, accuracy_axis = fig.axes
    train, val = accuracy_axis.lines[:2]
    assert train.get_linestyle() == "--" and val.get_linestyle() == "-"
    assert val.get_linewidth() > train.get_linewidth()
    assert val.get_ydata().tolist() == pytest.approx([30, 50])  # the seeds' mean, in percent
    assert len(accuracy_axis.collections) == 2  # ±std bands (training, validation) for the seeds only
    assert loss_axis.get_yscale() == "log" and set(CURVES) <= set(ds.data_vars)
    plt.close("all")
