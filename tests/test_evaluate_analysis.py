"""The evaluation analysis: BN modes with known answers, and the model left untouched."""
import pytest
import torch
import torch.nn as nn

import models
from analyses.evaluate import evaluate
from conftest import assert_no_hooks


def bn_net() -> nn.Module:
    """conv (identity) -> BN -> pool -> fc: logits are an affine map of the BN output."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.conv = nn.Conv2d(1, 1, 1, bias=False)
    model.bn = nn.BatchNorm2d(1)
    model.pool = nn.AdaptiveAvgPool2d(1)
    model.flatten = nn.Flatten()
    model.fc = nn.Linear(1, 2)
    with torch.no_grad():
        model.conv.weight.fill_(1)
        model.fc.weight.copy_(torch.tensor([[5.0], [-5.0]]))
        model.fc.bias.zero_()
    return model


def test_bn_modes_have_known_answers_and_leave_the_model_untouched():
    model = bn_net()
    # Class 0: images of +1, class 1: images of -1, around a population mean of 10 and std 1.
    x = torch.cat([torch.full((8, 1, 2, 2), 11.0), torch.full((8, 1, 2, 2), 9.0)])
    y = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    batches = [(x, y)]
    with torch.no_grad():  # running statistics that say mean 0, var 1: everything looks like class 0
        model.bn.running_mean.zero_()
        model.bn.running_var.fill_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    as_trained = evaluate(model, batches)
    assert as_trained.accuracy.item() == 0.5 and as_trained.class_accuracy.values.tolist() == [1.0, 0.0]
    batch_stats = evaluate(model, batches, bn_mode="train")
    recalibrated = evaluate(model, batches, bn_mode="recalibrated", recalibration=[x[:8], x[8:]])
    assert batch_stats.accuracy.item() == 1.0 and recalibrated.accuracy.item() == 1.0
    # With batch statistics the BN output is +-1 (up to eps): logits +-5, loss log(1 + e^-10).
    expected = torch.log1p(torch.exp(torch.tensor(-10.0 / (1 + 1e-5) ** 0.5, dtype=torch.float64))).item()
    assert batch_stats.loss.item() == pytest.approx(expected, abs=1e-7)  # float32 logits
    assert recalibrated.attrs["recalibration_images"] == 16 and recalibrated.attrs["bn_mode"] == "recalibrated"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.bn.momentum == 0.1 and model.training
    assert_no_hooks(model)


def test_per_class_counts_and_names():
    model = models.build("resnet20", num_classes=3).eval()
    x, y = torch.randn(9, 3, 32, 32), torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    ds = evaluate(model, [(x[:5], y[:5]), (x[5:], y[5:])], num_classes=4, class_names=["a", "b", "c", "d"])
    assert ds.class_count.values.tolist() == [3, 4, 2, 0] and ds.class_name.values.tolist() == list("abcd")
    assert torch.isnan(torch.tensor(ds.class_accuracy.values[3]))
    assert ds.attrs["n_images"] == 9 and ds.loss.attrs["units"] == "nats"
    assert_no_hooks(model)
