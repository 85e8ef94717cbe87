"""Models: exact parameter counts of the papers, names, the registry, and that hooks see every layer once."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M parameters, as rounded there.
@pytest.mark.parametrize("depth, count, paper", [(20, 269_722, "0.27"), (32, 464_154, "0.46"), (44, 658_586, "0.66"),
                                                 (56, 853_018, "0.85"), (110, 1_727_962, "1.7"),
                                                 (1202, 19_421_274, "19.4")])
def test_cifar_resnet_option_a_parameter_counts(depth, count, paper):
    assert n_params(models.build(f"resnet{depth}")) == count
    assert f"{count / 1e6:.{len(paper.split('.')[1])}f}" == paper
    assert n_params(models.build(f"plain{depth}")) == count  # option A adds no parameters


def test_imagenet_style_and_vgg_parameter_counts():
    assert n_params(models.build("vgg16", head="fc4096", num_classes=3)) == 33_617_987
    assert n_params(models.build("resnet50", num_classes=3)) == 23_506_499  # bias-free projections
    # torchvision's ResNet-18 has 11,689,512 with a 7x7 stem and 1000 classes: 3x3 stem and 10 classes here.
    assert n_params(models.build("resnet18")) == 11_689_512 - 64 * 3 * (49 - 9) - 512 * 990 - 990


def test_projection_bias_matches_the_published_resnet50_count():
    # Ablations quote ResNet-50 for 3 classes at 23,510,339 parameters: ours plus a bias on each of the four
    # projection convs (256 + 512 + 1024 + 2048 = 3,840); nothing else differs.
    biased = models.build("resnet50", num_classes=3, projection_bias=True)
    assert n_params(biased) == 23_510_339 == 23_506_499 + 256 + 512 + 1024 + 2048
    biases = {name: module.bias.numel() for name, module in biased.named_modules()
              if isinstance(module, nn.Conv2d) and module.bias is not None}
    assert biases == {f"stage{s}.block1.shortcut.conv": c for s, c in zip((1, 2, 3, 4), (256, 512, 1024, 2048))}
    for name in ("resnet18", "resnet34"):  # basic blocks: projections where stages 2-4 begin
        assert n_params(models.build(name, projection_bias=True)) == n_params(models.build(name)) + 128 + 256 + 512
    assert (n_params(models.build("resnet101", projection_bias=True))
            == n_params(models.build("resnet101")) + 256 + 512 + 1024 + 2048)
    # CIFAR ResNets: option B's two projections (32, 64 channels), option C's nine (3 x 16, 3 x 32, 3 x 64).
    assert n_params(models.build("resnet20", shortcut="B", projection_bias=True)) == 272_474 + 32 + 64
    assert (n_params(models.build("cifar_resnet", depth=20, shortcut="C", projection_bias=True))
            == n_params(models.build("resnet20", shortcut="C")) + 3 * (16 + 32 + 64))
    assert n_params(models.build("plain50", num_classes=3, projection_bias=True)) == n_params(
        models.build("plain50", num_classes=3))  # no shortcut, no projection: nothing to bias
    with pytest.raises(models.ModelError, match="option A has none"):
        models.build("resnet20", projection_bias=True)


def test_projection_bias_from_the_training_command_line():
    from train import config as cfg
    args = ["--model", "resnet50", "--dataset", "mini-cifar10", "--out", "x", "--projection-bias"]
    config = cfg.from_args(cfg.parser().parse_args(args))
    assert config.projection_bias and config.model_kwargs(3, 3)["projection_bias"] is True
    assert n_params(models.build(config.model, **config.model_kwargs(3, 3))) == 23_510_339
    default = cfg.from_args(cfg.parser().parse_args(args[:-1]))
    assert not default.projection_bias and "projection_bias" not in default.model_kwargs(3, 3)


def test_shortcut_options_b_and_c_add_projections():
    a, b, c = (models.build("resnet20", shortcut=s) for s in "ABC")
    # B: two projections (16->32, 32->64); C: one in every one of the 9 blocks.
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    projections_c = sum(1 for name, _ in c.named_modules() if name.endswith("shortcut.conv"))
    assert projections_c == 9
    plain_b = models.build("resnet20", shortcut="B", skip=False)
    assert n_params(plain_b) == n_params(a)  # skip=False removes projections too
    assert not any("shortcut" in name for name, _ in plain_b.named_modules())


def test_option_a_pads_channels_equally_as_akamaster():
    block = models.build("resnet20").stage2.block1
    x = torch.randn(2, 16, 32, 32)
    planes = 32
    expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)
    assert torch.equal(block.shortcut(x), expected)


def test_layer_names_follow_the_contract():
    names = dict(models.build("resnet56").named_modules())
    for name in ["stem.conv", "stem.bn", "stage1.block1.conv1", "stage1.block1.bn2", "stage3.block9.bn2", "fc"]:
        assert name in names
    names_b = dict(models.build("resnet50").named_modules())
    assert {"stage1.block1.shortcut.conv", "stage1.block1.shortcut.bn", "stage4.block3.conv3"} <= set(names_b)
    names_vgg = dict(models.build("vgg16", head="fc4096").named_modules())
    assert {"stage1.conv1", "stage1.bn1", "stage5.conv3", "stage5.bn3", "fc1", "fc2", "fc"} <= set(names_vgg)


def forward_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    order, handles = [], []
    for name, module in model.named_modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return order


def test_response_layers_of_resnet56_are_the_55_bns_after_3x3_convs_in_forward_order():
    model = models.build("resnet56").eval()
    layers = models.response_layers(model)
    assert len(layers) == 55
    assert layers[0] == "stem.bn" and layers[-1] == "stage3.block9.bn2"
    fired = [name for name in forward_order(model, torch.randn(1, 3, 32, 32)) if name in layers]
    assert fired == layers


def test_response_layers_of_other_families():
    assert len(models.response_layers(models.build("resnet50"))) == 1 + 16  # stem + one 3x3 per bottleneck
    assert len(models.response_layers(models.build("vgg16"))) == 13
    no_bn = models.build("resnet20", bn=False)
    assert models.response_layers(no_bn) == models.response_layers(models.build("resnet20"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())


@pytest.mark.parametrize("name", [n for n in models.available() if n not in ("resnet1202", "plain1202")])
def test_registry_sweep(name):
    """Every registered name builds, gives finite logits of the right shape, and trains every parameter.
    Every module runs at most once per forward (no shared ReLU), and nothing is in-place."""
    torch.manual_seed(0)
    model = models.build(name, num_classes=7, in_channels=1)
    x = torch.randn(2, 1, 32, 32)
    counts = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
               for n, m in model.named_modules() if n]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert max(counts.values()) == 1
    assert torch.allclose(model.forward_head(model.forward_features(x)), logits)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_plain_alias_and_labels():
    assert "plain56" in models.available()
    plain = models.build("plain56")
    assert not any("shortcut" in name for name, _ in plain.named_modules())
    assert models.canonical("plain56") == ("resnet56", {"skip": False})
    assert models.label("resnet56", {"skip": False}) == "plain56"
    assert models.label("resnet18", {}) == "resnet18" and models.label("vgg16", {"bn": False}) == "vgg16"
    assert models.label("cifar_resnet", {"depth": 26, "skip": False}) == "plain26"
    with pytest.raises(models.ModelError):
        models.build("plain56", skip=True)


def test_cifar_resnet_by_depth():
    assert n_params(models.build("cifar_resnet", depth=20)) == 269_722
    with pytest.raises(models.ModelError, match="6n\\+2"):
        models.build("cifar_resnet", depth=21)


def test_registry_refuses_duplicates_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="already registered"):
        models.register("resnet20")(lambda: None)
    with pytest.raises(models.ModelError, match="unknown model 'resnet57'"):
        models.build("resnet57")
    with pytest.raises(models.ModelError, match="vgg16 does not take skip"):
        models.build("vgg16", skip=False)
    with pytest.raises(models.ModelError, match="shortcut"):
        models.build("resnet20", shortcut="D")


def test_zero_init_residual_and_he_init():
    model = models.build("resnet18", zero_init_residual=True)
    assert torch.all(model.stage1.block1.bn2.weight == 0) and torch.all(model.stage1.block1.bn1.weight == 1)
    torch.manual_seed(0)
    conv = models.build("resnet56").stage3.block5.conv1  # 64 -> 64, fan-in 576
    assert conv.weight.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.03)


def test_no_bn_networks_have_conv_biases_instead():
    model = models.build("resnet20", bn=False)
    assert model.stem.conv.bias is not None and isinstance(model.stem.bn, nn.Identity)
    assert models.build("resnet20").stem.conv.bias is None


def test_zero_init_residual_needs_skip_connections():
    with pytest.raises(models.ModelError, match="without skip connections"):
        models.build("plain20", zero_init_residual=True)


def test_check_input_is_cheap_for_our_models_and_leaves_the_random_state():
    """The trainer checks the model before any work: milliseconds for a CIFAR ResNet, every side from 1 taken
    (a 1x1 map of two images is a BN batch), and the global random numbers untouched (the check builds a model)."""
    import time
    state = torch.get_rng_state()
    started = time.perf_counter()
    for side in (1, 2, 32):
        models.check_input("plain20", {"num_classes": 10}, 3, side)
    assert time.perf_counter() - started < 1.0
    assert torch.equal(torch.get_rng_state(), state)


def test_check_input_names_the_smallest_side():
    with pytest.raises(models.ModelError, match=r"vgg11 cannot take 31x31 images; the smallest it takes is 32x32"):
        models.check_input("vgg11", {}, 1, 31)
