"""Other people's models (`torchvision:NAME`, `timm:NAME`): built as their libraries build them, with their own
module names, through every analysis or a one-line refusal; their bare state_dicts loaded without our key
mapping; and the in-place ReLUs of torchvision's blocks, which must not change what a hook measured."""
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import models
from analyses.attributions import attributions
from analyses.evaluate import evaluate
from analyses.flops import flop_count
from analyses.gradients import gradient_norms, weight_layers
from analyses.monitor import BNMonitor
from analyses.responses import layer_responses
from conftest import assert_no_hooks
from train import checkpoint as ckpt
from train.errors import UserError

# name, input channels, side of the smallest input its pooling takes, number of response layers (BN after a 3x3)
MODELS = [("torchvision:resnet18", 3, 32, 16), ("torchvision:resnet50", 3, 32, 16),
          ("torchvision:vgg11_bn", 3, 32, 8), ("torchvision:mobilenet_v3_small", 3, 32, 4),
          ("timm:resnet18", 1, 32, 16)]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_built_as_their_libraries_build_them_with_their_own_module_names():
    ours = models.build("torchvision:resnet18", num_classes=3)
    theirs = torchvision.models.resnet18(num_classes=3)
    assert type(ours) is type(theirs) and list(ours.state_dict()) == list(theirs.state_dict())
    grey = models.build("timm:resnet18", num_classes=5, in_channels=1)
    assert list(grey.state_dict()) == list(timm.create_model("resnet18", num_classes=5, in_chans=1).state_dict())
    assert grey.conv1.weight.shape == (64, 1, 7, 7) and grey.fc.out_features == 5
    assert models.canonical("torchvision:resnet18", num_classes=3) == ("torchvision:resnet18", {"num_classes": 3})
    assert models.label("timm:resnet18", {"num_classes": 5}) == "timm:resnet18"


@pytest.mark.parametrize("name, kwargs, phrase", [
    ("torchvision:resnet18", {"in_channels": 1}, "built for 3-channel (RGB) images, not 1"),
    ("torchvision:resnet18", {"weights": "DEFAULT"}, "does not take weights"),  # nothing is downloaded
    ("timm:resnet18", {"pretrained": True}, "does not take pretrained"),
    ("torchvision:resnet18", {"skip": False}, "does not take skip"),
    ("torchvision:resnet19", {}, "torchvision has no classification model 'resnet19'"),
    ("torchvision:fasterrcnn_resnet50_fpn", {}, "no classification model"),
    ("timm:resnet19", {}, "timm has no model 'resnet19'"),
    ("resnet57", {}, "or torchvision:NAME, timm:NAME"),
])
def test_what_cannot_be_built_is_one_line(name, kwargs, phrase):
    with pytest.raises(models.ModelError) as error:
        models.build(name, **kwargs)
    assert phrase in str(error.value) and "\n" not in str(error.value)


def test_without_timm_a_timm_name_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(models.ModelError, match=r"needs timm, which is not installed: pip install "
                                                r"'resnet-diagnostics\[timm\]'"):
        models.build("timm:resnet18")


def test_response_layers_follow_the_rule_on_other_libraries_models():
    assert models.response_layers(models.build("torchvision:resnet18"))[:3] == [
        "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1"]  # conv1 is 7x7: not a response
    assert models.response_layers(models.build("torchvision:resnet50"))[0] == "layer1.0.bn2"  # the 3x3 of 1x1-3x3-1x1
    assert models.response_layers(models.build("torchvision:squeezenet1_1")) == []  # no BN: none, not its ReLUs
    assert models.response_layers(models.build("resnet20", bn=False))[0] == "stem.bn"  # ours: the BN's stand-in
    # timm's BatchNormAct2d normalises and activates in one module: its output is not a response
    assert models.response_layers(models.build("timm:efficientnet_b0")) == []


