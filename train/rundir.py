"""Run directories (docs/design.md §2): what `python -m train --out RUN_DIR` writes and every tool reads.

`config.json` (every option), `metrics.csv` (a row per epoch), `steps.csv` (a row per step), `monitor.nc` (the BN
monitor), `epoch_NNN.pt`, `last.pt` (resumable), `best.pt`, and `.lock`. This module alone writes and parses the
text files and lists the checkpoints, for the trainer and the diagnostics alike.
"""
import csv
import errno
import fcntl
import json
import math
import os
import re
import shutil
import stat
from pathlib import Path

import models

from .checkpoint import atomic_path
from .errors import UserError, first_line

REQUIRED_METRICS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                    "images_per_second"]  # every metrics.csv has these; runs of version 0.1 have no more
ATTRIBUTION = ["val_loss_recalibrated", "val_acc_recalibrated", "bn_excess", "bn_excess_se"]  # NaN where off
METRICS = [*REQUIRED_METRICS, "bn_warnings", *ATTRIBUTION]  # the trainer's: bn_warnings counts the BN monitor's
STEPS = ["step", "epoch", "train_loss", "lr"]
TIMING = ("epoch_seconds", "images_per_second")  # the only columns a resumed run may differ in
EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt$")
LIGHTNING_EPOCH_FILE = re.compile(r"(?:^|[-_])epoch=(\d+)\b.*\.ckpt$")  # ModelCheckpoint's epoch=1-step=8.ckpt
LIGHTNING_STEP = re.compile(r"(?:^|[-_])step=(\d+)")
# What `checkpoint.atomic_paths` and `temporary_folder` write before they rename: `.NAME.PID-RANDOM.tmp` (before
# issue 27 without `PID-`).
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[^.-]+\.tmp$")


def is_run_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def is_lightning_dir(path) -> bool:
    """A PyTorch Lightning log directory (`lightning_logs/version_N`): its ModelCheckpoint's `checkpoints/*.ckpt`,
    and the BN monitor callback's `monitor.nc` beside them."""
    return Path(path).is_dir() and not is_run_dir(path) and any((Path(path) / "checkpoints").glob("*.ckpt"))


def named_epoch(path) -> int | None:
    """The epoch a checkpoint's name says: ours `epoch_005.pt` 5; Lightning's `epoch=4-step=80.ckpt` 5 (its epoch
    counts from 0, ours the epochs trained); None for any other name."""
    if match := EPOCH_FILE.match(Path(path).name):
        return int(match.group(1))
    if match := LIGHTNING_EPOCH_FILE.search(Path(path).name):
        return int(match.group(1)) + 1
    return None


def epoch_files(run_dir) -> list[Path]:
    """The run's epoch checkpoints in numeric order."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := EPOCH_FILE.match(p.name))]
    return [path for _, path in sorted(found)]


def has_checkpoints(run_dir) -> bool:
    return bool(epoch_files(run_dir)) or (Path(run_dir) / "last.pt").is_file()


def run_checkpoints(run_dir) -> list[Path]:
    """What tools read from a run: its epoch files in order, or `last.pt` where there are none; of a Lightning
    log directory its `checkpoints/*.ckpt` by the epoch in their names, the last step's of each epoch, or all of
    them in the order of the numbers in their names where none names an epoch (`last.ckpt`, `{epoch}` names)."""
    if is_lightning_dir(run_dir):
        found = sorted(Path(run_dir, "checkpoints").glob("*.ckpt"), key=lambda p: models.natural_key(p.name))
        last_of_epoch = {}  # a fit that also saved within epochs (every_n_train_steps, val_check_interval): the ends
        for path in sorted(found, key=lambda p: (int(m[1]) if (m := LIGHTNING_STEP.search(p.name)) else -1,
                                                 models.natural_key(p.name))):
            if named_epoch(path) is not None:
                last_of_epoch[named_epoch(path)] = path
        files = [last_of_epoch[epoch] for epoch in sorted(last_of_epoch)] or found
    else:
        files = epoch_files(run_dir) or [p for p in [Path(run_dir) / "last.pt"] if p.is_file()]
    broken = next((path for path in files if not path.is_file()), None)  # is_file: False for a looping link too
    if broken is not None:
        raise UserError(f"{broken} is not a readable file (a dangling or looping symbolic link, or a folder); "
                        "remove it or put the checkpoint back")
    if not files:
        raise UserError(f"{run_dir} holds no checkpoints yet (no epoch_NNN.pt or last.pt); let the run finish "
                        "an epoch, or point at another run")
    return files


def remove_stale_temporaries(folder, names=None) -> None:
    """Delete the temporary files and folders a killed writer left in `folder` (those for `names` only, where
    given). A live writer's are left alone: two commands may write into one folder at once."""
    for path in Path(folder).iterdir():
        match = TEMPORARY.match(path.name)
        if (match and (names is None or match["name"] in names) and _writer_gone(match["pid"])
                and not path.is_symlink()):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)  # another command may be removing it too
            else:
                path.unlink(missing_ok=True)


def _writer_gone(pid: str | None) -> bool:
    """No process has this pid. A name without one was written by a version before issue 27, which no longer
    runs."""
    if pid is None:
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:  # another user's process
        return False
    return False


