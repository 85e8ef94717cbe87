"""Attributions: exact answers on linear and constructed conv models, deletion curves known by hand, the model
left untouched (hooks, grads, modes), and the command on a plain and a residual run."""
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
from analyses.attributions import attributions, default_gradcam_layer, deletion_ranks, normalised_auc
from diagnostics import common
from diagnostics.attributions import main

ROOT = Path(__file__).resolve().parents[1]
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def no_hooks_left(model: nn.Module) -> bool:
    return all(len(getattr(module, name)) == 0 for module in model.modules() for name in HOOK_DICTS)


def linear_model(weights) -> nn.Module:
    """Flatten -> bias-free Linear with the given (classes, inputs) weights."""
    weights = torch.tensor(np.array(weights), dtype=torch.float32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(weights.shape[1], weights.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weights)
    return model.eval()


# Two channels of a 1x3 image; the weights of class 0 per (channel, x), class 1 all zero.
W0 = [[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]]
X = [[2.0, 1.0, -1.0], [4.0, -3.0, 2.0]]


def test_ig_and_saliency_of_a_linear_model_are_exact():
    model = linear_model([np.ravel(W0), np.zeros(6)])
    x, label = torch.tensor([X]).view(1, 2, 1, 3), torch.tensor([0])
    ds = attributions(model, x, label, ("ig", "saliency"), n_steps=8, mean=[0.5, 0.25], std=[2.0, 4.0])
    # IG from zero: w0 * x per element = (2, -2, -3) + (2, -12, -2) over the channels; saliency max_c |w0|.
    assert ds.attribution.sel({"method": "ig"}).values[0, 0].tolist() == pytest.approx([4, -14, -5], abs=1e-5)
    assert ds.attribution.sel({"method": "saliency"}).values[0, 0].tolist() == pytest.approx([1, 4, 3], abs=1e-7)
    assert abs(ds.ig_completeness_error.item()) < 1e-5  # they sum to logit(x) - logit(0) = -15
    assert ds.prediction.item() == 1  # logits (-15, 0)
    assert ds.image.values[0, :, 0].tolist() == [[4.5, 2.5, -1.5], [16.25, -11.75, 8.25]]  # x * std + mean
    shifted = attributions(model, x, label, ("ig",), baseline=1.0, n_steps=8)
    # w0 * (x - 1) = (1, 0, -6) + (1.5, -16, -1)
    assert shifted.attribution.sel({"method": "ig"}).values[0, 0].tolist() == pytest.approx([2.5, -16, -7], abs=1e-5)
    predicted = attributions(model, x, label, ("ig", "saliency"), target="prediction", n_steps=8)
    assert np.abs(predicted.attribution.sel({"method": ["ig", "saliency"]}).values).max() == 0  # w1 = 0
    assert predicted.attrs["target"] == "prediction" and no_hooks_left(model)


def stride_two_cam_model() -> nn.Module:
    """stage1: a stride-2 1x1 conv that copies the input; then the mean and logits (4, -4) x mean."""
    model = nn.Sequential()
    model.stage1 = nn.Conv2d(1, 1, 1, stride=2, bias=False)
    model.pool, model.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
    model.fc = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.stage1.weight.fill_(1)
        model.fc.weight.copy_(torch.tensor([[4.0], [-4.0]]))
    return model.eval()


def test_grad_cam_is_the_relu_of_the_weighted_map_upsampled_bilinearly():
    x = torch.full((1, 1, 4, 4), 9.0)  # the odd rows and columns are never seen by the strided conv
    x[0, 0, ::2, ::2] = torch.tensor([[0.0, 4.0], [-8.0, 4.0]])
    model = stride_two_cam_model()
    ds = attributions(model, x.repeat(2, 1, 1, 1), torch.tensor([0, 1]), ("gradcam",))
    assert ds.attrs["gradcam_layer"] == "stage1"
    # d logit / d A = +-4 / 4 positions: the CAM is ReLU(+-A); bilinear (half-pixel centres) takes
    # [0, 4] to [0, 1, 3, 4] and [8, 0] to [8, 6, 2, 0].
    cam = ds.attribution.sel({"method": "gradcam"}).values
    np.testing.assert_allclose(cam[0], [[0, 1, 3, 4]] * 4, atol=1e-6)
    np.testing.assert_allclose(cam[1], 8 * np.outer([0, 0.25, 0.75, 1], [1, 0.75, 0.25, 0]), atol=1e-6)
    assert no_hooks_left(model)


def test_default_gradcam_layer():
    assert default_gradcam_layer(models.build("resnet20")) == "stage3"
    assert default_gradcam_layer(models.build("resnet18")) == "stage4"
    assert default_gradcam_layer(torchvision.models.resnet18()) == "layer4"
    with pytest.raises(ValueError, match="gradcam_layer"):
        attributions(linear_model([[1.0] * 3]), torch.ones(1, 1, 1, 3), torch.tensor([0]), ("gradcam",))
    with pytest.raises(ValueError, match="no module named head"):
        attributions(stride_two_cam_model(), torch.ones(1, 1, 4, 4), torch.tensor([0]), gradcam_layer="head")


def test_deletion_ranks_break_ties_by_the_random_map():
    ranks = deletion_ranks(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[0.1, 0.9], [0.5, 0.3]]]))
    assert ranks.tolist() == [[[1, 2], [3, 0]]]
    assert normalised_auc([0, 0.25, 0.5], np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert normalised_auc([0, 0.1, 1.0], np.array([0.7, 0.7, 0.7])) == pytest.approx(0.7)


def test_deletion_curve_known_by_hand():
    # Class 0 wins while the sum of the pixels is positive (logits: sum, 0). IG from zero is the pixel itself.
    model = linear_model([np.ones(8), np.zeros(8)])
    x = torch.zeros(2, 2, 2, 2)
    x[0, 0] = torch.tensor([[3.0, 1.0], [0.0, -1.0]])  # channel sums 4, 1, -1, -1: deleting the 4 flips it
    x[0, 1] = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    x[1, 0] = torch.tensor([[3.0, 2.0], [1.0, -2.5]])  # 3, 2, 1, -2.5: still right without the 3, not without 2
    ds = attributions(model, x, torch.tensor([0, 0]), ("ig",), deletion_fractions=(0, 0.25, 0.5))
    assert ds.deletion_accuracy.sel({"method": "ig"}).values.tolist() == [1.0, 0.5, 0.0]
    assert ds.deletion_auc.sel({"method": "ig"}).item() == pytest.approx(0.5)
    assert ds.method.values.tolist() == ["ig", "random"] and ds.deletion_accuracy.sel({"method": "random"})[0] == 1.0


def test_the_model_is_left_as_it_came():
    model = models.build("resnet20", num_classes=4).train()
    model.stage1.eval()  # a mixed state must come back as it was
    before = {key: value.clone() for key, value in model.state_dict().items()}
    modes = [module.training for module in model.modules()]
    ds = attributions(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 3]), n_steps=4, batch_size=5,
                      class_names="abcd")
    assert ds.attribution.shape == (4, 2, 32, 32) and np.isfinite(ds.attribution.values).all()
    assert (ds.attribution.sel({"method": ["saliency", "gradcam"]}).values >= 0).all()
    assert ds.class_name.values.tolist() == list("abcd") and ds.attrs["gradcam_layer"] == "stage3"
    assert all(ds[name].attrs["long_name"] and ds[name].attrs["units"] for name in ds.data_vars)
    assert no_hooks_left(model) and all(p.grad is None for p in model.parameters())
    assert [module.training for module in model.modules()] == modes
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


