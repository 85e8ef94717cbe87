"""Attributions: exact answers on linear and constructed conv models, Grad-CAM's layer by the size of its map,
deletion and insertion curves known by hand, the model left untouched (hooks, grads, modes), dims no xarray
keyword shadows, and the command on a plain and a residual run."""
import inspect
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
import xarray as xr
from matplotlib.text import Text

import models
from analyses.attributions import (attributions, choose_gradcam_layer, importance_ranks, mean_and_sem,
                                   normalised_auc)
from conftest import assert_no_hooks
from diagnostics import common
import diagnostics.attributions
from analyses.attributions import combine_models
from diagnostics.attributions import main

ROOT = Path(__file__).resolve().parents[1]
# The keyword arguments of xarray's selection methods: a dim of that name given as `ds.sel(name=...)` is taken for
# the keyword and silently selects nothing (`ds.sel(method="ig")` returned every method).
XARRAY_KEYWORDS = {name for owner in (xr.Dataset, xr.DataArray) for method in ("sel", "isel", "interp", "reindex")
                   for name in inspect.signature(getattr(owner, method)).parameters} - {"self"}


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
    assert ds.attribution.sel({"explainer": "ig"}).values[0, 0].tolist() == pytest.approx([4, -14, -5], abs=1e-5)
    assert ds.attribution.sel({"explainer": "saliency"}).values[0, 0].tolist() == pytest.approx([1, 4, 3], abs=1e-7)
    assert abs(ds.ig_completeness_error.item()) < 1e-5  # they sum to logit(x) - logit(0) = -15
    assert ds.prediction.item() == 1  # logits (-15, 0)
    assert ds.image.values[0, :, 0].tolist() == [[4.5, 2.5, -1.5], [16.25, -11.75, 8.25]]  # x * std + mean
    shifted = attributions(model, x, label, ("ig",), baseline=1.0, n_steps=8)
    # w0 * (x - 1) = (1, 0, -6) + (1.5, -16, -1)
    assert shifted.attribution.sel({"explainer": "ig"}).values[0, 0].tolist() == pytest.approx([2.5, -16, -7], abs=1e-5)
    predicted = attributions(model, x, label, ("ig", "saliency"), target="prediction", n_steps=8)
    assert np.abs(predicted.attribution.sel({"explainer": ["ig", "saliency"]}).values).max() == 0  # w1 = 0
    assert predicted.attrs["target"] == "prediction"
    assert_no_hooks(model)


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
    cam = ds.attribution.sel({"explainer": "gradcam"}).values
    np.testing.assert_allclose(cam[0], [[0, 1, 3, 4]] * 4, atol=1e-6)
    np.testing.assert_allclose(cam[1], 8 * np.outer([0, 0.25, 0.75, 1], [1, 0.75, 0.25, 0]), atol=1e-6)
    assert ds.attrs["gradcam_layer_shape"] == "1x2x2"
    assert_no_hooks(model)


def test_gradcam_layer_is_the_last_map_larger_than_1x1():
    assert choose_gradcam_layer(models.build("resnet20"), (3, 32, 32)) == ("stage3", (64, 8, 8))
    assert choose_gradcam_layer(models.build("resnet18"), (3, 32, 32)) == ("stage4", (512, 4, 4))
    # VGG's last stage ends in its fifth max-pool: 1x1 on 32x32 images. Its last ReLU is still 2x2.
    vgg = models.build("vgg11")
    assert choose_gradcam_layer(vgg, (3, 32, 32)) == ("stage5.relu2", (512, 2, 2))
    # Any model (shapes alone decide, so these are built on the meta device): torchvision's ResNet-18 has a 1x1
    # layer4 on 32x32 images, a 7x7 one on 224x224; its VGG upsamples the 1x1 map to 7x7 (avgpool), a copy of
    # one value and no feature map.
    with torch.device("meta"):
        resnet18, tv_vgg11 = torchvision.models.resnet18(), torchvision.models.vgg11()
    assert choose_gradcam_layer(resnet18, (3, 32, 32)) == ("layer3", (256, 2, 2))
    assert choose_gradcam_layer(resnet18, (3, 224, 224)) == ("layer4", (512, 7, 7))
    assert choose_gradcam_layer(tv_vgg11, (3, 32, 32)) == ("features.19", (512, 2, 2))
    with pytest.raises(ValueError, match="stage5's output is 512x1x1 on 32x32 images.*such as stage5.relu2"):
        choose_gradcam_layer(vgg, (3, 32, 32), "stage5")
    with pytest.raises(ValueError, match="no convolutional feature map larger than 1x1"):
        attributions(linear_model([[1.0] * 3]), torch.ones(1, 1, 1, 3), torch.tensor([0]), ("gradcam",))
    with pytest.raises(ValueError, match="no module named head"):
        attributions(stride_two_cam_model(), torch.ones(1, 1, 4, 4), torch.tensor([0]), gradcam_layer="head")
    assert_no_hooks(vgg)
    assert_no_hooks(resnet18)
    assert vgg.training and resnet18.training


