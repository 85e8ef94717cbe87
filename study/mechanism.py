"""The mechanism tables of docs/spikes.md: how fast each net's weights turn and what a stale statistic costs it,
per finished run of a plain/residual pair, with the mean and 95% t-interval over seeds (cut to the values a
nonnegative measure can take) and plain minus residual (Welch): `python study/mechanism.py [runs/study]`.

- weight speed (the run's monitor.nc, `angular_speed`): each 3x3 conv's angle per step, its median over the
  measurements of epochs 1-6 (where every event of the pairs was), as a multiple of SGD's equilibrium angle
  (`angular_equilibrium`) at the same measurements; then the median over the convs of each stage;
- weight growth (`weight_norm` at the monitor's first measurement, step 10): the stem's conv and the median of
  stage 1's convs (a freshly initialised 3x3 conv of these nets has a norm of about 6: lr 0.2 without warm-up
  grew plain56's 20-40-fold in ten steps, which freezes them);
- amplification (runs/study/amplification/RUN/spikes.nc, from `python -m diagnostics.spikes --amplification`):
  the gain at the last BN layer's input of a 10% scale error and of a 0.1-std mean shift planted in one layer's
  statistics, median over the source layers; the stem's scale gain; the loss change of a scale error in the stem
  and the largest in any other layer; the validation excess at the same epoch, and pooled over both nets' runs the
  Spearman correlation of that excess with the stem's loss change;
- the stem's statistics error at the validations (monitor.nc `shadow_error` at the run's own BN momentum, the
  first BN layer): its largest, against the median of the other layers' errors;
- the run's largest validation excess (monitor.nc `bn_excess`, as metrics.csv has it).
"""
import re
import sys
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analyses.monitor import spearman  # noqa: E402
from analyses.trust import t_interval, welch_interval  # noqa: E402
from train import rundir  # noqa: E402

EVENT_EPOCHS = 6
SIGNED = {"stem scale loss", "other layers' scale loss, largest", "any layer's scale loss, largest",
          "excess at that epoch", "largest excess"}


def weight_speed(monitor: xr.Dataset) -> dict[str, float]:
    """Median angle per step over epochs 1-6 in units of the equilibrium angle: per stage, and over all convs."""
    ds = monitor.isel(step=np.flatnonzero(monitor.epoch.values <= EVENT_EPOCHS))
    relative = (ds.angular_speed / ds.angular_equilibrium).median("step")
    convs = ds.weight_kind.values == "conv3x3"
    stages = np.array([int(name[5]) if name.startswith("stage") else 0 for name in ds.weight_layer.values])
    speeds = {f"stage {s}": float(np.median(relative.values[convs & (stages == s)]))
              for s in sorted(set(stages[convs])) if s > 0}
    speeds["all convs"] = float(np.median(relative.values[convs]))
    first, step = monitor.weight_norm.isel(step=0).values, int(monitor.step[0])
    speeds[f"stem conv's weight norm, step {step}"] = float(first[0])
    speeds[f"stage 1 convs' weight norm, step {step}, median"] = float(np.median(first[convs & (stages == 1)]))
    return speeds


def amplification(run: Path, root: Path, monitor: xr.Dataset) -> dict[str, float]:
    path = root / "amplification" / run.name / "spikes.nc"
    if not path.is_file():
        return {}
    ds = xr.load_dataset(path)
    gain = ds.amplification_gain.squeeze(drop=True)
    loss = ds.amplification_loss.squeeze(drop=True)
    epoch = int(ds.epoch.values.ravel()[0])
    return {"scale gain": float(gain.sel(perturbation="scale").median()),
            "mean gain": float(gain.sel(perturbation="mean").median()),
            "stem scale gain": float(gain.sel(perturbation="scale").isel(source_depth=0)),
            "stem scale loss": float(loss.sel(perturbation="scale").isel(source_depth=0)),
            "other layers' scale loss, largest": float(loss.sel(perturbation="scale").isel(source_depth=slice(1, None)).max()),
            "any layer's scale loss, largest": float(loss.sel(perturbation="scale").max()),
            "excess at that epoch": float(monitor.bn_excess.where(monitor.val_epoch == epoch, drop=True)[0])}


def measures(run: Path, root: Path) -> dict[str, float]:
    ds = xr.load_dataset(run / "monitor.nc")
    own = ds.shadow_error.sel(momentum=float(ds.attrs["bn_momentum"]), method="nearest").values
    return {**weight_speed(ds), **amplification(run, root, ds), "stem error, largest": float(own[:, 0].max()),
            "other layers' error, median": float(np.median(own[:, 1:])),
            "largest excess": float(np.nanmax(ds.bn_excess.values))}


def pair_member(name: str) -> str | None:
    """The net and change of a run of a plain/residual pair, by run.sh's names: plain20-s0 -> plain20,
    resnet18-noskip-s1 -> plain18, plain56-warmup-s0 -> plain56-warmup (paired with resnet56-warmup); None for
    anything else."""
    net, _, seed = name.rpartition("-s")
    net = re.sub(r"^resnet(\d+)-noskip", r"plain\1", net)
    return net if re.fullmatch(r"(plain|resnet)\d+(-[\w.]+)?", net) and seed.isdigit() else None


def finished(run: Path) -> bool:
    return len(rundir.read_metrics(run)["epoch"]) == rundir.read_config(run)["epochs"]


def cell(values, name: str) -> str:
    mean, low, high = t_interval(values, (-np.inf, np.inf) if name in SIGNED else (0.0, np.inf))
    return f"{mean:.2f} ({low:.2f} to {high:.2f})" if np.isfinite(low) else f"{mean:.2f}"


def main(root: Path) -> None:
    runs = {}
    for run in sorted(root.iterdir()):
        net = pair_member(run.name)
        if net and (run / "metrics.csv").is_file() and (run / "monitor.nc").is_file() and finished(run):
            runs.setdefault(net, []).append(measures(run, root))
    for plain in [net for net in runs if net.startswith("plain")]:
        residual = "resnet" + plain[len("plain"):]
        if residual not in runs:
            continue
        pair = {plain: runs[plain], residual: runs[residual]}
        names = [name for name in pair[plain][0] if all(name in r for rows in pair.values() for r in rows)]
        print(f"{plain} ({len(pair[plain])} runs) against {residual} ({len(pair[residual])} runs): mean (95% interval)")
        header = ["", plain, residual, "plain - residual"]
        rows = []
        for name in names:
            a, b = ([r[name] for r in pair[net]] for net in (plain, residual))
            difference, low, high = welch_interval(a, b)
            rows.append([name, cell(a, name), cell(b, name), f"{difference:+.2f} ({low:+.2f} to {high:+.2f})"
                         if np.isfinite(low) else f"{difference:+.2f}"])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        both = [r for net in pair for r in pair[net]]
        if "stem scale loss" in names and len(both) >= 4:
            excess = [r["excess at that epoch"] for r in both]
            for sensitivity in ("stem scale loss", "any layer's scale loss, largest"):
                rho = spearman(excess, [r[sensitivity] for r in both])
                print(f"Spearman(excess, {sensitivity}) over the {len(both)} runs of both nets, at the "
                      f"amplification's epoch: {rho:+.2f}")
        print()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study"))
