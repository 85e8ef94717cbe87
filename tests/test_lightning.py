"""The BN monitor in a real PyTorch Lightning Trainer (train.lightning.BNMonitorCallback), CPU, a few steps of a
tiny model on synthetic images: what it logs reaches a CSVLogger, its monitor.nc is what the any-loop API records
for the same steps, training is exactly what it is without it, a resumed fit continues the record, gradient
accumulation is followed, and the diagnostics read the Lightning checkpoints and the record beside them."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")

import models  # noqa: E402
from analyses.monitor import BNMonitor  # noqa: E402
from conftest import read_csv  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train import rundir  # noqa: E402
from train.lightning import BNMonitorCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
BATCH, EVERY = 16, 2
OPTIONS = dict(every=EVERY, probe_images=BATCH, attribution_images=32, recalibration_images=32)


class Classifier(pl.LightningModule):
    """A user's module: the network under `self.model`, SGD with weight decay."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.model = models.build("resnet20", num_classes=3, in_channels=in_channels)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)


class Scheduled(Classifier):
    """The learning rate divided by the step's number, stepped after every optimiser step (OneCycleLR, warm-up)."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1 / (done + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class DictLogits(Classifier):
    """A forward that returns a dict, not the logits the monitor reads."""

    def forward(self, x):
        return {"logits": self.model(x)}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])["logits"], batch[1])


class Stop(pl.Callback):
    """Ends the fit after its first batch."""

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = True


def synthetic(n: int, seed: int, channels: int = 1, size: int = 8) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, channels, size, size, generator=generator) + labels[:, None, None, None].float()
    return TensorDataset(images, labels)


TRAIN, VAL = synthetic(96, 0), synthetic(48, 1)


def fit(root: Path, *, callbacks=(), epochs: int = 2, shuffle: bool = False, accumulate: int = 1, resume=None,
        data=(TRAIN, VAL), precision: str = "32-true", kind=Classifier) -> tuple[Classifier, "pl.Trainer"]:
    pl.seed_everything(0, verbose=False)
    module = kind(in_channels=data[0][0][0].shape[0])
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True,
                         logger=pl.loggers.CSVLogger(root, name="logs", version=0), callbacks=list(callbacks),
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                         num_sanity_val_steps=0, log_every_n_steps=1, precision=precision)
    trainer.fit(module, DataLoader(data[0], batch_size=BATCH, shuffle=shuffle),
                DataLoader(data[1], batch_size=BATCH), ckpt_path=resume)
    return module, trainer


def record(path: Path) -> xr.Dataset:
    return xr.load_dataset(path)


def assert_same_record(a: xr.Dataset, b: xr.Dataset) -> None:
    assert list(a.step.values) == list(b.step.values)
    assert list(a.val_step.values) == list(b.val_step.values)
    for name in a.data_vars:
        np.testing.assert_allclose(a[name].values.astype(float), b[name].values.astype(float), rtol=1e-6,
                                   atol=1e-9, equal_nan=True, err_msg=name)


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    callback = BNMonitorCallback(**OPTIONS)
    module, trainer = fit(root, callbacks=[callback])
    return root / "logs" / "version_0", module, callback, trainer


def test_the_loggers_receive_every_measurement_and_each_validation_attribution(watched):
    log_dir, module, _, _ = watched
    rows = read_csv(log_dir / "metrics.csv")
    columns = set(rows[0])
    layers = [name for name, _ in models.bn_layers(module)]
    assert {"probe/loss_running", "probe/loss_batch", "val/loss_recalibrated", "val/bn_excess",
            "val/bn_excess_se", f"bn_gap/{layers[0]}", f"bn_gap/{layers[-1]}"} <= columns
    steps = [int(row["step"]) for row in rows if row["probe/loss_running"]]
    ds = record(log_dir / "monitor.nc")
    assert steps == list(ds.step.values) == list(range(EVERY, 13, EVERY))  # 6 steps an epoch, from step 2
    validated = [row for row in rows if row["val/bn_excess"]]
    assert [int(row["step"]) for row in validated] == [6, 12] == list(ds.val_step.values)
    np.testing.assert_allclose([float(row["val/bn_excess"]) for row in validated], ds.bn_excess.values, rtol=1e-6)
    assert list(ds.val_epoch.values) == [1, 2] and set(ds.epoch.values) == {1, 2}  # epochs counted from 1, as ours


def test_the_record_is_what_the_any_loop_api_records_for_the_same_steps(watched):
    """The same training by hand (same initial weights, batches, SGD), the monitor started where the callback's
    probe was complete (after the first batch), stepped after every optimiser step and validated after each
    epoch on the same images: the same numbers."""
    log_dir, _, _, _ = watched
    pl.seed_everything(0, verbose=False)
    module = Classifier()
    optimizer = module.configure_optimizers()
    train, val = DataLoader(TRAIN, batch_size=BATCH), list(DataLoader(VAL, batch_size=BATCH))[:2]
    monitor, step = None, 0
    for epoch in (1, 2):
        module.train()
        for x, y in train:
            optimizer.zero_grad()
            loss = F.cross_entropy(module(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            if monitor is None:
                monitor = BNMonitor(module, x, y, every=EVERY, optimizer=optimizer, warn_after=3)  # half an epoch
                continue
            monitor.step(step, epoch=epoch, loss=loss.detach(), lr=0.2)
        monitor.validate(val, list(train)[:2], step=step, epoch=epoch)
    assert_same_record(record(log_dir / "monitor.nc"), monitor.dataset())


def test_a_validation_outside_fit_is_not_recorded(watched):
    """trainer.validate() after fit: its step is the last validation's; the record keeps fit's validations."""
    _, module, callback, trainer = watched
    trainer.validate(module, DataLoader(VAL, batch_size=BATCH), verbose=False)
    assert callback.monitor.validations["val_step"] == [6, 12]


def test_training_is_exactly_what_it_is_without_the_callback(tmp_path):
    """deterministic=True, shuffled batches: the weights, BN buffers and the random state after fit are the same
    with the callback (its forwards, its recalibrations and validations) as without it."""
    watched, _ = fit(tmp_path / "with", callbacks=[BNMonitorCallback(**OPTIONS)], shuffle=True)
    after_watched = torch.get_rng_state()
    bare, _ = fit(tmp_path / "without", shuffle=True)
    assert torch.equal(after_watched, torch.get_rng_state())
    theirs = bare.state_dict()
    for key, value in watched.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    assert (tmp_path / "with" / "logs" / "version_0" / "monitor.nc").is_file()


def test_a_resumed_fit_continues_the_record_as_if_it_had_not_stopped(tmp_path, watched):
    """... at the interval it was recorded at, or at the one the resumed fit's callback is given."""
    log_dir, _, _, _ = watched
    checkpoints = pl.callbacks.ModelCheckpoint(save_top_k=-1)
    fit(tmp_path, callbacks=[BNMonitorCallback(**OPTIONS), checkpoints], epochs=1)
    first = next((tmp_path / "logs" / "version_0" / "checkpoints").glob("epoch=0-*.ckpt"))
    assert torch.load(first, weights_only=True)["callbacks"]  # the monitor's state rides in the checkpoint
    fit(tmp_path, callbacks=[BNMonitorCallback(**OPTIONS)], epochs=2, resume=first)
    assert_same_record(record(tmp_path / "logs" / "version_0" / "monitor.nc"), record(log_dir / "monitor.nc"))
    fit(tmp_path / "every3", callbacks=[BNMonitorCallback(**{**OPTIONS, "every": 3})], epochs=2, resume=first)
    assert list(record(tmp_path / "every3" / "logs" / "version_0" / "monitor.nc").step.values) == [2, 4, 6, 9, 12]


