"""The command lines as a person types them: in a terminal (tests/terminal.py), where the progress bars run and
Ctrl-C is a key. Output redirected to a file takes another path, which the other tests cover."""
import os
import sys
from pathlib import Path

import pytest

import terminal
from conftest import TINY_RUN
from train import datasets

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_shows_its_bar_stops_on_ctrl_c_and_resumes(tmp_path):
    run = tmp_path / "run"
    session = terminal.start([sys.executable, "-m", "train", "--model", "resnet20", "--out", str(run), *TINY_RUN,
                              "--epochs", "4"], cwd=ROOT)
    assert session.wait_for(lambda: (run / "last.pt").exists(), 120), session.text
    session.type_ctrl_c()
    assert session.finish(60) == 130, session.text
    assert "train" in terminal.bars(session.text), session.text
    last_line = session.text.strip().splitlines()[-1]
    assert last_line.startswith("error: interrupted") and f"--resume {run}" in last_line, session.text
    assert "Traceback" not in session.text
    code, text = terminal.run([sys.executable, "-m", "train", "--resume", str(run)], cwd=ROOT, timeout=300)
    assert code == 0, text
    assert "train" in terminal.bars(text) and "epoch 4/4" in text and "Traceback" not in text


DIAGNOSTIC_ARGUMENTS = {  # the commands of `make demo`, on the suite's tiny runs
    "curves": [],
    "evaluate": ["--epochs", "last"],
    "responses": ["--epochs", "last"],
    "gradients": ["--epochs", "last", "--init", "plain20", "--batches", "2"],
    "flops": ["resnet56"],
    "attributions": ["--n-images", "4", "--steps", "4"],
    "spikes": ["--recal-images", "128"],
}


@pytest.mark.parametrize("name", DIAGNOSTIC_ARGUMENTS)
def test_every_diagnostic_shows_its_bar(name, tiny_runs, tmp_path):
    """Each diagnostic in its own terminal (one test each, so that the suite's workers share them)."""
    runs = [str(tiny_runs["plain20"]), str(tiny_runs["resnet20"])]
    argv = [sys.executable, "-m", f"diagnostics.{name}", *runs, *DIAGNOSTIC_ARGUMENTS[name], "--out", str(tmp_path)]
    code, text = terminal.run(argv, cwd=ROOT, timeout=300)
    assert code == 0, text
    assert any(bar.startswith(name) for bar in terminal.bars(text)), text
    assert "Traceback" not in text


@pytest.mark.skipif(not (ROOT / ".venv" / ".installed").exists() or Path(sys.prefix) != ROOT / ".venv",
                    reason="make demo's commands run in the project's .venv; run the suite with `make test`")
def test_make_demo_finishes_in_a_terminal(tmp_path):
    """`make demo` itself, on fewer images and epochs and with three of the report's sections (its variables
    overridden as a user may; every diagnostic's bar is the test above's, the whole report is tests/test_report.py's)."""
    if not any((folder / "train-images-idx3-ubyte.gz").exists() or (folder / "train-images-idx3-ubyte").exists()
               for folder in datasets.fashion_mnist_folders(tmp_path / "data")):
        pytest.skip("Fashion-MNIST is not installed (make test installs it with apt-get where it can)")
    demo, data_dir = tmp_path / "demo", tmp_path / "data"
    small = f"--dataset fashion-mnist --data-dir {data_dir} --train-images 256 --val-split 128 --epochs 2"
    env = {**os.environ, "MAKEFLAGS": ""}
    code, text = terminal.run(["make", "demo", f"DEMO={demo}", f"DATA={data_dir}", f"DEMO_ARGS={small}",
                               "REPORT_ARGS=--sections curves evaluate spikes"], cwd=ROOT, env=env, timeout=900)
    assert code == 0, text[-3000:]
    shown = terminal.bars(text)
    assert {"train", "curves"} <= shown, shown
    for name in ("evaluate", "spikes"):
        assert {f"{name} plain20", f"{name} resnet20"} <= shown, (name, shown)
    assert f"demo: runs in {demo}/plain20" in text and "Traceback" not in text
    # as it trains, each validation attributed; at each run's end and the report's, what BN statistics cost
    assert text.count("of it is BN statistics") >= 4 and text.count("BN statistics: the worst validation") >= 4
    assert "plain20: BN statistics: the worst validation, epoch" in text
    assert "  what: " in text
    assert (demo / "diagnostics" / "report.html").is_file() and (demo / "diagnostics" / "report.pdf").is_file()
