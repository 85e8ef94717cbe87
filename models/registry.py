"""One registry from model names to builders, as torchvision's `get_model` and timm's `create_model`.

A checkpoint stores `{"name": ..., "kwargs": ...}`; `build(name, **kwargs)` turns that back into the module.
Names are this package's (`resnet56`, `plain56`, `vgg16`) or another library's, `LIBRARY:NAME`
(`torchvision:resnet18`, `timm:resnet18`: models/external.py), resolved here like ours.
"""
import inspect
import re
from typing import Callable

import torch.nn as nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_LIBRARIES: dict[str, Callable[[str], Callable[..., nn.Module]]] = {}  # "torchvision": NAME -> NAME's builder
_PLAIN_ALIAS = re.compile(r"plain(\d+)$")


class ModelError(ValueError):
    """An unknown model name or an argument the builder does not take: the user's mistake, not a bug."""


def _registers_into(table: dict, kind: str):
    """A decorator factory that files a function in `table` under a name given once: a second is refused."""
    def register(name: str):
        def decorator(function):
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = function
            return function
        return decorator
    return register


register = _registers_into(_BUILDERS, "model")
# `@register_library(LIBRARY)` files `resolve(NAME) -> builder` for the names `LIBRARY:NAME`; `resolve` raises
# ModelError for a name the library does not have.
register_library = _registers_into(_LIBRARIES, "library")


def is_external(name: str) -> bool:
    """Whether `name` is another library's model (`torchvision:resnet18`), whose module names are its own."""
    library, separator, _ = name.partition(":")
    return bool(separator) and library in _LIBRARIES


def _builder(name: str) -> Callable[..., nn.Module]:
    if is_external(name):
        library, _, model = name.partition(":")
        return _LIBRARIES[library](model)
    if name not in _BUILDERS:
        others = ", ".join(f"{library}:NAME" for library in _LIBRARIES)
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(available())} (or {others})")
    return _BUILDERS[name]


def _resolve(name: str, kwargs: dict) -> tuple[str, dict]:
    """Turn the alias `plainNN` into `resnetNN` with `skip=False`."""
    match = _PLAIN_ALIAS.match(name)
    if match and f"resnet{match.group(1)}" in _BUILDERS:
        if kwargs.get("skip", False):
            raise ModelError(f"{name} is the network without skip connections; it cannot take skip=True")
        return f"resnet{match.group(1)}", {**kwargs, "skip": False}
    return name, kwargs


def available() -> list[str]:
    """Every name `build` accepts, the `plainNN` aliases included."""
    aliases = [f"plain{name[len('resnet'):]}" for name in _BUILDERS if re.fullmatch(r"resnet\d+", name)]
    return sorted(list(_BUILDERS) + aliases, key=natural_key)


def natural_key(text: str) -> list:
    """`resnet20` before `resnet110`, `2.ckpt` before `10.ckpt`: the numbers in a name compared as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def canonical(name: str, **kwargs) -> tuple[str, dict]:
    """The registered name and the keyword arguments that build `name`, checked against the builder."""
    name, kwargs = _resolve(name, kwargs)
    accepted = inspect.signature(_builder(name)).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelError(f"{name} does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}")
    for key, value in kwargs.items():
        expected = accepted[key].annotation
        if expected in _PLAIN_TYPES and not _PLAIN_TYPES[expected](value):
            raise ModelError(f"{name}'s argument {key} must be {'an' if expected is int else 'a'} "
                             f"{expected.__name__}, not {str(value)[:40]!r}")
    return name, kwargs


_PLAIN_TYPES = {  # what a builder's annotation admits (a checkpoint's kwargs are plain data)
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def build(name: str, **kwargs) -> nn.Module:
    name, kwargs = canonical(name, **kwargs)
    return _builder(name)(**kwargs)


def label(name: str, kwargs: dict | None = None) -> str:
    """The model's label in datasets and figures: `plain56` / `resnet56` / `vgg16` / `torchvision:resnet18`."""
    name, kwargs = _resolve(name, dict(kwargs or {}))
    if name == "cifar_resnet":
        name = f"resnet{kwargs.get('depth', 20)}"
    plain = name.startswith("resnet") and kwargs.get("skip", True) is False
    return "plain" + name[len("resnet"):] if plain else name


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm layer, in registration (forward) order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def response_layers(model: nn.Module) -> list[str]:
    """The paper's "responses" (Fig. 7): the normalisation layer right after each 3x3 convolution.

    Leaf modules are visited in registration order, which is forward order in this package's models and in
    torchvision's and timm's CNNs. A module counts when it directly follows a 3x3 conv and is a BatchNorm, or,
    in a model without any BatchNorm (ours built with `bn=False`), the Identity that stands in its place. A
    model whose 3x3 convs are followed by something else (no BN, or timm's BatchNormAct2d, whose output is after
    its activation) has none: name the layers to measure instead.
    """
    stand_in = (nn.Identity,) if not bn_layers(model) else ()
    names, previous_is_3x3 = [], False
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        if previous_is_3x3 and isinstance(module, (nn.modules.batchnorm._BatchNorm, *stand_in)):
            names.append(name)
        previous_is_3x3 = isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)
    return names
