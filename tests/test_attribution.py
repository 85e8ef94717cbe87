"""Trust every validation (issue 24): the validation attributed to BN statistics, the statistics followed from
step to step, the lag model against a constructed moving average, and the prescription."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

import models
from analyses.bn import recalibrate_bn
from analyses.monitor import (BNMonitor, Prescription, StatisticsTracker, agreement, attribute, best_momentum,
                              lag_from, lag_inputs, lag_start, predicted_error, prescription, validation_predictions)
from conftest import assert_no_hooks, train_tiny
from train import checkpoint as ckpt
from train import datasets, rundir
from train.batches import EvalBatches, recalibration_inputs


def hand_loop(model, steps: int, monitor=None, batch: int = 16, seed: int = 1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, 4, (batch,), generator=generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss=loss)
    return optimizer


def test_each_steps_batch_statistics_are_recovered_and_the_own_momentum_shadow_is_the_running_one():
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    tracker = StatisticsTracker(model, (0.02, 0.5))
    assert tracker.momenta == (0.02, 0.1, 0.5)  # the run's own momentum joins the shadows
    seen = {}
    layer = dict(model.named_modules())["stage2.block1.bn1"]
    layer.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0].detach()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(6):
        loss = F.cross_entropy(model(torch.randn(16, 3, 32, 32)), torch.randint(0, 4, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tracker.update()
    names = [name for name, _ in models.bn_layers(model)]
    i = names.index("stage2.block1.bn1")
    start = sum(tracker.sizes[:i])
    batch_mean, batch_var = (t[start:start + tracker.sizes[i]] for t in tracker.previous)
    torch.testing.assert_close(batch_mean, seen["x"].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch_var, seen["x"].var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    own = tracker.shadow_statistics(names)[1]
    for name, module in models.bn_layers(model):
        torch.testing.assert_close(own[name].mean, module.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(own[name].var, module.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("motion", ["drift", "diffusion"])
def test_the_lag_model_matches_a_moving_average_of_a_statistic_moving_at_a_known_speed(motion):
    """One BN layer whose input's population mean (in stds) drifts v = 0.01 per step, or diffuses by q = 1e-4 per
    step (a random walk): every shadow's error against the population equals the lag model's, with the batch
    noise the tracker measures (for Gaussian inputs of n values per channel, sqrt(1 / n + 1 / (2 n)): the mean's
    and the std's), and lag_inputs recovers v and q from the shifts over one and two intervals."""
    channels, n, steps, interval = 512, 64, 600, 10
    v, q = (0.01, 0.0) if motion == "drift" else (0.0, 1e-4)
    model = nn.Sequential(nn.BatchNorm2d(channels))
    tracker = StatisticsTracker(model, (0.02, 0.05, 0.2, 0.5))
    generator = torch.Generator().manual_seed(0)
    mean = torch.zeros(channels)
    path = []
    for t in range(1, steps + 1):
        mean = mean + v + math.sqrt(q) * torch.randn(channels, generator=generator)
        path.append(mean.clone())
        model(mean.view(1, -1, 1, 1) + torch.randn(n, channels, 1, 1, generator=generator))
        tracker.update()
    noise = tracker.noise()[0]
    assert noise == pytest.approx(math.sqrt(1.5 / n), rel=0.05)
    late = torch.stack(path[-200:])  # shifts of the population mean over one and two intervals, late in the run
    shift = (late[interval:] - late[:-interval]).square().mean(1).sqrt()[::interval].numpy()
    shift2 = (late[2 * interval:] - late[:-2 * interval]).square().mean(1).sqrt()[::interval].numpy()
    count = min(len(shift), len(shift2))
    drift, diffusion, _ = lag_inputs(shift[:count, None], shift2[:count, None], [[noise]] * count, [interval] * count)
    assert drift[0] == pytest.approx(v, abs=0.002) and diffusion[0] == pytest.approx(q, rel=0.35, abs=2e-5)
    for momentum, shadow in zip(tracker.momenta, tracker.shadow_statistics(["0"])):
        mean_error = (mean - shadow["0"].mean) / shadow["0"].var.add(1e-5).sqrt()
        scale_error = 1 - 1 / shadow["0"].var.add(1e-5).sqrt()
        measured = (mean_error.square() + scale_error.square()).mean().sqrt().item()
        assert measured == pytest.approx(predicted_error(v, q, noise, momentum), rel=0.15), momentum


def test_the_why_line_says_which_motion_the_fit_could_not_measure_instead_of_a_rate_of_0():
    """The lag model's fit puts one term at 0 where the shifts leave no room for it (over two intervals exactly
    twice the shift over one: pure drift; at most sqrt(2) times: pure diffusion); the why-line then names the
    motion it measured and says the other was not measurable, where it printed "diffuse 0 per sqrt(step)" (the
    demo's resnet20). A record without a second shift never measured drift, and says so."""
    def why(shift, shift2) -> str:
        drift, diffusion, noise = lag_inputs([[shift]], [[shift2]], [[0.02]], [10])
        found = Prescription(worst=None, layers=[], momentum=0.1, drift=float(drift[0]),
                             diffusion=float(diffusion[0]), noise=float(noise[0]), angular_speed=0.002,
                             angular_equilibrium=0.007, replaced=False, measured_best=float("nan"),
                             measured_error={}, predicted_best=float("nan"), fit=(float("nan"), float("nan"), 0),
                             drift_measured=bool(np.isfinite(shift2)))
        return found.lines()[1]

    assert "drift 0.015 per step, no diffusion measurable beside it (medians over layers)" in why(0.15, 0.3)
    assert "diffuse 0.077 per sqrt(step), no drift measurable beside it" in why(0.2, 0.2)  # q = 0.06 / 10, v^2 < 0
    assert "drift 0.0071 per step and diffuse 0.059 per sqrt(step)" in why(0.2, 0.3)  # v^2 = 0.01 / 200, q = 0.035 / 10
    assert "diffuse 0.095 per sqrt(step) (drift not measured: a record without input_shift2)" in why(0.3, np.nan)
    assert "did not move measurably" in why(0.0, 0.0)
    for line in (why(0.15, 0.3), why(0.2, 0.2), why(0.3, np.nan)):
        assert " 0 per" not in line and "trail by ~" in line


def test_the_best_momentum_balances_lag_and_noise():
    # small m, drift alone: (v / m)^2 + s^2 m / 2 is smallest at m = (4 v^2 / s^2)^(1/3)
    assert best_momentum([1e-5], [0.0], [0.1]) == pytest.approx((4e-10 / 1e-2) ** (1 / 3), rel=0.05)
    # small m, diffusion alone: q / (2 m) + s^2 m / 2 is smallest at m = sqrt(q) / s
    assert best_momentum([0.0], [1e-6], [0.1]) == pytest.approx(0.01, rel=0.05)
    assert best_momentum([1e-5] * 2, [0.0] * 2, [0.1] * 2) == best_momentum([1e-5], [0.0], [0.1])
    assert best_momentum([0.0], [0.0], [0.1]) == pytest.approx(1e-3)  # nothing moves: average as long as possible
    assert best_momentum([0.5], [0.0], [0.0]) == 1.0  # no noise: follow the last batch
    assert math.isnan(best_momentum([np.nan], [0.0], [0.1]))
    assert agreement([0.1, 0.2, 0.4, 0.8], [0.1, 0.2, 0.4, 0.8])[:2] == (1.0, 1.0)
    drift, diffusion, _ = lag_inputs([[0.3]], [[np.nan]], [[0.1]], [10])  # no second shift: all diffusion
    assert (drift[0], diffusion[0]) == (0.0, pytest.approx(0.009))


def test_a_corrupted_layer_is_attributed_exactly_and_nothing_is_changed(tiny_runs):
    loaded = ckpt.load(tiny_runs["resnet20"] / "epoch_002.pt")
    model = loaded.model
    train_images = datasets.load_split("synthetic", "train")[:128]
    recalibration = recalibration_inputs(train_images, loaded.spec, "none", 64, "cpu")
    val = datasets.load_split("synthetic", "test")[:96]
    batches = EvalBatches(val, loaded.spec, 32, "cpu")
    x = torch.cat([b for b, _ in batches])
    layer = dict(model.named_modules())["stage2.block1.bn1"]
    with torch.no_grad():
        layer.running_mean += 5 * (layer.running_var + layer.eps).sqrt()
    monitor = BNMonitor(model, x[:16], val.labels[:16], every=0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = monitor.validate(batches, recalibration, step=7, epoch=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert torch.equal(rng, torch.get_rng_state())
    assert_no_hooks(model)
    by_hand = copy.deepcopy(model)
    recalibrate_bn(by_hand, recalibration)
    model.eval(), by_hand.eval()
    with torch.no_grad():
        running, recalibrated = (F.cross_entropy(m(x), val.labels, reduction="none").double() for m in (model, by_hand))
    model.train()
    difference = running - recalibrated
    assert result.loss_running == pytest.approx(running.mean().item(), rel=1e-6)
    assert result.loss_recalibrated == pytest.approx(recalibrated.mean().item(), rel=1e-6)
    assert result.excess == pytest.approx(difference.mean().item(), rel=1e-6)
    assert result.excess_se == pytest.approx(difference.std().item() / math.sqrt(96), rel=1e-6)
    assert result.excess > 1 and result.n_images == 96 and "of it is BN statistics" in result.text()
    ds = monitor.dataset()
    assert ds.val_step.values.tolist() == [7] and ds.val_epoch.values.tolist() == [2]
    errors = ds.shadow_error.sel(momentum=0.1).isel(validation=0)
    assert str(ds.layer.values[int(np.argmax(errors.values))]) == "stage2.block1.bn1"  # the running statistics
    assert errors.max() == pytest.approx(5, rel=0.05)
    assert prescription(ds).layers[0][0] == "stage2.block1.bn1"
    with pytest.raises(ValueError, match="same images"):
        attribute((running[:3], running[:3].long(), val.labels[:3]), (running[:2], running[:2].long(), val.labels[:2]))


def test_the_monitor_keeps_its_new_measurements_across_a_resume():
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    probe_x, probe_y = torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,))
    monitor = BNMonitor(model, probe_x, probe_y, every=3)
    optimizer = hand_loop(model, 7, monitor)
    monitor.optimizer = optimizer
    state = copy.deepcopy(monitor.state_dict())
    twin = copy.deepcopy(model)
    hand_loop(model, 5, monitor, seed=2)
    restored = BNMonitor(twin, probe_x, probe_y, every=3)
    restored.load_state_dict(state)
    hand_loop(twin, 5, restored, seed=2)
    a, b = monitor.dataset(), restored.dataset()
    for name in ("input_shift", "input_shift2", "interval", "batch_noise", "angular_speed", "shadow_gap",
                 "predicted_gap"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-5, atol=1e-7, err_msg=name)
    assert np.isfinite(a.input_shift.sel(step=[6, 9, 12])).all() and np.isfinite(a.angular_speed).all()
    assert np.isfinite(a.input_shift2.sel(step=[9, 12])).all() and np.isnan(a.input_shift2.sel(step=6)).all()
    assert np.isnan(a.input_shift.sel(step=3)).all()  # nothing to compare with at the first measurement


def test_the_trainer_attributes_each_validation_and_selects_as_asked(tmp_path, capsys):
    run = train_tiny(tmp_path / "run", "plain20", "--lr", "0.2", "--attribution-images", "48", "--select",
                     "recalibrated")
    out = capsys.readouterr().out
    metrics = rundir.read_metrics(run)
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    for line, loss, recalibrated in zip(epoch_lines, metrics["val_loss"], metrics["val_loss_recalibrated"]):
        assert f"val_loss {loss:.4f} (first 48 images" in line and f"recalibrated {recalibrated:.4f}:" in line
    ds = xr.load_dataset(run / "monitor.nc")
    np.testing.assert_allclose(ds.bn_excess.values, metrics["bn_excess"])
    np.testing.assert_allclose(ds.val_loss.sel(val_bn="recalibrated").values, metrics["val_loss_recalibrated"])
    assert (ds.val_images == 48).all() and ds.val_epoch.values.tolist() == [1, 2]
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == 1 + int(np.argmax(metrics["val_acc_recalibrated"]))
    assert best["history"]["bn_excess"] == metrics["bn_excess"][:best["epoch"]]
    assert any(line.startswith("BN statistics: the worst validation, epoch") for line in out.splitlines())


def test_the_attribution_recomputes_over_the_first_recalibration_images(tmp_path):
    run = train_tiny(tmp_path / "run", "resnet20", "--attribution-images", "48", "--recalibration-images", "64")
    loaded = ckpt.load(run / "epoch_002.pt")
    train_images = datasets.load_split("synthetic", "train")
    val = EvalBatches(datasets.load_split("synthetic", "test")[:48], loaded.spec, 48, "cpu")
    (x, labels), = val
    recalibrated = {}
    for n in (64, 128):  # the trainer's 64, and what another number would have read
        model = copy.deepcopy(loaded.model)
        recalibrate_bn(model, recalibration_inputs(train_images[:n], loaded.spec, "crop-flip", 64, "cpu"))
        with torch.no_grad():
            recalibrated[n] = F.cross_entropy(model.eval()(x), labels).item()
    measured = rundir.read_metrics(run)["val_loss_recalibrated"][-1]
    assert measured == pytest.approx(recalibrated[64], rel=1e-5)
    assert abs(recalibrated[128] - recalibrated[64]) > 1e-3 * recalibrated[64]
    assert json.loads((run / "config.json").read_text())["recalibration_images"] == 64


def test_after_a_recalibration_every_shadow_starts_from_the_replaced_statistics():
    """--precise-bn replaces the running statistics before each validation; a run at any momentum would have
    been recalibrated too, so every shadow starts again there, and the run's own stays its running statistics."""
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    monitor = BNMonitor(model, torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)), every=0)
    hand_loop(model, 4, monitor)
    recalibrate_bn(model, [torch.randn(16, 3, 32, 32)])
    monitor.statistics_replaced()
    hand_loop(model, 3, monitor, seed=3)
    names = [name for name, _ in models.bn_layers(model)]
    for shadow in monitor.tracker.shadow_statistics(names)[list(monitor.momenta).index(0.1):][:1]:
        for name, module in models.bn_layers(model):
            torch.testing.assert_close(shadow[name].mean, module.running_mean, rtol=1e-5, atol=1e-6)


