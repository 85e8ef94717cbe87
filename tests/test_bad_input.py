"""Every bad input through the real command lines: exit 2, one line `error: ...`, no traceback, nothing written.

One row a case. A row names the command, its arguments (with placeholders for the hostile files made
below) and a phrase the error line must contain, so that the line says what is wrong.
"""
import json
import math
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np

import pytest
import torch

import models
from forked import run_module

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ["--dataset", "synthetic"]

ROWS = [
    # (id, module, arguments, phrase in the error line)
    ("missing path", "diagnostics.responses", ["{tmp}/nowhere.pt"], "does not exist"),
    ("empty file", "diagnostics.responses", ["{empty}"], "is empty"),
    ("truncated checkpoint", "diagnostics.responses", ["{truncated}"], "truncated or corrupt"),
    ("random bytes", "diagnostics.responses", ["{random}"], "not a PyTorch checkpoint"),
    ("code-running pickle in a torch file", "diagnostics.responses", ["{exploit_torch}", "--model", "resnet20"],
     "could run code"),
    ("code-running plain pickle", "diagnostics.responses", ["{exploit_pickle}", "--model", "resnet20"],
     "not a PyTorch checkpoint"),
    ("foreign state_dict without --model", "diagnostics.responses", ["{foreign}"], "--model NAME"),
    ("state_dict shapes do not match --model", "diagnostics.responses", ["{foreign}", "--model", "resnet56"],
     "check --model"),
    ("NaN weights", "diagnostics.responses", ["{nan}"], "non-finite"),
    ("newer checkpoint format", "diagnostics.responses", ["{newer}"], "newer resnet-diagnostics"),
    ("run directory without checkpoints", "diagnostics.responses", ["{empty_run}"], "holds no checkpoints"),
    ("folder that is not a run", "diagnostics.responses", ["{tmp}"], "not a run directory"),
    ("unknown model for a foreign file", "diagnostics.responses", ["{foreign}", "--model", "resnet57"],
     "unknown model 'resnet57'"),
    ("negative batch size (diagnostics)", "diagnostics.responses", ["{good}", "--batch-size", "-4"],
     "must be a positive integer"),
    ("unknown split", "diagnostics.responses", ["{good}", "--split", "holdout"], "invalid choice"),
    ("bad --epochs selection", "diagnostics.responses", ["{good_run}", "--epochs", "five"], "--epochs must be"),
    ("read-only --out (diagnostics)", "diagnostics.responses", ["{good}", "--out", "{readonly}/out"],
     "cannot write"),
    ("unknown model (train)", "train", ["--model", "resnet57", *SYNTHETIC, "--out", "{out}"],
     "unknown model 'resnet57'"),
    ("unknown dataset (train)", "train", ["--model", "resnet20", "--dataset", "imagenet", "--out", "{out}"],
     "unknown dataset 'imagenet'"),
    ("negative batch size (train)", "train", ["--model", "resnet20", *SYNTHETIC, "--batch-size", "-5", "--out",
                                              "{out}"], "must be a positive integer"),
    ("option the model does not take", "train", ["--model", "vgg16", "--no-skip", *SYNTHETIC, "--out", "{out}"],
     "vgg16 does not take skip"),
    ("dataset folder missing offline", "train", ["--model", "resnet20", "--dataset", "cifar10", "--data-dir",
                                                 "{tmp}/data", "--out", "{out}"], "could not be downloaded"),
    ("read-only --out (train)", "train", ["--model", "resnet20", *SYNTHETIC, "--out", "{readonly}/out"],
     "cannot write"),
    ("resume a folder that is not a run", "train", ["--resume", "{tmp}"], "not a run directory"),
    ("missing --out", "train", ["--model", "resnet20", *SYNTHETIC], "--out is required"),
    # Reliability, round two: a row for each class of the issue.
    ("model argument of the wrong type", "diagnostics.responses", ["{wrong_kwargs}"], "num_classes must be an int"),
    ("dataset entry of the wrong length", "diagnostics.responses", ["{wrong_dataset}"], "wrong type, length"),
    ("tensor claiming more than its storage", "diagnostics.responses", ["{forged}"], "forged view"),
    ("compressed checkpoint entries", "diagnostics.responses", ["{compressed}"], "compressed entries"),
    ("resume a last.pt without its optimizer", "train", ["--resume", "{mangled_run}"], "damaged"),
    ("resume a last.pt with a foreign optimizer", "train", ["--resume", "{foreign_optimizer_run}"], "damaged"),
    ("CIFAR batch claiming a billion images", "train", ["--model", "resnet20", "--dataset", "cifar10", "--data-dir",
                                                       "{forged_cifar}", "--out", "{out}"], "claims"),
    ("NaN learning rate", "train", ["--model", "resnet20", *SYNTHETIC, "--lr", "nan", "--out", "{out}"],
     "must be a finite number"),
    ("seed beyond what torch takes", "train", ["--model", "resnet20", *SYNTHETIC, "--seed", "99999999999", "--out",
                                              "{out}"], "up to 2147483647"),
    ("non-ASCII digits in --keep", "train", ["--model", "resnet20", *SYNTHETIC, "--keep", "\u0663", "--out", "{out}"],
     "--keep must be"),
    ("empty --out", "train", ["--model", "resnet20", *SYNTHETIC, "--out", ""], "--out is empty"),
    ("zero --std for a foreign file", "diagnostics.responses", ["{foreign}", "--model", "resnet20", "--mean", "0",
                                                               "0", "0", "--std", "0", "1", "1"],
     "must be a positive number"),
    ("a lock that is a symbolic link", "train", ["--resume", "{symlink_run}"], "symbolic link"),
    ("a lock that is a hard link to a user's file", "train", ["--resume", "{hardlink_run}"], "is a hard link"),
    # Reliability, round three: odd paths and models.
    ("dangling symbolic link as --out (diagnostics)", "diagnostics.responses", ["{good}", "--out", "{dangling}"],
     "does not exist; remove the link"),
    ("dangling symbolic link as --out (train)", "train", ["--model", "resnet20", *SYNTHETIC, "--out", "{dangling}"],
     "does not exist; remove the link"),
    ("dangling symbolic link as --tensorboard", "train", ["--model", "resnet20", *SYNTHETIC, "--tensorboard",
                                                         "{dangling}", "--out", "{out}"], "remove the link"),
    ("regular file as --tensorboard", "train", ["--model", "resnet20", *SYNTHETIC, "--tensorboard", "{empty}",
                                               "--out", "{out}"], "is a file, not a folder"),
    ("symbolic-link loop as an epoch file", "diagnostics.responses", ["{loop_run}"], "looping symbolic link"),
    ("an epoch file that is a copy of another epoch", "diagnostics.evaluate", ["{copied_run}", "--n-images", "8"],
     "holds epoch 1, not the epoch 3"),
    ("two files of the same epoch", "diagnostics.evaluate", ["{twice_run}", "--n-images", "8"],
     "both hold epoch 1"),
    ("TorchScript archive as a checkpoint", "diagnostics.responses", ["{torchscript}", "--model", "resnet20"],
     "TorchScript archive"),
    ("seed past 64 bits for --init", "diagnostics.gradients", ["--init", "resnet20", *SYNTHETIC, "--seed",
                                                               "99999999999999999999"], "up to 2147483647"),
    ("a billion Integrated Gradients steps", "diagnostics.attributions", ["{good}", "--steps", "1000000000"],
     "give at most 1024"),
    # Models that cannot take the dataset's images (built on the meta device: no ViT weights are made).
    ("a ViT on 32x32 images (train)", "train", ["--model", "torchvision:vit_b_16", *SYNTHETIC, "--out", "{out}"],
     "cannot take 32x32 images; the smallest it takes is 224x224"),
    ("a timm ViT on 32x32 images (flops)", "diagnostics.flops", ["timm:vit_tiny_patch16_224", *SYNTHETIC],
     "the smallest it takes is 224x224"),
    ("Inception on 32x32 images (gradients --init)", "diagnostics.gradients", ["--init", "torchvision:inception_v3",
                                                                               *SYNTHETIC], "cannot take 32x32"),
    ("VGG's fifth pool on 16x16 images", "train", ["--model", "vgg16", "--dataset", "folder:{pictures}", "--out",
                                                   "{out}"], "the smallest it takes is 32x32"),
    ("a ViT's own checkpoint on 32x32 images (evaluate)", "diagnostics.evaluate", ["{vit}", "--model",
                                                                                   "timm:vit_tiny_patch16_224",
                                                                                   *SYNTHETIC],
     "the smallest it takes is 224x224"),
    ("--resume of a run that never trained, of a model that cannot take its images", "train",
     ["--resume", "{vit_run}"], "cannot take 32x32 images"),
    ("1x1 images cropped from their padding", "train", ["--model", "resnet20", "--dataset", "folder:{pictures}",
                                                        "--image-size", "1", "--out", "{out}"], "8 of 9 crops"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_runs, image_folder) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad")
    good = tiny_runs["resnet20"] / "epoch_001.pt"
    raw = good.read_bytes()
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    marker = tmp / "code-ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "payload": Exploit()}, tmp / "exploit.pt")
    with open(tmp / "exploit.pkl", "wb") as file:
        pickle.dump(Exploit(), file)
    torch.save(models.build("resnet20").state_dict(), tmp / "foreign.pt")
    state = torch.load(good, weights_only=True)
    state["state_dict"]["stage2.block1.conv1.weight"][0, 0, 0, 0] = math.nan
    torch.save(state, tmp / "nan.pt")
    state = torch.load(good, weights_only=True)
    state["format"] = "resnet-diagnostics/2"
    torch.save(state, tmp / "newer.pt")
    (tmp / "empty_run").mkdir()
    (tmp / "empty_run" / "config.json").write_text("{}")
    for name, change in (("wrong_kwargs", lambda c: c["model"]["kwargs"].update(num_classes="ten")),
                         ("wrong_dataset", lambda c: c["dataset"].update(mean=[0.5])),
                         ("forged", lambda c: c["state_dict"].update({"fc.bias": torch.zeros(1).expand(10**9)}))):
        state = torch.load(good, weights_only=True)
        change(state)
        torch.save(state, tmp / f"{name}.pt")
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(tmp / "compressed.pt", "w", zipfile.ZIP_DEFLATED) as out:
        for entry in source.infolist():
            out.writestr(entry.filename, source.read(entry))
    for name, change in (("mangled_run", lambda last: last.pop("optimizer")),
                         ("foreign_optimizer_run", lambda last: last["optimizer"]["param_groups"][0].update(
                             params=[0, 1]))):
        copy = Path(shutil.copytree(tiny_runs["resnet20"], tmp / name))
        last = torch.load(copy / "last.pt", weights_only=True)
        last["config"].update(epochs=3, total_epochs=3, total_steps=12)  # resumable by one more epoch
        change(last)
        torch.save(last, copy / "last.pt")
    symlink_run = Path(shutil.copytree(tiny_runs["resnet20"], tmp / "symlink_run"))
    (tmp / "victim.txt").write_text("keep me")
    (symlink_run / ".lock").unlink(missing_ok=True)
    (symlink_run / ".lock").symlink_to(tmp / "victim.txt")
    hardlink_run = Path(shutil.copytree(tiny_runs["resnet20"], tmp / "hardlink_run"))
    (hardlink_run / ".lock").unlink(missing_ok=True)
    os.link(tmp / "victim.txt", hardlink_run / ".lock")
    forged_cifar = tmp / "forged_cifar" / "cifar-10-batches-py"
    forged_cifar.mkdir(parents=True)
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (forged_cifar / batch).write_bytes(pickle.dumps({b"data": ForgedArray(), b"labels": [0]}, protocol=2))
    (tmp / "dangling").symlink_to(tmp / "nowhere")
    loop_run = Path(shutil.copytree(tiny_runs["resnet20"], tmp / "loop_run"))
    (loop_run / "epoch_009.pt").symlink_to("epoch_009.pt")
    copied_run = Path(shutil.copytree(tiny_runs["resnet20"], tmp / "copied_run"))
    shutil.copy(copied_run / "epoch_001.pt", copied_run / "epoch_003.pt")
    twice_run = Path(shutil.copytree(tiny_runs["resnet20"], tmp / "twice_run"))
    shutil.copy(twice_run / "epoch_001.pt", twice_run / "epoch_0001.pt")
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), tmp / "torchscript.pt")
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=4).state_dict(), tmp / "vit.pt")
    vit_run = tmp / "vit_run"  # config.json only: it stopped before its first epoch ended
    vit_run.mkdir()
    config = json.loads((tiny_runs["resnet20"] / "config.json").read_text())
    (vit_run / "config.json").write_text(json.dumps({**config, "model": "torchvision:vit_b_16", "out": str(vit_run)}))
    readonly = tmp / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permissions: use a file system nobody can write to
        readonly = Path("/proc")
    return {"tmp": str(tmp), "empty": str(tmp / "empty.pt"), "truncated": str(tmp / "truncated.pt"),
            "random": str(tmp / "random.pt"), "exploit_torch": str(tmp / "exploit.pt"),
            "exploit_pickle": str(tmp / "exploit.pkl"), "foreign": str(tmp / "foreign.pt"),
            "nan": str(tmp / "nan.pt"), "newer": str(tmp / "newer.pt"), "empty_run": str(tmp / "empty_run"),
            "good": str(good), "good_run": str(tiny_runs["resnet20"]), "readonly": str(readonly),
            "marker": str(marker), **{name: str(tmp / f"{name}.pt") for name in ("wrong_kwargs", "wrong_dataset",
                                                                                  "forged", "compressed")},
            "mangled_run": str(tmp / "mangled_run"), "foreign_optimizer_run": str(tmp / "foreign_optimizer_run"),
            "symlink_run": str(symlink_run), "hardlink_run": str(hardlink_run), "forged_cifar": str(forged_cifar.parent),
            "victim": str(tmp / "victim.txt"), "dangling": str(tmp / "dangling"), "loop_run": str(loop_run),
            "copied_run": str(copied_run), "twice_run": str(twice_run), "torchscript": str(tmp / "torchscript.pt"),
            "pictures": str(image_folder), "vit": str(tmp / "vit.pt"), "vit_run": str(vit_run)}


