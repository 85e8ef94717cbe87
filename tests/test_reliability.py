"""Interruptions and concurrency: one trainer per run directory, and a diverged run keeps its last good epoch."""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xarray as xr

from conftest import TINY_RUN, train_tiny
from train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_trainer_on_the_same_run_directory_refuses(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "train", "--model", "resnet20", "--out", str(out), *TINY_RUN,
                              "--epochs", "50"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "train", "--resume", str(out)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: another trainer (pid {first.pid}) is using {out}")


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    run = train_tiny(tmp_path / "run", "resnet20", "--train-images", "128", "--epochs", "1")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert train_main(["--resume", str(run)]) == 2
    holder.kill()
    holder.wait()
    assert train_main(["--resume", str(run)]) == 0  # finished: "nothing to resume", but not refused


def test_divergence_after_good_epochs_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = train_tiny(tmp_path / "run", "resnet20", "--train-images", "128", "--epochs", "3")
    state = torch.load(run / "last.pt", weights_only=True)
    # Roll the run back to epoch 2 with a weight that overflows: the first step of epoch 3 gives a NaN loss.
    (run / "epoch_003.pt").unlink()
    state["epoch"], state["step"] = 2, 4
    state["history"] = {k: v[:2] for k, v in state["history"].items()}
    state["step_history"] = state["step_history"][:4]
    state["state_dict"]["fc.weight"].fill_(3e38)  # finite (a checkpoint holds no inf), but the logits overflow
    torch.save(state, run / "last.pt")
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert train_main(["--resume", str(run)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at step 5 (epoch 3)" in err[0] and "last good checkpoint" in err[0]
    assert (run / "last.pt").read_bytes() == before and not (run / "epoch_003.pt").exists()
    assert (run / "epoch_002.pt").exists()


def test_sigterm_ends_the_trainer_in_one_line_and_keeps_what_was_done(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "train", "--model", "resnet20", "--out", str(out), *TINY_RUN,
                                "--epochs", "50"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.terminate()
    _, err = process.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert process.returncode == 143 and len(lines) == 1, err
    assert lines[0].startswith(f"error: interrupted; {out / 'last.pt'} keeps epoch ") and "--resume" in lines[0]
    assert not list(out.glob(".*.tmp"))  # nothing half-written
    epoch = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert (out / f"epoch_{epoch:03d}.pt").exists()


def test_a_run_killed_in_its_first_epoch_starts_again_either_way(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a run killed before its first epoch ended leaves
    (out / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert train_main(["--model", "resnet20", "--out", str(out), *TINY_RUN, "--epochs", "1"]) == 0
    assert (out / "last.pt").exists() and not list(out.glob(".*.tmp"))
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((out / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "out": str(other)}))
    capsys.readouterr()
    assert train_main(["--resume", str(other)]) == 0  # nothing to continue: it trains from step 0
    assert "training it again from step 0" in capsys.readouterr().out
    assert torch.load(other / "last.pt", weights_only=True)["epoch"] == 1


def test_a_run_resumes_from_another_working_directory(cifar10_dir, tmp_path):
    """Trained with a relative --data-dir and --out, resumed from elsewhere: the run stored absolute paths."""
    here, elsewhere = cifar10_dir, tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = subprocess.run([sys.executable, "-m", "train", "--model", "resnet20", "--dataset", "cifar10",
                            "--data-dir", ".", "--out", "run", "--batch-size", "50", "--epochs", "1",
                            "--precision", "fp32"], cwd=here, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert first.returncode == 0, first.stderr
    last = torch.load(here / "run" / "last.pt", weights_only=True)
    assert last["config"]["data_dir"] == str(here) and last["config"]["out"] == str(here / "run")
    last["config"].update(epochs=2, total_epochs=2, total_steps=4)
    torch.save(last, here / "run" / "last.pt")
    resumed = subprocess.run([sys.executable, "-m", "train", "--resume", str(here / "run")], cwd=elsewhere,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(here / "run" / "last.pt", weights_only=True)["epoch"] == 2


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MiB file system (tmpfs; needs root): a resnet20 checkpoint fits, the second epoch's files do not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root); the full-disk path is also tested in-process")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_the_last_good_files(tiny_disk, capsys):
    out = tiny_disk / "run"
    code = train_main(["--model", "resnet20", "--out", str(out), *TINY_RUN, "--epochs", "3", "--monitor-every", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no space left on the disk while writing" in err[0], err
    assert "--resume" in err[0] and not list(out.glob(".*.tmp"))
    for name in ("metrics.csv", "config.json"):
        if (out / name).exists():
            (out / name).read_text()  # whole, readable files
    if (out / "last.pt").exists():
        torch.load(out / "last.pt", weights_only=True)


def test_a_full_disk_during_a_diagnostic_writes_nothing(tiny_runs, tmp_path, monkeypatch, capsys):
    """ENOSPC at the flush of the dataset, simulated: one line, no file, no temporary, no empty folder."""
    from diagnostics import responses
    from diagnostics.common import main_guard

    real_fsync = os.fsync

    def full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "new" / "out"
    code = main_guard(lambda: responses.main([str(tiny_runs["resnet20"]), "--n-images", "16", "--out", str(out)]))
    monkeypatch.setattr(os, "fsync", real_fsync)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no space left" in err[0]
    assert not (tmp_path / "new").exists()


def test_two_writers_of_one_folder_leave_one_whole_set_and_each_others_temporaries(tmp_path, monkeypatch):
    """Issue 27: a second command writes the same outputs while the first is between its .nc and its .png (run
    here inside the first's figure saving). Neither deletes the other's temporaries; the folder ends with the
    last writer's .nc, .png and .pdf, not a mix. A dead process's temporaries go; a live one's stay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import xarray as xr

    from diagnostics import common, plotting

    def figure(title: str):
        fig = plt.figure(figsize=(2, 2))
        fig.suptitle(title)
        return fig

    alone = tmp_path / "alone"
    common.write_outputs(alone, "x", xr.Dataset(attrs={"writer": "first"}), figure("first"))
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        kept, stale = out / f".x.nc.{live.pid}-abcdefgh.tmp", out / f".x.nc.{dead.pid}-abcdefgh.tmp"
        kept.write_bytes(b"a live writer's")
        stale.write_bytes(b"a dead writer's")
        real_save, second = plotting.save, []

        def save_with_a_second_writer(fig, path, kind):
            if not second:  # once: the second writer's own saves go straight through
                second.append(figure("second"))
                common.write_outputs(out, "x", xr.Dataset(attrs={"writer": "second"}), second[0])
            real_save(fig, path, kind)

        monkeypatch.setattr(plotting, "save", save_with_a_second_writer)
        common.write_outputs(out, "x", xr.Dataset(attrs={"writer": "first"}), figure("first"))
        assert second and kept.read_bytes() == b"a live writer's" and not stale.exists()
    finally:
        live.kill()
        live.wait()
    assert xr.load_dataset(out / "x.nc").attrs["writer"] == "first"  # the last to finish
    assert (out / "x.png").read_bytes() == (alone / "x.png").read_bytes()
    assert sorted(path.name for path in out.iterdir()) == sorted([kept.name, "x.nc", "x.pdf", "x.png"])


@pytest.mark.parametrize("damage", ["folder", "garbage", "empty"])
def test_a_damaged_monitor_nc_is_one_line_before_training_or_rewritten(tmp_path, capsys, damage):
    """A folder named monitor.nc cannot be replaced: refused before an epoch is trained again; a garbage or
    empty file is the trainer's own output, rewritten from the monitor's state in last.pt. The report's findings
    and its monitor line say a damaged monitor.nc cannot be read, not a traceback."""
    from diagnostics import common, report
    run = tmp_path / "run"
    assert train_main(["--model", "resnet20", "--out", str(run), *TINY_RUN, "--epochs", "1"]) == 0
    state = torch.load(run / "last.pt", weights_only=True)
    state["config"].update(epochs=2, total_epochs=2, total_steps=2 * state["config"]["steps_per_epoch"])
    torch.save(state, run / "last.pt")
    (run / "monitor.nc").unlink()
    if damage == "folder":
        (run / "monitor.nc").mkdir()
    else:
        (run / "monitor.nc").write_bytes(b"" if damage == "empty" else b"\x89HDF not really")
        found = dict(report.findings([common.read_run(str(run))]))["resnet20"]
        assert "cannot be read" in found[0] and "cannot be read" in report.monitor_summary(common.read_run(str(run)))
    capsys.readouterr()
    code = train_main(["--resume", str(run)])
    err = capsys.readouterr().err
    if damage == "folder":
        assert code == 2 and err.count("\n") == 1 and "monitor.nc is not a regular file" in err
        assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1  # nothing trained
    else:
        assert code == 0 and xr.load_dataset(run / "monitor.nc").sizes["step"] > 0
