"""Gradient norms per depth: a hand-computed linear network, the scale-invariant measure against a rescaled weight,
plain vs residual at init, the model left as it came, the figure's quantity, and the command."""
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import xarray as xr

import models
from analyses.common import attrs, combine, forward_hooks
from analyses.gradients import gradient_norms, weight_layers
from conftest import assert_no_hooks
from diagnostics import common
from diagnostics.gradients import figure, main

ROOT = Path(__file__).resolve().parents[1]


def linear_net(weight) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(weight))
    return model


def no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


def firing_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    names = [name for name, _ in weight_layers(model)]
    fired = []
    with forward_hooks(model, {name: (lambda *_, name=name: fired.append(name)) for name in names}), torch.no_grad():
        model(x)
    return fired


def test_known_answer_of_a_linear_network():
    # W = [[1, 1, 0], [0, 1, 1]] gives equal logits for these images, so softmax = (1/2, 1/2) and the gradient
    # of the mean cross-entropy, (softmax(z) - onehot(y))^T x / N, is exact:
    # batch A: x = (1,0,1) label 0 and (0,2,0) label 1 -> [[-1/4, 1/2, -1/4], [1/4, -1/2, 1/4]], norm sqrt(3/4);
    # batch B: x = (3,0,3) label 1 -> [[3/2, 0, 3/2], [-3/2, 0, -3/2]], norm 3.
    model = linear_net([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    model[1].weight.requires_grad_(False)  # a frozen model: measured all the same, and left frozen
    batches = [(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 1])),
               (torch.tensor([[3.0, 0.0, 3.0]]), torch.tensor([1]))]
    ds = gradient_norms(model, batches)
    a, b = math.sqrt(0.75), 3.0
    np.testing.assert_allclose(ds.grad_norm.values, [[a, b]], rtol=1e-6)
    assert ds.grad_norm_mean.item() == pytest.approx((a + b) / 2, rel=1e-6)
    assert ds.grad_norm_std.item() == pytest.approx((b - a) / 2, rel=1e-6)  # population std of two values
    assert ds.weight_norm.item() == 2.0 and ds.loss.values == pytest.approx([math.log(2)] * 2, rel=1e-6)
    np.testing.assert_allclose(ds.scaled_grad_norm.values, [[2 * a, 2 * b]], rtol=1e-6)  # times ||W|| = 2
    assert ds.scaled_grad_norm_mean.item() == pytest.approx(a + b, rel=1e-6)
    assert ds.scaled_grad_norm_std.item() == pytest.approx(b - a, rel=1e-6)
    assert ds.layer.values.tolist() == ["1"] and ds.kind.values.tolist() == ["fc"] and ds.n_weights.item() == 6
    assert ds.batch_images.values.tolist() == [2, 1]
    assert (ds.attrs["batch_size"], ds.attrs["n_images"], ds.attrs["n_batches"], ds.attrs["bn_mode"]) == (2, 3, 2,
                                                                                                          "train")
    assert ds.grad_norm.attrs["units"] == "nats" and ds.grad_norm_mean.attrs["long_name"]
    assert not model[1].weight.requires_grad and model[1].weight.grad is None and no_hooks(model)
    first = gradient_norms(model, batches, n_batches=1)
    assert first.sizes["batch"] == 1 and first.grad_norm_std.item() == 0.0


def test_matches_the_closed_form_for_random_weights():
    torch.manual_seed(1)
    weight = torch.randn(4, 6, dtype=torch.float64)
    x, y = torch.randn(5, 2, 3, dtype=torch.float64), torch.tensor([0, 3, 1, 3, 2])
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(weight)
    flat = x.flatten(1)
    expected = (F.softmax(flat @ weight.T, dim=1) - F.one_hot(y, 4)).T @ flat / len(y)
    ds = gradient_norms(model, [(x, y)])
    assert ds.grad_norm.item() == pytest.approx(torch.linalg.norm(expected).item(), rel=1e-6)


