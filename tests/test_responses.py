"""Responses (Fig. 7): known answers from constructed BN outputs and blocks, what the response is made of (|gamma|,
stale running statistics), the branch ratio against hooks on the real tensors, streaming, and the command."""
import math
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
from analyses.bn import recalibrate_bn
from analyses.common import ChannelMoments, combine, forward_hooks
from analyses.responses import SumOfSquares, layer_responses
from conftest import assert_no_hooks
from models.resnet import BasicBlock, Bottleneck

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
        model.bn.weight.copy_(torch.tensor([-3.0, 1.0]))
        model.bn.bias.copy_(torch.tensor([0.0, 7.0]))
    return model.eval()


# Moments are float32 per batch merged in float64 (docs/design.md §4): values agree to 1e-6 relative, no closer.
RTOL = 1e-6


def test_known_answer_from_a_constructed_bn_output():
    # Channel 0 holds +-1 in equal numbers (std 1), channel 1 holds 0 or 2 in equal numbers (std 1, mean 1).
    x = torch.zeros(6, 2, 4, 4)
    x[:, 0] = torch.tensor([1.0, -1.0]).repeat(48).view(6, 4, 4)
    x[:, 1] = torch.tensor([0.0, 2.0]).repeat(48).view(6, 4, 4)
    model = constructed_model()
    assert torch.equal(model.conv(x), x)  # only the centre tap is non-zero: zero padding adds nothing
    ds = layer_responses(model, [(x, None)])
    # BN output = gamma * (x - mean) / s + bias, s = sqrt(running_var + eps) = 2 and 0.5: std |gamma| / s * 1.
    assert ds.response_std_channel.values[0] == pytest.approx([1.5, 2.0], rel=RTOL)
    assert ds.response_std.values[0] == pytest.approx(1.75, rel=RTOL)
    assert ds.response_mean_channel.values[0] == pytest.approx([-3 * (0 - 0.5) / 2, 1 * (1 + 1) / 0.5 + 7], rel=RTOL)
    # What it is made of: |gamma| = 3 and 1, and the input's std over the images (1, with eps) over the running one.
    eps = model.bn.eps
    assert ds.bn_scale_channel.values[0] == pytest.approx([3.0, 1.0]) and ds.bn_scale.values[0] == 2.0
    ratio = [math.sqrt(1 + eps) / 2, math.sqrt(1 + eps) / 0.5]
    assert ds.bn_std_ratio_channel.values[0] == pytest.approx(ratio, rel=RTOL)
    assert ds.bn_std_ratio.values[0] == pytest.approx(sum(ratio) / 2, rel=RTOL)
    assert ds.layer.values.tolist() == ["bn"] and ds.attrs["n_images"] == 6 and ds.attrs["bn_mode"] == "eval"
    assert ds.response_std.attrs["long_name"] and ds.response_std.attrs["units"] == "1"
    assert ds.sizes["block_depth"] == 0  # no residual block in this model
    assert_no_hooks(model)


def stale_resnet(name: str = "resnet20", **kwargs) -> nn.Module:
    """A model with random BN scales and shifts and running statistics that describe no input."""
    torch.manual_seed(0)
    model = models.build(name, **kwargs)
    with torch.no_grad():
        for _, bn in models.bn_layers(model):
            bn.weight.normal_()
            bn.bias.normal_(0, 0.5)
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.3, 3)
    return model.eval()


def captured(model: nn.Module, x: torch.Tensor, outputs: list[str], inputs: list[str] = ()) -> dict:
    """The real tensors of one eval-mode forward, in float64: the outputs of `outputs`, and the inputs of
    `inputs` keyed `(name, "input")`."""
    tensors = {}

    def hook(name):
        def keep(module, args, output):
            if name in outputs:
                tensors[name] = output.double()
            if name in inputs:
                tensors[name, "input"] = args[0].double()
        return keep

    with forward_hooks(model, {name: hook(name) for name in {*outputs, *inputs}}), torch.no_grad():
        model(x)
    return tensors


