"""`pip install .` gives a working toolkit (issue 28): the wheel built from this tree, installed into a fresh
environment that has the dependencies but not this checkout, runs the commands and the API from a user's folder.

The fresh environment matters: the project's own venv holds an editable install whose import hook would quietly
supply any module the wheel lacks. The new venv sees the test interpreter's site-packages through a .pth line,
which adds the folder without running the .pth files inside it (the editable hook among them).
"""
import importlib.util
import json
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "train", "analyses", "diagnostics", "benchmarks")  # docs/design.md §0, and the benchmarks
MODULES = ("resnet_diagnostics", *PACKAGES)
TRAP = 'print("ran the user\'s models.py"); raise SystemExit(7)\n'


def source_files() -> list[Path]:
    """The tree as a clone with this work in it has it: tracked and new files, nothing git ignores (runs, data,
    .venv, build/, whose stale copies would otherwise go into the wheel)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode:  # not a git checkout: everything but what a checkout ignores
        return [path.relative_to(ROOT) for path in ROOT.rglob("*") if path.is_file() and not {
            ".git", ".venv", "runs", "data", "demo", "build", "__pycache__", ".pytest_cache"} & set(path.parts)
            and not any(part.endswith(".egg-info") for part in path.parts)]
    return [Path(name) for name in listed.stdout.split("\0") if name and (ROOT / name).is_file()]


def run(argv: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(arg) for arg in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, and a venv with it installed inside a user's project folder that is a git repository of its own
    (a .venv in one's project is common) and holds a models.py that must never be imported."""
    missing = [tool for tool in ("pip", "setuptools") if importlib.util.find_spec(tool) is None]
    if missing:
        pytest.skip(f"no build tool: {', '.join(missing)} not installed")
    tmp = tmp_path_factory.mktemp("wheel")
    source, dist, project = tmp / "source", tmp / "dist", tmp / "project"
    files = source_files()
    for name in files:  # a copy: the build writes build/ and *.egg-info beside the sources
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    built = run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", dist], tmp)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("resnet_diagnostics-*.whl")

    project.mkdir()
    (project / "models.py").write_text(TRAP)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", "-c", "commit.gpgsign=false"]
    if shutil.which("git"):
        assert run([*git, "init", "-q"], project).returncode == 0
        assert run([*git, "commit", "-q", "--allow-empty", "-m", "the user's project"], project).returncode == 0
    venv = project / ".venv"
    assert run([sys.executable, "-m", "venv", "--without-pip", venv], tmp).returncode == 0
    python = venv / "bin" / "python"
    purelib = Path(sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv}))
    (purelib / "dependencies.pth").write_text("".join(f"{folder}\n" for folder in site.getsitepackages()))
    # pip from the test's site-packages installs into the new venv; --ignore-installed: the copy it sees there (this
    # checkout's editable install) is none of its business
    pip = run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], tmp)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    (tmp / "elsewhere").mkdir()  # a folder of no project, for the API: a script in the project imports its models.py
    return {"wheel": wheel, "files": files, "project": project, "elsewhere": tmp / "elsewhere", "python": python,
            "purelib": purelib,
            "console": venv / "bin" / "resnet-diag", "version": wheel.name.split("-")[1]}


def test_the_wheel_holds_every_file_of_the_packages(installed):
    """Every module and every file read at run time (package-data: the report's template) is in the wheel."""
    wanted = {name.as_posix() for name in installed["files"] if name.parts[0] in PACKAGES and name.suffix != ".pyc"}
    wanted |= {"resnet_diagnostics.py", "diagnostics/report.html"}
    held = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert not wanted - held, f"missing from the wheel (pyproject.toml [tool.setuptools]): {sorted(wanted - held)}"


def test_the_api_and_the_console_script_come_from_the_installed_wheel(installed):
    code = ("import importlib.metadata as m, importlib.resources as r, importlib.util as u, json; "
            f"origins = {{name: u.find_spec(name).origin for name in {MODULES!r}}}; "
            "(script,) = m.entry_points(group='console_scripts', name='resnet-diag'); "
            "print(json.dumps({'origins': origins, 'script': script.value, 'main': script.load().__module__, "
            "'template': str(r.files('diagnostics') / 'report.html'), 'version': m.version('resnet-diagnostics'), "
            "'models_version': __import__('models').__version__}))")
    result = run([installed["python"], "-c", code], installed["elsewhere"])
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    purelib = installed["purelib"]
    assert all(Path(origin).is_relative_to(purelib) for origin in found["origins"].values()), found["origins"]
    assert found["script"] == "resnet_diagnostics:main" and found["main"] == "resnet_diagnostics"
    assert Path(found["template"]).is_relative_to(purelib) and Path(found["template"]).is_file()
    assert found["version"] == found["models_version"] == installed["version"]
    assert installed["console"].is_file()


def test_train_and_report_from_the_wheel_in_a_users_folder(installed):
    """`resnet-diag train` on the synthetic data, then `python -m diagnostics.report` on that run (the template,
    one diagnostic through its own main), both from a project folder whose models.py must not be imported."""
    project, purelib = installed["project"], installed["purelib"]
    trained = run([installed["console"], "train", "--model", "resnet20", *TINY_RUN, "--epochs", "1",
                   "--out", "runs/tiny"], project)
    assert trained.returncode == 0 and "ran the user's" not in trained.stdout, trained.stdout + trained.stderr
    assert "Traceback" not in trained.stderr and "fatal" not in trained.stderr  # no stray git message
    provenance = torch.load(project / "runs/tiny/last.pt", weights_only=True)["provenance"]
    # the project's own git commit is not the toolkit's: from a wheel there is none
    assert provenance["git_commit"] is None
    assert provenance["software"]["resnet-diagnostics"] == installed["version"]
    assert Path(provenance["argv"][0]).is_relative_to(purelib)  # the trainer that ran is the installed one

    report = run([installed["python"], "-m", "diagnostics.report", "runs/tiny", "--sections", "curves",
                  "--out", "report"], project)
    assert report.returncode == 0 and "ran the user's" not in report.stdout, report.stdout + report.stderr
    assert (project / "report" / "curves.nc").is_file()  # a section that fails leaves the page made all the same
    page = (project / "report" / "report.html").read_text()
    assert f"resnet-diagnostics {installed['version']}" in page and "not a git checkout" in page