def test_a_saved_state_of_another_shape_or_version_is_one_error_or_resumes():
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    probe = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    monitor = BNMonitor(model, *probe, every=2)
    hand_loop(model, 4, monitor)
    state = monitor.state_dict()
    broken = copy.deepcopy(state)
    broken["tracker"]["shadow_mean"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shadow statistics"):
        BNMonitor(model, *probe, every=2).load_state_dict(broken)
    broken = copy.deepcopy(state)
    broken["previous"][0]["mean"] = broken["previous"][0]["mean"][:-1]
    with pytest.raises(ValueError, match="probe statistics"):
        BNMonitor(model, *probe, every=2).load_state_dict(broken)
    # version 2 saved a run's empty record flat, with none of the new variables: it resumes
    old = {"calls": 3, "bn_layers": state["bn_layers"], "weight_layers": state["weight_layers"],
           "records": {name: torch.zeros(0, dtype=torch.float64) for name in
                       ("step", "epoch", "probe_loss", "probe_acc", "bn_gap", "eval_mismatch", "grad_norm",
                        "weight_norm", "train_loss", "lr", "warning")}}
    resumed = BNMonitor(model, *probe, every=2)
    resumed.load_state_dict(old)
    hand_loop(model, 2, resumed)
    assert resumed.dataset().sizes["step"] == 1 and resumed.calls == 5
    assert resumed.replacements == 0 and resumed.dataset().attrs["statistics_replaced"] == 0
    # the count of replaced statistics resumes; a hostile one is refused
    monitor.statistics_replaced()
    again = BNMonitor(model, *probe, every=2)
    again.load_state_dict(monitor.state_dict())
    assert again.replacements == 1
    for hostile in (-1, True, "2", 1.5):
        with pytest.raises(ValueError, match="replacements"):
            BNMonitor(model, *probe, every=2).load_state_dict({**state, "replacements": hostile})


def test_an_older_record_without_warnings_or_image_counts_resumes_without_inventing_them():
    """An early version-3 record kept neither whether each measurement's warning fired nor how many images each
    validation attributed: it resumes, with no warning fired there (a NaN would read as one) and the counts NaN."""
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    probe = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    monitor = BNMonitor(model, *probe, every=2)
    hand_loop(model, 4, monitor)
    monitor.validate([(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))], [torch.randn(16, 3, 32, 32)],
                     step=4, epoch=1)
    state = monitor.state_dict()
    del state["records"]["warning"], state["validations"]["val_images"]
    resumed = BNMonitor(model, *probe, every=2)
    resumed.load_state_dict(state)
    hand_loop(model, 2, resumed)
    ds = resumed.dataset()
    assert ds.sizes["step"] == 3 and ds.sizes["validation"] == 1
    assert ds.warning.dtype == bool and not ds.warning.values[:2].any()
    assert np.isnan(ds.val_images.values[0]) and int(ds.val_step.values[0]) == 4


