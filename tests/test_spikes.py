"""Spike diagnosis: the rule, the share and its uncertainty on hand-set numbers; constructed models whose drift,
mismatch floor, repair curve and amplification are known; corrupted checkpoints of a real run whose cause must be
named (BN statistics, weights, or mixed with its share) and whose culprit layer must be found."""
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

from analyses.bn import BNStatistics, running_statistics
from analyses.spikes import (amplification, cause_of, diagnose_checkpoint, excess_and_share, gap_mask,
                             jackknife_share, repair, spike_diagnosis, spike_mask)
from conftest import assert_no_hooks, train_tiny
from diagnostics.common import main_guard
from diagnostics.spikes import figure as spikes_figure
from diagnostics.spikes import main as spikes_command
from test_evaluate_analysis import bn_net
from train import checkpoint as ckpt
from train import rundir
from train.batches import EvalBatches, recalibration_inputs
from train.datasets import load_split

ROOT = Path(__file__).resolve().parents[1]
CULPRIT = "stage2.block2.bn1"
RECAL_IMAGES = 64
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic


def find_spikes(val_loss, **rule) -> np.ndarray:
    """Indices of the spikes of a validation-loss series (one value per checkpoint, in order)."""
    return np.flatnonzero(spike_mask(val_loss, **rule))


def test_find_spikes_on_a_hand_made_series():
    loss = [1.0, 0.8, 0.7, 5.0, 0.6, 0.65, 2.0, 2.1, 0.5]
    # Medians of the previous three: -, 1, .9, .8 (5 > 2.4), .8, .7, .65 (2 > 1.95), .65 (2.1 > 1.95), 2.
    assert find_spikes(loss, window=3, factor=3.0).tolist() == [3, 6, 7]
    assert find_spikes(loss, window=1, factor=3.0).tolist() == [3, 6]  # 2.1 is not 3 x 2.0
    assert find_spikes([1.0, float("nan"), 1.0]).tolist() == [1]  # a NaN loss counts as infinite
    assert find_spikes([0.01, 0.01, 0.05]).tolist() == []  # 5 x, but only 0.04 nats
    assert find_spikes([0.01, 0.01, 0.05], min_increase=0.0).tolist() == [2]
    assert find_spikes([7.0]).tolist() == []


def test_a_bn_gap_is_flagged_at_the_first_checkpoint_and_after_a_high_loss():
    # resnet32 of docs/spikes.md (v1): 1.29 vs 0.83 at epoch 1, then 3.04 vs 0.525 after the already high 1.29,
    # which the 3x spike rule never flags; 0.5 vs 0.45 is within the rule's 1.25x.
    running, recalibrated = [1.293, 3.041, 0.875, 0.5], [0.828, 0.525, 0.504, 0.45]
    assert gap_mask(running, recalibrated).tolist() == [True, True, True, False]
    assert find_spikes(running).tolist() == []


def test_the_share_of_the_excess_on_hand_set_losses():
    # A spike of 2.5 over a trend of 0.5 that recalibration brings to 1.5: half of the excess is BN statistics.
    assert excess_and_share(2.5, 1.5, 0.5) == (0.5, 2.0, 0.5) and cause_of(0.5) == "mixed"
    # Recalibration lands below the trend (the weights improved): all of the excess is BN statistics.
    assert excess_and_share(2.6, 0.454, 0.585)[2] == 1.0 and cause_of(1.0) == "BN statistics"
    # The first checkpoint has no trend: the recalibrated loss is the reference.
    assert excess_and_share(1.29, 0.83, float("nan")) == (0.83, pytest.approx(0.46), 1.0)
    # A spike that recalibration does not touch lies in the weights; no excess, no share.
    assert excess_and_share(3.0, 2.95, 0.5)[2] == pytest.approx(0.02) and cause_of(0.02) == "weights"
    assert math.isnan(excess_and_share(0.4, 0.4, 0.5)[2]) and cause_of(float("nan")) == ""


