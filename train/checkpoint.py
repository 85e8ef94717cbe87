"""Checkpoints (docs/design.md §2): save atomically, load safely, rebuild the model.

A checkpoint holds only what `torch.load(path, weights_only=True)` reads: tensors, dicts, lists, strings,
numbers, bools and None. Nothing in a file can run code when we load it. Files other projects wrote (a bare
`state_dict`, akamaster's CIFAR ResNets, torchvision's ResNets) are accepted with an explicit model name; for
our architectures their keys are mapped onto ours here, once, before the model sees them. Another library's
model (`torchvision:resnet18`, `timm:resnet18`) keeps its own names: only wrapper prefixes are removed.
"""
import errno
import fcntl
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

import models

from . import schema
from .config import config_from_dict
from .datasets import DatasetSpec, check_image_size, dataset_name, get_spec, is_folder
from .errors import DiskFull, UserError, first_line

FORMAT = "resnet-diagnostics/1"
FORMAT_VERSION = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temporary_prefix(path: Path) -> str:
    """How a temporary for `path` begins: `.NAME.PID-` (then random letters and `.tmp`). The pid makes the name
    unique to this process and says whose it is: `train.rundir.remove_stale_temporaries` removes only those of
    a process that is gone, never a live writer's beside it."""
    return f".{path.name}.{os.getpid()}-"


@contextmanager
def folder_lock(folder, shared: bool = False):
    """An OS lock on the folder itself (no file is left behind): writers replace their set of files under the
    exclusive lock, readers of a set hold the shared one, so no one sees half of another's set."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def replace_together(pairs, folder) -> None:
    """os.replace each (temporary, path) of `folder`, all under its lock: two writers of the same set leave one
    whole set, the last one's, never a mix of both."""
    with folder_lock(folder):
        for temporary, path in pairs:
            os.replace(temporary, path)


@contextmanager
def atomic_paths(paths):
    """Yield a temporary path beside each of `paths` (all in one folder); on success they replace `paths`
    together, on any failure they vanish, so a reader finds the old set or the new one, never half of one. A
    full disk is `DiskFull`, one line."""
    paths = [Path(path) for path in paths]
    folder, temporaries = paths[0].parent, []
    try:
        try:
            for path in paths:
                handle, temporary = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(path), suffix=".tmp")
                os.close(handle)
                temporaries.append(Path(temporary))
        except OSError as exc:
            raise _as_user_error(exc, path) from None
        yield temporaries
        for temporary in temporaries:
            with open(temporary, "rb") as file:
                os.fsync(file.fileno())
            os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes files private; outputs are ordinary files
        replace_together(zip(temporaries, paths), folder)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _disk_full(exc, folder)  # before the temporaries free their space
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        if full and not isinstance(exc, DiskFull):
            raise _as_user_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), paths[0]) from None
        raise


@contextmanager
def atomic_path(path):
    """`atomic_paths` of one file."""
    with atomic_paths([path]) as (temporary,):
        yield temporary