def test_rescaling_a_weight_that_bn_follows_changes_the_raw_norm_and_not_the_scaled_one():
    # conv1 of the first block feeds bn1, which normalises by the batch's statistics: the loss is the same for
    # 4 W as for W, so the gradient at 4 W is a quarter of it and ||dL/dW|| * ||W|| does not move. BN's eps would
    # break the identity by eps / var, so that BN gets an eps (torch wants one) too small to matter in float64;
    # float64 makes the rest exact to rounding.
    torch.manual_seed(0)
    model = models.build("resnet20").double()
    model.stage1.block1.bn1.eps = 1e-30
    batches = [(torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.arange(6) % 10)]
    before = gradient_norms(model, batches)
    with torch.no_grad():
        model.stage1.block1.conv1.weight.mul_(4)
    after = gradient_norms(model, batches)
    conv = before.layer.values.tolist().index("stage1.block1.conv1")
    ratio = after.grad_norm_mean.values / before.grad_norm_mean.values
    assert ratio[conv] == pytest.approx(0.25, rel=1e-10)
    assert np.delete(ratio, conv) == pytest.approx(np.ones(len(ratio) - 1), rel=1e-10)  # nothing else moved
    np.testing.assert_allclose(after.scaled_grad_norm_mean.values, before.scaled_grad_norm_mean.values, rtol=1e-10)
    assert after.loss.item() == pytest.approx(before.loss.item(), rel=1e-12)
    assert_no_hooks(model)


@pytest.mark.parametrize("name, kwargs, convs_1x1", [("resnet20", {}, 0), ("plain20", {}, 0),
                                                     ("resnet20", {"shortcut": "B"}, 2)])