def test_the_lag_model_reads_the_measurements_from_lag_from_on():
    """Training's first upheaval (plain56's first measurement: a batch noise of 78 normalised units, 0.03 after
    it) would outweigh a whole run in the lag model's mean squares and put its best momentum at 0.03 where every
    shadow said 0.8: the prescription and every validation's prediction, during training and after it, read the
    measurements from `lag_from` on, whatever step the warning is armed from."""
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    monitor = BNMonitor(model, torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)), every=2, lag_from=3)
    hand_loop(model, 8, monitor)
    monitor.validate([(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))], [torch.randn(16, 3, 32, 32)],
                     step=8, epoch=1)
    ds = monitor.dataset()
    assert list(ds.step.values) == [2, 4, 6, 8] and ds.attrs["lag_from"] == 3  # the first one not read
    np.testing.assert_allclose(validation_predictions(ds), ds.predicted_error.values, rtol=1e-12)
    found = prescription(ds)
    assert np.isfinite(found.predicted_best)

    def upheaval(index: int) -> xr.Dataset:
        changed = ds.copy(deep=True)
        for name in ("batch_noise", "input_shift", "input_shift2"):
            changed[name][index] = 1e3
        return changed

    before = upheaval(0)
    assert prescription(before).predicted_best == found.predicted_best
    assert (prescription(before).noise, prescription(before).diffusion) == (found.noise, found.diffusion)
    np.testing.assert_array_equal(validation_predictions(before), validation_predictions(ds))
    read = upheaval(1)  # the same upheaval from lag_from on does count
    assert prescription(read).noise > 100 * found.noise
    assert not np.allclose(validation_predictions(read), validation_predictions(ds), equal_nan=True)
    nothing = ds.assign_attrs(lag_from=100)  # nothing read: no inputs, not all of the measurements
    assert np.isnan(prescription(nothing).predicted_best) and np.isnan(prescription(nothing).noise)
    assert np.isnan(validation_predictions(nothing)).all()
    assert found.drift_measured
    before_shift2 = ds.drop_vars(["input_shift", "input_shift2"])  # a record of input_speed alone: no drift term
    assert not prescription(before_shift2).drift_measured
    why = [line for line in prescription(before_shift2).lines() if line.startswith("  why:")]
    assert len(why) == 1 and "(drift not measured: a record without input_shift2)" in why[0]
    older = ds.copy()
    del older.attrs["lag_from"]  # a record of an earlier version: lag_start of its first validation's step
    assert lag_from(older) == lag_start(8) == 4 and lag_start(156) == lag_start() == 44


