"""The study's runs as docs/spikes.md lists them: `python study/runs.py [runs/study]` prints, per run directory, its
epochs done, its training wall time (metrics.csv's epoch seconds added up: training, validation, attribution and
monitor), the epochs whose time includes a pause (the study was stopped with SIGSTOP while the full test suite or a
benchmark ran: over twice the run's median epoch; their time is left out and the other epochs' median stands in
for them), the commit that trained it last and when that process started (the last checkpoint's provenance). The machine is the page's: runs record the software, not the CPU.
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import rundir  # noqa: E402


def row(run: Path) -> list[str]:
    metrics = rundir.read_metrics(run)
    seconds = np.array(metrics["epoch_seconds"], dtype=float)
    paused = seconds > 2 * np.median(seconds)
    wall = seconds[~paused].sum() + paused.sum() * np.median(seconds[~paused])
    provenance = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["provenance"]
    config = rundir.read_config(run)
    paused_epochs = ",".join(str(e) for e in np.array(metrics["epoch"])[paused]) or "-"
    return [run.name, f"{len(seconds)}/{config['epochs']}", f"{wall / 60:.1f}", paused_epochs,
            provenance["git_commit"][:7], provenance["created"][:16].replace("T", " ")]


def main(root: Path) -> None:
    header = ["run", "epochs", "minutes", "paused epochs (estimated)", "commit", "last started (UTC)"]
    rows = [row(run) for run in sorted(root.iterdir()) if (run / "last.pt").is_file() and rundir.is_run_dir(run)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study"))