def test_at_init_every_weight_in_forward_order_and_the_model_untouched(name, kwargs, convs_1x1):
    model = models.build(name, **kwargs)
    model.fc.weight.requires_grad_(False)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    before = {key: value.clone() for key, value in model.state_dict().items()}
    ds = gradient_norms(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # BN running statistics included
    assert ds.sizes == {"depth": 20 + convs_1x1, "batch": 2}
    assert ds.kind.values.tolist().count("conv3x3") == 19 and ds.kind.values.tolist().count("conv1x1") == convs_1x1
    assert ds.layer.values[-1] == "fc" and ds.layer.values.tolist() == firing_order(model, x)
    assert np.all(np.isfinite(ds.grad_norm.values)) and np.all(ds.grad_norm.values > 0)
    assert model.training and all(bn.momentum == 0.1 for _, bn in models.bn_layers(model))
    assert [p.requires_grad for p in model.parameters()].count(False) == 1
    assert all(p.grad is None for p in model.parameters()) and no_hooks(model)


def test_bn_modes_differ_at_init_and_a_torchvision_model_works():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.arange(2)
    train, eval_ = (gradient_norms(model, [(x, y)], bn_mode=mode) for mode in ("train", "eval"))
    # 7x7 stem, 16 3x3 convs, 3 downsample projections, fc; a projection runs after its block's convs.
    assert train.sizes["depth"] == 21 and train.kind.values.tolist().count("conv1x1") == 3
    assert train.kind.values[0] == "conv7x7" and train.layer.values.tolist() == firing_order(model, x)
    assert eval_.attrs["bn_mode"] == "eval" and not np.allclose(train.grad_norm.values, eval_.grad_norm.values)
    assert not model.training and no_hooks(model)


def test_the_model_is_restored_when_the_batches_fail():
    model = models.build("resnet20")

    def batches():
        yield torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
        raise RuntimeError("the data loader broke")

    with pytest.raises(RuntimeError, match="broke"):
        gradient_norms(model, batches())
    with pytest.raises(ValueError, match="labels"):
        gradient_norms(model, [torch.randn(2, 3, 32, 32)])
    assert model.training and all(bn.momentum == 0.1 for _, bn in models.bn_layers(model))
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and no_hooks(model)


def plotted(fig) -> list[float]:
    return [float(y) for line in fig.axes[0].lines for y in line.get_ydata()]


def test_the_figure_shows_the_scaled_norm_unless_raw_is_asked_for():
    batch = [(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 1]))]
    early, late = (gradient_norms(linear_net(weight), batch) for weight in ([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]],
                                                                           [[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    one = combine([late], ["resnet20"], [3], attrs("test"))
    assert plotted(figure(one, {})) == pytest.approx(one.scaled_grad_norm_mean.values.ravel().tolist())
    assert plotted(figure(one, {}, "raw")) == pytest.approx(one.grad_norm_mean.values.ravel().tolist())
    assert figure(one, {}).axes[0].get_ylabel() != figure(one, {}, "raw").axes[0].get_ylabel()
    epochs = combine([early, late], ["resnet20"] * 2, [1, 2], attrs("test"))  # one model: the heat map
    for quantity, name in (("scaled", "scaled_grad_norm_mean"), ("raw", "grad_norm_mean")):
        shown = figure(epochs, {}, quantity).axes[0].collections[0].get_array()  # (depth, epoch)
        np.testing.assert_allclose(np.asarray(shown), epochs[name].values[0].T)
    plt.close("all")


def test_untrained_models_get_their_own_panel_in_their_twins_colours():
    batch = [(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 1]))]
    norms = [gradient_norms(linear_net(weight), batch) for weight in (
        [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], [[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]], [[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])]
    ds = combine(norms, ["plain20", "resnet20", "resnet20-init"], [5, 5, 0], attrs("test"))
    fig = figure(ds, {})
    untrained, trained = fig.axes
    assert (untrained.get_title(), trained.get_title()) == ("at initialisation (untrained)", "trained (epoch 5)")
    assert [line.get_label() for line in untrained.lines] == ["resnet20"]
    assert [line.get_label() for line in trained.lines] == ["plain20", "resnet20"]
    assert untrained.lines[0].get_color() == trained.lines[1].get_color()  # one colour per model
    assert trained.lines[0].get_linestyle() == "--" and trained.lines[1].get_linestyle() == "-"
    assert untrained.lines[0].get_ydata().tolist() == pytest.approx(
        ds.scaled_grad_norm_mean.sel(model="resnet20-init", epoch=0).values.tolist())
    assert trained.lines[0].get_ydata().tolist() == pytest.approx(
        ds.scaled_grad_norm_mean.sel(model="plain20", epoch=5).values.tolist())
    plt.close("all")


def test_command_on_two_runs_and_a_model_at_init(tiny_runs, tmp_path):
    out = tmp_path / "out"
    argv = [str(tiny_runs["plain20"]), str(tiny_runs["resnet20"]), "--init", "resnet20", "--out", str(out),
            "--epochs", "last", "--batches", "2", "--batch-size", "16"]
    result = subprocess.run([sys.executable, "-m", "diagnostics.gradients", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out / f"gradients.{ext}") for ext in ("nc", "png", "pdf")]
    ds = xr.open_dataset(out / "gradients.nc")
    assert ds.model.values.tolist() == ["plain20", "resnet20", "resnet20-init"]
    assert ds.epoch.values.tolist() == [0, 2] and ds.sizes["depth"] == 20 and ds.sizes["batch"] == 2
    assert np.isnan(ds.grad_norm_mean.sel(model="resnet20", epoch=0)).all()
    assert np.isfinite(ds.grad_norm_mean.sel(model="resnet20-init", epoch=0)).all()
    np.testing.assert_allclose(ds.scaled_grad_norm_mean.values, ds.grad_norm_mean.values * ds.weight_norm.values)
    assert (ds.attrs["batch_size"], ds.attrs["n_images"], ds.attrs["bn_mode"]) == (16, 32, "train")
    assert len(ds.attrs["checkpoint"]) == 3 and ds.attrs["checkpoint"][-1] == "untrained resnet20-init, seed 0"
    for key in ("definition", "dataset", "split", "software", "created"):
        assert ds.attrs[key]


def test_a_single_run_is_a_heat_map_and_init_alone_needs_a_dataset(tiny_runs, tmp_path, capsys):
    main([str(tiny_runs["resnet20"]), "--out", str(tmp_path / "run"), "--batches", "1", "--batch-size", "8",
          "--bn", "eval", "--quantity", "raw"])
    ds = xr.open_dataset(tmp_path / "run" / "gradients.nc")
    assert ds.attrs["bn_mode"] == "eval" and len(figure(ds, {}).axes) == 2  # the heat map and its colour bar
    main(["--init", "plain20", "--dataset", "synthetic", "--out", str(tmp_path / "init"), "--batches", "1",
          "--batch-size", "8", "--n-images", "4"])
    ds = xr.open_dataset(tmp_path / "init" / "gradients.nc")
    assert ds.model.values.tolist() == ["plain20"] and ds.attrs["n_images"] == 4 and len(figure(ds, {}).axes) == 1
    capsys.readouterr()
    for argv, message in ((["--init", "plain20"], "--init needs --dataset"), ([], "give checkpoints"),
                          (["--init", "plain21", "--dataset", "synthetic"], "unknown model"),
                          (["--init", "plain20", "--init", "plain20", "--dataset", "synthetic"], "more than once")):
        assert common.main_guard(lambda: main([*argv, "--out", str(tmp_path / "bad")])) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse's exit: one line, code 2
        main(["--init", "plain20", "--dataset", "synthetic", "--quantity", "relative", "--out", str(tmp_path / "bad")])
    assert usage.value.code == 2 and "invalid choice: 'relative'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
