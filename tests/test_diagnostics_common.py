"""The shared command layer: labels that tell inputs apart, the epochs a run contributes, and the images read once
while their files stay as they are."""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from analyses.common import combine
from conftest import tiny_images, write_cifar_batch, write_image_folder
from diagnostics import common, responses
from train import datasets
from train.errors import UserError


def args_for(*inputs, epochs="all"):
    return SimpleNamespace(inputs=[str(i) for i in inputs], epochs=epochs, model=None, dataset=None, mean=None,
                           std=None)


def test_runs_of_one_model_get_distinct_labels(tiny_runs, tmp_path):
    # Same model, same run-directory name, different parents: the labels fall back to the paths.
    first = shutil.copytree(tiny_runs["resnet20"], tmp_path / "seed0" / "resnet20")
    second = shutil.copytree(tiny_runs["resnet20"], tmp_path / "seed1" / "resnet20")
    labels = [s.label for s in common.collect_sources(args_for(first, second, tiny_runs["plain20"]))]
    assert labels == [str(first), str(second), "plain20"]
    # Different run-directory names: those.
    third = shutil.copytree(tiny_runs["resnet20"], tmp_path / "r20-again")
    labels = [s.label for s in common.collect_sources(args_for(tiny_runs["resnet20"], third))]
    assert labels == [tiny_runs["resnet20"].name, "r20-again"]


def test_files_of_one_run_are_one_model_along_epoch(tiny_runs):
    run = tiny_runs["resnet20"]
    sources = common.collect_sources(args_for(run / "epoch_002.pt", run / "epoch_001.pt"))
    assert len(sources) == 1 and [p.name for p in sources[0].paths] == ["epoch_001.pt", "epoch_002.pt"]
    assert [p.name for p in common.collect_sources(args_for(run, epochs="last"))[0].paths] == ["epoch_002.pt"]
    with pytest.raises(UserError, match="has none of the epochs 7"):
        common.collect_sources(args_for(run, epochs="7"))


def test_combine_refuses_two_datasets_for_one_model_and_epoch():
    import xarray as xr
    part = xr.Dataset({"v": ("depth", [1.0])}, coords={"depth": [1]})
    with pytest.raises(ValueError, match="share a"):
        combine([part, part], ["resnet20", "resnet20"], [2, 2], {})


def test_importing_the_diagnostics_changes_nothing_of_matplotlib():
    """A notebook keeps its backend and style: every diagnostics module imported, then a figure drawn."""
    code = """
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
before = dict(plt.rcParams)
import diagnostics.attributions, diagnostics.curves, diagnostics.evaluate, diagnostics.flops
import diagnostics.gradients, diagnostics.responses, diagnostics.spikes, diagnostics.plotting as plotting
import numpy as np, xarray as xr
ds = xr.Dataset({"response_std": (("model", "epoch", "depth"), np.ones((1, 1, 3)))},
                coords={"model": ["resnet20"], "epoch": [1], "depth": [1, 2, 3]})
fig = diagnostics.responses.figure(ds, {})
assert fig.axes[0].xaxis.label.get_fontsize() == plotting.STYLE["axes.labelsize"]
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
changed = [key for key, value in plt.rcParams.items() if before[key] != value]
assert not changed, changed
print("unchanged")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "unchanged" in result.stdout, result.stderr[-2000:]


def test_the_same_checkpoint_twice_is_one_input_or_a_line_of_its_own(tiny_runs, tmp_path):
    """A run spelled two ways (relative and absolute, through a symlink), or given with one of its epoch files,
    counts once; its best.pt or last.pt beside it is a model line of its own: every combination runs."""
    run = tiny_runs["resnet20"]
    link = tmp_path / "link"
    link.symlink_to(run)
    relative = Path(os.path.relpath(run))
    for inputs in ((run, relative), (run, link), (run, run / "epoch_002.pt"), (link / "epoch_001.pt", run)):
        (source,) = common.collect_sources(args_for(*inputs))
        assert [p.name for p in source.paths] == ["epoch_001.pt", "epoch_002.pt"]
    sources = common.collect_sources(args_for(run, run / "best.pt", run / "last.pt"))
    assert [s.label for s in sources] == ["resnet20", f"{run.name}/best.pt", f"{run.name}/last.pt"]
    out = tmp_path / "out"
    assert common.main_guard(lambda: responses.main([str(run), str(run / "best.pt"), str(link), "--n-images", "16",
                                                     "--out", str(out)])) == 0
    import xarray as xr
    ds = xr.open_dataset(out / "responses.nc")
    assert ds.model.values.tolist() == ["resnet20", f"{run.name}/best.pt"]


def test_a_file_the_trainer_replaced_while_it_was_read_is_skipped(tiny_runs, tmp_path):
    """--keep last deletes the previous epoch's file: a diagnostic reading a live run takes what is there."""
    run = Path(shutil.copytree(tiny_runs["resnet20"], tmp_path / "live"))
    args = SimpleNamespace(**vars(args_for(run)), command="responses")
    sources = common.collect_sources(args)
    (run / "epoch_001.pt").unlink()  # replaced between the listing and the reading
    newer = torch.load(run / "epoch_002.pt", weights_only=True)
    history = {key: [*values, values[-1]] for key, values in newer["history"].items()}
    torch.save({**newer, "epoch": 3, "history": {**history, "epoch": [1, 2, 3]}}, run / "epoch_003.pt")  # a newer one
    read = [common.epoch_of(loaded) for _, loaded in common.checkpoints(sources, args, "cpu")]
    assert read == [2, 3]


