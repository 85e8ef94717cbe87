"""TensorBoard: `python -m train --tensorboard DIR` and the BN monitor's writer, read back with TensorBoard's own
event reader; without the package, one line saying how to install it."""
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import xarray as xr

import models
from analyses.monitor import BNMonitor
from conftest import TINY_RUN, read_csv
from train import trainer
from train.__main__ import main as train_main
from train.errors import TrainingDiverged

EPOCH_TAGS = {"train_loss": "train/loss", "train_acc": "train/accuracy", "val_loss": "val/loss",
              "val_acc": "val/accuracy", "lr": "train/lr", "epoch_seconds": "time/epoch_seconds",
              "images_per_second": "time/images_per_second", "bn_warnings": "probe/warnings"}


def events(folder):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                      reason="tensorboard is not installed (pip install resnet-diagnostics[test])")
    return accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0}).Reload()


def float32(values) -> list:
    """What an event file holds: TensorBoard stores a scalar as a 32-bit float."""
    return [np.float32(value) for value in values]


def test_a_monitor_record_of_another_model_is_refused_before_config_json_or_events_are_written(tmp_path,
                                                                                               monkeypatch):
    """A well-formed last.pt whose monitor record names other BN layers: one line, exit 2, config.json untouched
    (the same bytes, the same time) and no new events file (opening the writer would purge the run's events)."""
    pytest.importorskip("tensorboard")
    run, folder = tmp_path / "run", tmp_path / "tb" / "run"
    check_weights = trainer.check_weights

    def stopped_in_epoch_2(model, epoch, run_dir):
        if epoch == 2:
            raise TrainingDiverged("stopped for the test")
        check_weights(model, epoch, run_dir)

    monkeypatch.setattr(trainer, "check_weights", stopped_in_epoch_2)
    assert train_main(["--model", "resnet20", "--out", str(run), *TINY_RUN, "--epochs", "3",
                       "--tensorboard", str(folder)]) == 3
    last = torch.load(run / "last.pt", weights_only=True)
    last["monitor"]["bn_layers"] = [f"other.{name}" for name in last["monitor"]["bn_layers"]]
    torch.save(last, run / "last.pt")
    config = run / "config.json"
    before = (config.read_bytes(), config.stat().st_mtime_ns, sorted(p.name for p in folder.iterdir()))
    assert train_main(["--resume", str(run)]) == 2
    assert (config.read_bytes(), config.stat().st_mtime_ns, sorted(p.name for p in folder.iterdir())) == before