class Tripwire(nn.Module):
    """Fails on its third call: after the logits and the baseline, during Grad-CAM's hooked forward pass."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("tripped")
        return x


def test_hooks_are_removed_when_grad_cam_fails():
    model = nn.Sequential()
    model.stage1, model.tripwire = nn.Conv2d(1, 2, 3), Tripwire()
    model.pool, model.flatten, model.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)
    model.train()
    with pytest.raises(RuntimeError, match="tripped"):
        attributions(model, torch.randn(2, 1, 6, 6), torch.tensor([0, 1]), ("gradcam",))
    assert model.tripwire.calls == 3 and no_hooks_left(model) and model.training


def test_bad_options_are_refused():
    model, x, y = linear_model([[1.0] * 3]), torch.ones(1, 1, 1, 3), torch.tensor([0])
    for bad, match in [({"methods": ("lime",)}, "methods"), ({"target": "guess"}, "target"),
                       ({"deletion_fractions": (0.5, 0.2)}, "increasing")]:
        with pytest.raises(ValueError, match=match):
            attributions(model, x, y, **bad)


def test_command_on_a_plain_and_a_residual_run(tiny_runs, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "diagnostics.attributions", str(tiny_runs["plain20"]),
                             str(tiny_runs["resnet20"]), "--out", str(out), "--n-images", "4", "--steps", "4",
                             "--method", "ig", "saliency", "--method", "gradcam", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-3:] == [str(out / f"attributions.{ext}") for ext in ("nc", "png", "pdf")]
    assert len(lines) == 1 + 2 * 4 + 3 and lines[1].split()[:2] == ["plain20", "ig"]  # header, (model, method)
    ds = xr.open_dataset(out / "attributions.nc")
    assert ds.model.values.tolist() == ["plain20", "resnet20"]
    assert ds.method.values.tolist() == ["ig", "saliency", "gradcam", "random"]
    assert ds.attribution.dims == ("model", "method", "sample", "y", "x") and ds.attribution.shape[2:] == (4, 32, 32)
    assert ds.image.dims == ("sample", "channel", "y", "x") and 0 <= ds.image.min() and ds.image.max() <= 1
    assert ds.label.dims == ("sample",) and ds.prediction.dims == ("model", "sample")
    assert ds.deletion_accuracy.sizes == {"model": 2, "method": 4, "fraction": 6}
    assert ds.attrs["n_images"] == 4 and ds.attrs["n_steps"] == 4 and ds.attrs["checkpoint"][0].endswith("epoch_002.pt")
    assert ds.class_name.values[0] == "stripes-horizontal"
    # By default the prediction is explained: before any deletion every image keeps it.
    assert ds.attrs["target"] == "prediction" and (ds.deletion_accuracy.isel(fraction=0) == 1).all()


def test_command_refuses_bad_input_in_one_line(tiny_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny_runs["resnet20"]), "--method", "lime", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    code = common.main_guard(lambda: main([str(tiny_runs["resnet20"]), "--epochs", "all",
                                           "--out", str(tmp_path / "out")]))
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert error.startswith("error: resnet20: attributions take one checkpoint per model, not 2")
    assert not (tmp_path / "out").exists()
