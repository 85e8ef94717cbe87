"""Every `python -m ...` command that README.md and docs/*.md show is one this toolkit accepts: its options parse
with the module's own parser, and a training command's options pass the trainer's checks (models, presets, ranges)
before any work. A renamed or dropped option fails here, not in a reader's terminal."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

import train.errors
from train.config import from_args

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:sh|bash)?\n(.*?)^```$", re.DOTALL | re.MULTILINE)
PLACEHOLDERS = {"MODEL": "plain20", "$m": "plain20"}  # a loop's variable or the page's placeholder for a model


def commands():
    found = []
    for page in PAGES:
        for block in SHELL_BLOCK.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#")[0].strip().removeprefix("do ").strip()
                if line.startswith("python -m "):
                    found.append(pytest.param(line, id=f"{page.name}: {line[:70]}"))
    return found


class Parsed(Exception):
    def __init__(self, args):
        self.args_namespace = args


def parsed(command: str, monkeypatch):
    words = shlex.split(command)
    for placeholder, value in PLACEHOLDERS.items():
        words = [word.replace(placeholder, value) for word in words]
    module, argv = words[2], words[3:]
    original = train.errors.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(train.errors.ArgumentParser, "parse_args", parse_then_stop)
    main = importlib.import_module("train.__main__" if module == "train" else module).main
    with pytest.raises(Parsed) as stopped:
        main(argv)
    return module, stopped.value.args_namespace


def test_the_pages_show_commands():
    modules = {shlex.split(param.values[0])[2] for param in commands()}
    assert {"train", "diagnostics.responses", "diagnostics.gradients", "diagnostics.spikes", "diagnostics.curves",
            "diagnostics.flops", "diagnostics.evaluate", "diagnostics.attributions", "diagnostics.report"} <= modules


@pytest.mark.parametrize("command", commands())
def test_every_command_of_the_docs_is_accepted(command, monkeypatch):
    module, args = parsed(command, monkeypatch)
    if module == "train" and not args.resume:
        from_args(args)


def test_a_wrong_option_is_caught(monkeypatch):
    with pytest.raises(SystemExit):
        parsed("python -m diagnostics.responses runs/a --n-imgs 2000", monkeypatch)