def test_grad_cam_of_vgg_varies_across_the_image():
    """At the fifth max-pool (the old default, `stage5`) every map was one value per image."""
    torch.manual_seed(0)
    model = models.build("vgg11", num_classes=3)
    ds = attributions(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), ("gradcam",), target="prediction",
                      fractions=(0, 0.5, 1))
    assert ds.attrs["gradcam_layer"] == "stage5.relu2" and ds.attrs["gradcam_layer_shape"] == "512x2x2"
    cam = ds.attribution.sel(explainer="gradcam").values
    assert (cam.reshape(2, -1).std(1) > 0).all()
    assert "Grad-CAM at stage5.relu2 (512x2x2)" in ds.attrs["definition"]


def test_importance_ranks_break_ties_by_the_random_map():
    ranks = importance_ranks(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[0.1, 0.9], [0.5, 0.3]]]))
    assert ranks.tolist() == [[[1, 2], [3, 0]]]
    assert normalised_auc([0, 0.25, 0.5], np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert normalised_auc([0, 0.1, 1.0], np.array([0.7, 0.7, 0.7])) == pytest.approx(0.7)
    mean, sem = mean_and_sem(np.array([[0.2, 0.6], [0.5, 0.5]]))
    assert mean.tolist() == pytest.approx([0.4, 0.5]) and sem.tolist() == pytest.approx([0.2, 0.0])
    assert np.isnan(mean_and_sem(np.array([[0.3]]))[1]).all()  # one image: no standard error


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def trapezoid(step: float, values: list[float]) -> float:
    return step * sum((a + b) / 2 for a, b in zip(values, values[1:]))


def test_deletion_and_insertion_curves_known_by_hand():
    """Logits (sum of the pixels, 0): the probability of class 0 is sigmoid(sum), and IG from zero is each pixel
    itself, the ideal ranking of the pixels' contributions."""
    model = linear_model([np.ones(4), np.zeros(4)])
    x = torch.tensor([[[3.0, 1.0], [0.0, -1.0]], [[-2.0, 2.0], [1.0, 0.5]]])[:, None]
    ds = attributions(model, x, torch.tensor([0, 0]), ("ig",), fractions=(0, 0.25, 0.5, 0.75, 1))
    # Sums left after deleting the top 0-4 pixels (by IG: 3, 1, 0, -1 and 2, 1, 0.5, -2), and after inserting them.
    deleted = [[3, 0, -1, -1, 0], [1.5, -0.5, -1.5, -2, 0]]
    inserted = [[0, 3, 4, 4, 3], [0, 2, 3, 3.5, 1.5]]
    for name, sums in (("deletion", deleted), ("insertion", inserted)):
        expected = [[sigmoid(z) for z in image] for image in sums]
        np.testing.assert_allclose(ds[f"{name}_probability"].sel(explainer="ig").values, expected, rtol=1e-6)
        auc = [trapezoid(0.25, curve) for curve in expected]
        np.testing.assert_allclose(ds[f"{name}_auc"].sel(explainer="ig").values, auc, rtol=1e-6)
        assert ds[f"{name}_auc_mean"].sel(explainer="ig").item() == pytest.approx((auc[0] + auc[1]) / 2)
        assert ds[f"{name}_auc_sem"].sel(explainer="ig").item() == pytest.approx(abs(auc[0] - auc[1]) / 2)
    assert ds.deletion_auc_mean.sel(explainer="ig") < ds.deletion_auc_mean.sel(explainer="random")
    assert ds.insertion_auc_mean.sel(explainer="ig") > ds.insertion_auc_mean.sel(explainer="random")
    assert np.isfinite(ds.deletion_auc_sem.sel(explainer="random").item())  # the reference has its own error
    # The ends of the curves are the image and the baseline, whatever the order.
    np.testing.assert_allclose(ds.deletion_probability.isel(fraction=0), ds.insertion_probability.isel(fraction=-1))
    np.testing.assert_allclose(ds.deletion_probability.isel(fraction=-1), 0.5)
    assert ds.explainer.values.tolist() == ["ig", "random"]


def test_no_dim_is_an_xarray_keyword():
    model = linear_model([np.ones(4), np.zeros(4)])
    ds = attributions(model, torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 0]), ("ig", "saliency"), n_steps=2)
    assert {"method", "tolerance", "drop"} <= XARRAY_KEYWORDS
    assert not set(ds.dims) & XARRAY_KEYWORDS and "method" not in ds.variables
    # `class` is Python's keyword, not xarray's: ds.sel(class=0) cannot be written, so it cannot mislead.
    assert set(ds.dims) == {"explainer", "sample", "channel", "y", "x", "fraction", "class"}
    assert ds.deletion_auc_mean.sel(explainer="ig").dims == ()  # before: ds.sel(method="ig") kept every method
    assert ds.attribution.sel(explainer="saliency").dims == ("sample", "y", "x")


