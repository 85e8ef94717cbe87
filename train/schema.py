"""What a checkpoint file must hold, checked before anything is built from it: a checkpoint is untrusted input.

`torch.load(weights_only=True)` already guarantees that no code runs; these checks add that every field has the
type and range the format (docs/design.md §2) says, and that no file makes us allocate more memory than it
holds: a zip entry must be stored as `torch.save` stores it (uncompressed, within the file), and a tensor may
not claim more values than its storage has (a stride-0 view of one number can claim a billion). Every failure
is one `UserError` line naming the field.
"""
import math
import zipfile
from pathlib import Path

import torch

from .errors import UserError

MAX_OBJECTS = 1_000_000  # containers and leaves in one file: far beyond any checkpoint, bounded walk time
MAX_NAME = 200  # characters of a model, dataset, layer or class name
MAX_MODEL_ARGUMENT = 100_000  # any integer argument of a model builder (classes, channels, depth)


def damaged(path, what: str) -> UserError:
    return UserError(f"{path} {what}; it is damaged or not a resnet-diagnostics file: use another copy or epoch")


# ---------------------------------------------------------------------------------------------------------------
# The file and its tensors


def check_archive(path: Path) -> None:
    """Before `torch.load`: the entries of a zip checkpoint are stored uncompressed and fit in the file."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format (before torch 1.6) or not a zip: torch.load decides, tensors are checked after
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(f"{path} is truncated or corrupt as a PyTorch checkpoint; copy it again") from None
    if any(entry.filename.split("/")[1:2] == ["code"] for entry in entries):  # ARCHIVE/code/__torch__/...: its program
        raise UserError(f"{path} is a TorchScript archive (torch.jit.save: a compiled program), not a checkpoint; "
                        "save the model's state_dict with torch.save and give that file")
    if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
        raise UserError(f"{path} holds compressed entries, which torch.save never writes; it was not loaded "
                        "(it could expand to far more memory than the file): re-save it with torch.save")
    if sum(entry.file_size for entry in entries) > path.stat().st_size:
        raise UserError(f"{path} declares more data than the file holds; it is truncated or forged: copy it again")


def check_tensors(obj, path) -> None:
    """Walk everything loaded: bounded in size, and no tensor claims more values than its storage holds."""
    stack, seen = [obj], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_OBJECTS:
            raise UserError(f"{path} holds more than {MAX_OBJECTS:,} objects; it is not a checkpoint")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif torch.is_tensor(item):
            claimed = item.numel() * item.element_size()
            if claimed > item.untyped_storage().nbytes():
                raise UserError(f"{path} has a tensor of shape {tuple(item.shape)} ({claimed:,} bytes) over "
                                f"{item.untyped_storage().nbytes():,} bytes of data (a forged view); it was not used")


# ---------------------------------------------------------------------------------------------------------------
# Fields


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value, low: int = 0, high: int = 2**62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _name(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def check_state_dict(state_dict, path) -> None:
    if not isinstance(state_dict, dict) or not state_dict:
        raise damaged(path, "has no state_dict of tensors")
    for key, value in state_dict.items():
        if not isinstance(key, str) or len(key) > 1000:
            raise damaged(path, f"has a state_dict key {str(key)[:40]!r} that is not a layer name")
        if not torch.is_tensor(value):
            raise damaged(path, f"has {type(value).__name__} at state_dict[{key[:80]!r}], not a tensor")


def check_model(spec, path) -> None:
    if not isinstance(spec, dict) or not _name(spec.get("name")) or not isinstance(spec.get("kwargs"), dict):
        raise damaged(path, "has no model entry {name, kwargs}")
    for key, value in spec["kwargs"].items():
        if not _name(key):
            raise damaged(path, f"has a model argument named {str(key)[:40]!r}")
        fine = (value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= MAX_NAME)
                or _integer(value, 0, MAX_MODEL_ARGUMENT) or (isinstance(value, float) and math.isfinite(value)))
        if not fine:
            raise damaged(path, f"has model argument {key} = {str(value)[:40]!r}, of the wrong type or size")


def check_dataset(spec, path) -> None:
    if not isinstance(spec, dict):
        raise damaged(path, "has no dataset entry")
    classes, channels = spec.get("num_classes"), spec.get("in_channels")
    checks = {
        "name": _name(spec.get("name")),
        "num_classes": _integer(classes, 1, MAX_MODEL_ARGUMENT),
        "in_channels": _integer(channels, 1, 1024),
        "image_size": _integer(spec.get("image_size"), 1, 16384),
    }
    bad = [key for key, fine in checks.items() if not fine]
    if not bad:
        for key, positive in (("mean", False), ("std", True)):
            values = spec.get(key)
            if not (isinstance(values, list) and len(values) == channels
                    and all(_number(v) and (v > 0 or not positive) for v in values)):
                bad.append(key)
        names = spec.get("classes")
        if not (isinstance(names, list) and len(names) == classes and all(_name(n) for n in names)):
            bad.append("classes")
    if bad:
        raise damaged(path, f"has a dataset entry whose {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} of the "
                            "wrong type, length or range")


def check_history(history, epoch, path) -> None:
    """Per-epoch lists of numbers, one entry per epoch done."""
    if not isinstance(history, dict) or "epoch" not in history:
        raise damaged(path, "has no training history")
    for key, values in history.items():
        if not isinstance(key, str) or not isinstance(values, list) or len(values) != epoch:
            raise damaged(path, f"has a history column {str(key)[:40]!r} that is not a list of {epoch} values")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise damaged(path, f"has a history column {key!r} with values that are not numbers")


def check_own(checkpoint: dict, path) -> None:
    """Every field a resnet-diagnostics checkpoint must have, of the right type and size (docs/design.md §2)."""
    check_model(checkpoint.get("model"), path)
    check_state_dict(checkpoint.get("state_dict"), path)
    check_dataset(checkpoint.get("dataset"), path)
    epoch = checkpoint.get("epoch")
    if not (epoch is None or _integer(epoch)) or not (checkpoint.get("step") is None or _integer(checkpoint["step"])):
        raise damaged(path, "has an epoch or step that is not a non-negative integer")
    if checkpoint.get("config") is not None and not isinstance(checkpoint["config"], dict):
        raise damaged(path, "has a config that is not a dict of options")
    if checkpoint.get("history") is not None:
        check_history(checkpoint["history"], epoch, path)


def check_resumable(state: dict, path) -> None:
    """A last.pt: a checkpoint plus what continues it exactly (optimiser, scheduler, scaler, random state, step
    history, BN monitor), each of the right form. What depends on the model (shapes of the optimiser's
    buffers) is checked against the rebuilt objects in `check_against`."""
    check_own(state, path)
    epoch, step = state.get("epoch"), state.get("step")
    if not _integer(epoch, 1) or not _integer(step, 1) or state.get("config") is None or "history" not in state:
        raise damaged(path, "is not resumable (no epoch, step, config or history)")
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list) and optimizer["param_groups"]
            and all(isinstance(group, dict) for group in optimizer["param_groups"])):
        raise damaged(path, "has no optimizer state {state, param_groups}")
    for key in ("scheduler", "scaler"):
        if not isinstance(state.get(key), dict):
            raise damaged(path, f"has no {key} state")
    rng = state.get("rng")
    if not (isinstance(rng, dict) and torch.is_tensor(rng.get("torch")) and rng["torch"].dtype == torch.uint8
            and rng["torch"].dim() == 1 and isinstance(rng.get("cuda", []), list)
            and all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in rng.get("cuda", []))):
        raise damaged(path, "has no random-number state of the right form")
    rows = state.get("step_history")
    if not (isinstance(rows, list) and len(rows) == step and all(
            isinstance(row, list) and len(row) == 4 and all(_number(v) or v != v for v in row) for row in rows)):
        raise damaged(path, f"has a step history that is not {step} rows of (step, epoch, loss, lr)")
    monitor = state.get("monitor")
    if monitor is not None:
        records = monitor.get("records") if isinstance(monitor, dict) else None
        if not (isinstance(records, dict) and _integer(monitor.get("calls"))
                and all(torch.is_tensor(v) for v in records.values())
                and len({len(v) for v in records.values()}) <= 1
                and isinstance(monitor.get("bn_layers"), list) and isinstance(monitor.get("weight_layers"), list)):
            raise damaged(path, "has a BN monitor state of the wrong form")


def _same_form(saved, fresh, where: str, path) -> None:
    """`saved` has the keys, types and tensor shapes of `fresh` (a state_dict the live object just made)."""
    if isinstance(fresh, dict):
        fits = isinstance(saved, dict) and set(saved) == set(fresh)
        if fits:
            for key in fresh:
                _same_form(saved[key], fresh[key], where, path)
    elif isinstance(fresh, (list, tuple)):
        fits = isinstance(saved, (list, tuple)) and len(saved) == len(fresh)
        if fits:
            for a, b in zip(saved, fresh):
                _same_form(a, b, where, path)
    elif torch.is_tensor(fresh):
        fits = torch.is_tensor(saved) and saved.shape == fresh.shape
    elif isinstance(fresh, (bool, str)):
        fits = type(saved) is type(fresh)
    elif isinstance(fresh, (int, float)):
        fits = isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    else:  # None, or a value torch keeps that we do not interpret
        fits = saved is None or isinstance(saved, (int, float, str, bool)) or torch.is_tensor(saved)
    if not fits:
        raise damaged(path, f"has a {where} state of another form ({str(saved)[:40]!r} where "
                            f"{type(fresh).__name__} belongs)")


def check_against(state: dict, optimizer, scheduler, scaler, path) -> None:
    """The saved optimiser, scheduler and scaler states fit the live objects they are loaded into."""
    saved = state["optimizer"]
    fresh = optimizer.state_dict()
    if len(saved["param_groups"]) != len(fresh["param_groups"]):
        raise damaged(path, "has an optimizer state of another model")
    for group, live in zip(saved["param_groups"], fresh["param_groups"]):
        _same_form(group, live, "optimizer", path)
        if list(group["params"]) != list(live["params"]):
            raise damaged(path, "has an optimizer state of another model")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, entry in saved["state"].items():
        if not _integer(key, 0, len(params) - 1) or not isinstance(entry, dict):
            raise damaged(path, "has an optimizer state of another model")
        for name, value in entry.items():
            if name == "momentum_buffer" and value is not None and (
                    not torch.is_tensor(value) or value.shape != params[key].shape):
                raise damaged(path, f"has an optimizer buffer of another shape for parameter {key}")
    _same_form({k: v for k, v in state["scheduler"].items() if k != "lr_lambdas"},
               {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}, "scheduler", path)
    if scaler.is_enabled():
        _same_form(state["scaler"], scaler.state_dict(), "scaler", path)