def channel_std(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).flatten(1).std(1, correction=0)


def test_the_response_is_gamma_times_the_std_ratio_and_equals_the_real_bn_output():
    model = stale_resnet()
    x = torch.randn(12, 3, 32, 32)
    ds = layer_responses(model, x.split(5))
    layers = ds.layer.values.tolist()
    tensors = captured(model, x, layers, layers)
    for i, name in enumerate(layers):
        bn = dict(model.named_modules())[name]
        channels = bn.num_features
        std, var_in = channel_std(tensors[name]).numpy(), channel_std(tensors[name, "input"]).square().numpy()
        # The response measured from the BN's input equals the std of the BN's real output ...
        np.testing.assert_allclose(ds.response_std_channel.values[i, :channels], std, rtol=1e-5)
        # ... and per channel it is |gamma| * s_pop / s_running * sqrt(var / (var + eps)), each factor stored.
        np.testing.assert_allclose(ds.bn_scale_channel.values[i, :channels], bn.weight.detach().abs().numpy())
        s_running = np.sqrt(bn.running_var.numpy() + bn.eps)
        np.testing.assert_allclose(ds.bn_std_ratio_channel.values[i, :channels], np.sqrt(var_in + bn.eps) / s_running,
                                   rtol=1e-5)
        scale, ratio = ds.bn_scale_channel.values[i, :channels], ds.bn_std_ratio_channel.values[i, :channels]
        np.testing.assert_allclose(ds.response_std_channel.values[i, :channels],
                                   scale * ratio * np.sqrt(var_in / (var_in + bn.eps)), rtol=1e-5)
    assert np.abs(ds.bn_std_ratio.values - 1).max() > 0.2  # the running statistics are stale, as built
    assert_no_hooks(model)


def test_after_recalibration_on_the_same_images_the_ratio_is_one_and_the_response_is_gamma():
    # Recalibration runs BN in train mode, so every layer's input depends on the batch statistics of the layers
    # before it; given the images as ONE batch, those are the population statistics that eval mode then uses, so
    # each BN sees in eval mode exactly the inputs whose statistics it was given.
    model = stale_resnet()
    x = torch.randn(16, 3, 32, 32)
    recalibrate_bn(model, [x])
    ds = layer_responses(model, x.split(6))
    # fvcore's float32 E[x^2] - E[x]^2 and our float32 moments: agreement to about 1e-6 of the variance.
    channels = np.isfinite(ds.bn_std_ratio_channel.values)  # NaN past a layer's channels
    np.testing.assert_allclose(ds.bn_std_ratio_channel.values[channels], 1, atol=1e-5)
    # Then Fig. 7 is BN's |gamma| (times sqrt(var / (var + eps)), 1 within eps / var), channel by channel.
    np.testing.assert_allclose(ds.response_std_channel.values, ds.bn_scale_channel.values, rtol=2e-4)
    assert_no_hooks(model)