def test_the_jackknife_standard_error_of_the_share():
    # Two batches of 10 images: shares leaving one out are (3-1.5)/(3-0.5) = 0.6 and (2-1.5)/(2-0.5) = 1/3.
    se = jackknife_share(np.array([2.0, 3.0]), np.array([1.5, 1.5]), np.array([10, 10]), trend=0.5)
    shares = np.array([0.6, 1 / 3])
    assert se == pytest.approx(math.sqrt(1 / 2 * np.sum((shares - shares.mean()) ** 2)))
    assert jackknife_share(np.array([2.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0]), np.array([5, 5, 5]), 0.5) == 0


# ---------------------------------------------------------------------------------------------------------------
# Constructed models


def model_with_stale_statistics() -> nn.Module:
    """conv (identity) -> BN -> pool -> fc (class 0 above the BN mean, class 1 below), with running statistics
    that say mean 0 and variance 1 where the images below have mean 10 and std 1: everything looks like class 0."""
    model = bn_net()
    with torch.no_grad():
        model.bn.running_mean.zero_()
        model.bn.running_var.fill_(1.0)
    return model


def test_a_constructed_checkpoint_has_known_losses_drift_and_floor():
    model = model_with_stale_statistics()
    x = torch.cat([torch.full((8, 1, 2, 2), 11.0), torch.full((8, 1, 2, 2), 9.0)])
    y = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    previous = {"bn": BNStatistics(torch.tensor([4.0]), torch.tensor([1.0]), 1e-5)}
    ds = diagnose_checkpoint(model, [(x[::2], y[::2]), (x[1::2], y[1::2])], [x[:8], x[8:]], previous=previous)
    assert ds.val_acc.sel(bn="running").item() == 0.5
    assert ds.val_acc.sel(bn="recalibrated").item() == 1.0 and ds.val_acc.sel(bn="batch").item() == 1.0
    assert ds.val_batch_images.values.tolist() == [8, 8] and ds.val_batch_loss.sizes["val_batch"] == 2
    # Running mean 0 against the population's 10 (std 1 over both batches), variances equal: a pure mean error
    # of 10 normalised units.
    drift = ds.drift.isel(depth=0)
    assert drift.sel(component="mean").item() == pytest.approx(10 / math.sqrt(1 + 1e-5), rel=1e-5)
    assert drift.sel(component="scale").item() == pytest.approx(0.0, abs=1e-5)
    assert drift.sel(component="rms").item() == pytest.approx(10, rel=1e-5)
    # Against the previous checkpoint's mean 4: the previous statistics, used now, are 4 off.
    assert ds.drift_consecutive.isel(depth=0).sel(component="mean").item() == pytest.approx(4, rel=1e-5)
    # Validation images are the recalibration images: the floor is nothing, so the mismatch is all excess.
    assert ds.mismatch_floor.isel(depth=0).sel(component="rms").item() == pytest.approx(0, abs=1e-4)
    assert ds.mismatch_excess.isel(depth=0).sel(component="rms").item() == pytest.approx(10, rel=1e-4)
    assert ds.layer.values.tolist() == ["bn"] and ds.attrs["recal_images"] == 16
    assert ds.val_loss.attrs["units"] == "nats" and ds.drift.attrs["long_name"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert_no_hooks(model)


def test_augmented_recalibration_images_raise_the_floor():
    """The floor is what augmentation (the statistics describe augmented images, validation is not) leaves even
    with exact statistics: here the recalibration images are the validation images shifted by 2."""
    model = model_with_stale_statistics()
    x = torch.cat([torch.full((8, 1, 2, 2), 11.0), torch.full((8, 1, 2, 2), 9.0)])
    y = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    ds = diagnose_checkpoint(model, [(x, y)], [x + 2])
    assert ds.mismatch_floor.isel(depth=0).sel(component="mean").item() == pytest.approx(2, rel=1e-4)
    assert ds.eval_mismatch.isel(depth=0).sel(component="mean").item() == pytest.approx(10, rel=1e-4)
    assert ds.mismatch_excess.isel(depth=0).sel(component="rms").item() == pytest.approx(8, rel=1e-4)


def test_nothing_is_left_behind_when_recalibration_fails():
    model = model_with_stale_statistics()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def recal():
        yield torch.randn(4, 1, 2, 2)
        raise RuntimeError("the data loader broke")

    with pytest.raises(RuntimeError, match="broke"):
        diagnose_checkpoint(model, [(torch.randn(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))], recal())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_no_hooks(model)


class IdentityChain(nn.Module):
    """`depth` layers of identity 1x1 conv -> BN (weight 1, bias 0), with or without the addition
    x + BN(conv(x)), then a linear head: a network whose propagation of a statistics error is known by hand."""

    def __init__(self, depth: int, skip: bool):
        super().__init__()
        self.skip = skip
        self.convs = nn.ModuleList(nn.Conv2d(1, 1, 1, bias=False) for _ in range(depth))
        self.bns = nn.ModuleList(nn.BatchNorm2d(1) for _ in range(depth))
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.fill_(1.0)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = x + bn(conv(x)) if self.skip else bn(conv(x))
        return self.fc(x.mean((2, 3)))


def test_amplification_of_a_planted_error_has_its_known_answer():
    """An error of size d planted in layer j's statistics reaches every later BN layer unchanged in the plain
    chain (each layer passes a normalised signal on), and as d / s_(j+1) in the residual chain, whose signal
    std grows by 1 per layer (s_(k+1) = s_k + 1 from the input's std s_1): the skip connections damp it."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 4, 4)
    y = torch.randint(0, 2, (64,))
    depth, size = 6, 0.1
    s1 = math.sqrt(x.var(correction=0).item() + 1e-5)
    for skip in (False, True):
        model = IdentityChain(depth, skip)
        ds = amplification(model, [(x, y)], [x], size=size)
        for kind in ("mean", "scale"):
            gain = ds.amplification_gain.sel(perturbation=kind).values
            expected = [1.0] * (depth - 1) if not skip else [1 / (s1 + j) for j in range(1, depth)]
            assert gain[:-1] == pytest.approx(expected, rel=2e-3), (skip, kind)
            assert math.isnan(gain[-1])  # no BN layer after the last one
            error = ds.amplification_error.sel(perturbation=kind).values  # (source, depth)
            assert np.allclose(np.tril(error), 0, atol=1e-6)  # nothing reaches the layer itself or those before
        assert_no_hooks(model)
        assert all(module.running_var.item() == 1.0 for module in model.bns)  # the model came back as it came


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


def shift_culprit_mean(state: dict, std: float = 50) -> None:
    """Running mean `std` std too low: the layer's output is that much x gamma too high, through the block."""
    state[f"{CULPRIT}.running_mean"] -= std * (state[f"{CULPRIT}.running_var"] + 1e-5).sqrt()


def scramble_classifier(state: dict, scale: float = 10) -> None:
    weight = state["fc.weight"]
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    state["fc.weight"] = weight + scale * weight.std() * noise


def inputs_of_run(loaded) -> tuple[EvalBatches, list]:
    val = EvalBatches(load_split("synthetic", "val", val_split=32), loaded.spec, 8, "cpu")  # 4 batches
    recal = recalibration_inputs(load_split("synthetic", "train", val_split=32)[:RECAL_IMAGES], loaded.spec,
                                 "crop-flip", 32, "cpu")  # as the trainer's --precise-bn
    return val, recal


def diagnose_file(path: Path, previous=None) -> tuple[xr.Dataset, dict, float]:
    """What the command computes for one checkpoint, in-process; with the checkpoint's running statistics and
    the validation loss its trainer logged."""
    loaded = ckpt.load(path)
    part = diagnose_checkpoint(loaded.model, *inputs_of_run(loaded), previous=previous)
    assert_no_hooks(loaded.model)
    return part, running_statistics(loaded.model), loaded.history["val_loss"][-1]


@pytest.fixture(scope="module")
def untouched(run) -> list[tuple[xr.Dataset, dict, float]]:
    diagnosed, previous = [], None
    for path in rundir.run_checkpoints(run):
        diagnosed.append(diagnose_file(path, previous))
        previous = diagnosed[-1][1]
    return diagnosed


def diagnosis(diagnosed: list[tuple[xr.Dataset, dict, float]], **rule) -> xr.Dataset:
    return spike_diagnosis([part for part, _, _ in diagnosed], ["resnet20"] * len(diagnosed),
                           list(range(1, len(diagnosed) + 1)),
                           history_val_loss=[logged for _, _, logged in diagnosed], **rule)


def test_an_untouched_run_has_nothing_flagged(untouched):
    ds = diagnosis(untouched)
    assert not ds.flagged.values.any()
    (line,) = ds.attrs["verdict"]
    assert line.startswith("resnet20: no spike or BN-statistics gap over epochs 1-3")
    # The run's BN statistics are already population statistics: nothing drifted, recalibrating changes nothing.
    assert np.nanmax(ds.drift.values) < 1e-3
    np.testing.assert_allclose(ds.val_loss.sel(bn="running"), ds.val_loss.sel(bn="recalibrated"), rtol=1e-4)
    np.testing.assert_allclose(ds.val_loss.sel(bn="running"), ds.history_val_loss, rtol=1e-3)


def test_a_bn_gap_at_the_first_checkpoint_is_flagged_with_its_share(run, untouched, tmp_path):
    path = corrupt(Path(shutil.copy(run / "epoch_001.pt", tmp_path)), shift_culprit_mean)
    ds = diagnosis([diagnose_file(path)] + untouched[1:])
    assert ds.flagged.values[0].tolist() == [True, False, False] and not ds.spike.values.any()
    assert ds.bn_gap.values[0, 0] and ds.cause.values[0, 0] == "BN statistics"
    assert ds.share.values[0, 0] == pytest.approx(1.0) and ds.share_se.values[0, 0] < 0.05
    line = ds.attrs["verdict"][0]
    assert line.startswith("resnet20, epoch 1 (BN-statistics gap):") and "(first checkpoint)" in line
    assert "recalibration removes 100%" in line and f"at {CULPRIT}" in line


def test_scrambled_weights_are_not_blamed_on_bn(run, untouched, tmp_path):
    path = corrupt(Path(shutil.copy(run / "epoch_003.pt", tmp_path)), scramble_classifier)
    ds = diagnosis(untouched[:2] + [diagnose_file(path, previous=untouched[1][1])])
    assert ds.spike.values[0].tolist() == [False, False, True] and ds.cause.values[0, 2] == "weights"
    assert ds.share.values[0, 2] < 0.2
    (line,) = ds.attrs["verdict"]
    assert line.startswith("resnet20, epoch 3 (spike):") and ": weights" in line


def test_a_spike_that_recalibration_only_partly_removes_is_mixed(run, untouched, tmp_path):
    """Both planted at once: a running mean off (recalibration repairs it) and a scrambled classifier (it
    cannot): the share is strictly between the two, and the verdict says so with the number."""
    def both(state):
        shift_culprit_mean(state, std=2)
        scramble_classifier(state, scale=3)

    path = corrupt(Path(shutil.copy(run / "epoch_003.pt", tmp_path)), both)
    ds = diagnosis(untouched[:2] + [diagnose_file(path, previous=untouched[1][1])])
    loss = ds.val_loss.isel(model=0, epoch=2)
    running, recalibrated = loss.sel(bn="running").item(), loss.sel(bn="recalibrated").item()
    trend = np.median(ds.val_loss.isel(model=0).sel(bn="recalibrated").values[:2])
    share = (running - recalibrated) / (running - min(recalibrated, trend))
    assert 0.2 < share < 0.8 and ds.share.values[0, 2] == pytest.approx(share)
    assert ds.cause.values[0, 2] == "mixed" and ds.flagged.values[0, 2]
    (line,) = ds.attrs["verdict"]
    assert f"recalibration removes {share:.0%} ± " in line and ": mixed" in line


def test_the_repair_curve_drops_where_the_corrupted_layer_is_repaired(run, tmp_path):
    path = corrupt(Path(shutil.copy(run / "epoch_003.pt", tmp_path)), shift_culprit_mean)
    loaded = ckpt.load(path)
    layers = list(running_statistics(loaded.model))
    culprit = layers.index(CULPRIT) + 1  # its depth: k = culprit repairs it
    ds = repair(loaded.model, *inputs_of_run(loaded))
    curve = ds.repair_loss.values
    assert ds.repaired.values.tolist() == list(range(len(layers) + 1))
    assert np.argmax(curve[:-1] - curve[1:]) == culprit - 1  # the one big step is the culprit's
    assert np.allclose(curve[:culprit], curve[0], rtol=1e-3) and np.allclose(curve[culprit:], curve[-1], rtol=1e-3)
    assert ds.single_repair_loss.sel(depth=culprit).item() == pytest.approx(curve[-1], rel=1e-3)
    assert_no_hooks(loaded.model)


def test_command_names_the_bn_layer_whose_statistics_were_corrupted(run, tmp_path):
    broken = Path(shutil.copytree(run, tmp_path / "bn"))
    corrupt(broken / "epoch_003.pt", shift_culprit_mean)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "diagnostics.spikes", str(broken), "--recal-images",
                             str(RECAL_IMAGES), "--batch-size", "64", "--repair", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    verdict = [line for line in lines if line.startswith("resnet20")]
    assert lines[-5:] == [str(out / name) for name in ("spikes.nc", "spikes.png", "spikes.pdf", "spikes_repair.png",
                                                        "spikes_repair.pdf")]
    assert len(verdict) == 1 and verdict[0].startswith("resnet20, epoch 3 (spike and BN-statistics gap):")
    assert "recalibration removes 100%" in verdict[0] and ": BN statistics" in verdict[0]
    assert f"the largest drift of the running statistics is 50 at {CULPRIT}" in verdict[0]
    assert "repairing " + CULPRIT + " alone" in verdict[0]
    ds = xr.open_dataset(out / "spikes.nc")
    assert ds.flagged.values[0].tolist() == [False, False, True] and ds.attrs["verdict"] == verdict[0]
    drift = ds.drift.sel(model="resnet20", epoch=3, component="mean")
    culprit = (ds.layer.sel(model="resnet20") == CULPRIT).values
    assert drift.values[culprit].item() == pytest.approx(50, rel=1e-4) and drift.values[~culprit].max() < 1e-3
    # In eval mode the culprit's input is its usual self, 50 running std off its shifted statistics; the layers
    # before it see nothing wrong, the layers after it inherit the damage.
    mismatch = ds.mismatch_excess.sel(model="resnet20", epoch=3, component="rms").dropna("depth").values
    at = int(np.flatnonzero(culprit)[0])
    assert mismatch[at] == pytest.approx(50, rel=0.05) and mismatch[:at].max() < 0.5
    assert mismatch[at + 1:].max() > 10 * mismatch[:at].max()
    loss = ds.val_loss.sel(model="resnet20", epoch=3)
    logged = ds.history_val_loss.sel(model="resnet20", epoch=3).item()  # what the intact checkpoint scored
    assert loss.sel(bn="recalibrated").item() == pytest.approx(logged, rel=1e-3)
    assert ds.repair_loss.sel(model="resnet20", epoch=3).dropna("repaired").values[-1] == pytest.approx(logged, rel=1e-3)
    assert ds.attrs["precise_bn"] == RECAL_IMAGES and ds.attrs["recal_images"] == RECAL_IMAGES
    for key in ("definition", "rule", "checkpoint", "dataset", "split", "software", "created"):
        assert ds.attrs[key]
    assert (out / "spikes_repair.png").stat().st_size > 10_000


def test_by_default_the_diagnosis_recomputes_over_the_images_the_trainer_did_and_reads_its_loss(tmp_path):
    """Without --recal-images the diagnosis recomputes BN statistics over as many training images as the run's own
    attribution did (--recalibration-images 64 here, not the 256 it has), so on the attributed validation images
    its recalibrated loss is the one the epoch line printed; --precise-bn's images where the run had them, and the
    trainer's default for a record that names neither."""
    from diagnostics.common import run_recal_images
    run = train_tiny(tmp_path / "run", "resnet20", "--attribution-images", "48", "--recalibration-images", "64")
    out = tmp_path / "out"
    assert main_guard(lambda: spikes_command([str(run), "--n-images", "48", "--out", str(out)])) == 0
    ds = xr.load_dataset(out / "spikes.nc")
    assert ds.attrs["recal_images"] == 64
    logged = rundir.read_metrics(run)["val_loss_recalibrated"]
    np.testing.assert_allclose(ds.val_loss.sel(bn="recalibrated").squeeze("model").values, logged, rtol=1e-5)
    loaded = ckpt.load(run / "epoch_002.pt")
    assert run_recal_images(loaded.config) == run_recal_images(rundir.read_config(run)) == 64
    for config, n in (({"precise_bn": 32, "recalibration_images": 512}, 32), ({"attribution_images": 100}, 100),
                      ({}, 512), (None, 512), ({"recalibration_images": True}, 512)):
        assert run_recal_images(config) == n, config


def test_the_monitor_of_a_run_is_in_the_diagnosis(tiny_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main_guard(lambda: spikes_command([str(tiny_runs["resnet20"]), "--recal-images", "64", "--out",
                                              str(out)])) == 0
    ds = xr.open_dataset(out / "spikes.nc")
    monitor = xr.open_dataset(tiny_runs["resnet20"] / "monitor.nc")
    assert ds.monitor_step.values.tolist() == monitor.step.values.tolist()
    np.testing.assert_allclose(ds.monitor_probe_loss.sel(model="resnet20").values, monitor.probe_loss.values)
    assert ds.monitor_epoch_end.sel(model="resnet20").values.tolist() == [4, 8]
    printed = capsys.readouterr().out
    if ds.flagged.values.any():  # a 4-step epoch leaves stale statistics: the monitor saw it coming
        assert "the BN monitor warned first at step" in printed
    np.testing.assert_allclose(ds.monitor_val_loss.sel(model="resnet20").values, monitor.val_loss.values)
    assert ds.monitor_val_step.sel(model="resnet20").values.tolist() == [4, 8]
    # The step view of a long run: the first, unarmed measurement (initial statistics) is 1e6 times the rest; the
    # loss axis is scaled to the armed part, the warnings are a rug a reader can count, the validations are drawn.
    ds = ds.load()
    ds["monitor_probe_loss"][dict(monitor_step=0)] = 1e6
    ds["monitor_armed_from"] = ds.monitor_armed_from.where(False, float(ds.monitor_step.values[1]))
    fig = spikes_figure(ds, {})
    loss_axis = fig.axes[3]
    assert loss_axis.get_ylim()[1] < 1e3 and "y: from step" in loss_axis.get_title(loc="left")
    labels = [text.get_text() for text in loss_axis.get_legend().get_texts()]
    assert "validation, running" in labels and "validation, recalibrated" in labels
    warned = int(ds.monitor_warning.sel(model="resnet20").sum())
    assert not warned or f"early warning ({warned} of {ds.sizes['monitor_step']} measurements)" in labels


def test_command_refuses_a_checkpoint_file(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main_guard(lambda: spikes_command([str(run / "epoch_001.pt"), "--out", str(out)])) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "not a run directory" in error
    assert not out.exists()