def test_select_recalibrated_without_bn_keeps_a_best_checkpoint(tmp_path):
    run = train_tiny(tmp_path / "nobn", "plain20", "--no-bn", "--select", "recalibrated", "--lr", "0.01")
    assert (run / "best.pt").is_file()


@pytest.mark.parametrize("every", [1, 2])
def test_the_angular_speed_is_of_the_measured_step_at_any_cadence(every):
    """The weights' copy one step before a measurement is taken after that measurement's step (every 1: at every
    step): the angle is the one the measured step turned, known by hand from the weights around it."""
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    monitor = BNMonitor(model, torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,)), every=every)
    hand_loop(model, 3, monitor)
    before = [w.detach().clone() for w in monitor.weights]
    hand_loop(model, 1, monitor, seed=5)  # step 4, measured at both cadences
    cosines = [F.cosine_similarity(a.flatten().double(), b.detach().flatten().double(), dim=0).item()
               for a, b in zip(before, monitor.weights)]
    turned = [math.acos(max(-1.0, min(1.0, c))) for c in cosines]
    np.testing.assert_allclose(monitor.dataset().angular_speed.sel(step=4).values, turned, rtol=1e-6)


def test_under_precise_bn_the_statistics_are_recomputed_once_per_validation(tmp_path, monkeypatch):
    """--precise-bn recomputes the statistics the attribution needs (over the same images): the trainer passes its
    own pass to the monitor instead of a second recalibration, and the numbers are what that pass gives: the
    validation, made with the recomputed statistics, reads the attribution's recalibrated loss exactly."""
    import analyses.monitor
    import train.trainer
    calls = []
    for module in (train.trainer, analyses.monitor):
        monkeypatch.setattr(module, "recalibrate_bn", lambda *a, __f=module.recalibrate_bn, **k: (
            calls.append(1), __f(*a, **k))[1])
    run = train_tiny(tmp_path / "run", "plain20", "--precise-bn", "128", "--attribution-images", "128",
                     "--val-split", "64")
    metrics = rundir.read_metrics(run)
    assert len(calls) == 2  # one per epoch
    np.testing.assert_allclose(metrics["val_loss_recalibrated"], metrics["val_loss"], rtol=1e-12)
    assert np.isfinite(metrics["bn_excess"]).all()


