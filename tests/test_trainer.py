"""The trainer as users run it: run directory, schedules, resume after SIGKILL, divergence, DDP on CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xarray as xr

import models
from analyses.common import ChannelMoments, forward_hooks, preserved_state
from conftest import TINY_RUN, read_csv, train_tiny
from train import checkpoint as ckpt
from train import config as cfg
from train import datasets, rundir
from train.__main__ import main as train_main
from train.batches import recalibration_inputs

ROOT = Path(__file__).resolve().parents[1]


def test_run_directory_contents(tiny_runs):
    run = tiny_runs["resnet20"]
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.csv", "steps.csv", "monitor.nc", "epoch_001.pt", "epoch_002.pt", "last.pt",
            "best.pt"} <= names
    rows = read_csv(run / "metrics.csv")
    assert list(rows[0]) == ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                             "epoch_seconds", "images_per_second", "bn_warnings", "val_loss_recalibrated",
                             "val_acc_recalibrated", "bn_excess", "bn_excess_se"]
    assert [int(r["step"]) for r in rows] == [4, 8]
    steps = read_csv(run / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 9))
    assert float(rows[0]["train_loss"]) == pytest.approx(sum(float(r["train_loss"]) for r in steps[:4]) / 4)
    config = json.loads((run / "config.json").read_text())
    assert config["total_steps"] == 8 and config["precision_used"] == "fp32" and config["per_device_batch"] == 64
    last = torch.load(run / "last.pt", weights_only=True)
    assert config["precision_reason"] == "--precision fp32" and config["monitor_every"] == 2
    assert (config["compile"], config["compile_used"]) == ("auto", "off")  # 8 steps: not worth a compile
    assert config["compile_reason"] == "auto: 8 steps, too few to repay compiling"
    assert {"optimizer", "scheduler", "scaler", "rng", "monitor"} <= set(last) and last["history"]["val_acc"][1] == float(
        rows[1]["val_acc"])


def test_schedules_are_defined_in_iterations():
    config = cfg.Config(model="resnet20", dataset="synthetic", out="x", schedule="multistep", lr=0.1, warmup=10,
                        iterations=100, epochs=None, milestones=[50, 75])
    config.resolve_length(30)
    assert config.total_epochs == 4 and config.total_steps == 100
    factors = [cfg.lr_factor(config, step) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1 and factors[49] == 1
    assert factors[50] == pytest.approx(0.1) and factors[75] == pytest.approx(0.01)
    config.schedule = "cosine"
    assert cfg.lr_factor(config, 10) == 1 and cfg.lr_factor(config, 55) == pytest.approx(0.5)
    he = cfg.from_args(cfg.parser().parse_args(["--model", "resnet110", "--dataset", "cifar10", "--out", "x",
                                                  "--preset", "he2016"]))
    assert (he.iterations, he.milestones, he.weight_decay, he.keep) == (64000, [32000, 48000], 1e-4, "5")
    he.resolve_length(50000 // 128)
    assert he.total_epochs == 165  # 64k iterations of the 390 full batches of 50k images
    override = cfg.from_args(cfg.parser().parse_args(["--model", "resnet20", "--dataset", "cifar10", "--out",
                                                        "x", "--preset", "he2016", "--epochs", "3"]))
    assert override.iterations is None and override.epochs == 3 and override.schedule == "multistep"


def test_keep_every_nth_and_last(tmp_path):
    train_tiny(tmp_path / "every2", "resnet20", "--epochs", "3", "--keep", "2", "--train-images", "128")
    assert sorted(p.name for p in (tmp_path / "every2").glob("epoch_*.pt")) == ["epoch_002.pt", "epoch_003.pt"]
    train_tiny(tmp_path / "last", "resnet20", "--epochs", "2", "--keep", "last", "--train-images", "128")
    assert [p.name for p in (tmp_path / "last").glob("epoch_*.pt")] == ["epoch_002.pt"]


def test_precise_bn_recomputes_running_statistics(tmp_path):
    run = train_tiny(tmp_path / "pbn", "resnet20", "--epochs", "1", "--precise-bn", "128", "--bn-momentum",
                     "0.01", "--train-images", "128")
    state = torch.load(run / "epoch_001.pt", weights_only=True)
    assert state["config"]["precise_bn"] == 128 and state["config"]["bn_momentum"] == 0.01
    # The saved running statistics are the population statistics of each BN layer's input over those 128
    # images as training augments them (train.batches.recalibration_inputs: once, seed 0), every BN upstream
    # normalising with its batch's statistics.
    loaded = ckpt.load(run / "epoch_001.pt")
    model = loaded.model
    images = datasets.load_split("synthetic", "train", train_images=128)
    batches = recalibration_inputs(images, loaded.spec, "crop-flip", 64, "cpu")
    expected = {name: ChannelMoments() for name in ("stem.bn", "stage2.block3.bn2")}
    hooks = {name: (lambda module, inputs, output, m=m: m.update(inputs[0])) for name, m in expected.items()}
    saved = {name: (module.running_mean.clone(), module.running_var.clone()) for name, module in
             models.bn_layers(model) if name in expected}
    with preserved_state(model), forward_hooks(model, hooks), torch.no_grad():
        for _, module in models.bn_layers(model):
            module.train()
        for x in batches:
            model(x)
    for name, (mean, var) in saved.items():
        assert torch.allclose(mean.double(), expected[name].mean, atol=1e-4)
        assert torch.allclose(var.double(), expected[name].variance, rtol=2e-3)


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "diverge"
    code = train_main(["--model", "plain20", "--out", str(out), *TINY_RUN, "--lr", "1e30", "--no-bn",
                       "--train-images", "128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and err[0].startswith("error: the training loss became")
    assert "at step 1 " in err[0] or "at step 2 " in err[0]
    assert not (out / "last.pt").exists() and not list(out.glob("epoch_*.pt"))


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=kwargs.pop("cwd", ROOT), capture_output=True,
                          text=True, timeout=600, **kwargs)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    args = ["--model", "resnet20", *TINY_RUN, "--epochs", "3", "--deterministic", "--monitor-every", "3"]
    reference = run_cli(*args, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "train", *args, "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "epoch_002.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # during epoch 3
    process.wait()
    assert not (out / "epoch_003.pt").exists()
    second = run_cli("--out", str(out), "--model", "resnet20", "--dataset", "synthetic")
    assert second.returncode == 2 and "--resume" in second.stderr  # the folder holds a run already
    resumed = run_cli("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    expected = torch.load(tmp_path / "reference" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in rundir.TIMING} for r in rows]
    assert strip(read_csv(out / "metrics.csv")) == strip(read_csv(tmp_path / "reference" / "metrics.csv"))
    assert read_csv(out / "steps.csv") == read_csv(tmp_path / "reference" / "steps.csv")
    # The BN monitor continues exactly: every measurement of the resumed run is the uninterrupted run's.
    resumed_monitor, reference_monitor = (xr.load_dataset(folder / "monitor.nc") for folder in (out, tmp_path / "reference"))
    assert resumed_monitor.sizes["step"] == 4 * 3 // 3  # steps 3, 6, 9 and 12 of 4 an epoch
    xr.testing.assert_identical(resumed_monitor.drop_attrs(), reference_monitor.drop_attrs())


# Run under torchrun in place of `python -m train`: the trainer, with each rank's weights saved at the point where
# every process checks them after an epoch (train.trainer.check_weights).
RANK_WEIGHTS_DRIVER = """
import os, sys
import torch
import train.trainer as trainer
from train.__main__ import main

