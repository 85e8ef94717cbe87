"""FLOPs and parameters: the paper's block and network costs by hand, FlopCounterMode's cross-check, training
costs by convention and measured, labels that say what each count holds, the command."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
import xarray as xr

import models
from analyses.curves import training_curves
from analyses.flops import FVCORE_UNITS, flop_count, total_cost
from conftest import assert_no_hooks
from diagnostics import common
from diagnostics import curves as curves_command
from diagnostics.flops import LEGEND, main
from models.resnet import BasicBlock, Bottleneck
from test_attributions import XARRAY_KEYWORDS

ROOT = Path(__file__).resolve().parents[1]
CONV3X3_16 = 16 * 16 * 9 * 32 * 32  # = 32*32*9*16*16 = 64*64*9*8*8: every 3x3 layer but a stage's first, 2,359,296


def cifar_conv_fc(n: int) -> int:
    """Multiply-adds of a CIFAR ResNet-(6n+2) by hand: the stem, 6n - 2 equal 3x3 layers, the two strided first
    layers of stages 2 and 3 (half of an equal layer each) and the 64 -> 10 classifier."""
    return 3 * 16 * 9 * 32 * 32 + (6 * n - 2) * CONV3X3_16 + 2 * (CONV3X3_16 // 2) + 64 * 10


@pytest.fixture(scope="module")
def counted() -> dict[str, xr.Dataset]:
    return {name: flop_count(models.build(name)) for name in ("resnet20", "plain20", "resnet56")}


def test_basic_block_and_bottleneck_cost_the_same_as_the_paper_says():
    basic = BasicBlock(64, 64, 1, True, "A", True)
    bottleneck = Bottleneck(256, 64, 1, True, "A", True)
    # A batch of 2: every count is per image.
    basic_ds = flop_count(basic, (2, 64, 56, 56))
    bottleneck_ds = flop_count(bottleneck, (2, 256, 56, 56))
    assert int(basic_ds.conv_fc_flops) == 2 * (64 * 64 * 9 * 56 * 56) == 231_211_008
    assert int(bottleneck_ds.conv_fc_flops) == (256 * 64 + 64 * 64 * 9 + 64 * 256) * 56 * 56 == 218_365_952
    # eval-mode BN: a scale and a shift per output element.
    assert int(basic_ds.total_flops) == 231_211_008 + 2 * (2 * 64 * 56 * 56)
    assert int(bottleneck_ds.total_flops) == 218_365_952 + 2 * (64 + 64 + 256) * 56 * 56
    assert basic_ds.layer.values.tolist() == ["conv1", "bn1", "conv2", "bn2"]
    assert basic_ds.flops.values.tolist() == [115_605_504, 401_408, 115_605_504, 401_408]
    assert basic_ds.kind.values.tolist() == ["Conv2d", "BatchNorm2d", "Conv2d", "BatchNorm2d"]
    assert basic_ds.attrs["skipped_operators"] == "aten::add" and basic_ds.attrs["input_shape"] == "64x56x56"
    assert int(basic_ds.total_flops_torch) == 231_211_008
    assert_no_hooks(basic)


def test_cifar_resnets_known_answers(counted):
    resnet20, resnet56 = counted["resnet20"], counted["resnet56"]
    assert int(resnet20.conv_fc_flops) == cifar_conv_fc(3) == 40_551_040
    assert int(resnet56.conv_fc_flops) == cifar_conv_fc(9) == 125_485_696  # 125.49M
    assert cifar_conv_fc(18) == 252_887_680  # 252.89M: resnet110 itself is counted in the command's test
    # fvcore's full total adds BN (2 per element: 16x32x32 x 7 + 32x16x16 x 6 + 64x8x8 x 6) and the pooling.
    bn = 2 * (16 * 32 * 32 * 7 + 32 * 16 * 16 * 6 + 64 * 8 * 8 * 6)
    assert resnet20.flops_by_operator.sel(operator="batch_norm").item() == bn == 376_832
    assert resnet20.flops_by_operator.sel(operator="adaptive_avg_pool2d").item() == 64 * 8 * 8
    assert int(resnet20.total_flops) == 40_551_040 + 376_832 + 4096 == 40_931_968
    # Parameters: He et al. 2016, Table 6 (0.27M, 0.85M).
    assert int(resnet20.total_params) == 269_722 and int(resnet56.total_params) == 853_018
    assert total_cost(models.build("resnet20"), (1, 3, 32, 32)) == (40_551_040, 269_722)  # the paper's: conv+fc
    assert resnet20.sizes["depth"] == 19 * 2 + 2  # 19 conv + BN pairs, the pooling, fc
    assert resnet20.layer.values[-2:].tolist() == ["pool", "fc"] and resnet20.stage.values[2] == 1


def test_per_module_counts_sum_to_the_totals(counted):
    for name, ds in counted.items():
        model = models.build(name)
        assert int(ds.params.sum()) == int(ds.total_params) == sum(p.numel() for p in model.parameters())
        assert int(ds.flops.sum()) == int(ds.total_flops) == int(ds.flops_by_operator.sum())


def test_units_say_what_each_count_holds(counted):
    """Only the counts of convolutions and matrix products alone are in multiply-adds; fvcore's totals, which
    hold BN and pooling operations too, are in its own flops."""
    ds = counted["resnet20"]
    multiply_adds = {"conv_fc_flops", "total_flops_torch", "train_conv_fc_flops", "train_flops_torch"}
    assert {name for name in ds.data_vars if ds[name].attrs["units"] == "multiply-adds"} == multiply_adds
    assert {name for name in ds.data_vars if ds[name].attrs["units"] == FVCORE_UNITS} == {
        "flops", "flops_by_operator", "total_flops"}
    assert "BN" in ds.total_flops.attrs["long_name"] and "backward" in ds.train_flops_torch.attrs["long_name"]
    assert all(ds[name].attrs["long_name"] for name in ds.data_vars)


def test_training_costs_by_convention_and_as_measured(counted):
    resnet20 = counted["resnet20"]
    # Convention: backward = gradients of the inputs and of the weights, each one forward's multiply-adds.
    assert int(resnet20.train_conv_fc_flops) == 3 * 40_551_040 == 121_653_120
    # FlopCounterMode measures it: the same less the stem's input gradient, which training never needs.
    assert int(resnet20.train_flops_torch) == 3 * 40_551_040 - 3 * 16 * 9 * 32 * 32 == 121_210_752
    block = flop_count(BasicBlock(64, 64, 1, True, "A", True), (2, 64, 56, 56))
    assert int(block.train_flops_torch) == 3 * 231_211_008 - 115_605_504  # conv1's input is the block's input


def test_flop_counter_mode_agrees_on_convolutions_and_fc():
    model = models.build("resnet20", shortcut="B", num_classes=100)  # projection convs and a wider fc too
    ds = flop_count(model)
    projections = 16 * 32 * 16 * 16 + 32 * 64 * 8 * 8
    assert int(ds.conv_fc_flops) == cifar_conv_fc(3) + projections + 64 * 90
    assert int(ds.total_flops_torch) == int(ds.conv_fc_flops)


def test_plain_twin_costs_the_same(counted):
    resnet, plain = counted["resnet20"], counted["plain20"]
    np.testing.assert_array_equal(resnet.flops.values, plain.flops.values)
    np.testing.assert_array_equal(resnet.params.values, plain.params.values)
    assert int(resnet.total_flops) == int(plain.total_flops)
    # The additions (and option A's padding) are counted by no one: they are not multiply-adds.
    assert resnet.attrs["skipped_operators"] == "aten::add, aten::pad" and plain.attrs["skipped_operators"] == ""


def test_a_torchvision_model_at_imagenet_size():
    model = torchvision.models.resnet18()
    ds = flop_count(model, (1, 3, 224, 224))
    assert int(ds.total_params) == 11_689_512 and round(int(ds.conv_fc_flops) / 1e9, 2) == 1.81  # its docs
    assert int(ds.total_flops_torch) == int(ds.conv_fc_flops) and int(ds.params.sum()) == 11_689_512
    assert ds.layer.values[0] == "conv1" and ds.flops.values[0] == 3 * 64 * 49 * 112 * 112
    assert int(ds.train_flops_torch) == 3 * int(ds.conv_fc_flops) - 3 * 64 * 49 * 112 * 112
    assert model.training and all(p.grad is None for p in model.parameters())
    assert_no_hooks(model)


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("this layer is broken")


def test_model_is_left_as_it_came_even_when_the_forward_fails():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Broken())
    model[1].eval()  # mixed modes must come back as they were
    with pytest.raises(RuntimeError, match="broken"):
        flop_count(model)
    assert_no_hooks(model)
    assert [m.training for m in model] == [True, False, True]
    model = models.build("resnet20")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    total_cost(model)
    assert_no_hooks(model)
    assert model.training and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_unknown_model_name_is_a_usage_error(tmp_path, capsys):
    assert common.main_guard(lambda: main(["resnet21", "--out", str(tmp_path / "out")])) == 2
    assert "resnet21 does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_command_on_a_run_and_a_model_name(tiny_runs, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "diagnostics.flops", str(tiny_runs["resnet20"]), "resnet110",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-3:] == [str(out / f"flops.{ext}") for ext in ("nc", "png", "pdf")]
    legend = len(LEGEND.splitlines())
    assert lines[:legend] == LEGEND.splitlines()
    # Every column is named by what it counts, and the legend defines each name.
    header = ["model", "parameters", "conv+fc MACs", "fvcore all ops", "torch MACs", "agreement", "train 3x MACs",
              "train torch MACs"]
    assert [cell.strip() for cell in lines[legend].split("  ") if cell.strip()] == header
    assert all(f"  {name}: " in LEGEND for name in header[2:] if name != "agreement")
    # Before: a column "MFLOPs" of fvcore's total (BN and pooling included) under a legend of multiply-adds.
    assert lines[legend + 1].split() == ["resnet20", "269,332", "40.55", "40.93", "40.55", "exact", "121.65", "121.21"]
    assert lines[legend + 2].split() == ["resnet110", "1,727,962", "252.89", "254.99", "252.89", "exact", "758.66",
                                         "758.22"]
    ds = xr.open_dataset(out / "flops.nc")
    assert ds.model.values.tolist() == ["resnet20", "resnet110"] and "epoch" not in ds.dims
    assert set(ds.dims) == {"model", "depth", "operator"} and not set(ds.dims) & XARRAY_KEYWORDS
    # The synthetic dataset has 4 classes: the run's fc costs 64 x 4; resnet110 is built for CIFAR-10.
    assert ds.conv_fc_flops.values.tolist() == [cifar_conv_fc(3) - 64 * 6, cifar_conv_fc(18)]
    assert ds.total_flops_torch.values.tolist() == ds.conv_fc_flops.values.tolist()
    assert ds.sizes["depth"] == 220 and np.isnan(ds.flops.sel(model="resnet20", depth=41).item())
    assert ds.attrs["checkpoint"][0].endswith("epoch_002.pt") and ds.attrs["checkpoint"][1] == ""
    assert list(ds.attrs["dataset"]) == ["cifar10", "synthetic"]
    for key in ("definition", "software", "created", "input_shape", "counted_operators"):
        assert ds.attrs[key]


def test_the_curves_summary_says_its_flops_are_conv_and_fc_multiply_adds():
    history = {"epoch": [1], "val_acc": [0.5], "epoch_seconds": [1.0],
               **{name: [0.0] for name in ("step", "train_loss", "train_acc", "val_loss", "lr", "images_per_second")}}
    flops, _ = total_cost(models.build("resnet20"))
    ds = training_curves([history], ["run"], ["run"], flops=[flops])
    assert ds.flops.item() == 40_551_040 and ds.flops.attrs["units"] == "multiply-adds"
    assert "convolutions and fc layers" in ds.flops.attrs["long_name"]
    assert curves_command.SUMMARY_HEADER[-1] == "conv+fc MACs"  # was "MFLOPs", with no word of what it counts