@contextmanager
def temporary_folder(path):
    """A private folder beside `path`, named as its temporaries are, removed afterwards whatever happens: a set
    of files is made there whole, then moved in with `replace_together`."""
    path = Path(path)
    try:
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp"))
    except OSError as exc:
        raise _as_user_error(exc, path) from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: Exception, folder: Path) -> bool:
    """Did a write fail for want of space? torch.save and netCDF do not say so in their errors (a failed
    enforce, a permission error), so the folder's free space decides when the errno does not."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _as_user_error(exc: OSError, path: Path) -> UserError:
    if exc.errno in _NO_SPACE:
        return DiskFull(f"no space left on the disk while writing {path} ({exc.strerror}); nothing half-written "
                        f"was left and the previous {path.name}, if any, is intact: free some space and run again")
    return UserError(f"cannot write {path} ({exc.strerror or exc}); choose another output folder")


def check_writable(folder) -> None:
    """Fail now, before any work, if `folder` (or the nearest existing parent it would be made in) cannot take
    a file. A real probe file, not `os.access`, which says yes to root on read-only mounts."""
    folder = Path(folder)
    existing = folder
    while not os.path.lexists(existing):  # lexists: a dangling link is a name taken, which mkdir cannot replace
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise UserError(f"cannot create {folder}: {existing} is a symbolic link to {os.readlink(existing)}, which "
                        "does not exist; remove the link or choose another folder")
    if not existing.is_dir():
        raise UserError(f"cannot create {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {existing} ({exc.strerror or exc}); choose another output folder") from None


def save(checkpoint: dict, path) -> None:
    with atomic_path(path) as temporary:
        torch.save(checkpoint, temporary)


def provenance() -> dict:
    import torchvision
    root = Path(__file__).resolve().parents[1]  # our source checkout, or site-packages for an installed wheel
    commit = None
    # Only a checkout of ours has a commit: an installed copy may sit inside another project's repository (its
    # .venv), whose HEAD is not the code that ran.
    if (root / ".git").exists():
        with suppress(OSError, subprocess.SubprocessError):
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                    timeout=5).stdout.strip() or None
    return {
        "software": {"resnet-diagnostics": models.__version__, "torch": str(torch.__version__),
                     "torchvision": str(torchvision.__version__)},
        "argv": list(sys.argv),
        "git_commit": commit,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read(path) -> dict:
    """`torch.load(weights_only=True)` with every way a user's file can be wrong turned into one line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a checkpoint file (.pt) or a run directory")
    if path.is_dir():
        raise UserError(f"{path} is a directory without config.json, not a run directory; give a checkpoint "
                        "file or the folder `python -m train --out` wrote")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; it is not a checkpoint (was the copy interrupted?)")
    schema.check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # "Unsupported global" or "unsupported GLOBAL ... blocked"
            raise UserError(f"{path} holds Python objects other than tensors and plain data, so it was not "
                            "loaded (loading it could run code); re-save its state_dict with torch.save") from None
        raise UserError(f"{path} is not a PyTorch checkpoint (it cannot be unpickled)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        if "zip" in str(exc).lower() or isinstance(exc, EOFError):  # the archive's end is missing or damaged
            raise UserError(f"{path} is truncated or corrupt as a PyTorch checkpoint; copy it again") from None
        raise UserError(f"{path} is unreadable as a PyTorch checkpoint ({first_line(exc)}); copy it again") from None
    except Exception as exc:  # garbage read as a legacy pickle fails in the unpickler's own ways (IndexError ...)
        raise UserError(f"{path} is not a PyTorch checkpoint (it cannot be unpickled: "
                        f"{type(exc).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict or state_dict")
    schema.check_tensors(checkpoint, path)
    return checkpoint


def is_own(checkpoint: dict) -> bool:
    return isinstance(checkpoint.get("format"), str) and checkpoint["format"].startswith("resnet-diagnostics/")


def _check_format(checkpoint: dict, path) -> None:
    try:
        version = int(checkpoint["format"].split("/", 1)[1][:20])
    except ValueError:
        raise UserError(f"{path} has an unknown checkpoint format {checkpoint['format'][:60]!r}") from None
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer resnet-diagnostics (format {version}, this version reads "
                        f"{FORMAT_VERSION}); upgrade with pip install -U resnet-diagnostics")


def check_finite(state_dict: dict, path) -> None:
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"{path} has non-finite values (NaN or inf) in {key}; the run diverged before this "
                            "checkpoint: use an earlier epoch's file")


# ---------------------------------------------------------------------------------------------------------------
# Foreign files: a bare state_dict, akamaster's {"state_dict", "best_prec1"}, torchvision's ResNets

_WRAPPERS = re.compile(r"^(module\.|_orig_mod\.)+")  # DataParallel / DDP / torch.compile
_OUR_LAYOUT = [  # (pattern, replacement), applied in order to each key, for this package's architectures only
    (re.compile(r"^conv1\."), "stem.conv."),
    (re.compile(r"^bn1\."), "stem.bn."),
    (re.compile(r"^layer(\d+)\.(\d+)\."), lambda m: f"stage{m[1]}.block{int(m[2]) + 1}."),
    (re.compile(r"\.(downsample|shortcut)\.0\."), ".shortcut.conv."),
    (re.compile(r"\.(downsample|shortcut)\.1\."), ".shortcut.bn."),
    (re.compile(r"^linear\."), "fc."),
]