def test_the_model_is_left_as_it_came():
    model = models.build("resnet20", num_classes=4).train()
    model.stage1.eval()  # a mixed state must come back as it was
    before = {key: value.clone() for key, value in model.state_dict().items()}
    modes = [module.training for module in model.modules()]
    ds = attributions(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 3]), n_steps=4, batch_size=5,
                      fractions=(0, 0.5, 1), class_names="abcd")
    assert ds.attribution.shape == (4, 2, 32, 32) and np.isfinite(ds.attribution.values).all()
    assert (ds.attribution.sel(explainer=["saliency", "gradcam"]).values >= 0).all()
    assert ds.class_name.values.tolist() == list("abcd") and ds.attrs["gradcam_layer"] == "stage3"
    assert ds.attrs["gradcam_layer_shape"] == "64x8x8" and ds.attrs["insertion_start"] == "the baseline"
    assert all(ds[name].attrs["long_name"] and ds[name].attrs["units"] for name in ds.data_vars)
    assert_no_hooks(model)
    assert all(p.grad is None for p in model.parameters())
    assert [module.training for module in model.modules()] == modes
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


class Tripwire(nn.Module):
    """Fails on its fourth call: after the pass that sizes the feature maps, the logits and the baseline, during
    Grad-CAM's hooked forward pass."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 4:
            raise RuntimeError("tripped")
        return x


def test_hooks_are_removed_when_grad_cam_fails():
    model = nn.Sequential()
    model.stage1, model.tripwire = nn.Conv2d(1, 2, 3), Tripwire()
    model.pool, model.flatten, model.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)
    model.train()
    with pytest.raises(RuntimeError, match="tripped"):
        attributions(model, torch.randn(2, 1, 6, 6), torch.tensor([0, 1]), ("gradcam",))
    assert model.tripwire.calls == 4 and model.training
    assert_no_hooks(model)


def test_bad_options_are_refused():
    model, x, y = linear_model([[1.0] * 3]), torch.ones(1, 1, 1, 3), torch.tensor([0])
    for bad, match in [({"explainers": ("lime",)}, "explainers"), ({"target": "guess"}, "target"),
                       ({"fractions": (0.5, 0.2)}, "increasing"), ({"fractions": (0, 0.5)}, "from 0 to 1")]:
        with pytest.raises(ValueError, match=match):
            attributions(model, x, y, **bad)


def test_command_on_a_plain_and_a_residual_run(tiny_runs, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "diagnostics.attributions", str(tiny_runs["plain20"]),
                             str(tiny_runs["resnet20"]), "--out", str(out), "--n-images", "4", "--steps", "4",
                             "--explainer", "ig", "saliency", "--method", "gradcam", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-3:] == [str(out / f"attributions.{ext}") for ext in ("nc", "png", "pdf")]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "explainer"])
    assert "mean ± standard error over 4 images" in " ".join(lines[:header])  # the legend, wrapped
    assert max(map(len, lines[:header])) <= 100
    assert len(lines) == header + 1 + 2 * 4 + 3 and lines[header + 1].split()[:2] == ["plain20", "ig"]
    ds = xr.open_dataset(out / "attributions.nc")
    scores = [ds[f"{curve}_auc_{statistic}"].sel(model="plain20", explainer="ig").item()
              for curve in ("deletion", "insertion") for statistic in ("mean", "sem")]
    assert lines[header + 1].split()[2:] == [f"{scores[0]:.3f}", "±", f"{scores[1]:.3f}", f"{scores[2]:.3f}", "±",
                                    f"{scores[3]:.3f}"]
    assert ds.model.values.tolist() == ["plain20", "resnet20"]
    assert ds.explainer.values.tolist() == ["ig", "saliency", "gradcam", "random"]
    assert ds.attribution.dims == ("model", "explainer", "sample", "y", "x") and ds.attribution.shape[2:] == (4, 32, 32)
    assert ds.image.dims == ("sample", "channel", "y", "x") and 0 <= ds.image.min() and ds.image.max() <= 1
    assert ds.label.dims == ("sample",) and ds.prediction.dims == ("model", "sample")
    assert ds.deletion_probability.sizes == {"model": 2, "explainer": 4, "sample": 4, "fraction": 21}
    assert ds.insertion_auc_sem.dims == ("model", "explainer") and np.isfinite(ds.insertion_auc_sem).all()
    assert ds.attrs["n_images"] == 4 and ds.attrs["n_steps"] == 4 and ds.attrs["checkpoint"][0].endswith("epoch_002.pt")
    assert list(ds.attrs["gradcam_layer"]) == ["stage3", "stage3"] and "stage3 (64x8x8)" in ds.attrs["definition"]
    assert ds.class_name.values[0] == "stripes-horizontal"
    # By default the prediction is explained: the deletion curve starts at the softmax of the predicted class.
    assert ds.attrs["target"] == "prediction" and (ds.deletion_probability.isel(fraction=0) > 0.25).all()


def test_command_refuses_bad_input_in_one_line(tiny_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny_runs["resnet20"]), "--explainer", "lime", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    code = common.main_guard(lambda: main([str(tiny_runs["resnet20"]), "--epochs", "all",
                                           "--out", str(tmp_path / "out")]))
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert error.startswith("error: resnet20: attributions take one checkpoint per model, not 2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n_models", [1, 4])
def test_the_figure_text_does_not_overlap_with_many_models(n_models):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    one = attributions(model, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), ("ig", "saliency", "gradcam"),
                       n_steps=2, class_names=["a", "b", "c"])
    labels = [f"resnet{20 + 12 * k}" for k in range(n_models)]
    per_model = {key: [one.attrs[key]] * n_models for key in ("gradcam_layer", "gradcam_layer_shape")}
    ds = combine_models([one] * n_models, labels, {**one.attrs, **per_model})
    fig = diagnostics.attributions.figure(ds)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    texts = [text for text in fig.findobj(Text) if text.get_visible() and text.get_text().strip()]
    boxes = [text.get_window_extent(renderer) for text in texts]
    overlapping = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes)) for j in range(i)
                   if boxes[i].overlaps(boxes[j])]
    assert overlapping == []
    assert sum("del " in text.get_text() for text in texts) == 3 * n_models + n_models  # explainers and random
    plt.close("all")
