"""Interruptions and concurrency: one trainer per run directory, and a diverged run keeps its last good epoch."""
import subprocess
import sys
import time
from pathlib import Path

import torch

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
    state["state_dict"]["fc.weight"].fill_(float("inf"))
    torch.save(state, run / "last.pt")
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert train_main(["--resume", str(run)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at step 5 (epoch 3)" in err[0] and "last good checkpoint" in err[0]
    assert (run / "last.pt").read_bytes() == before and not (run / "epoch_003.pt").exists()
    assert (run / "epoch_002.pt").exists()