def is_lightning(checkpoint: dict) -> bool:
    """A PyTorch Lightning checkpoint (`.ckpt`): its weights are the LightningModule's, under its attribute's
    name (`self.model = resnet18()`: `model.conv1.weight`)."""
    return "pytorch-lightning_version" in checkpoint and isinstance(checkpoint.get("state_dict"), dict)


def _tensors(checkpoint: dict, path) -> dict:
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    tensors = {_WRAPPERS.sub("", k): v for k, v in checkpoint.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise UserError(f"{path} holds no tensors under a known key; it is not a model checkpoint")
    return tensors


def state_prefixes(checkpoint: dict, path, prefix: str | None = None) -> list[str]:
    """The prefixes to try, in order, that make a foreign file's keys the model's: `prefix` where the user named
    one (`--state-prefix`); for a Lightning checkpoint none, then the one attribute of the LightningModule that
    holds every convolution (`model.`, `net.`, `backbone.`); for any other file none."""
    if prefix is not None:
        return [prefix if not prefix or prefix.endswith(".") else prefix + "."]
    if not is_lightning(checkpoint):
        return [""]
    holders = {key.split(".", 1)[0] for key, value in _tensors(checkpoint, path).items() if value.ndim == 4
               and "." in key}
    return ["", f"{holders.pop()}."] if len(holders) == 1 else [""]


def foreign_state_dict(checkpoint: dict, path, our_layout: bool = True, prefix: str = "") -> dict:
    """The tensors of a foreign file under `prefix` (a LightningModule's attribute: `state_prefixes`), that
    prefix and `module.`/`_orig_mod.` removed and, with `our_layout`, its layout's names mapped onto this
    package's (README: "Other people's checkpoints"): akamaster's `module.conv1`, `module.layer1.0.conv1`,
    `module.linear`; torchvision's `conv1`, `layer1.0.downsample.0`, `fc`. Another library's model
    (`our_layout=False`) keeps its names."""
    tensors = {key[len(prefix):]: value for key, value in _tensors(checkpoint, path).items()
               if key.startswith(prefix)}
    if not tensors:
        raise UserError(f"{path} holds no tensors under {prefix!r}; check --state-prefix")
    mapped = {}
    for key, value in tensors.items():
        key = _WRAPPERS.sub("", key)
        for pattern, replacement in _OUR_LAYOUT if our_layout else ():
            key = pattern.sub(replacement, key)
        mapped[key] = value
    return mapped


def _check_fit(skeleton: nn.Module, state_dict: dict, name: str, path) -> None:
    """The file's tensors are exactly the model's (names and shapes), checked on a model built on the meta
    device (shapes, no memory) before any value of the file is touched."""
    expected = skeleton.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(k[:80] for k in unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
            if unexpected else "",
        ) if part)
        raise UserError(f"{path} does not hold the weights of {name} ({detail}); check --model")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{path} does not fit {name}: {key} is {tuple(value.shape)} in the file but "
                            f"{tuple(expected[key].shape)} in the model; check --model")
        if value.is_floating_point() != expected[key].is_floating_point():
            raise UserError(f"{path} has {key} of type {value.dtype}, where {name} keeps {expected[key].dtype}; "
                            "check --model")


