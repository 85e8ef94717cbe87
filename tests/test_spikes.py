"""Spike diagnosis: the rule and the drift on hand-set numbers, and corrupted checkpoints whose culprit must be
named: BN running statistics planted in one layer are blamed on that layer, scrambled weights are not blamed
on BN, and an untouched run has no spike."""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr

from analyses.spikes import (BNStatistics, bn_drift, diagnose_checkpoint, find_spikes, running_statistics,
                             spike_diagnosis)
from diagnostics.common import main_guard
from diagnostics.spikes import main as spikes_command
from tests.conftest import train_tiny
from tests.test_evaluate_analysis import bn_net
from train import checkpoint as ckpt
from train import rundir
from train.data import EvalBatches, TrainBatches, load_split

ROOT = Path(__file__).resolve().parents[1]
CULPRIT = "stage2.block2.bn1"
RECAL_IMAGES = 64
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from two threads and lose several-fold when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def no_hooks_left(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic


def test_find_spikes_on_a_hand_made_series():
    loss = [1.0, 0.8, 0.7, 5.0, 0.6, 0.65, 2.0, 2.1, 0.5]
    # Medians of the previous three: -, 1, .9, .8 (5 > 2.4), .8, .7, .65 (2 > 1.95), .65 (2.1 > 1.95), 2.
    indices, rule = find_spikes(loss, window=3, factor=3.0)
    assert indices.tolist() == [3, 6, 7]
    assert "3 x the median of the previous 3" in rule
    assert find_spikes(loss, window=1, factor=3.0)[0].tolist() == [3, 6]  # 2.1 is not 3 x 2.0
    assert find_spikes([1.0, float("nan"), 1.0])[0].tolist() == [1]  # a NaN loss counts as infinite
    assert find_spikes([0.01, 0.01, 0.05])[0].tolist() == []  # 5 x, but only 0.04 nats
    assert find_spikes([0.01, 0.01, 0.05], min_increase=0.0)[0].tolist() == [2]
    assert find_spikes([7.0])[0].tolist() == []


def test_drift_of_hand_set_statistics():
    eps = 1e-5
    drift = bn_drift(torch.tensor([1.0, 0.0]), torch.tensor([4.0, 1.0]) - eps, torch.tensor([0.0, 0.0]),
                     torch.tensor([1.0, 4.0]) - eps, eps)
    assert drift["mean_shift"].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert drift["log_var_ratio"].tolist() == pytest.approx([math.log(4), math.log(4)], abs=1e-6)
    in_other_units = bn_drift(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]),
                              eps, unit_var=torch.tensor([4.0]) - eps)
    assert in_other_units["mean_shift"].item() == pytest.approx(0.5, abs=1e-6)


def model_with_stale_statistics() -> nn.Module:
    """conv (identity) -> BN -> pool -> fc (class 0 above the BN mean, class 1 below), with running statistics
    that say mean 0 and variance 1 where the images below have mean 10 and std 1: everything looks like class 0."""
    model = bn_net()
    with torch.no_grad():
        model.bn.running_mean.zero_()
        model.bn.running_var.fill_(1.0)
    return model


