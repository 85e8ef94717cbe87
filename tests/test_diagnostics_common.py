"""The shared command layer: labels that tell inputs apart, and the epochs a run contributes."""
import shutil
from types import SimpleNamespace

import pytest

from analyses.common import combine
from diagnostics import common
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