def build_checked(name: str, kwargs: dict, state_dict: dict, path) -> nn.Module:
    """The model `name(**kwargs)` holding the file's weights: its arguments checked by the registry, its shape
    against the file's tensors on the meta device, the values checked finite, and only then built for real."""
    try:
        name, kwargs = models.canonical(name, **kwargs)
        with torch.device("meta"):
            skeleton = models.build(name, **kwargs)
    except (models.ModelError, TypeError, ValueError) as exc:
        raise UserError(f"{path} names a model that cannot be built ({first_line(exc)})") from None
    label = models.label(name, kwargs)
    _check_fit(skeleton, state_dict, label, path)
    check_finite(state_dict, path)
    model = models.build(name, **kwargs)
    model.load_state_dict(state_dict, strict=False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# From a file to a model


@dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with what the analyses need to know about it."""
    model: nn.Module
    name: str
    kwargs: dict
    label: str
    spec: DatasetSpec
    path: str
    epoch: int | None = None
    config: dict | None = None
    history: dict | None = None


def _infer_dataset(classes: int | None, channels: int) -> str | None:
    """The dataset a foreign model was most likely trained on, from its classes and input channels."""
    return {(10, 3): "cifar10", (100, 3): "cifar100", (3, 3): "mini-cifar10", (10, 1): "fashion-mnist",
            (4, 3): "synthetic"}.get((classes, channels))


def _classes_in_file(name: str, kwargs: dict, state_dict: dict, path) -> int | None:
    """The number of classes of the file's classifier, wherever the model keeps it: built on the meta device
    for 1 class and for 2, the model differs in exactly its classifier's tensors, and the file's size along the
    dimension that differs is the answer. None where the file lacks that tensor."""
    try:
        with torch.device("meta"):
            one, two = (models.build(name, **{**kwargs, "num_classes": n}).state_dict() for n in (1, 2))
    except (models.ModelError, TypeError, ValueError) as exc:
        raise UserError(f"{path} cannot be read as {name} ({first_line(exc)})") from None
    for key, tensor in one.items():
        if tensor.shape != two[key].shape and key in state_dict and state_dict[key].ndim == tensor.ndim:
            dim = next(d for d, (a, b) in enumerate(zip(tensor.shape, two[key].shape)) if a != b)
            return int(state_dict[key].shape[dim])
    return None


def _foreign(checkpoint: dict, path, model_name: str | None, dataset: str | None, image_size: int | None,
             prefix: str = "") -> tuple[str, dict, dict, DatasetSpec]:
    """(model name, its arguments, state_dict, dataset spec) of a file another project wrote, its weights those
    under `prefix`: the input channels read off its first convolution, the classes off its classifier, the
    dataset `dataset` or else inferred from those two."""
    if model_name is None:
        raise UserError(f"{path} is not a resnet-diagnostics checkpoint; say which model its weights are for "
                        "with --model NAME (e.g. --model resnet56, --model torchvision:resnet18)")
    name, kwargs = models.canonical(model_name)
    state_dict = foreign_state_dict(checkpoint, path, our_layout=not models.is_external(name), prefix=prefix)
    first_conv = next((v for v in state_dict.values() if v.ndim == 4), None)
    if first_conv is None:
        raise UserError(f"{path} holds no convolution weight; it is not the checkpoint of a CNN")
    kwargs = {**kwargs, "in_channels": first_conv.shape[1]}
    if not models.is_external(name) and any(key.endswith(".shortcut.conv.bias") for key in state_dict):
        kwargs["projection_bias"] = True  # another project's biased 1x1 projections (see --projection-bias)
        models.canonical(name, **kwargs)
    classes = _classes_in_file(name, kwargs, state_dict, path)
    dataset = dataset or _infer_dataset(classes, first_conv.shape[1])
    if dataset is None:
        raise UserError(f"cannot tell which dataset {path} was trained on; give --dataset NAME (or folder:PATH)")
    check_image_size(dataset, image_size)
    spec = get_spec(dataset, image_size)
    if classes is not None and classes != spec.num_classes:
        raise UserError(f"{path} classifies into {classes} classes but {spec.name} has {spec.num_classes}; give the "
                        "--dataset its model was trained on")
    if first_conv.shape[1] != spec.in_channels:
        raise UserError(f"{path} takes {first_conv.shape[1]}-channel images but {spec.name} has {spec.in_channels} "
                        "channel(s); give the --dataset its model was trained on")
    return name, {**kwargs, "num_classes": spec.num_classes}, state_dict, spec


def load(path, model_name: str | None = None, dataset: str | None = None, mean=None, std=None,
         image_size: int | None = None, device="cpu", state_prefix: str | None = None) -> Loaded:
    """Rebuild the model of a checkpoint, in eval mode on `device`; every field checked first (train.schema).

    Our checkpoints carry the model's name and arguments and the dataset's statistics. A foreign file needs
    `model_name`; its number of classes and input channels are read off its weights, and its normalisation is
    the dataset's standard one (an image folder's: measured over its training images, resized to `image_size`)
    unless `mean`/`std` say otherwise. `dataset` names a dataset, or an image folder `folder:PATH`; for one of
    our checkpoints trained on an image folder it may name the folder's new place. A Lightning checkpoint is a
    foreign file whose weights are under the LightningModule's attribute (found, or named by `state_prefix`),
    and whose epoch is the number of epochs it had trained (Lightning's `epoch` + 1).
    """
    checkpoint = read(path)
    dataset = dataset_name(dataset) if dataset is not None else None
    if is_own(checkpoint):
        _check_format(checkpoint, path)
        schema.check_own(checkpoint, path)
        name, kwargs = checkpoint["model"]["name"], dict(checkpoint["model"]["kwargs"])
        state_dict = checkpoint["state_dict"]
        spec = DatasetSpec.from_dict(checkpoint["dataset"])
        label = models.label(name, kwargs)
        if model_name is not None and models.label(*models.canonical(model_name)) != label:
            raise UserError(f"{path} is a {label} checkpoint; drop --model {model_name}")
        if dataset is not None and dataset != spec.name:
            if not (is_folder(dataset) and is_folder(spec.name)):
                raise UserError(f"{path} was trained on {spec.name}; drop --dataset {dataset}")
            spec = replace(spec, name=dataset)  # the run's image folder, moved: its images are read from there
        if mean is not None or std is not None:
            raise UserError(f"{path} stores the normalisation it was trained with; drop --mean/--std (they are for "
                            "foreign checkpoints)")
        if image_size is not None:
            raise UserError(f"{path} stores the image size it was trained with ({spec.image_size}); drop "
                            "--image-size (it is for foreign checkpoints)")
        if state_prefix is not None:
            raise UserError(f"{path} is one of ours; drop --state-prefix (it is for foreign checkpoints)")
        config = checkpoint.get("config")
        if config is not None:
            config = asdict(config_from_dict(config, path))
        extra = {"epoch": checkpoint.get("epoch"), "config": config, "history": checkpoint.get("history")}
        model = build_checked(name, kwargs, state_dict, path)
    else:
        prefixes = state_prefixes(checkpoint, path, state_prefix)
        for k, prefix in enumerate(prefixes):  # the first under which the weights are the model's
            try:
                name, kwargs, state_dict, spec = _foreign(checkpoint, path, model_name, dataset, image_size, prefix)
                model = build_checked(name, kwargs, state_dict, path)
                try:  # it was trained elsewhere, on images of any size: does it take these?
                    models.check_input(name, kwargs, spec.in_channels, spec.image_size)
                except models.ModelError as exc:
                    raise UserError(f"{path}: {exc}") from None
                break
            except UserError as exc:
                if k < len(prefixes) - 1:
                    continue
                if is_lightning(checkpoint) and state_prefix is None and "check --model" in str(exc):
                    holders = sorted({key.split(".", 1)[0] for key in _tensors(checkpoint, path) if "." in key})
                    raise UserError(f"{exc}; its weights are under the LightningModule's attributes "
                                    f"{', '.join(holders)}: give the one that holds the whole network as "
                                    "--state-prefix NAME (a network split over several, such as a backbone and a "
                                    "head, cannot be read: keep it in one module)") from None
                raise
        spec, extra = spec.with_statistics(mean, std), {}
        if is_lightning(checkpoint) and type(checkpoint.get("epoch")) is int and checkpoint["epoch"] >= 0:
            extra = {"epoch": checkpoint["epoch"] + 1}
    model.to(device).eval()
    return Loaded(model, name, kwargs, models.label(name, kwargs), spec, str(path), **extra)