check_weights = trainer.check_weights

def check_and_keep(model, epoch, run_dir):
    check_weights(model, epoch, run_dir)
    torch.save(model.state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}_epoch{epoch}.pt"))

trainer.check_weights = check_and_keep
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_with_gloo(tmp_path):
    # Two ranks against one process on the same global batch of 64 for 2 steps. Without SyncBN each rank's BN
    # normalises its own 32 images, which no single process reproduces, so the network is the one without BN:
    # then DDP's mean of the ranks' gradients (each the mean loss of 32 images) is the gradient of the mean loss
    # over the 64, and every step is one process's step up to float rounding. No augmentation either (each rank
    # crops with its own generator); each step's images are the same (tests/test_data.py checks the sharding).
    options = [*TINY_RUN, "--model", "plain20", "--no-bn", "--augment", "none", "--train-images", "128", "--epochs",
               "1"]
    driver = tmp_path / "driver.py"
    driver.write_text(RANK_WEIGHTS_DRIVER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(driver), str(tmp_path), *options, "--out", str(tmp_path / "ddp")], cwd=ROOT, capture_output=True,
        text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(tmp_path / "ddp" / "epoch_001.pt", weights_only=True)
    assert (state["config"]["world_size"], state["config"]["per_device_batch"]) == (2, 32)
    assert state["config"]["sync_bn"] is False and state["step"] == 2
    assert not any(k.startswith("module.") for k in state["state_dict"])
    ranks = [torch.load(tmp_path / f"rank{rank}_epoch1.pt", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # the same all-reduced gradient each step
    assert all(torch.equal(ranks[0][k], state["state_dict"][k]) for k in ranks[0])
    assert train_main([*options, "--out", str(tmp_path / "single")]) == 0
    single = torch.load(tmp_path / "single" / "epoch_001.pt", weights_only=True)["state_dict"]
    torch.manual_seed(state["config"]["seed"])  # the trainer's initial weights, rebuilt from the checkpoint
    init = models.build(state["model"]["name"], **state["model"]["kwargs"]).state_dict()
    for key, value in single.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5, msg=key)
    distance = lambda a, b: torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    moved, apart = distance(single, init), distance(single, ranks[0])
    assert moved > 0.1 and apart < 1e-4 * moved  # two real steps, the same up to float rounding (5e-6 of it here)


def test_the_diagnostics_recalibrate_as_precise_bn_did_in_bf16(tmp_path):
    """One recalibration for the trainer's --precise-bn and the diagnostics: the same images, batches and autocast
    dtype. What our code guarantees is exactness: with the trainer's memory layout the diagnostics reproduce the
    saved statistics bit for bit, in its contiguous layout to bf16's rounding. An fp32 recalibration lands
    elsewhere on every CPU, but how far is a property of the CPU's kernels (with native bf16 kernels, only 2.6x
    further than a bf16 one), so the test says only that it differs."""
    from analyses.bn import recalibrate_bn, running_statistics
    from diagnostics import common, spikes
    run = train_tiny(tmp_path / "bf16", "resnet20", "--epochs", "1", "--train-images", "128", "--precise-bn", "64",
                     "--precision", "bf16", "--monitor-every", "0")
    loaded = ckpt.load(run / "epoch_001.pt")
    assert common.run_dtype(loaded) == torch.bfloat16 and loaded.config["channels_last"]
    saved = {name: (s.mean.clone(), s.var.clone()) for name, s in running_statistics(loaded.model).items()}
    args = spikes.parser().parse_args([str(run / "epoch_001.pt")])

    def recalibrated(dtype, layout=torch.contiguous_format) -> dict:
        loaded.model.to(memory_format=layout)
        inputs = [x.contiguous(memory_format=layout) for x in common.run_recal_inputs(loaded, args, "cpu", 64)]
        recalibrate_bn(loaded.model, inputs, dtype)
        return {name: (s.mean.clone(), s.var.clone()) for name, s in running_statistics(loaded.model).items()}

    def largest_error(statistics) -> tuple[float, float]:
        """(largest mean error in population stds, largest relative variance error) against the saved ones."""
        return (max(((statistics[n][0] - m).abs() / v.sqrt()).max().item() for n, (m, v) in saved.items()),
                max(((statistics[n][1] - v).abs() / v).max().item() for n, (_, v) in saved.items()))

    exact = recalibrated(torch.bfloat16, torch.channels_last)
    assert all(torch.equal(exact[n][k], saved[n][k]) for n in saved for k in (0, 1))
    same = largest_error(recalibrated(torch.bfloat16))
    assert same[0] < 2e-3 and same[1] < 5e-3, same  # bf16 keeps 8 bits: 4e-3 is one rounding step
    assert max(largest_error(recalibrated(None))) > 1e-4  # the dtype is part of what is reproduced


CPU_KINDS = [  # (vendor_id, flags, native?, the reason says): what plain20's training step measured, bf16 vs fp32
    ("GenuineIntel", {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, True, "has AMX"),  # native and fast
    ("AuthenticAMD", {"avx512f", "avx512_bf16"}, True, "AMD CPU has avx512_bf16"),  # an EPYC (Zen 4): 1.6x faster
    ("GenuineIntel", {"avx512f", "avx512_bf16"}, False, "neither AMX nor an AMD core"),  # a Xeon: 1.3x slower
    ("CentaurHauls", {"avx512f", "avx512_bf16"}, False, "neither AMX nor an AMD core"),  # not measured: as Intel's
    ("AuthenticAMD", {"avx512f", "avx2"}, False, "no bf16 instructions"),  # emulated, ~10x slower
    ("", set(), False, "could not be read"),  # no /proc/cpuinfo (macOS, some containers) or no flags line in it
]


@pytest.mark.parametrize("vendor, flags, native, says", CPU_KINDS)
def test_native_bf16_is_known_for_each_cpu_kind_measured(monkeypatch, vendor, flags, native, says):
    from train import trainer
    monkeypatch.delenv(trainer.NATIVE_BF16_VARIABLE, raising=False)
    monkeypatch.setattr(trainer, "cpu_info", lambda field: {"vendor_id": vendor, "flags": " ".join(flags)}[field])
    found, why = trainer.cpu_native_bf16()
    assert found is native and says in why and "\n" not in why


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_precision_auto_is_decided_by_the_cpu_kind_on_any_machine(tmp_path, monkeypatch, capsys, native):
    """Both branches of `cpu_native_bf16`, whichever CPU runs the suite: --precision auto trains in bf16 only where
    bf16 is native, the override beats the flags, and a forced bf16 on a CPU without it says so in one line."""
    from train import trainer
    monkeypatch.setattr(trainer, "cpu_flags", lambda: set() if native else {"avx512_bf16", "amx_bf16"})
    monkeypatch.setenv(trainer.NATIVE_BF16_VARIABLE, "1" if native else "0")  # the override beats the flags
    run = train_tiny(tmp_path / "auto", "resnet20", "--epochs", "1", "--precision", "auto", "--monitor-every", "0")
    config = json.loads((run / "config.json").read_text())
    assert config["precision_used"] == ("bf16" if native else "fp32")
    assert config["precision_reason"] == f"auto: RESNET_DIAG_NATIVE_BF16={int(native)}"
    capsys.readouterr()
    train_tiny(tmp_path / "forced", "resnet20", "--epochs", "1", "--precision", "bf16", "--monitor-every", "0")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "slower than fp32" in line]
    assert warnings == ([] if native else ["warning: training in bf16 where it is not native "
                                           "(RESNET_DIAG_NATIVE_BF16=0): expect it slower than fp32"])


def test_a_bad_bf16_override_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESNET_DIAG_NATIVE_BF16", "yes")
    assert train_main(["--model", "resnet20", "--out", str(tmp_path / "run"), *TINY_RUN, "--precision", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RESNET_DIAG_NATIVE_BF16 must be 1" in err and not (tmp_path / "run").exists()


def test_monitor_every_auto_is_resolved_to_a_number_by_the_runs_length(tmp_path, capsys):
    assert [cfg.monitor_interval(n) for n in (4, 184, 500, 501, 1560, 5000, 64_000)] == [1, 4, 10, 11, 32, 100, 100]
    run = train_tiny(tmp_path / "auto", "resnet20", "--epochs", "1", "--monitor-every", "auto")
    config = json.loads((run / "config.json").read_text())
    assert config["monitor_every"] == 1 and config["monitor_reason"].startswith("auto: 4 measurements over 4 steps")
    assert "BN monitor every 1 step (auto: " in capsys.readouterr().out
    assert xr.load_dataset(run / "monitor.nc").sizes["step"] == 4
    assert cfg.parser().parse_args(["--model", "resnet20"]).monitor_every is None  # the default comes from Config
    assert cfg.Config(model="m", dataset="d", out="o").monitor_every == "auto"
