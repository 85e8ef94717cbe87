"""Commands run from a user's own project folder: its train.py, models.py, models/, analyses/, benchmarks.py and
diagnostics.py are never imported by ours (docs/design.md §1); relative paths still mean that folder."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_diagnostics import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = Path(sys.executable).parent / "resnet-diag"


def project_folder(path: Path, *, with_train_and_diagnostics: bool) -> Path:
    """A folder as an ML project has it; every file of it exits 7 with a line saying it ran, if it is imported."""
    path.mkdir()
    trap = 'print("ran the user\'s {}"); raise SystemExit(7)\n'
    names = ["models.py", "analyses/__init__.py", "benchmarks.py", "resnet.py", "data.py", "utils.py"]
    names += ["train.py", "diagnostics.py"] if with_train_and_diagnostics else []
    for name in names:
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_text(trap.format(name))
    (path / "models").mkdir()  # a package folder beside models.py: Python prefers the folder
    (path / "models" / "__init__.py").write_text(trap.format("models/"))
    return path


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_uses_our_modules_from_a_project_folder(tmp_path, command):
    """`python -m` (where the folder holds no file named as the command's own package, which Python itself would
    run) and `resnet-diag` (whatever the folder holds) import ours: their --help is ours and exits 0."""
    assert CONSOLE.is_file(), "the package installs the resnet-diag command (pyproject [project.scripts])"
    module = COMMANDS[command]
    forms = [([sys.executable, "-m", module, "--help"], False), ([str(CONSOLE), command, "--help"], True)]
    for argv, everything in forms:
        folder = project_folder(tmp_path / f"project-{everything}", with_train_and_diagnostics=everything)
        result = run(argv, folder)
        assert result.returncode == 0 and "ran the user's" not in result.stdout + result.stderr, (argv, result)
        assert ("resnet-diag " + command if everything else "python -m " + module) in result.stdout


def test_a_real_command_from_a_project_folder_writes_where_the_user_is(tmp_path):
    folder = project_folder(tmp_path / "project", with_train_and_diagnostics=False)
    result = run([sys.executable, "-m", "diagnostics.flops", "resnet20", "--out", "figures"], folder)
    assert result.returncode == 0, result.stderr
    assert (folder / "figures" / "flops.nc").is_file() and "ran the user's" not in result.stdout
    everything = project_folder(tmp_path / "everything", with_train_and_diagnostics=True)
    result = run([str(CONSOLE), "flops", "resnet20", "--out", "figures"], everything)
    assert result.returncode == 0 and (everything / "figures" / "flops.nc").is_file(), result.stderr


def test_the_console_command_says_what_it_runs(tmp_path):
    assert run([str(CONSOLE), "bogus"], tmp_path).returncode == 2
    listing = run([str(CONSOLE), "--help"], tmp_path)
    assert listing.returncode == 0 and all(name in listing.stdout for name in COMMANDS)


def test_a_notebook_in_its_own_folder_keeps_that_folder_on_its_path(tmp_path):
    """Only `python -m` loses the working directory: a script that imports us keeps importing its own modules."""
    (tmp_path / "mine.py").write_text("VALUE = 42\n")
    script = "import sys, os; sys.path.insert(0, os.getcwd()); import diagnostics, train; import mine; print(mine.VALUE)"
    result = run([sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "42", result.stderr


def test_our_commands_shorten_openmps_spin_unless_the_user_chose(monkeypatch):
    """libgomp's long spin made two of our processes on one machine keep 11-33% of their solo speed: a command
    sets GOMP_SPINCOUNT before torch is imported, and leaves a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT alone."""
    import resnet_diagnostics
    monkeypatch.setattr(sys, "argv", ["-m"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setenv("MPLBACKEND", os.environ.get("MPLBACKEND", "Agg"))
    for chosen, expected in (({}, resnet_diagnostics.OPENMP_SPIN), ({"GOMP_SPINCOUNT": "5"}, "5"),
                             ({"OMP_WAIT_POLICY": "PASSIVE"}, None)):
        for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
            monkeypatch.delenv(name, raising=False)
        for name, value in chosen.items():
            monkeypatch.setenv(name, value)
        resnet_diagnostics.start_command()
        assert os.environ.get("GOMP_SPINCOUNT") == expected