def test_a_constructed_checkpoint_has_known_losses_and_drift():
    model = model_with_stale_statistics()
    x = torch.cat([torch.full((8, 1, 2, 2), 11.0), torch.full((8, 1, 2, 2), 9.0)])
    y = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    previous = {"bn": BNStatistics(torch.tensor([4.0]), torch.tensor([1.0]), 1e-5)}
    ds = diagnose_checkpoint(model, [(x, y)], [x[:8], x[8:]], previous=previous)
    assert ds.val_acc.sel(bn="running").item() == 0.5
    assert ds.val_acc.sel(bn="recalibrated").item() == 1.0 and ds.val_acc.sel(bn="batch").item() == 1.0
    # Running mean 0 against the population's 10 (std 1, pooled over both batches), variances equal.
    assert ds.drift.sel(stat="mean_shift").item() == pytest.approx(10 / math.sqrt(1 + 1e-5), rel=1e-5)
    assert ds.drift.sel(stat="log_var_ratio").item() == pytest.approx(0.0, abs=1e-5)
    assert ds.drift_consecutive.sel(stat="mean_shift").item() == pytest.approx(4 / math.sqrt(1 + 1e-5), rel=1e-5)
    assert ds.layer.values.tolist() == ["bn"] and ds.attrs["recal_images"] == 16
    assert ds.val_loss.attrs["units"] == "nats" and ds.drift.attrs["long_name"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert no_hooks_left(model)


def test_nothing_is_left_behind_when_recalibration_fails():
    model = model_with_stale_statistics()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def recal():
        yield torch.randn(4, 1, 2, 2)
        raise RuntimeError("the data loader broke")

    with pytest.raises(RuntimeError, match="broke"):
        diagnose_checkpoint(model, [(torch.randn(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))], recal())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and no_hooks_left(model)


# ---------------------------------------------------------------------------------------------------------------
# Corrupted checkpoints of a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Three epochs of ResNet-20 whose BN statistics were recomputed over the first 64 training images before
    each save (--precise-bn 64), so the diagnosis's own recalibration reproduces them: all drift is planted."""
    return train_tiny(tmp_path_factory.mktemp("spikes") / "run", "resnet20", "--epochs", "3", "--train-images",
                      "64", "--batch-size", "32", "--val-split", "32", "--precise-bn", str(RECAL_IMAGES))


def corrupt(path: Path, change) -> Path:
    """Apply `change(state_dict)` to the checkpoint file at `path`, in place."""
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint["state_dict"])
    torch.save(checkpoint, path)
    return path


def shift_culprit_mean(state: dict) -> None:
    """Running mean 50 std too low: the layer's output is 50 x gamma too high, through the ReLU into the block."""
    state[f"{CULPRIT}.running_mean"] -= 50 * (state[f"{CULPRIT}.running_var"] + 1e-5).sqrt()


def scramble_classifier(state: dict) -> None:
    weight = state["fc.weight"]
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    state["fc.weight"] = weight + 10 * weight.std() * noise


def diagnose_file(path: Path, previous=None) -> tuple[xr.Dataset, dict, float]:
    """What the command computes for one checkpoint, in-process, on the run's own validation and training
    images; with the checkpoint's running statistics and the validation loss its trainer logged."""
    loaded = ckpt.load(path)
    val = EvalBatches(load_split("synthetic", "val", val_split=32), loaded.spec, 64, "cpu")
    recal = TrainBatches(load_split("synthetic", "train", val_split=32)[:RECAL_IMAGES], loaded.spec, 32, "crop-flip",
                         "cpu", seed=0).epoch(0)  # as training augmented them, as the trainer's --precise-bn
    part = diagnose_checkpoint(loaded.model, val, recal, previous=previous)
    assert no_hooks_left(loaded.model)
    return part, running_statistics(loaded.model), loaded.history["val_loss"][-1]


@pytest.fixture(scope="module")
def untouched(run) -> list[tuple[xr.Dataset, dict, float]]:
    diagnosed, previous = [], None
    for path in rundir.run_checkpoints(run):
        diagnosed.append(diagnose_file(path, previous))
        previous = diagnosed[-1][1]
    return diagnosed


def diagnosis(diagnosed: list[tuple[xr.Dataset, dict, float]]) -> xr.Dataset:
    return spike_diagnosis([part for part, _, _ in diagnosed], ["resnet20"] * len(diagnosed), [1, 2, 3],
                           history_val_loss=[logged for _, _, logged in diagnosed])


def test_an_untouched_run_has_no_spike(untouched):
    ds = diagnosis(untouched)
    assert not ds.spike.values.any()
    assert ds.attrs["verdict"] == [ds.attrs["verdict"][0]] and "no validation-loss spike" in ds.attrs["verdict"][0]
    assert "the running statistics never cost more than 0.00 nats over recalibrated ones" in ds.attrs["verdict"][0]
    # The run's BN statistics are already population statistics: nothing drifted, recalibrating changes nothing.
    assert np.nanmax(ds.drift.values) < 1e-3
    np.testing.assert_allclose(ds.val_loss.sel(bn="running"), ds.val_loss.sel(bn="recalibrated"), rtol=1e-4)
    np.testing.assert_allclose(ds.val_loss.sel(bn="running"), ds.history_val_loss, rtol=1e-3)