@pytest.mark.parametrize("name, channels, side, n_responses", MODELS, ids=[m[0] for m in MODELS])
def test_every_analysis_runs_on_other_libraries_models(name, channels, side, n_responses):
    torch.manual_seed(0)
    model = models.build(name, num_classes=3, in_channels=channels).eval()
    names = dict(model.named_modules())
    x, y = torch.randn(4, channels, side, side), torch.tensor([0, 1, 2, 0])
    batches = [(x, y)]
    before = {key: value.clone() for key, value in model.state_dict().items()}

    responses = layer_responses(model, batches)
    assert responses.sizes["depth"] == n_responses and set(responses.layer.values) <= set(names)
    assert np.isfinite(responses.response_std.values).all() and (responses.stage.values == -1).all()
    gradients = gradient_norms(model, batches, bn_mode="train")
    assert gradients.layer.values.tolist() == [layer for layer, _ in weight_layers(model)]
    assert np.isfinite(gradients.grad_norm.values).all() and (gradients.grad_norm.values > 0).any()
    scores = {mode: evaluate(model, batches, bn_mode=mode, recalibration=[x], num_classes=3)
              for mode in ("eval", "train", "recalibrated")}
    assert all(np.isfinite(ds.loss.item()) for ds in scores.values())
    maps = attributions(model, x[:2], y[:2], n_steps=2, batch_size=8, fractions=(0.0, 0.5, 1.0))
    assert maps.attribution.sizes["explainer"] == 4 and np.isfinite(maps.attribution.values).all()
    flops = flop_count(model, (1, channels, side, side))
    assert int(flops.total_params) == sum(p.numel() for p in model.parameters())
    monitor = BNMonitor(model, x, y, every=1)
    monitor.measure(1)
    assert monitor.dataset().sizes["depth"] == len(models.bn_layers(model))

    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert_no_hooks(model)


def test_an_in_place_relu_after_bn_does_not_change_the_measured_response():
    """torchvision's BasicBlock runs bn1 then its ReLU in place on bn1's output: the response must be bn1's output
    itself (negative values included), computed by hand here module by module."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    assert model.layer1[0].relu.inplace
    with torch.no_grad():
        for module in model.modules():  # running statistics off (0, 1): the BN outputs have both signs
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        by_hand = model.layer1[0].bn1(model.layer1[0].conv1(stem))
    expected = by_hand.transpose(0, 1).flatten(1).double().std(1, correction=0)
    after_relu = by_hand.clamp_min(0).transpose(0, 1).flatten(1).double().std(1, correction=0)
    ds = layer_responses(model, [x[:4], x[4:]])
    measured = ds.response_std_channel.sel(depth=1).values[:64]  # layer1 has 64 channels; the rest is padding
    assert ds.layer.values[0] == "layer1.0.bn1"
    np.testing.assert_allclose(measured, expected.numpy(), rtol=1e-5)
    assert np.abs(measured - after_relu.numpy()).max() > 0.1  # what a hook holding the tensor would have seen
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------------------------
# Their bare state_dicts


def test_a_bare_torchvision_state_dict_loads_with_its_own_names(tmp_path):
    theirs = torchvision.models.mobilenet_v3_small(num_classes=3).eval()  # classes in classifier.3, not fc
    path = tmp_path / "mobilenet.pt"
    torch.save({"module." + key: value for key, value in theirs.state_dict().items()}, path)  # from DataParallel
    loaded = ckpt.load(path, model_name="torchvision:mobilenet_v3_small")
    assert loaded.kwargs == {"num_classes": 3, "in_channels": 3} and loaded.spec.name == "mini-cifar10"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.model(x), theirs(x))
    with pytest.raises(UserError, match="is not a resnet-diagnostics checkpoint.*torchvision:resnet18"):
        ckpt.load(path)


def test_a_timm_state_dict_gives_its_input_channels_and_a_torchvision_model_refuses_them(tmp_path):
    path = tmp_path / "grey.pt"
    torch.save(timm.create_model("resnet18", num_classes=10, in_chans=1).state_dict(), path)
    loaded = ckpt.load(path, model_name="timm:resnet18")
    assert loaded.kwargs == {"num_classes": 10, "in_channels": 1} and loaded.spec.name == "fashion-mnist"
    with pytest.raises(UserError, match="3-channel"):
        ckpt.load(path, model_name="torchvision:resnet18")
    with pytest.raises(UserError, match="classifies into 10 classes but mini-cifar10 has 3"):
        ckpt.load(path, model_name="timm:resnet18", dataset="mini-cifar10")
