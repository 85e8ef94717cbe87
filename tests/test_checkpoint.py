"""Checkpoints: safe loading, rebuilding from the file alone, atomic writes, foreign layouts."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from train import checkpoint as ckpt
from train import rundir
from train.errors import UserError


def test_epoch_checkpoint_rebuilds_its_model_from_the_file_alone(tiny_runs):
    path = tiny_runs["resnet20"] / "epoch_001.pt"
    state = torch.load(path, weights_only=True)
    assert state["format"] == "resnet-diagnostics/1"
    assert set(state) >= {"model", "state_dict", "dataset", "config", "epoch", "step", "history", "provenance"}
    assert "optimizer" not in state  # only last.pt is resumable
    model = models.build(state["model"]["name"], **state["model"]["kwargs"])
    model.load_state_dict(state["state_dict"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["state_dict"])
    assert state["config"]["bn_momentum"] == 0.1 and state["config"]["world_size"] == 1
    assert set(state["provenance"]["software"]) == {"resnet-diagnostics", "torch", "torchvision"}
    loaded = ckpt.load(path)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded.model(x), model.eval()(x)) and loaded.label == "resnet20" and loaded.epoch == 1
    assert ckpt.load(tiny_runs["plain20"] / "epoch_002.pt").label == "plain20"


def test_run_checkpoints_in_numeric_order(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for epoch in (10, 2, 1):
        (tmp_path / f"epoch_{epoch:03d}.pt").write_bytes(b"")
    assert [p.name for p in rundir.run_checkpoints(tmp_path)] == ["epoch_001.pt", "epoch_002.pt", "epoch_010.pt"]


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "last.pt"
    ckpt.save({"a": torch.ones(2)}, target)
    with pytest.raises(KeyboardInterrupt):
        with ckpt.atomic_path(target) as temporary:
            temporary.write_bytes(b"half a chec")
            raise KeyboardInterrupt
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --- akamaster/pytorch_resnet_cifar10, re-implemented from its description to produce a file in its layout ---

class AkamasterBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = stride != 1 or in_planes != planes
        self.planes = planes

    def shortcut(self, x):
        if not self.pad:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.planes // 4, self.planes // 4), "constant", 0)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class AkamasterResNet(nn.Module):
    def __init__(self, n, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in, layers = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(n):
                blocks.append(AkamasterBlock(planes_in, planes, stride if b == 0 else 1))
                planes_in = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.avg_pool2d(out, out.size()[3]).flatten(1))


def randomise_bn(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)


def test_akamaster_checkpoint_gives_their_logits(tmp_path):
    theirs = AkamasterResNet(n=3)
    randomise_bn(theirs)
    theirs.eval()
    state = OrderedDict(("module." + k, v) for k, v in theirs.state_dict().items()
                        if not k.endswith("num_batches_tracked"))  # saved from DataParallel, old PyTorch
    path = tmp_path / "resnet20-12fca82f.th"
    torch.save({"state_dict": state, "best_prec1": 91.73}, path)
    with pytest.raises(UserError, match="--model NAME"):
        ckpt.load(path)
    loaded = ckpt.load(path, model_name="resnet20", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = torch.randn(8, 3, 32, 32)
    assert torch.allclose(loaded.model(x), theirs(x), atol=1e-5)
    assert loaded.spec.name == "cifar10" and loaded.spec.mean == (0.485, 0.456, 0.406)
    with pytest.raises(UserError, match="resnet56"):
        ckpt.load(path, model_name="resnet56")  # 9 blocks a stage expected, 3 in the file


def test_torchvision_resnet_keys_are_mapped_and_shape_mismatch_is_named(tmp_path):
    import torchvision
    path = tmp_path / "tv.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with pytest.raises(UserError, match=r"stem.conv.weight is \(64, 3, 7, 7\) in the file but \(64, 3, 3, 3\)"):
        ckpt.load(path, model_name="resnet18")
    ours = models.build("resnet18")
    tv_layout = {}
    for key, value in ours.state_dict().items():
        key = key.replace("stem.conv", "conv1").replace("stem.bn", "bn1").replace("shortcut.conv", "downsample.0")
        key = key.replace("shortcut.bn", "downsample.1")
        for s in range(1, 5):
            for b in range(1, 3):
                key = key.replace(f"stage{s}.block{b}.", f"layer{s}.{b - 1}.")
        tv_layout[key] = value
    torch.save(tv_layout, path)
    assert ckpt.load(path, model_name="resnet18").label == "resnet18"


def test_bare_state_dict_of_our_model_with_compile_prefix(tmp_path):
    model = models.build("plain20", num_classes=3)
    path = tmp_path / "bare.pt"
    torch.save({"_orig_mod." + k: v for k, v in model.state_dict().items()}, path)
    loaded = ckpt.load(path, model_name="plain20")
    assert loaded.spec.name == "mini-cifar10" and loaded.kwargs["num_classes"] == 3
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.model(x), model.eval()(x))


def test_own_checkpoints_refuse_contradicting_options(tiny_runs):
    path = tiny_runs["resnet20"] / "epoch_001.pt"
    with pytest.raises(UserError, match="is a resnet20 checkpoint; drop --model plain20"):
        ckpt.load(path, model_name="plain20")
    with pytest.raises(UserError, match="drop --mean/--std"):
        ckpt.load(path, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert ckpt.load(path, model_name="resnet20").label == "resnet20"


def test_a_damaged_own_checkpoint_is_bad_input(tiny_runs, tmp_path):
    state = torch.load(tiny_runs["resnet20"] / "epoch_001.pt", weights_only=True)
    del state["dataset"]
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(UserError, match="damaged"):
        ckpt.load(tmp_path / "damaged.pt")


def test_random_bytes_are_never_a_traceback(tmp_path):
    # Garbage read as a legacy pickle fails in many ways (UnpicklingError, IndexError, UnicodeDecodeError, ...);
    # among these 300 seeded files are each of them.
    rng = np.random.default_rng(1)
    path = tmp_path / "random.pt"
    for _ in range(300):
        path.write_bytes(rng.bytes(int(rng.integers(1, 4096))))
        with pytest.raises(UserError, match="PyTorch checkpoint"):
            ckpt.read(path)


def test_a_foreign_file_with_biased_projections_builds_them(tmp_path):
    theirs = models.build("resnet18", num_classes=10, projection_bias=True)
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    loaded = ckpt.load(tmp_path / "theirs.pt", model_name="resnet18", dataset="cifar10")
    assert loaded.kwargs["projection_bias"] is True
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.model(x), theirs.eval()(x))