def test_a_bn_jump_below_the_spike_rule_is_still_reported(run, untouched, tmp_path):
    path = corrupt(Path(shutil.copy(run / "epoch_003.pt", tmp_path)), shift_culprit_mean)
    parts = untouched[:2] + [diagnose_file(path, previous=untouched[1][1])]
    ds = spike_diagnosis([part for part, _, _ in parts], ["resnet20"] * 3, [1, 2, 3], factor=1e9,
                         history_val_loss=[logged for _, _, logged in parts])
    (line,) = ds.attrs["verdict"]
    running, recalibrated = ds.val_loss.sel(model="resnet20", epoch=3).sel(bn=["running", "recalibrated"]).values
    assert not ds.spike.values.any() and "no validation-loss spike" in line
    assert (f"the running statistics cost most at epoch 3: {running:.3g} against {recalibrated:.3g} recalibrated, "
            "which the spike rule does not flag") in line


def test_scrambled_weights_are_not_blamed_on_bn(run, untouched, tmp_path):
    path = corrupt(Path(shutil.copy(run / "epoch_003.pt", tmp_path)), scramble_classifier)
    ds = diagnosis(untouched[:2] + [diagnose_file(path, previous=untouched[1][1])])
    assert ds.spike.values[0].tolist() == [False, False, True]
    loss = ds.val_loss.isel(model=0)
    assert loss.sel(bn="recalibrated", epoch=3) > 3 * loss.sel(bn="recalibrated", epoch=2)  # it stays
    (line,) = ds.attrs["verdict"]
    assert line.startswith("resnet20, epoch 3:") and "so it is in the weights" in line
    assert "the spike is BN running statistics" not in line and "batch statistics spike too" in line


def test_command_names_the_bn_layer_whose_statistics_were_corrupted(run, tmp_path):
    broken = Path(shutil.copytree(run, tmp_path / "bn"))
    corrupt(broken / "epoch_003.pt", shift_culprit_mean)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "diagnostics.spikes", str(broken), "--recal-images",
                             str(RECAL_IMAGES), "--batch-size", "64", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:] == [str(out / f"spikes.{ext}") for ext in ("nc", "png", "pdf")]
    assert lines[0].startswith("resnet20, epoch 3:") and "the spike is BN running statistics" in lines[0]
    assert f"the largest drift is in {CULPRIT} (running mean 50 population std off" in lines[0]
    ds = xr.open_dataset(out / "spikes.nc")
    assert ds.spike.values[0].tolist() == [False, False, True] and ds.attrs["verdict"] == lines[0]
    drift = ds.drift.sel(model="resnet20", epoch=3, stat="mean_shift")
    culprit = (ds.layer.sel(model="resnet20") == CULPRIT).values
    assert drift.values[culprit].item() == pytest.approx(50, rel=1e-4) and drift.values[~culprit].max() < 1e-3
    # In eval mode the culprit's input is its usual self, 50 running std off its shifted statistics; the layers
    # before it see nothing wrong, the layers after it inherit the damage.
    mismatch = ds.eval_mismatch.sel(model="resnet20", epoch=3, stat="mean_shift").dropna("depth").values
    at = int(np.flatnonzero(culprit)[0])
    assert mismatch[at] == pytest.approx(50, rel=0.05) and mismatch[:at].max() < 0.5
    assert mismatch[at + 1:].max() > 10 * mismatch[:at].max()
    loss = ds.val_loss.sel(model="resnet20", epoch=3)
    logged = ds.history_val_loss.sel(model="resnet20", epoch=3).item()  # what the intact checkpoint scored
    assert loss.sel(bn="recalibrated").item() == pytest.approx(logged, rel=1e-3)
    assert loss.sel(bn="running").item() > 3 * logged
    assert ds.attrs["precise_bn"] == RECAL_IMAGES and ds.attrs["recal_images"] == RECAL_IMAGES
    for key in ("definition", "rule", "checkpoint", "dataset", "split", "software", "created"):
        assert ds.attrs[key]


def test_command_refuses_a_checkpoint_file(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main_guard(lambda: spikes_command([str(run / "epoch_001.pt"), "--out", str(out)])) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "not a run directory" in error
    assert not out.exists()
