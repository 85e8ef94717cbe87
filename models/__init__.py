"""Architectures and the registry: `models.build("resnet56", skip=False)`.

This package imports nothing else of the project; every other part imports it.
"""
from importlib import metadata

from . import resnet, vgg  # noqa: F401  (registers the families)
from .registry import ModelError, available, bn_layers, build, canonical, label, register, response_layers

try:
    __version__ = metadata.version("resnet-diagnostics")
except metadata.PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "ModelError", "available", "bn_layers", "build", "canonical", "label", "register",
           "response_layers"]