def test_events_equal_metrics_csv_and_monitor_nc_after_an_interrupted_epoch(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    run, folder = tmp_path / "run", tmp_path / "tb" / "run"
    check_weights = trainer.check_weights

    def stopped_in_epoch_2(model, epoch, run_dir):  # after epoch 2's steps (and their events), before its files
        if epoch == 2:
            raise TrainingDiverged("stopped for the test")
        check_weights(model, epoch, run_dir)

    monkeypatch.setattr(trainer, "check_weights", stopped_in_epoch_2)
    args = ["--model", "resnet20", "--out", str(run), *TINY_RUN, "--epochs", "3", "--tensorboard", str(folder)]
    assert train_main(args) == 3
    monkeypatch.setattr(trainer, "check_weights", check_weights)
    assert train_main(["--resume", str(run)]) == 0

    found = events(folder)
    metrics = read_csv(run / "metrics.csv")
    assert [int(row["epoch"]) for row in metrics] == [1, 2, 3]
    for column, tag in EPOCH_TAGS.items():  # epoch 2's steps were trained twice; each step is in the events once
        scalars = found.Scalars(tag)
        assert [event.step for event in scalars] == [int(row["step"]) for row in metrics], tag
        assert [event.value for event in scalars] == float32(float(row[column]) for row in metrics), tag

    monitor = xr.load_dataset(run / "monitor.nc")
    measured = [int(step) for step in monitor.step.values]
    assert measured == [2, 4, 6, 8, 10, 12]
    steps = {int(row["step"]): row for row in read_csv(run / "steps.csv")}
    for tag, column in (("step/loss", "train_loss"), ("step/lr", "lr")):
        scalars = found.Scalars(tag)
        assert [event.step for event in scalars] == measured
        assert [event.value for event in scalars] == float32(float(steps[step][column]) for step in measured)
    assert [event.value for event in found.Scalars("probe/loss_running")] == float32(
        monitor.probe_loss.sel(bn="running").values)
    assert [event.value for event in found.Scalars("probe/accuracy_batch")] == float32(
        monitor.probe_acc.sel(bn="batch").values)
    for depth, layer in zip(monitor.depth.values, monitor.layer.values):
        assert [event.value for event in found.Scalars(f"bn_gap/{layer}")] == float32(
            monitor.bn_gap.sel(depth=depth, component="rms").values)
    for depth, layer in zip(monitor.weight_depth.values, monitor.weight_layer.values):
        assert [event.value for event in found.Scalars(f"grad_norm/{layer}")] == float32(
            monitor.grad_norm.sel(weight_depth=depth).values)
    histogram = found.Histograms("layers/bn_gap")
    assert [event.step for event in histogram] == measured
    assert [event.histogram_value.num for event in histogram] == [monitor.sizes["depth"]] * len(measured)


def test_without_the_package_one_line_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now fails as if not installed
    run = tmp_path / "run"
    code = train_main(["--model", "resnet20", "--out", str(run), *TINY_RUN, "--tensorboard", str(tmp_path / "tb")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install resnet-diagnostics[tensorboard]" in err[0]
    assert not run.exists() and not (tmp_path / "tb").exists()


def test_a_folder_with_another_runs_events_is_refused(tmp_path, capsys):
    folder = tmp_path / "tb"
    folder.mkdir()
    (folder / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"")
    run = tmp_path / "run"
    code = train_main(["--model", "resnet20", "--out", str(run), *TINY_RUN, "--tensorboard", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already holds TensorBoard events" in err[0] and "tb/NAME" in err[0]
    assert not run.exists()


class RecordingWriter:
    """The part of SummaryWriter the monitor uses."""

    def __init__(self):
        self.scalars, self.histograms = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))

    def add_histogram(self, tag, values, step):
        self.histograms.setdefault(tag, []).append((step, np.asarray(values)))


def test_the_monitor_writes_one_scalar_per_group_name_tag_and_step_in_any_loop():
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = RecordingWriter()
    monitor = BNMonitor(model, torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,)), every=2, writer=writer)
    for step in range(1, 5):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 4, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss=loss, lr=0.05 / step)
    ds = monitor.dataset()
    assert all(tag.count("/") == 1 and all(tag.split("/")) for tag in [*writer.scalars, *writer.histograms])
    for tag, points in writer.scalars.items():
        assert Counter(step for step, _ in points) == {2: 1, 4: 1}, tag
    assert writer.scalars["step/lr"] == [(2, 0.025), (4, 0.0125)]
    assert writer.scalars["step/loss"] == list(zip([2, 4], ds.train_loss.values.tolist()))
    for depth, layer in zip(ds.weight_depth.values, ds.weight_layer.values):
        assert writer.scalars[f"scaled_grad_norm/{layer}"] == list(zip([2, 4], ds.scaled_grad_norm.sel(
            weight_depth=depth).values.tolist()))
    assert {f"bn_gap/{layer}" for layer in ds.layer.values} <= set(writer.scalars)
    assert set(writer.histograms) == {"layers/bn_gap", "layers/eval_mismatch", "layers/grad_norm",
                                      "layers/scaled_grad_norm"}
    np.testing.assert_array_equal(writer.histograms["layers/grad_norm"][1][1], ds.grad_norm.isel(step=1).values)