def test_under_precise_bn_the_shadows_are_measured_before_the_statistics_are_replaced(tmp_path):
    """Known answer: until its first validation a --precise-bn run trains exactly as one without, so its first
    validation measures every shadow's error as that run's does (the same images recomputed); then its shadows
    restart from the recomputed statistics, and the second validation's errors differ."""
    common = ("--attribution-images", "128", "--recalibration-images", "128", "--val-split", "64")
    precise = train_tiny(tmp_path / "precise", "plain20", "--precise-bn", "128", *common)
    ema = train_tiny(tmp_path / "ema", "plain20", *common)
    a, b = (xr.load_dataset(run / "monitor.nc") for run in (precise, ema))
    first, second = a.shadow_error.values, b.shadow_error.values
    assert first[0].min() > 1e-3
    np.testing.assert_allclose(first[0], second[0], rtol=1e-4)
    assert not np.allclose(first[1], second[1], rtol=1e-2)
    assert (a.attrs["statistics_replaced"], b.attrs["statistics_replaced"]) == (2, 0)
    assert prescription(a).what().startswith("nothing: the run recomputed its statistics before each validation")
    assert "--precise-bn" in prescription(a).lines()[0] and "--precise-bn" not in prescription(b).lines()[0]
    old_record = a.assign(shadow_error=a.shadow_error * 0)  # what a precise-bn run of fb0ca34's parent recorded
    assert math.isnan(prescription(old_record).measured_best)


def test_the_trainer_restarts_the_shadows_after_each_validation_measured_them(tmp_path, monkeypatch):
    calls = []
    for name in ("validate", "statistics_replaced"):
        monkeypatch.setattr(BNMonitor, name, lambda self, *a, __f=getattr(BNMonitor, name), __n=name, **k: (
            calls.append(__n), __f(self, *a, **k))[1])
    train_tiny(tmp_path / "run", "plain20", "--precise-bn", "64", "--attribution-images", "64", "--val-split", "64")
    assert calls == ["validate", "statistics_replaced"] * 2
