"""Progress of long work (train/progress.py): a bar on a terminal that has a width, a line at a fixed interval of
time anywhere else, so that a 20-minute epoch in a log file, a notebook or CI is not silent."""
import sys
from pathlib import Path

import pytest

import terminal
from conftest import TINY_RUN
from train import progress
from train.__main__ import main as train_main
from train.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WORK = ("import time; from train.progress import track\n"
        "for _ in track(range(3), 3, 'work', unit='step'): time.sleep(0.05)\n")


def test_the_line_states_count_share_elapsed_and_time_left():
    line = progress.Progress(780, "train", unit="step", enabled=False)
    line.started, line.count = 0.0, 120
    assert line.line(now=62.0) == "train: 120/780 steps (15%), 1m 02s elapsed, about 5m 41s left"
    line.count = 780
    assert line.line(now=3725.0) == "train: 780/780 steps (100%), 1h 02m elapsed"  # nothing left to estimate
    unknown = progress.Progress(None, "evaluate", unit="batch", enabled=False)
    unknown.started, unknown.count = 0.0, 7
    assert unknown.line(now=5.0) == "evaluate: 7 batches, 5s elapsed"
    epochs = progress.Progress(3, "train", unit="epoch", enabled=False)
    assert epochs.line().startswith("train: 0/3 epochs (0%)")


def test_off_a_terminal_a_line_at_most_every_interval(monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "3600")
    for _ in progress.track(range(5), 5, "work", unit="step"):
        pass
    assert capsys.readouterr().err == ""  # an hour had not passed
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0")
    for _ in progress.track(range(3), 3, "work", unit="step"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"work: {i}/3 steps ({i / 3:.0%})" for i in (1, 2, 3)]
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "")
    assert progress.interval_seconds() == progress.DEFAULT_INTERVAL  # set but empty is unset
    for bad in ("often", "-1", "nan", "inf"):  # was silently the default: the user's setting did nothing
        monkeypatch.setenv(progress.INTERVAL_VARIABLE, bad)
        with pytest.raises(UserError, match=progress.INTERVAL_VARIABLE):
            progress.interval_seconds()


def test_the_trainer_off_a_terminal_prints_progress_lines(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0")
    assert train_main(["--model", "resnet20", "--out", str(tmp_path / "run"), *TINY_RUN, "--epochs", "1",
                       "--monitor-every", "0"]) == 0
    err = capsys.readouterr().err
    assert "train: 4/4 steps (100%)" in err and "train: 1/4 steps (25%)" in err, err
    assert "\r" not in err and "|" not in err  # no bar


def test_no_stderr_at_all_is_no_bar_and_no_crash(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)  # `2>&-`, pythonw
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0")
    assert not progress.shows_a_bar()
    assert list(progress.track(range(3), 3, "work")) == [0, 1, 2]


def test_a_terminal_with_a_width_shows_a_bar_and_one_without_shows_lines():
    env = {"RESNET_DIAG_PROGRESS_SECONDS": "0", "PATH": "/usr/bin:/bin"}
    code, text = terminal.run([sys.executable, "-c", WORK], cwd=ROOT, env=env)
    assert code == 0 and terminal.bars(text) == {"work"}, text
    assert "work: 1/3 steps" not in text
    code, text = terminal.run([sys.executable, "-c", WORK], cwd=ROOT, env=env, columns=0)  # `script` in a pipe
    assert code == 0 and terminal.bars(text) == set(), text
    assert "work: 3/3 steps (100%)" in text, text
