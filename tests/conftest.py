"""Shared fixtures and helpers: tiny datasets written in the real on-disk formats, tiny trained runs, commands
run in this process, the files runs write read back, and the hooks an analysis must leave behind (none)."""
import csv
import gzip
import io
import os
import pickle
import struct
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.modules.module as module_globals

from diagnostics.common import main_guard
from train.__main__ import main as train_main

TINY_RUN = ["--dataset", "synthetic", "--train-images", "256", "--batch-size", "64", "--epochs", "2",
            "--eval-batch-size", "128", "--lr", "0.05", "--precision", "fp32", "--monitor-every", "2",
            "--monitor-images", "64"]


def write_cifar_batch(path: Path, images: np.ndarray, labels, label_key: bytes = b"labels") -> None:
    """One batch exactly as CIFAR's python version stores it: a protocol-2 pickle of a dict with bytes keys,
    `data` an (N, 3072) uint8 array (1024 red, 1024 green, 1024 blue values, row-major)."""
    batch = {b"batch_label": b"tiny batch", label_key: list(map(int, labels)),
             b"data": images.reshape(len(images), -1), b"filenames": [b"img%d.png" % i for i in range(len(images))]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [0] * len(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        pickle.dump(batch, file, protocol=2)


def tiny_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture
def cifar10_dir(tmp_path) -> Path:
    """CIFAR-10 with 20 images per training batch and 30 test images; label i % 10."""
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", tiny_images(20, i), [j % 10 for j in range(20)])
    write_cifar_batch(folder / "test_batch", tiny_images(30, 0), [j % 10 for j in range(30)])
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}, file, protocol=2)
    return tmp_path


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path) -> Path:
    """Fashion-MNIST as Debian ships it (gzipped idx) under DATA_DIR/fashion-mnist/: 40 train, 20 test."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / "fashion-mnist" / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(tmp_path / "fashion-mnist" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def train_tiny(out: Path, model: str, *extra: str) -> Path:
    assert train_main(["--model", model, "--out", str(out), *TINY_RUN, *extra]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """A residual and a plain ResNet-20 trained for 2 epochs of 256 synthetic images (shared, read-only)."""
    root = tmp_path_factory.mktemp("runs")
    return {name: train_tiny(root / name, name) for name in ("resnet20", "plain20")}


def run_command(command, argv) -> tuple[int, str, str]:
    """A command's `main` in this process as `python -m` runs it, bad input one line and exit 2 (argparse's own
    exit too): (exit code, stdout, stderr). Captured here, not with capsys, so that a module's fixture may run one."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main_guard(lambda: command.main([str(arg) for arg in argv]))
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def read_csv(path: Path) -> list[dict]:
    """A CSV file a run wrote (metrics.csv, steps.csv), one dict per row, the values as written (strings)."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# Every dict of hooks a module keeps (forward, pre-forward, backward, state-dict ...), read off a bare Module so
# that a kind torch adds later is checked too; and the global ones every module runs.
HOOK_DICTS = sorted(name for name, value in vars(nn.Module()).items() if "hook" in name and isinstance(value, dict))
GLOBAL_HOOK_DICTS = sorted(name for name, value in vars(module_globals).items()
                           if name.startswith("_global") and "hook" in name and isinstance(value, dict))


def assert_no_hooks(model: nn.Module) -> None:
    """No hook of any kind left on any module of `model`, nor a global one: an analysis cleaned up after itself."""
    for name, module in model.named_modules():
        for attribute in HOOK_DICTS:
            left = getattr(module, attribute, {})
            assert not left, f"{name or 'model'}.{attribute} still holds {len(left)} hook(s)"
    for attribute in GLOBAL_HOOK_DICTS:
        assert not getattr(module_globals, attribute), f"torch.nn.modules.module.{attribute} is not empty"


def pytest_addoption(parser):
    parser.addoption("--cpu-bf16", choices=("native", "emulated"),
                     help="run the suite as a CPU with (native) or without (emulated: emulated or slower than "
                          "fp32) native bf16 would: sets RESNET_DIAG_NATIVE_BF16 for the tests and the commands "
                          "they start")


def pytest_configure(config):
    kind = config.getoption("--cpu-bf16")
    if kind:
        os.environ["RESNET_DIAG_NATIVE_BF16"] = "1" if kind == "native" else "0"


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on CI's two cores: one thread each, and for the commands they start, so that
    # OpenMP's waiting threads do not fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_torch_state():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------------------------------
# Image folders (ImageFolder's layout) and a torchvision model trained on one

FOLDER_CLASSES = ("cat", "dog", "fox")


def write_image_folder(root: Path, per_class: dict[str, int] | None = None, size: int = 16, mode: str = "RGB",
                       seed: int = 0) -> Path:
    """root/SPLIT/CLASS/NNN.png: noise with the class's colour channel at full intensity (learnable at a glance),
    12 training and 4 validation images per class by default."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (per_class or {"train": 12, "val": 4}).items():
        for c, name in enumerate(FOLDER_CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 200, size=(size, size, 3), dtype=np.uint8)
                pixels[..., c] = 255
                Image.fromarray(pixels).convert(mode).save(root / split / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x (12 training + 4 validation) RGB PNGs of 16x16 (shared, read-only)."""
    return write_image_folder(tmp_path_factory.mktemp("pictures") / "pictures")


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory, image_folder) -> Path:
    """torchvision's resnet18 trained by our trainer on `image_folder` for 2 epochs of 3 steps (read-only)."""
    out = tmp_path_factory.mktemp("folder-run") / "r18"
    with torch_threads(1):
        assert train_main(["--model", "torchvision:resnet18", "--dataset", f"folder:{image_folder}", "--out",
                           str(out), "--batch-size", "12", "--epochs", "2", "--lr", "0.05", "--precision", "fp32",
                           "--monitor-every", "3", "--monitor-images", "12", "--eval-batch-size", "64"]) == 0
    return out


@contextmanager
def torch_threads(count: int):
    """Small convolutions gain nothing from more threads, and lose several-fold when other jobs share the cores
    (the threads of a parallel region wait for the slowest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """For a module of small models: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with torch_threads(1):
        yield
