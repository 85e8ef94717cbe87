"""Other people's models, built the way their own libraries build them: `torchvision:NAME` and `timm:NAME`.

`torchvision.models.get_model(NAME, weights=None, num_classes=...)` and `timm.create_model(NAME,
pretrained=False, num_classes=..., in_chans=...)`: no weights are downloaded, and no module is wrapped, replaced
or renamed, so a layer's name in every dataset is the model's own module name (`layer1.0.bn1`,
`features.3.block.0.1`). Each library is imported only when one of its names is used; timm is optional
(`pip install resnet-diagnostics[timm]`).

The builders take what a checkpoint needs to rebuild the model and nothing more (a `weights` argument stored in
a file could make loading it download): `num_classes` and `in_channels`. torchvision's classification models
are built for 3-channel (RGB) images and cannot take another number of channels; timm's take `in_chans`.
"""
from typing import Callable

import torch.nn as nn

from .registry import ModelError, register_library


@register_library("torchvision")
def torchvision_builder(model: str) -> Callable[..., nn.Module]:
    import torchvision
    if model not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"torchvision has no classification model {model!r}; see "
                         "torchvision.models.list_models(module=torchvision.models)")

    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        if in_channels != 3:
            raise ModelError(f"torchvision:{model} is built for 3-channel (RGB) images, not {in_channels}; use an "
                             "RGB dataset, or a timm model (timm:NAME takes any number of input channels)")
        return torchvision.models.get_model(model, weights=None, num_classes=num_classes)
    build.__doc__ = f"torchvision.models.get_model({model!r}, weights=None, num_classes=num_classes)"
    # The smallest images its published weights take, which its architecture needs too (ViT's 224, Inception's 75):
    # where models.check_input looks for the side to suggest.
    build.sides = {weights.meta["min_size"][0] for weights in torchvision.models.get_model_weights(model)}
    return build


@register_library("timm")
def timm_builder(model: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise ModelError(f"timm:{model} needs timm, which is not installed: pip install "
                         "'resnet-diagnostics[timm]' (or pip install timm)") from None
    if not timm.is_model(model):
        raise ModelError(f"timm has no model {model!r}; see timm.list_models()")

    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    build.__doc__ = f"timm.create_model({model!r}, pretrained=False, num_classes=num_classes, in_chans=in_channels)"
    # The side it was made for (a ViT takes no other): where models.check_input looks for the side to suggest.
    build.sides = {timm.get_pretrained_cfg(model).input_size[-1]}
    return build
