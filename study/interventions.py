"""Each intervention run of docs/spikes.md against the run of the same model and seed at the recipe's settings:
`python study/interventions.py [runs/study]` prints one row per intervention run that has finished.

- training: the largest difference of the per-step training loss (steps.csv). A BN momentum or --precise-bn
  changes only the running statistics, which training (BN in train mode) never reads: the same losses, to the
  last bit on one CPU thread;
- shadow check (BN momentum runs): the run's own running statistics' error at each validation against the
  baseline's shadow at that momentum (the baseline's monitor kept it from the same batches), as the largest
  relative difference: the shadows are what a run at that momentum would have had;
- the statistics error (RMS over validations and layers) of the run's running statistics, and as a ratio of the
  baseline's at momentum 0.1 (the prediction's "0.25-0.5x");
- events (the spike diagnosis's gap, `analyses.spikes.gap_mask`: running loss 1.25x and 0.1 nats over the
  recomputed) and the largest excess,
  both of the attribution (with --precise-bn: of the statistics before they are replaced);
- the largest validation loss metrics.csv logged (with --precise-bn: with the recomputed statistics);
- the warnings the run printed (the trainer's rule, `WARNING_RULE` above `WARNING_THRESHOLD`, chosen on the
  20-layer pairs' seeds 0-1) at the last measurement before each validation (`analyses.trust.own_warnings`): the
  events they caught, and the validations they announced that were not events.
"""
import csv
import sys
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analyses.trust import events_of, own_warnings  # noqa: E402
from train import rundir  # noqa: E402
from mechanism import finished  # noqa: E402  (study/, this script's folder)


def losses(run: Path) -> np.ndarray:
    with open(run / "steps.csv") as file:
        return np.array([float(row["train_loss"]) for row in csv.DictReader(file)])


def own_error(ds: xr.Dataset, momentum: float) -> np.ndarray:
    """(validation, layer): the running statistics' error, which the monitor keeps as its own momentum's shadow."""
    return ds.shadow_error.sel(momentum=momentum, method="nearest").values


def events(metrics: dict) -> tuple[np.ndarray, float]:
    """Per attributed validation, was it an event (`analyses.trust.events_of`: the spike diagnosis's gap, as
    diagnostics.trust counts them), and the largest excess."""
    return events_of(metrics, 1.25, 0.1), float(np.nanmax(metrics["bn_excess"]))


def warned(ds: xr.Dataset, metrics: dict, flags: np.ndarray) -> str:
    """`caught/events (false alarms)` of the warnings the run printed (`analyses.trust.own_warnings`)."""
    scores = {k: int(v) for k, v in own_warnings([metrics], [ds], [flags]).items()}
    caught, missed = scores["own_warning_caught"], scores["own_warning_missed"]
    return f"{caught}/{caught + missed} ({scores['own_warning_false_alarms']})"


def row(run: Path, base: Path) -> list[str]:
    config, base_config = (rundir.read_config(path) for path in (run, base))
    momentum, base_momentum = float(config["bn_momentum"]), float(base_config["bn_momentum"])
    ds, base_ds = (xr.load_dataset(path / "monitor.nc") for path in (run, base))
    a, b = losses(run), losses(base)
    n = min(len(a), len(b))
    mine = own_error(ds, momentum)
    shadow = "-"
    if momentum != base_momentum and momentum in base_ds.momentum.values and not config.get("precise_bn"):
        theirs = own_error(base_ds, momentum)
        shadow = f"{np.nanmax(np.abs(mine - theirs) / np.abs(theirs)):.1e}"
    rms = lambda e: float(np.sqrt(np.nanmean(e ** 2)))
    metrics, base_metrics = rundir.read_metrics(run), rundir.read_metrics(base)
    flags, largest = events(metrics)
    base_flags, base_largest = events(base_metrics)
    recomputed = bool(config.get("precise_bn"))  # its running statistics are replaced before each validation
    error = "-" if recomputed else f"{rms(mine):.3f}"
    ratio = "-" if recomputed else f"{rms(mine) / rms(own_error(base_ds, base_momentum)):.2f}"
    return [run.name, f"{np.max(np.abs(a[:n] - b[:n])):.1e}", shadow, error, ratio,
            f"{flags.sum()} ({base_flags.sum()})", f"{largest:.2f} ({base_largest:.2f})",
            f"{max(metrics['val_loss']):.2f} ({max(base_metrics['val_loss']):.2f})", warned(ds, metrics, flags)]


def main(root: Path) -> None:
    header = ["run", "max |loss diff|", "shadow check", "stats error", "x baseline's", "events (base)",
              "max excess (base)", "max logged val_loss (base)",
              "warning: caught/events (false)"]
    rows = []
    for run in sorted(root.iterdir()):
        model, _, rest = run.name.partition("-")
        if not rest or rest.startswith(("s", "noskip-")) or not (run / "metrics.csv").is_file():
            continue  # a run of the recipe, or the no-skip half of a pair (not a change of resnet18's recipe)
        if not finished(run):
            continue  # still training
        base = root / f"{model}-{rest.rpartition('-')[2]}"
        rows.append(row(run, base))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(r, widths)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study"))