def test_under_gradient_accumulation_it_measures_after_optimiser_steps_and_follows_every_micro_batch(tmp_path):
    """Two batches per optimiser step: measurements at optimiser steps (3 an epoch), each with the learning rate
    of its step (not the next one's, where the scheduler steps after every optimiser step), and the shadow at the
    run's own momentum, stepped at every micro-batch, stays the running statistics themselves. every="auto" is
    worked out for each fit: 6 steps, every step; then 90 steps, every second."""
    callback = BNMonitorCallback(**{**OPTIONS, "every": "auto"})
    module, _ = fit(tmp_path, callbacks=[callback], accumulate=2, kind=Scheduled)
    ds = record(tmp_path / "logs" / "version_0" / "monitor.nc")
    assert list(ds.step.values) == [1, 2, 3, 4, 5, 6]
    assert ds.attrs["warn_after"] == 1  # half an epoch of 3 optimiser steps, not of its 6 batches
    np.testing.assert_allclose(ds.lr.values, 0.2 / ds.step.values, rtol=1e-6)
    monitor = callback.monitor
    own = list(monitor.momenta).index(0.1)
    mean, _ = monitor.tracker._buffers()
    torch.testing.assert_close(monitor.tracker.shadow_mean[own], mean, rtol=1e-4, atol=1e-5)
    fit(tmp_path / "longer", callbacks=[callback, Stop()], epochs=30, accumulate=2)
    assert callback.monitor.every == 2


