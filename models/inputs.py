"""What images a model can take: `check_input(name, kwargs, channels, side)` runs one training-mode forward pass
on two blank side x side images, so that a model that cannot take them (a ViT made for 224x224, Inception's
kernels larger than its maps, VGG's fifth pool on a 1x1 map) is one ModelError before any work, naming the
smallest side it takes, and not a traceback at the first training step.

Our own models are built on the CPU: they are small, and a CPU forward pass costs milliseconds where the meta
device's first use costs seconds. Other libraries' models may have hundreds of millions of parameters, so they
are built on the meta device, which makes no weights and does no arithmetic but checks every shape (on the CPU
after all where an operation has no meta implementation).
"""
import warnings
from functools import lru_cache

import torch

from .registry import ModelError, _builder, canonical, is_external, label

MAX_SIDE = 4096  # train.datasets.MAX_IMAGE_SIZE: no image is larger
SIDES = tuple(2**k for k in range(13))  # 1 .. MAX_SIDE: where the search for the smallest side starts


def check_input(name: str, kwargs: dict, channels: int, side: int) -> None:
    """Refuse, in one line, a model `name(**kwargs, in_channels=channels)` that cannot take side x side images."""
    name, kwargs = canonical(name, **{**kwargs, "in_channels": channels})
    failure = _failure(name, tuple(sorted(kwargs.items())), side)
    if failure is None:
        return
    model = label(name, kwargs)
    smallest = _smallest_side(name, kwargs)
    if smallest is None:
        raise ModelError(f"{model} cannot take {side}x{side} images ({failure}); give it images of the size it "
                         "was made for (--dataset folder:PATH --image-size N), or choose another model")
    raise ModelError(f"{model} cannot take {side}x{side} images; the smallest it takes is {smallest}x{smallest}: "
                     f"give it such images (--dataset folder:PATH --image-size {smallest}), or choose another model")


@lru_cache(maxsize=256)
def _failure(name: str, kwargs: tuple, side: int) -> str | None:
    """What goes wrong when the model takes side x side images, in a few words; None when nothing does. Cached:
    a command may ask once per checkpoint of the same model."""
    kwargs = dict(kwargs)
    try:
        return _forward_failure(_built(name, kwargs, _device(name)), kwargs["in_channels"], side)
    except _MetaLimit:
        return _forward_failure(_built(name, kwargs, "cpu"), kwargs["in_channels"], side)


class _MetaLimit(Exception):
    """An operation the meta device cannot run (no meta kernel, or a value read off a tensor)."""


def _device(name: str) -> str:
    return "meta" if is_external(name) else "cpu"  # see the module's docstring


def _built(name: str, kwargs: dict, device: str) -> torch.nn.Module:
    # The caller's random state stays as it was; a library's warnings about its defaults (torchvision's Inception
    # warns of a future initialisation) are the real build's to give, not this throwaway's: a refusal is one line.
    with torch.random.fork_rng(devices=[]), torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _builder(name)(**kwargs).train()  # training mode: Inception's auxiliary head needs larger maps


def _forward_failure(model: torch.nn.Module, channels: int, side: int) -> str | None:
    device = next(model.parameters()).device
    # Two images: BN in training mode needs more than one value per channel, and a 1x1 map of one image is one.
    try:
        with torch.no_grad():
            model(torch.zeros(2, channels, side, side, device=device))
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError, NotImplementedError) as exc:
        if device.type == "meta" and (isinstance(exc, NotImplementedError) or "meta" in str(exc).lower()):
            raise _MetaLimit from exc
        return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return None


def _smallest_side(name: str, kwargs: dict) -> int | None:
    """The smallest side the model takes: the first of SIDES (and of the sides its library says it was made for)
    that works, then bisection below it, taking the sides it refuses to be those below a minimum (a ViT, which
    takes its own side only, declares it). None where no side up to MAX_SIDE works, or the meta device cannot
    tell (searching on the CPU could build and run a large model at 4096x4096)."""
    model, channels = _built(name, kwargs, _device(name)), kwargs["in_channels"]
    try:
        below = 0  # the largest side tried that it does not take
        for side in sorted({*SIDES, *getattr(_builder(name), "sides", ())}):
            if _forward_failure(model, channels, side) is None:
                break
            below = side
        else:
            return None
        while side - below > 1:
            middle = (below + side) // 2
            if _forward_failure(model, channels, middle) is None:
                side = middle
            else:
                below = middle
        return side
    except _MetaLimit:
        return None
