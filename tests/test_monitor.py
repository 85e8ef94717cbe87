"""The BN monitor (analyses.monitor) and its unit (analyses.bn): known answers, any training loop, the trainer."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

import models
from analyses.bn import BNStatistics, batch_statistics, normalisation_error, recalibrate_bn, running_statistics
from analyses.common import ChannelMoments, forward_hooks, preserved_state
from analyses.monitor import BNMonitor, BNWarning, warm_up_steps
from conftest import assert_no_hooks, train_tiny
from train import checkpoint as ckpt
from train import datasets, rundir
from train.batches import augmented_once


# ---------------------------------------------------------------------------------------------------------------
# The unit


def test_normalisation_error_known_answers():
    used = BNStatistics(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([4.0, 1.0, 0.0]), 0.0)
    true = BNStatistics(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([4.0, 0.25, 0.0]), 0.0)
    error = normalisation_error(used, true)
    # channel 0: mean off by 1 in a std of 2 -> 0.5; channel 1: std 0.5 normalised by 1 -> scale 0.5; channel 2
    # is constant (a dead ReLU), so only its mean could be wrong, and it is not.
    assert error["mean"][:2].tolist() == pytest.approx([0.5, 0.0])
    assert error["scale"][:2].tolist() == pytest.approx([0.0, 0.5])
    assert error["rms"][:2].tolist() == pytest.approx([0.5, 0.5])
    with_eps = normalisation_error(used._replace(eps=1e-5), true._replace(eps=1e-5))
    assert with_eps["rms"][2].item() == 0.0
    # The RMS is what it says: the root mean square of the error of the normalised activation.
    torch.manual_seed(0)
    x = 3 + 2 * torch.randn(200_000, dtype=torch.float64)
    used_mean, used_var, eps = 2.5, 3.0, 1e-5
    actual = (x - used_mean) / math.sqrt(used_var + eps) - (x - x.mean()) / math.sqrt(x.var(correction=0) + eps)
    measured = normalisation_error(BNStatistics(torch.tensor([used_mean]), torch.tensor([used_var]), eps),
                                   BNStatistics(x.mean()[None], x.var(correction=0)[None], eps))
    assert measured["rms"].item() == pytest.approx(actual.square().mean().sqrt().item(), rel=1e-9)


def test_batch_statistics_are_the_inputs_statistics_and_touch_nothing():
    torch.manual_seed(0)
    model = models.build("resnet20")
    x = torch.randn(16, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {name: ChannelMoments() for name, _ in models.bn_layers(model)}
    hooks = {name: (lambda module, inputs, output, m=m: m.update(inputs[0])) for name, m in expected.items()}
    with preserved_state(model), forward_hooks(model, hooks), torch.no_grad():
        model.train()
        reference_output = model(x)
    rng = torch.get_rng_state()
    found, output = batch_statistics(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.allclose(output, reference_output, atol=1e-5)
    for name, stats in found.items():
        assert torch.allclose(stats.mean.double(), expected[name].mean, atol=1e-5)
        assert torch.allclose(stats.var.double(), expected[name].variance, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # buffers and counters too
    assert model.training
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------------------------
# Any training loop


def test_the_monitor_in_a_hand_written_loop():
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe_x, probe_y = torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,))
    monitor = BNMonitor(model, probe_x, probe_y, every=3)
    grads_at_6 = None
    for step in range(1, 10):
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 6:
            grads_at_6 = [m.weight.grad.norm().item() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            with preserved_state(model), torch.no_grad():
                model.eval()
                running_loss = F.cross_entropy(model(probe_x), probe_y).item()
        monitor.step(loss=loss)
    ds = monitor.dataset()
    assert ds.step.values.tolist() == [3, 6, 9] and model.training
    at_6 = ds.sel(step=6)
    assert at_6.grad_norm.values == pytest.approx(grads_at_6, rel=1e-5)
    assert at_6.probe_loss.sel(bn="running").item() == pytest.approx(running_loss, rel=1e-5)
    np.testing.assert_allclose(ds.scaled_grad_norm, ds.grad_norm * ds.weight_norm)
    assert (ds.bn_gap >= 0).all() and ds.bn_gap.sizes["depth"] == len(models.bn_layers(model))
    np.testing.assert_allclose(ds.bn_gap.sel(component="rms") ** 2,
                               ds.bn_gap.sel(component="mean") ** 2 + ds.bn_gap.sel(component="scale") ** 2,
                               rtol=1e-9)
    assert ds.weight_layer.values[0] == "stem.conv" and ds.weight_layer.values[-1] == "fc"
    assert_no_hooks(model)
    restored = BNMonitor(model, probe_x, probe_y, every=3)
    restored.load_state_dict(monitor.state_dict())
    xr.testing.assert_identical(restored.dataset().drop_attrs(), ds.drop_attrs())


def test_a_gap_in_the_running_statistics_raises_the_warning(tiny_runs):
    loaded = ckpt.load(tiny_runs["resnet20"] / "epoch_002.pt")
    model = loaded.model
    images = datasets.load_split("synthetic", "test")[:64]
    probe_x, probe_y = augmented_once(images, loaded.spec, "none", "cpu"), images.labels
    fired = []
    recalibrate_bn(model, [probe_x])  # running statistics exact for these weights: eval and batch modes agree
    monitor = BNMonitor(model, probe_x, probe_y, every=1, on_warning=fired.append)
    assert monitor.measure(1) is None and not fired
    layer = dict(model.named_modules())["stage2.block1.bn1"]
    with torch.no_grad():
        layer.running_mean += 5 * (layer.running_var + layer.eps).sqrt()  # 5 std off: a broken statistic
    warning = monitor.measure(2)
    assert warning is not None and fired == [warning] and warning.layer == "stage2.block1.bn1"
    assert warning.loss_running > 1.5 * warning.loss_batch and "step 2" in warning.message()
    gap = monitor.dataset().bn_gap.sel(step=2, depth=warning_depth(model, "stage2.block1.bn1"))
    assert gap.sel(component="mean").item() == pytest.approx(5, rel=1e-3) and gap.sel(component="scale") < 1e-3


def warning_depth(model, layer: str) -> int:
    return [name for name, _ in models.bn_layers(model)].index(layer) + 1


# ---------------------------------------------------------------------------------------------------------------
# In the trainer


def test_the_trainer_writes_monitor_nc_that_the_checkpoints_confirm(tiny_runs):
    run = tiny_runs["resnet20"]
    ds = xr.load_dataset(run / "monitor.nc")
    assert ds.step.values.tolist() == [2, 4, 6, 8] and ds.epoch.values.tolist() == [1, 1, 2, 2]
    assert ds.attrs["every"] == 2 and ds.attrs["n_images"] == 64 and "augmented once" in ds.attrs["probe"]
    # At the last step of epoch 1 the weights and running statistics are those of epoch_001.pt: recompute.
    loaded = ckpt.load(run / "epoch_001.pt")
    images = datasets.load_split("synthetic", "train", train_images=256)[:64]
    probe = augmented_once(images, loaded.spec, "crop-flip", "cpu")
    model = loaded.model
    with torch.no_grad():
        running = F.cross_entropy(model(probe), images.labels).item()
        stats, logits = batch_statistics(model, probe)
        batch = F.cross_entropy(logits, images.labels).item()
    at_4 = ds.sel(step=4)
    assert at_4.probe_loss.values == pytest.approx([running, batch], rel=1e-5)
    weights = [m.weight.norm().item() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert at_4.weight_norm.values == pytest.approx(weights, rel=1e-5)
    gap = normalisation_error(running_statistics(model)["stem.bn"], stats["stem.bn"])["rms"]
    assert at_4.bn_gap.sel(depth=1, component="rms").item() == pytest.approx(gap.square().mean().sqrt().item(),
                                                                             rel=1e-4)
    # A 4-step epoch leaves the running statistics far from the weights' (the validation loss says so): the
    # warnings fired, and metrics.csv counts them per epoch.
    per_epoch = [int(ds.warning.where(ds.epoch == epoch).sum()) for epoch in (1, 2)]
    assert rundir.read_metrics(run)["bn_warnings"] == per_epoch and sum(per_epoch) > 0


def test_the_monitor_changes_nothing_in_training(tmp_path):
    """Measured every step and every validation attributed (statistics recomputed, shadows kept), or nothing:
    the same weights, buffers, random state and validation losses."""
    watched = train_tiny(tmp_path / "watched", "resnet20", "--monitor-every", "1", "--deterministic")
    unwatched = train_tiny(tmp_path / "unwatched", "resnet20", "--monitor-every", "0", "--attribution-images", "0",
                           "--deterministic")
    a, b = (torch.load(run / "last.pt", weights_only=True) for run in (watched, unwatched))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # buffers too
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["history"]["val_loss"] == b["history"]["val_loss"]
    assert not (unwatched / "monitor.nc").exists() and "monitor" not in b
    excess = [rundir.read_metrics(run)["bn_excess"] for run in (watched, unwatched)]
    assert all(np.isfinite(excess[0])) and all(np.isnan(excess[1]))


def test_the_trainer_prints_the_warning_and_counts_it(tmp_path, capsys):
    # BN momentum 1e-4: the running statistics stay at their initial values while the weights move.
    run = train_tiny(tmp_path / "stale", "plain20", "--bn-momentum", "0.0001", "--monitor-every", "1",
                     "--lr", "0.2")
    out = capsys.readouterr().out
    warnings = rundir.read_metrics(run)["bn_warnings"]
    printed = [line for line in out.splitlines() if line.startswith("warning: step")]
    # the first warning of each epoch is printed, later ones only where the probe loss has doubled
    assert sum(warnings) > 0 and sum(map(bool, warnings)) <= len(printed) <= sum(warnings)
    firsts = [line for line in printed if not line.endswith("(it has doubled since the last line)")]
    assert [f"(epoch {e})" in line for e, line in zip((1, 2), firsts)] == [bool(n) for n in warnings]
    ds = xr.load_dataset(run / "monitor.nc")
    assert int(ds.warning.sum()) == sum(warnings)
    last_epoch = [line for line in out.splitlines() if line.startswith("epoch ")][-1]
    assert f"BN warnings {warnings[-1]}" in last_epoch or warnings[-1] == 0


def test_the_warning_waits_for_the_running_statistics_to_warm_up():
    model = models.build("resnet20")
    assert warm_up_steps(model) == 44  # 0.9^44 = 0.0097: the initial statistics weigh under 1%
    assert warm_up_steps(model, steps_per_epoch=61) == 30  # at most half an epoch
    assert warm_up_steps(model, steps_per_epoch=float("inf")) == 44  # an iterable of unknown length
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average has no initial values to forget
    assert warm_up_steps(model) == 0
    model.stem.bn.momentum = 0.5
    assert warm_up_steps(model) == 7  # 0.5^7 = 0.0078


def test_the_trainer_arms_the_warning_after_half_an_epoch_at_most(tiny_runs):
    # 4 steps an epoch: armed from step 2 (BN momentum 0.1 would need 44).
    ds = xr.load_dataset(tiny_runs["resnet20"] / "monitor.nc")
    assert ds.attrs["warn_after"] == 2 and "from step 2 on" in ds.attrs["rule"]
    assert ds.attrs["lag_from"] == 2  # the lag model's start: the same half epoch at most (lag_start)


def test_the_lag_model_starts_at_the_same_step_whatever_the_bn_momentum(tmp_path):
    """At BN momentum 0.8 the warning is armed after 3 steps, but training's first upheaval is the same as at
    0.1: the lag model reads from step 44 on (`lag_start`), as a momentum-0.1 run of the same recipe does."""
    run = train_tiny(tmp_path / "m0.8", "resnet20", "--batch-size", "2", "--epochs", "1", "--bn-momentum", "0.8",
                     "--monitor-every", "20")
    ds = xr.load_dataset(run / "monitor.nc")
    assert (ds.attrs["warn_after"], ds.attrs["lag_from"]) == (3, 44)


def test_warning_lines_one_an_epoch_unless_the_loss_doubles():
    from train.trainer import WarningLines
    lines = []
    show = WarningLines(lines.append)
    for step, epoch, loss in ((10, 1, 3.0), (20, 1, 4.0), (30, 1, 6.5), (40, 1, 7.0), (50, 2, 2.0), (60, 2, 2.5)):
        show(BNWarning(step, epoch, loss, 1.0, "stem.bn", 0.5))
    assert [line.split(":")[1].strip() for line in lines] == ["step 10 (epoch 1)", "step 30 (epoch 1)",
                                                                "step 50 (epoch 2)"]
    assert lines[1].endswith("(it has doubled since the last line)")
