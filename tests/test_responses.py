"""Responses (Fig. 7): a known answer from a constructed BN output, streaming, and the command."""
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
from analyses.common import ChannelMoments, combine
from analyses.responses import layer_responses

ROOT = Path(__file__).resolve().parents[1]


def constructed_model() -> nn.Module:
    """A 3x3 conv that copies its input (centre tap 1) and an eval-mode BN with fixed statistics."""
    model = nn.Sequential()
    model.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    model.bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.weight[0, 0, 1, 1] = model.conv.weight[1, 1, 1, 1] = 1
        model.bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
        model.bn.running_var.copy_(torch.tensor([4.0, 0.25]) - model.bn.eps)
        model.bn.weight.copy_(torch.tensor([3.0, 1.0]))
        model.bn.bias.copy_(torch.tensor([0.0, 7.0]))
    return model.eval()


def test_known_answer_from_a_constructed_bn_output():
    # Channel 0 holds +-1 in equal numbers (std 1), channel 1 holds 0 or 2 in equal numbers (std 1, mean 1).
    x = torch.zeros(6, 2, 4, 4)
    x[:, 0] = torch.tensor([1.0, -1.0]).repeat(48).view(6, 4, 4)
    x[:, 1] = torch.tensor([0.0, 2.0]).repeat(48).view(6, 4, 4)
    model = constructed_model()
    assert torch.equal(model.conv(x), x)  # only the centre tap is non-zero: zero padding adds nothing
    ds = layer_responses(model, [(x, None)])
    # BN output = weight * (x - mean) / sqrt(var) + bias: std = weight / sqrt(var) * std(x) = 3/2 and 1/0.5.
    assert ds.response_std_channel.values[0] == pytest.approx([1.5, 2.0], abs=1e-12)
    assert ds.response_std.values[0] == pytest.approx(1.75, abs=1e-12)
    assert ds.response_mean_channel.values[0] == pytest.approx([3 * (0 - 0.5) / 2, 1 * (1 + 1) / 0.5 + 7])
    assert ds.layer.values.tolist() == ["bn"] and ds.attrs["n_images"] == 6 and ds.attrs["bn_mode"] == "eval"
    assert ds.response_std.attrs["long_name"] and ds.response_std.attrs["units"] == "1"
    assert len(model.bn._forward_hooks) == 0


def test_streaming_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    model = models.build("resnet20").eval()
    images = torch.randn(40, 3, 32, 32)
    one = layer_responses(model, [images])
    many = layer_responses(model, list(images.split(7)))
    np.testing.assert_allclose(one.response_std_channel.values, many.response_std_channel.values, rtol=1e-10)
    assert one.attrs["batch_size"] == 40 and many.attrs["batch_size"] == 7


def test_streamed_moments_match_the_two_pass_answer():
    data = torch.randn(50, 3, 5, 5, dtype=torch.float64) * 1e3 + 1e6  # large offset: naive sums would cancel
    moments = ChannelMoments()
    for part in data.split(9):
        moments.update(part)
    expected = data.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(moments.mean, expected.mean(1))
    assert torch.allclose(moments.variance, expected.var(1, correction=0))


def test_hooks_are_removed_when_the_batches_fail():
    model = models.build("resnet20")

    def batches():
        yield torch.randn(2, 3, 32, 32)
        raise RuntimeError("the data loader broke")

    with pytest.raises(RuntimeError, match="broke"):
        layer_responses(model, batches())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert model.training  # mode restored


def test_any_torchvision_model_works_through_the_analysis_api():
    model = torchvision.models.resnet18(num_classes=10).eval()
    ds = layer_responses(model, [torch.randn(2, 3, 64, 64)])
    assert ds.sizes["depth"] == 16 and ds.layer.values[0] == "layer1.0.bn1"  # conv1 is 7x7: not a response


def test_combine_aligns_models_of_different_depth():
    torch.manual_seed(0)
    images = [torch.randn(4, 3, 32, 32)]
    parts = [layer_responses(models.build(name).eval(), images) for name in ("resnet20", "plain32")]
    ds = combine(parts, ["resnet20", "plain32"], [0, 0], {"definition": "test"})
    assert ds.sizes == {"model": 2, "epoch": 1, "depth": 31, "channel": 64}
    assert ds.layer.sel(model="resnet20", depth=25).item() == "" and np.isnan(
        ds.response_std.sel(model="resnet20", depth=25, epoch=0).item())
    assert ds.layer.sel(model="plain32", depth=31).item() == "stage3.block5.bn2"
    assert ds.attrs == {"definition": "test"}


def test_command_on_a_plain_and_a_residual_run(tiny_runs, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "diagnostics.responses", str(tiny_runs["plain20"]),
                             str(tiny_runs["resnet20"]), "--out", str(out), "--n-images", "100",
                             "--batch-size", "32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out / f"responses.{ext}") for ext in ("nc", "png", "pdf")]
    ds = xr.open_dataset(out / "responses.nc")
    assert ds.model.values.tolist() == ["plain20", "resnet20"] and ds.epoch.values.tolist() == [1, 2]
    assert ds.sizes["depth"] == 19 and ds.attrs["n_images"] == 100 and len(ds.attrs["checkpoint"]) == 4
    for key in ("definition", "dataset", "split", "software", "created"):
        assert ds.attrs[key]
    assert np.isfinite(ds.response_std.values).all()
