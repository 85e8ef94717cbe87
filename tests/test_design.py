"""docs/design.md names only what exists: every file path of ours in backticks (`analyses/bn.py`) is there, and
every dotted name of ours (`train.rundir.named_epoch`, `BNMonitor.validate(...)`) imports and resolves, so that a
rename which forgets the contract fails here. The page writes our code's names in full for this reason:
`train.checkpoint.load`, not `checkpoint.load` (Lightning's `trainer.log_dir` is not our `train.trainer`)."""
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "design.md"
PACKAGES = ("models", "analyses", "train", "diagnostics", "benchmarks")
SPAN = re.compile(r"`([^`\n]+)`")
PATH = re.compile(rf"^(?:{'|'.join(PACKAGES)}|tests|docs)/[\w./-]*$")  # no placeholders: CLASS, *, <name>
DOTTED = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+")
CLASS_DOTTED = re.compile(r"^[A-Z]\w*(?:\.[A-Za-z_]\w*)+")  # `BNMonitor.step`: a class of ours and its member


def references(text: str) -> tuple[list[str], list[str], list[str]]:
    """(paths, dotted names, class-qualified names) that the backticked spans of `text` begin with."""
    paths, dotted, members = [], [], []
    for span in dict.fromkeys(SPAN.findall(text)):
        if PATH.match(span):
            paths.append(span)
        elif (match := DOTTED.match(span)) and not match.group().endswith(".py"):  # `models.py`: a user's file
            dotted.append(match.group())
        elif match := CLASS_DOTTED.match(span):
            members.append(match.group())
    return paths, dotted, members


def resolve(name: str):
    """The object a dotted name of ours names: its longest importable module, then attributes."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError as exc:
            if exc.name != ".".join(parts[:end]):  # the module exists but needs what is not installed
                pytest.skip(f"{name} needs {exc.name}")
            continue
        for part in parts[end:]:
            found = getattr(found, part)
        return found
    raise ModuleNotFoundError(name)


def our_classes() -> dict[str, type]:
    """Every class defined at the top level of a module of ours, by name."""
    classes = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            module = package if path.stem == "__init__" else f"{package}.{path.stem}"
            try:
                found = importlib.import_module(module)
            except ModuleNotFoundError:  # an optional extra (Lightning) not installed
                continue
            classes |= {name: value for name, value in vars(found).items()
                        if inspect.isclass(value) and value.__module__ == found.__name__}
    return classes


def broken(text: str) -> list[str]:
    paths, dotted, members = references(text)
    wrong = [path for path in paths if not (ROOT / path).exists()]
    for name in dotted:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            wrong.append(name)
    classes = our_classes()
    for name in members:
        owner, *rest = name.split(".")
        try:
            found = classes[owner]
            for part in rest:
                found = getattr(found, part)
        except (KeyError, AttributeError):
            wrong.append(name)
    return wrong


def test_the_page_names_enough_to_check():
    paths, dotted, members = references(PAGE.read_text())
    assert len(paths) >= 15 and len(dotted) >= 15 and len(members) >= 3


def test_every_name_the_page_promises_exists():
    assert broken(PAGE.read_text()) == []


def test_a_renamed_name_is_found():
    assert broken("`train.rundir.named_epoch` `train/rundir.py` `BNMonitor.step`") == []
    assert broken("`train.rundir.epoch_named` `train/run_dir.py` `BNMonitor.stride` `Monitor.step`") == [
        "train/run_dir.py", "train.rundir.epoch_named", "BNMonitor.stride", "Monitor.step"]