def test_the_diagnostics_read_its_checkpoints_and_draw_the_step_view_from_its_record(tmp_path, image_folder):
    """A LightningModule trained on 3-channel 16x16 images of 3 classes, diagnosed against the image folder."""
    module, _ = fit(tmp_path, callbacks=[BNMonitorCallback(**OPTIONS), pl.callbacks.ModelCheckpoint(save_top_k=-1)],
                    data=(synthetic(96, 0, 3, 16), synthetic(48, 1, 3, 16)))
    dataset = f"folder:{image_folder}"
    log_dir = tmp_path / "logs" / "version_0"
    files = rundir.run_checkpoints(log_dir)
    assert [rundir.named_epoch(path) for path in files] == [1, 2]
    loaded = ckpt.load(files[-1], model_name="resnet20", dataset=dataset)  # `model.` found and stripped
    assert loaded.epoch == 2 and loaded.label == "resnet20"
    for key, value in module.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    named = ckpt.load(files[-1], model_name="resnet20", dataset=dataset, state_prefix="model")
    assert torch.equal(named.model.fc.weight, module.model.fc.weight)
    with pytest.raises(ckpt.UserError, match="--state-prefix"):
        ckpt.load(files[-1], model_name="resnet20", dataset=dataset, state_prefix="backbone.")
    out = subprocess.run([sys.executable, "-m", "diagnostics.spikes", str(log_dir), "--model", "resnet20",
                          "--dataset", dataset, "--n-images", "8", "--recal-images", "8", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "the BN monitor warned" in out.stdout or "BN monitor" in out.stdout
    spikes = xr.load_dataset(log_dir / "diagnostics" / "spikes.nc")
    assert spikes.monitor_probe_loss.sizes["monitor_step"] == 6
    assert list(spikes.epoch.values) == [1, 2]


def test_bad_options_batches_and_forwards_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="every"):
        BNMonitorCallback(every=-1)
    with pytest.raises(ValueError, match="probe_images"):
        BNMonitorCallback(probe_images=0)
    from train.lightning import images_and_labels
    with pytest.raises(ValueError, match="unpack="):
        images_and_labels({"image": torch.zeros(1), "label": torch.zeros(1)})
    with pytest.raises(ValueError, match="DictLogits's forward .* gave a dict of logits"):
        fit(tmp_path, callbacks=[BNMonitorCallback(**OPTIONS)], epochs=1, kind=DictLogits)


def test_the_images_kept_are_copies_not_views_of_the_batch():
    """A loader that refills its batch tensors in place (DALI, FFCV, a preallocated buffer) leaves the probe,
    recalibration and attribution images as they came."""
    from train.lightning import _Images
    kept = _Images(2)
    images, labels = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    kept.add(images, labels)
    images.fill_(7), labels.fill_(2)
    assert kept.tensors()[0].eq(0).all() and kept.tensors()[1].eq(0).all()
    assert kept.batches[0][0].untyped_storage().nbytes() == 2 * 4 * 4  # not the whole batch's storage


def test_a_training_set_smaller_than_the_probe_is_all_probe_from_the_end_of_the_first_epoch(tmp_path):
    fit(tmp_path, callbacks=[BNMonitorCallback(**{**OPTIONS, "probe_images": 1000})])
    ds = record(tmp_path / "logs" / "version_0" / "monitor.nc")
    assert ds.attrs["n_images"] == len(TRAIN) and list(ds.step.values) == [8, 10, 12]
    assert list(ds.val_step.values) == [6, 12]


def test_under_bf16_mixed_it_measures_in_the_runs_autocast_and_refuses_true_half_precision(tmp_path):
    """The probe's passes under the run's autocast dtype, as training normalised; bf16-true (weights in bf16) is
    one clear error, not a dtype mismatch deep in a forward."""
    callback = BNMonitorCallback(**OPTIONS)
    fit(tmp_path, callbacks=[callback], epochs=1, precision="bf16-mixed")
    ds = record(tmp_path / "logs" / "version_0" / "monitor.nc")
    assert callback.monitor.autocast == torch.bfloat16 and ds.attrs["autocast"] == "bf16"
    assert np.isfinite(ds.probe_loss.values).all() and np.isfinite(ds.bn_excess.values).all()
    with pytest.raises(ValueError, match="precision"):
        fit(tmp_path / "true", callbacks=[BNMonitorCallback(**OPTIONS)], epochs=1, precision="bf16-true")


DDP_SCRIPT = """
import pytorch_lightning as pl
from torch.utils.data import DataLoader
from test_lightning import BATCH, OPTIONS, TRAIN, VAL, Classifier
from train.lightning import BNMonitorCallback

if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", num_sanity_val_steps=0,
                         logger=pl.loggers.CSVLogger(".", name="logs", version=0), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[BNMonitorCallback(**OPTIONS)])
    trainer.fit(Classifier(), DataLoader(TRAIN, batch_size=BATCH), DataLoader(VAL, batch_size=BATCH))
"""


def test_under_ddp_every_process_measures_and_rank_zero_alone_logs_prints_and_writes(tmp_path):
    """Two CPU processes (gloo): each trains on half the batches (3 steps an epoch); one record, one logger's
    file with the monitor's keys, one prescription printed."""
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "ddp.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("BN statistics: the worst validation") == 1
    ds = record(tmp_path / "logs" / "version_0" / "monitor.nc")
    assert list(ds.step.values) == [2] and list(ds.val_step.values) == [3]
    assert "val/bn_excess" in (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert sorted(path.name for path in (tmp_path / "logs" / "version_0").iterdir()) == ["metrics.csv",
                                                                                         "monitor.nc"]


class ThroughSubmodule(Classifier):
    """A validation_step that calls the network, not the module: no forward of the module to take logits from."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.model(x), y))


class SaveDirOnly(pl.loggers.Logger):
    """A logger whose log_dir is its save_dir alone, as W&B's and MLflow's: ModelCheckpoint still writes into
    save_dir/name/version/checkpoints."""

    def __init__(self, root: Path):
        super().__init__()
        self.root, self.received = root, []

    name, version = "project", "run-1"
    save_dir = log_dir = property(lambda self: str(self.root))

    def log_metrics(self, metrics, step=None):
        self.received.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize("module, passes", [(Classifier, 1), (ThroughSubmodule, 2)])
def test_the_running_pass_is_the_modules_own_validation_forward_where_it_has_one(tmp_path, monkeypatch, module,
                                                                                   passes):
    """Each validation predicts the attributed images once more (with recomputed statistics) where the module's
    own forward gave their logits, twice where validation_step went around it; and the record goes beside the
    checkpoints of a logger whose log_dir is its save_dir."""
    import analyses.monitor
    calls = []
    monkeypatch.setattr(analyses.monitor, "predict", lambda *a, __f=analyses.monitor.predict, **k: (
        calls.append(1), __f(*a, **k))[1])
    pl.seed_everything(0, verbose=False)
    logger = SaveDirOnly(tmp_path)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[BNMonitorCallback(**OPTIONS), pl.callbacks.ModelCheckpoint()])
    trainer.fit(module(), DataLoader(TRAIN, batch_size=BATCH), DataLoader(VAL, batch_size=BATCH))
    assert len(calls) == passes
    run = tmp_path / "project" / "run-1"
    assert next((run / "checkpoints").glob("*.ckpt")) and (run / "monitor.nc").is_file()
    ds = record(run / "monitor.nc")
    by_hand = BNMonitor(trainer.lightning_module, *TRAIN[:BATCH], every=0)  # the same model, validated by hand
    expected = by_hand.validate(*(list(DataLoader(data, batch_size=BATCH))[:2] for data in (VAL, TRAIN)))
    np.testing.assert_allclose(ds.val_loss.values[-1], [expected.loss_running, expected.loss_recalibrated],
                               rtol=1e-9)
    assert any("val/bn_excess" in metrics for _, metrics in logger.received)


def lightning_file(path: Path, state_dict: dict, epoch: int) -> Path:
    """A checkpoint as ModelCheckpoint writes one, without a Trainer."""
    torch.save({"epoch": epoch, "global_step": 3 * (epoch + 1), "pytorch-lightning_version": pl.__version__,
                "state_dict": state_dict, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}, path)
    return path


def test_a_log_directory_is_read_epoch_by_epoch_whatever_its_checkpoints_are_named(tmp_path):
    """Saved within epochs too (every_n_train_steps, val_check_interval): each epoch's last step, in epoch order
    (step 12 after step 9); names without an epoch (`{epoch}` alone): in the order of their numbers."""
    weights = {f"model.{key}": value for key, value in models.build("resnet20", num_classes=4).state_dict().items()}
    within = tmp_path / "within" / "checkpoints"
    within.mkdir(parents=True)
    for epoch, step in ((0, 3), (0, 6), (1, 9), (1, 12), (1, 10)):
        lightning_file(within / f"epoch={epoch}-step={step}.ckpt", weights, epoch)
    lightning_file(within / "last.ckpt", weights, 1)
    assert [path.name for path in rundir.run_checkpoints(within.parent)] == ["epoch=0-step=6.ckpt",
                                                                              "epoch=1-step=12.ckpt"]
    numbered = tmp_path / "numbered" / "checkpoints"
    numbered.mkdir(parents=True)
    for epoch in (0, 1, 2, 10):
        lightning_file(numbered / f"{epoch}.ckpt", weights, epoch)
    assert [path.name for path in rundir.run_checkpoints(numbered.parent)] == ["0.ckpt", "1.ckpt", "2.ckpt",
                                                                                "10.ckpt"]


def test_a_network_split_over_two_attributes_is_one_line_naming_them(tmp_path):
    weights = models.build("resnet20", num_classes=4).state_dict()
    split = {f"backbone.{key}" if not key.startswith("fc.") else f"head.{key}": value
             for key, value in weights.items()}
    path = lightning_file(tmp_path / "split.ckpt", split, 0)
    with pytest.raises(ckpt.UserError, match="attributes backbone, head: give the one that holds the whole network"):
        ckpt.load(path, model_name="resnet20", dataset="synthetic")
    whole = lightning_file(tmp_path / "whole.ckpt", {f"backbone.{key}": value for key, value in weights.items()}, 0)
    assert ckpt.load(whole, model_name="resnet20", dataset="synthetic").epoch == 1
