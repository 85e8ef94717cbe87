"""Architectures and the registry: `models.build("resnet56", skip=False)`, `models.build("torchvision:resnet18")`.

This package imports nothing else of the project; every other part imports it.
"""
from importlib import metadata

from . import external, resnet, vgg  # noqa: F401  (registers the families and the other libraries)
from .inputs import check_input
from .registry import (ModelError, available, bn_layers, build, canonical, is_external, label, natural_key,
                       register, response_layers)

try:
    __version__ = metadata.version("resnet-diagnostics")
except metadata.PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "ModelError", "available", "bn_layers", "build", "canonical", "check_input", "is_external",
           "label", "natural_key", "register", "response_layers"]