def block_model(block, shortcut: str, skip: bool) -> nn.Module:
    """One block (2 -> 4 channels for a BasicBlock, 2 -> 1 * 4 for a Bottleneck, stride 2) whose last BN has
    gamma 0, so its branch output is the BN shift: F(x) = beta = (1, -2, 0, 2) per channel, everywhere."""
    torch.manual_seed(0)
    model = nn.Sequential(block(2, 4 // block.expansion, 2, skip, shortcut, True))
    with torch.no_grad():
        model[0].last_bn().weight.zero_()
        model[0].last_bn().bias.copy_(torch.tensor([1.0, -2.0, 0.0, 2.0]))
        if shortcut != "A":  # a projection shortcut S(x) = its BN's shift too: (3, 0, 0, 4)
            model[0].shortcut.bn.weight.zero_()
            model[0].shortcut.bn.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 4.0]))
    return model.eval()


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("shortcut, skip", [("A", True), ("B", True), ("C", True), ("A", False)])
def test_branch_ratio_known_answer_for_every_block_and_shortcut(block, shortcut, skip):
    model = block_model(block, shortcut, skip)
    x = torch.ones(3, 2, 4, 4)
    ds = layer_responses(model, [x[:1], x[1:]])
    # F(x) = (1, -2, 0, 2): RMS sqrt(9 / 4) = 1.5. A(x): ones on the 2x2 output grid, 2 of its 4 channels zero:
    # RMS sqrt(1 / 2). S(x) is A(x) for option A, the projection's shift (3, 0, 0, 4) otherwise: RMS 2.5.
    assert ds.sizes["block_depth"] == 1 and ds.block_layer.values.tolist() == ["0"]
    assert ds.branch_rms.item() == pytest.approx(1.5, rel=RTOL)
    assert ds.input_rms.item() == pytest.approx(math.sqrt(0.5), rel=RTOL)
    assert ds.branch_ratio.item() == pytest.approx(1.5 / math.sqrt(0.5), rel=RTOL)
    expected_shortcut = {("A", True): math.sqrt(0.5), ("A", False): float("nan")}.get((shortcut, skip), 2.5)
    assert ds.shortcut_rms.item() == pytest.approx(expected_shortcut, rel=RTOL, nan_ok=True)
    kind = {"A": "pad", "B": "projection", "C": "projection"}[shortcut] if skip else "none"
    assert ds.block_shortcut.item() == kind
    assert_no_hooks(model)


@pytest.mark.parametrize("name, kwargs", [("resnet20", {}), ("plain20", {}), ("resnet20", {"shortcut": "C"})])
def test_branch_ratio_is_the_norm_of_the_real_branch_over_the_real_input(name, kwargs):
    model = stale_resnet(name, **kwargs)
    x = torch.randn(6, 3, 32, 32)
    ds = layer_responses(model, x.split(4))
    blocks = ds.block_layer.values.tolist()
    assert len(blocks) == 9 and blocks[3] == "stage2.block1"
    shortcuts = [f"{block}.shortcut" for block in blocks] if kwargs.get("shortcut") == "C" else []
    tensors = captured(model, x, [f"{block}.bn2" for block in blocks] + shortcuts, blocks)
    for i, block in enumerate(blocks):
        f = tensors[f"{block}.bn2"]
        a = tensors[block, "input"]
        stride = a.shape[2] // f.shape[2]
        a = nn.functional.pad(a[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, f.shape[1] - a.shape[1]))
        assert ds.branch_ratio.values[i] == pytest.approx((f.norm() / a.norm()).item(), rel=1e-5)
        assert ds.input_rms.values[i] == pytest.approx(a.square().mean().sqrt().item(), rel=1e-5)
    if name == "plain20":
        assert np.isnan(ds.shortcut_rms.values).all() and set(ds.block_shortcut.values) == {"none"}
    if shortcuts:
        expected = [tensors[name].square().mean().sqrt().item() for name in shortcuts]
        np.testing.assert_allclose(ds.shortcut_rms.values, expected, rtol=1e-5)
    assert_no_hooks(model)


def test_streaming_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    model = models.build("resnet20").eval()
    images = torch.randn(40, 3, 32, 32)
    one = layer_responses(model, [images])
    many = layer_responses(model, list(images.split(7)))
    for name in ("response_std_channel", "bn_std_ratio_channel", "branch_ratio", "shortcut_rms"):
        np.testing.assert_allclose(one[name].values, many[name].values, rtol=RTOL)  # the contract's tolerance
    assert one.attrs["batch_size"] == 40 and many.attrs["batch_size"] == 7
    assert_no_hooks(model)