# ---------------------------------------------------------------------------------------------------------------
# config.json, metrics.csv, steps.csv


def write_config(run_dir, config: dict) -> None:
    with atomic_path(Path(run_dir) / "config.json") as temporary:
        temporary.write_text(json.dumps(config, indent=2) + "\n")


def read_config(run_dir) -> dict:
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is not readable JSON ({first_line(exc)}); copy the run again") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds no training options; give a run directory python -m train wrote")
    return config


def check_outputs(run_dir: Path) -> None:
    """Each file the trainer replaces at an epoch's end is a regular file or absent: found now, not after an epoch
    of training (a folder or a device named monitor.nc cannot be replaced by a rename)."""
    for name in ("metrics.csv", "steps.csv", "monitor.nc", "last.pt", "best.pt"):
        path = Path(run_dir) / name
        if path.exists() and not path.is_file():
            raise UserError(f"{path} is not a regular file (a folder or a device), so the trainer could not "
                            "replace it at the end of an epoch; move it away and run again")


def write_dataset(path, dataset) -> None:
    """An xarray dataset as netCDF, atomically (the monitor's monitor.nc)."""
    with atomic_path(path) as temporary:
        dataset.to_netcdf(temporary, engine="netcdf4")


def write_csv(path, columns: list[str], rows: list[list]) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            writer.writerows(rows)


def _plausible(column: str, value: float) -> bool:
    """What the trainer can write in a column: counts are whole and positive, accuracies fractions, times and
    the learning rate finite and not negative; a loss may be anything (a diverged evaluation is NaN)."""
    if column in ("train_loss", "val_loss", "val_loss_recalibrated", "bn_excess"):
        return True
    if column in ATTRIBUTION and math.isnan(value):  # the attribution was off
        return True
    if column in ("epoch", "step"):
        return value.is_integer() and 1 <= value <= 2**62
    if column == "bn_warnings":
        return value.is_integer() and 0 <= value <= 2**62
    if column in ("train_acc", "val_acc", "val_acc_recalibrated"):
        return 0 <= value <= 1
    return math.isfinite(value) and value >= 0


def read_metrics(run_dir) -> dict[str, list]:
    """metrics.csv as one list per column of METRICS (bn_warnings 0 where an older run has none); other
    columns are ignored, a missing or damaged one refused."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.csv; the run has not finished an epoch yet")
    try:
        with open(path, newline="") as file:
            lines = list(csv.reader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} cannot be read as CSV ({first_line(exc)}); copy the run again") from None
    header, rows = (lines[0], lines[1:]) if lines else ([], [])
    missing = [column for column in REQUIRED_METRICS if column not in header]
    if missing:
        raise UserError(f"{path} is not a metrics.csv of python -m train (no column {', '.join(missing)}); give a "
                        "run directory it wrote")
    if not rows:
        raise UserError(f"{path} has no epochs yet; let the run finish one")
    columns = [column for column in METRICS if column in header]
    history = {column: [] for column in columns}
    positions = {column: header.index(column) for column in columns}
    for line, row in enumerate(rows, start=2):
        try:
            if len(row) != len(header):
                raise ValueError(f"{len(row)} fields instead of {len(header)}")
            for column, position in positions.items():
                value = float(row[position])
                if not _plausible(column, value):
                    raise ValueError(f"{column} {row[position]!r} is out of range")
                history[column].append(value)
        except ValueError as exc:
            raise UserError(f"{path} line {line} is damaged ({first_line(exc)}); the file is truncated or was "
                            "edited: copy the run again") from None
    history["epoch"] = [int(epoch) for epoch in history["epoch"]]
    history["bn_warnings"] = [int(count) for count in history.get("bn_warnings", [0] * len(history["epoch"]))]
    for column in ATTRIBUTION:  # runs before version 3 have none
        history.setdefault(column, [math.nan] * len(history["epoch"]))
    if len(set(history["epoch"])) < len(history["epoch"]) or history["epoch"] != sorted(history["epoch"]):
        raise UserError(f"{path} lists epochs out of order or twice; the file was edited: copy the run again")
    return history


# ---------------------------------------------------------------------------------------------------------------
# One trainer per run directory


def lock(run_dir):
    """An OS lock on `run_dir/.lock`: a second trainer refuses; a killed one releases it. The file is opened
    without following a symbolic link, and only our own regular file with no other name (no hard link) is ever
    truncated."""
    path = Path(run_dir) / ".lock"
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link, not this run's lock file; remove it and run again") from None
        raise UserError(f"cannot open {path} ({exc.strerror}); check the folder's permissions") from None
    handle = os.fdopen(descriptor, "r+")
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        handle.close()
        raise UserError(f"{path} is not a regular file; remove it and run again")
    if status.st_nlink > 1:  # a hard link to someone's file: O_NOFOLLOW cannot tell, and we would truncate it
        handle.close()
        raise UserError(f"{path} is a hard link ({status.st_nlink} names for one file), not this run's own lock "
                        "file; remove it (the other names keep the file) and run again")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read(32).strip()
        handle.close()
        raise UserError(f"another trainer (pid {holder if holder.isdigit() else '?'}) is using {run_dir}; wait "
                        "for it or stop it") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