class ForgedArray:
    """Pickles as numpy's own ndarray constructor with zero strides: a billion images over one byte."""

    def __reduce__(self):
        return (np.ndarray, ((10**9 * 3072,), np.dtype("u1"), b"\x00", 0, (0,)))


@pytest.mark.parametrize("case, module, arguments, phrase", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input(case, module, arguments, phrase, files, tmp_path):
    out = tmp_path / "out"
    values = {**files, "out": str(out)}
    argv = [argument.format(**values) for argument in arguments]
    if module.startswith("diagnostics") and "--out" not in argv:
        argv += ["--out", str(out)]
    env = {**os.environ, "RESNET_DIAG_DATA": str(tmp_path / "no-data")}
    result = run_module(module, argv, cwd=tmp_path, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert phrase in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists() and not (tmp_path / "diagnostics").exists()
    assert not Path(files["marker"]).exists()  # no file ever ran code
    assert Path(files["victim"]).read_text() == "keep me"  # the lock never writes through a link


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
@pytest.mark.parametrize("module, arguments", [
    ("diagnostics.responses", ["{good}", "--out", "{out}"]),
    ("train", ["--model", "resnet20", *SYNTHETIC, "--out", "{out}"])])
def test_a_bad_progress_interval_is_one_line(value, module, arguments, files, tmp_path):
    """RESNET_DIAG_PROGRESS_SECONDS that is no number of seconds was silently the default."""
    out = tmp_path / "out"
    env = {**os.environ, "RESNET_DIAG_PROGRESS_SECONDS": value}
    result = run_module(module, [a.format(**files, out=out) for a in arguments], cwd=tmp_path, env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: RESNET_DIAG_PROGRESS_SECONDS=") and not out.exists()


def test_an_empty_data_variable_is_unset(monkeypatch):
    from train import datasets
    monkeypatch.setenv("RESNET_DIAG_DATA", "")
    assert datasets.default_data_dir() == Path("./data")  # was Path(""): the working directory


@pytest.mark.parametrize("package", ["train", "diagnostics"])
def test_ctrl_c_while_importing_is_one_line_and_130(package, tmp_path):
    """Under `python -m` (argv[0] is "-m" while the package imports), a KeyboardInterrupt that reaches the top, as
    one in torch's import does, is one line; and MPLBACKEND naming no backend does not stop matplotlib's import."""
    import subprocess
    import sys
    code = (f"import sys; sys.argv = ['-m']; import {package}; import matplotlib.pyplot as plt; "
            "print(plt.get_backend()); raise KeyboardInterrupt")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MPLBACKEND": "no-such-backend"})
    assert result.returncode == 130 and result.stdout == "Agg\n"
    assert result.stderr == "error: interrupted while starting; nothing was written\n"
