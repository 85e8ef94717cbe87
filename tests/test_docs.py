"""docs/python.md runs: every ```python block, in order, in one namespace, in a folder holding what the page
says it holds; and matplotlib's backend and style are what they were before."""
import re
import shutil
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
import torchvision

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_blocks_are_found():
    assert len(BLOCK.findall(PAGE.read_text())) >= 7


def test_every_python_block_of_the_page_runs(tmp_path, monkeypatch, image_folder, folder_run):
    shutil.copytree(image_folder, tmp_path / "pictures")
    shutil.copytree(folder_run, tmp_path / "runs" / "r18")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "resnet18.pt")
    monkeypatch.chdir(tmp_path)
    backend, style = matplotlib.get_backend(), dict(plt.rcParams)
    namespace = {"__name__": "docs"}
    try:
        for number, block in enumerate(BLOCK.findall(PAGE.read_text()), start=1):
            try:
                exec(compile(block, f"docs/python.md, block {number}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"block {number} of docs/python.md fails: {exc!r}\n{block}") from exc
        assert matplotlib.get_backend() == backend
        assert [key for key, value in plt.rcParams.items() if style[key] != value] == []
        assert (tmp_path / "responses.png").stat().st_size > 0 and (tmp_path / "monitor.nc").is_file()
        assert namespace["responses"].layer.values[0] == "layer1.0.bn1"
        lightning = Path(namespace["trainer"].log_dir)  # the Lightning section: its logger and its record
        assert "val/bn_excess" in (lightning / "metrics.csv").read_text().splitlines()[0]
        assert (lightning / "monitor.nc").is_file()
    finally:
        plt.close("all")