def test_streamed_moments_match_the_two_pass_answer():
    data = torch.randn(50, 3, 5, 5, dtype=torch.float64) * 1e3 + 1e6  # large offset: naive sums would cancel
    moments = ChannelMoments()
    for part in data.split(9):
        moments.update(part)
    expected = data.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(moments.mean, expected.mean(1))
    assert torch.allclose(moments.variance, expected.var(1, correction=0))


def test_streamed_moments_of_float32_activations_far_from_zero_are_exact_and_batch_size_free():
    """float32 as the activations come, a mean 1e4 times the std (a sum of squares in float32 would keep no
    digit of the variance): against float64 two-pass statistics of the same values, for any batch size."""
    generator = torch.Generator().manual_seed(0)
    data = (torch.randn(60, 4, 6, 6, generator=generator, dtype=torch.float64) * 0.01 + 100).float()
    expected = data.double().transpose(0, 1).reshape(4, -1)
    for batch in (60, 13, 1):
        moments = ChannelMoments()
        for part in data.split(batch):
            moments.update(part)
        torch.testing.assert_close(moments.mean, expected.mean(1), rtol=1e-12, atol=0)
        torch.testing.assert_close(moments.variance, expected.var(1, correction=0), rtol=1e-6, atol=0)


def test_streamed_moments_of_a_large_plane_and_an_untypical_first_batch():
    """A 1024x1024 plane (a float32 reduction over a million values keeps about 5 digits) and a first batch
    45 std away from the rest (a shift taken from it would cancel digits later): float64 answers to 1e-6."""
    generator = torch.Generator().manual_seed(1)
    large = torch.randn(2, 2, 1024, 1024, generator=generator) * 0.5 + 1
    stream = [torch.randn(1, 4, 8, 8, generator=generator) + 1e4, *torch.randn(2000, 4, 8, 8, generator=generator).split(100)]
    for batches in ([large], stream):
        moments = ChannelMoments()
        for part in batches:
            moments.update(part)
        values = torch.cat(batches).double().transpose(0, 1).reshape(batches[0].shape[1], -1)
        torch.testing.assert_close(moments.variance, values.var(1, correction=0), rtol=1e-6, atol=0)
        torch.testing.assert_close(moments.mean, values.mean(1), rtol=1e-7, atol=1e-7)
    sums = SumOfSquares()
    sums.add(large)
    sums.add(large[:0])  # an empty batch adds nothing
    assert abs(sums.total.item() / large.double().square().sum().item() - 1) < 1e-9


def test_streamed_moments_either_side_of_the_raw_sums_switch():
    """Channels whose mean^2 + var is 1.5 to 1e4 times their var, in one batch and in batches that cross
    RAW_MOMENTS_RATIO one at a time: float64 two-pass answers to 1e-6 either way."""
    generator = torch.Generator().manual_seed(2)
    ratios = torch.tensor([1.5, 4.0, 15.0, 17.0, 64.0, 1e4], dtype=torch.float64)
    data = (torch.randn(64, len(ratios), 16, 16, generator=generator, dtype=torch.float64) * 2
            + 2 * (ratios - 1).sqrt().view(1, -1, 1, 1)).float()
    expected = data.double().transpose(0, 1).reshape(len(ratios), -1)
    for channels in ([slice(None)], [slice(c, c + 1) for c in range(len(ratios))]):
        for channel in channels:
            moments = ChannelMoments()
            for part in data[:, channel].split(16):
                moments.update(part)
            torch.testing.assert_close(moments.variance, expected[channel].var(1, correction=0), rtol=1e-6, atol=0)
            torch.testing.assert_close(moments.mean, expected[channel].mean(1), rtol=1e-7, atol=0)