# ---------------------------------------------------------------------------------------------------------------
# The images a command reads, kept between commands of one process


def checkpoint_of(spec: datasets.DatasetSpec, **config) -> SimpleNamespace:
    """What the image readers take of a checkpoint: its run's config and its dataset."""
    return SimpleNamespace(config=config, spec=spec, path="run/epoch_001.pt")


def images_read(checkpoint, data_dir, split: str = "test") -> torch.Tensor:
    """The images a command evaluates the checkpoint on, read as every command reads them."""
    args = SimpleNamespace(split=split, n_images=None, batch_size=64, data_dir=data_dir, image_size=None)
    return common.image_batches(checkpoint, args, "cpu").images


def test_a_dataset_file_rewritten_in_place_is_read_again(cifar10_dir):
    """A notebook that rewrites a dataset's file between two diagnostics gets the new images, not the first
    read's: the same size, the modification time alone tells them apart."""
    test_batch = cifar10_dir / "cifar-10-batches-py" / "test_batch"
    os.utime(test_batch, ns=(0, 0))  # written long ago
    checkpoint = checkpoint_of(datasets.SPECS["cifar10"])
    images = tiny_images(30, 0)
    assert torch.equal(images_read(checkpoint, cifar10_dir), torch.from_numpy(images))
    size = test_batch.stat().st_size
    write_cifar_batch(test_batch, images[::-1], [j % 10 for j in range(30)])  # the same bytes in another order
    assert test_batch.stat().st_size == size
    assert torch.equal(images_read(checkpoint, cifar10_dir), torch.from_numpy(images[::-1].copy()))


def test_an_image_added_to_a_folder_is_read(tmp_path):
    """An image folder is known by its folders' modification times, which a file added there changes."""
    root = write_image_folder(tmp_path / "pictures", {"train": 2})
    name = datasets.dataset_name(f"folder:{root}")
    checkpoint = checkpoint_of(datasets.get_spec(name))
    os.utime(root / "train" / "dog", ns=(0, 0))  # written long ago
    assert len(images_read(checkpoint, None, "train")) == 6
    shutil.copy(root / "train" / "dog" / "000.png", root / "train" / "dog" / "002.png")
    assert len(images_read(checkpoint, None, "train")) == 7


def test_the_images_kept_are_the_splits_read_last(cifar10_dir, monkeypatch):
    """Each run's held-out split is a split of its own; beyond IMAGE_CACHE_SPLITS the one used longest ago is
    dropped, and read again when asked for: a long notebook does not keep every split it ever read."""
    reads, run_split = [], common.run_split

    def counted(dataset, config, *rest):
        reads.append(config["val_split"])
        return run_split(dataset, config, *rest)

    monkeypatch.setattr(common, "run_split", counted)
    last = common.IMAGE_CACHE_SPLITS + 1
    for val_split in [*range(1, last + 1), last, 1]:
        checkpoint = checkpoint_of(datasets.SPECS["cifar10"], val_split=val_split)
        assert len(images_read(checkpoint, cifar10_dir, "val")) == val_split
    assert reads == [*range(1, last + 1), 1] and len(common._IMAGES) == common.IMAGE_CACHE_SPLITS
