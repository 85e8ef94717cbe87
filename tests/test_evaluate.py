"""The evaluate command: a known answer from a checkpoint whose logits do not depend on the image, BN modes,
the table, the figures, and the command line on a plain and a residual run."""
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import xarray as xr

from diagnostics import evaluate as command
from train.datasets import load_split

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["stripes-horizontal", "stripes-vertical", "checkerboard", "rings"]


@pytest.fixture(scope="module")
def constant_checkpoint(tiny_runs, tmp_path_factory) -> Path:
    """A trained run's file with fc weight 0 and bias (0, 0, ln 3, 0): every image gets softmax
    (1/6, 1/6, 1/2, 1/6), whatever BN does before it."""
    checkpoint = torch.load(tiny_runs["resnet20"] / "epoch_002.pt", weights_only=True)
    checkpoint["state_dict"]["fc.weight"].zero_()
    checkpoint["state_dict"]["fc.bias"].copy_(torch.tensor([0.0, 0.0, math.log(3.0), 0.0]))
    path = tmp_path_factory.mktemp("constant") / "constant.pt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("bn_options, bn_mode, recalibrated", [
    ([], "eval", 0), (["--bn", "train"], "train", 0), (["--precise-bn", "40"], "recalibrated", 40)])
def test_known_answer_in_every_bn_mode(constant_checkpoint, tmp_path, capsys, bn_options, bn_mode, recalibrated):
    out = tmp_path / "out"
    command.main([str(constant_checkpoint), "--n-images", "64", "--batch-size", "32", "--out", str(out), *bn_options])
    labels = load_split("synthetic", "val").labels[:64]
    n2 = int((labels == 2).sum())  # only class 2 is ever predicted
    ds = xr.open_dataset(out / "evaluate.nc")
    assert ds.accuracy.item() == pytest.approx(n2 / 64)
    assert ds.class_accuracy.values.ravel().tolist() == [0.0, 0.0, 1.0, 0.0]
    # Cross-entropy: ln 2 for a class-2 image (p = 1/2), ln 6 for any other (p = 1/6).
    assert ds.loss.item() == pytest.approx((n2 * math.log(2) + (64 - n2) * math.log(6)) / 64, rel=1e-6)
    assert ds.class_count.values.ravel().tolist() == [int((labels == c).sum()) for c in range(4)]
    assert ds.class_name.values.tolist() == CLASSES
    assert ds.attrs["bn_mode"] == bn_mode and ds.attrs["recalibration_images"] == recalibrated
    assert ds.attrs["n_images"] == 64 and ds.attrs["split"] == "val" and ds.attrs["dataset"] == "synthetic"
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["model", "epoch", "loss", "acc", "%", "worst", "class", "acc", "%"]
    assert table[1].split() == ["resnet20", "2", f"{ds.loss.item():.4f}", f"{100 * n2 / 64:.2f}",
                                "stripes-horizontal", "0.00"]  # the first of the classes at 0
    assert table[2:] == [str(out / f"evaluate.{ext}") for ext in ("nc", "png", "pdf")]


def test_precise_bn_with_batch_statistics_is_a_usage_error(constant_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        command.main([str(constant_checkpoint), "--bn", "train", "--precise-bn", "8", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --precise-bn") and error.count("\n") == 1
    assert not (tmp_path / "o").exists()


def fake_results(models_, epochs, accuracy, class_accuracy) -> xr.Dataset:
    return xr.Dataset(
        {"loss": (("model", "epoch"), np.ones_like(accuracy)), "accuracy": (("model", "epoch"), accuracy),
         "class_accuracy": (("model", "epoch", "class"), class_accuracy)},
        coords={"model": models_, "epoch": epochs, "class": [0, 1, 2], "class_name": ("class", ["a", "b", "c"])},
        attrs={"split": "test"})


def test_table_skips_missing_epochs_and_absent_classes():
    # plain20 has no epoch 2 (NaN after the outer join); class c has no image (NaN accuracy).
    class_accuracy = np.array([[[0.5, 0.2, np.nan], [np.nan] * 3], [[0.9, 0.8, np.nan], [0.3, 0.7, np.nan]]])
    ds = fake_results(["plain20", "resnet20"], [1, 2], np.array([[0.4, np.nan], [0.85, 0.5]]), class_accuracy)
    rows = command.table_rows(ds)
    assert [row[:2] for row in rows] == [["plain20", "1"], ["resnet20", "1"], ["resnet20", "2"]]
    assert [row[4:] for row in rows] == [["b", "20.00"], ["b", "80.00"], ["a", "30.00"]]


def test_figures_for_one_run_over_epochs_and_for_several_models():
    accuracy = np.array([[0.4, 0.6, 0.7]])
    one_run = fake_results(["resnet20"], [1, 2, 3], accuracy, np.tile(accuracy[..., None], 3))
    fig = command.figure(one_run, {})
    accuracy_axis, loss_axis = fig.axes
    assert len(accuracy_axis.lines) == 4 and len(loss_axis.lines) == 1  # 3 classes and the mean; the loss
    assert accuracy_axis.lines[-1].get_ydata().tolist() == pytest.approx([40, 60, 70])
    two_models = fake_results(["plain20", "resnet20"], [3], np.array([[0.4], [0.6]]),
                              np.array([[[0.1, 0.5, 0.6]], [[0.2, 0.7, 0.9]]]))
    fig = command.figure(two_models, {"plain20": True})
    bars = fig.axes[0].patches
    assert [round(bar.get_height()) for bar in bars] == [10, 50, 60, 20, 70, 90]
    assert bars[0].get_hatch() == "////" and bars[3].get_hatch() is None  # plain hatched, residual solid
    plt.close("all")


def test_command_on_a_plain_and_a_residual_run(tiny_runs, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "diagnostics.evaluate", str(tiny_runs["plain20"]),
                             str(tiny_runs["resnet20"]), "--out", str(out), "--n-images", "64", "--batch-size", "32"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-3:] == [str(out / f"evaluate.{ext}") for ext in ("nc", "png", "pdf")]
    ds = xr.open_dataset(out / "evaluate.nc")
    assert ds.model.values.tolist() == ["plain20", "resnet20"] and ds.epoch.values.tolist() == [1, 2]
    assert ds.class_accuracy.shape == (2, 2, 4) and ds.attrs["bn_mode"] == "eval" and ds.attrs["n_images"] == 64
    assert len(ds.attrs["checkpoint"]) == 4 and ds.attrs["definition"].startswith("mean cross-entropy")
    for name in ds.data_vars:
        assert ds[name].attrs["long_name"] and ds[name].attrs["units"]
    assert (ds.class_count.sum("class") == 64).all()
    # Each table row is the dataset's numbers; the worst class is the lowest per-class accuracy.
    for row in lines[1:5]:
        model, epoch, loss, accuracy, worst, worst_accuracy = row.split()
        point = ds.sel(model=model, epoch=int(epoch))
        assert float(loss) == pytest.approx(point.loss.item(), abs=1e-4)
        assert float(accuracy) == pytest.approx(100 * point.accuracy.item(), abs=0.00501)  # 2 decimals
        assert float(worst_accuracy) == pytest.approx(100 * np.nanmin(point.class_accuracy.values), abs=0.00501)
        assert worst in CLASSES