def test_streamed_moments_of_huge_and_of_few_valued_activations():
    """Values whose squares pass float32's range (a diverging run's, mean 1e18, std 1e16) keep a finite, exact
    variance (read as deviations); channels of few distinct values (two values; mostly zeros), where float32's
    roundings add up in one direction, within the documented 3e-5 either side of the switch."""
    generator = torch.Generator().manual_seed(3)
    huge = (torch.randn(4, 2, 32, 32, generator=generator, dtype=torch.float64) * 1e16 + 1e18).float()
    two_valued = (torch.rand(64, 3, 32, 32, generator=generator) < 0.3).double() * 2
    mostly_zero = torch.where(torch.rand(64, 3, 32, 32, generator=generator) < 0.9, 0.0,
                              torch.randn(64, 3, 32, 32, generator=generator, dtype=torch.float64) * 5)
    for data, rtol in ((huge, 1e-6), ((two_valued + torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1)).float(), 3e-5),
                       ((mostly_zero + torch.tensor([0.0, 2.0, 6.0]).view(1, 3, 1, 1)).float(), 3e-5)):
        expected = data.double().transpose(0, 1).reshape(data.shape[1], -1)
        for batch in (64, 7):
            moments = ChannelMoments()
            for part in data.split(batch):
                moments.update(part)
            torch.testing.assert_close(moments.variance, expected.var(1, correction=0), rtol=rtol, atol=0)


def test_hooks_are_removed_when_the_batches_fail():
    model = models.build("resnet20")

    def batches():
        yield torch.randn(2, 3, 32, 32)
        raise RuntimeError("the data loader broke")

    with pytest.raises(RuntimeError, match="broke"):
        layer_responses(model, batches())
    assert_no_hooks(model)
    assert model.training  # mode restored


def test_any_torchvision_model_works_through_the_analysis_api():
    model = torchvision.models.resnet18(num_classes=10).eval()
    ds = layer_responses(model, [torch.randn(2, 3, 64, 64)])
    assert ds.sizes["depth"] == 16 and ds.layer.values[0] == "layer1.0.bn1"  # conv1 is 7x7: not a response
    assert ds.sizes["block_depth"] == 0 and np.isfinite(ds.bn_std_ratio.values).all()  # blocks: ours only
    assert_no_hooks(model)


def test_a_model_without_bn_has_responses_and_branches_but_no_gamma():
    model = models.build("resnet20", bn=False).eval()
    ds = layer_responses(model, [torch.randn(4, 3, 32, 32)])
    assert np.isfinite(ds.response_std.values).all() and np.isfinite(ds.branch_ratio.values).all()
    assert np.isnan(ds.bn_scale.values).all() and np.isnan(ds.bn_std_ratio.values).all()
    assert_no_hooks(model)


def test_combine_aligns_models_of_different_depth():
    torch.manual_seed(0)
    images = [torch.randn(4, 3, 32, 32)]
    parts = [layer_responses(models.build(name).eval(), images) for name in ("resnet20", "plain32")]
    ds = combine(parts, ["resnet20", "plain32"], [0, 0], {"definition": "test"})
    assert ds.sizes == {"model": 2, "epoch": 1, "depth": 31, "channel": 64, "block_depth": 15}
    assert ds.layer.sel(model="resnet20", depth=25).item() == "" and np.isnan(
        ds.response_std.sel(model="resnet20", depth=25, epoch=0).item())
    assert ds.layer.sel(model="plain32", depth=31).item() == "stage3.block5.bn2"
    assert np.isnan(ds.branch_ratio.sel(model="resnet20", block_depth=10, epoch=0).item())
    assert ds.block_layer.sel(model="plain32", block_depth=15).item() == "stage3.block5"
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
    assert np.isfinite(ds.response_std.values).all() and np.isfinite(ds.bn_scale.values).all()
    assert np.isfinite(ds.branch_ratio.values).all() and ds.sizes["block_depth"] == 9
    assert np.isnan(ds.shortcut_rms.sel(model="plain20").values).all()
    assert np.isfinite(ds.shortcut_rms.sel(model="resnet20").values).all()
    for name in ("bn_std_ratio", "branch_ratio"):
        assert name in ds.attrs["definition"] and ds[name].attrs["long_name"] and ds[name].attrs["units"] == "1"
