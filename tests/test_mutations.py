"""The mutation harness (tests/mutations.py) over a real tiny run: every field of a checkpoint, of last.pt, of
metrics.csv and config.json made wrong in type, size, sign or encoding; each case must exit 0 with the right
result or exit 2 with one error line and nothing written, and no case may use much memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import train_tiny

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BOUND_MIB = 300  # above the worker's own footprint: a forged tensor of 1e9 floats would need 3,815 MiB


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory) -> Path:
    """A 1-epoch run whose last.pt says 2 epochs: resumable by one epoch of two steps."""
    run = train_tiny(tmp_path_factory.mktemp("mutations") / "run", "resnet20", "--epochs", "1", "--train-images",
                     "64", "--batch-size", "32", "--monitor-every", "1")
    last = torch.load(run / "last.pt", weights_only=True)
    last["config"].update(epochs=2, total_epochs=2, total_steps=4)
    torch.save(last, run / "last.pt")
    return run


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory per case needs Linux's VmHWM")
def test_every_mutation_ends_in_a_correct_result_or_one_line(unfinished_run, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "mutations.py"), str(unfinished_run), str(work)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    cases, baseline = report["results"], report["baseline_mib"]
    failures = []
    for case in cases:
        one_line = case["code"] == 2 and len(case["stderr"]) == 1 and case["stderr"][0].startswith("error: ")
        correct = case["code"] == 0 and case.get("correct", True)
        if not (one_line and not case["wrote"] or correct) or case["escaped"]:
            failures.append((case["case"], case["code"], case["stderr"][-2:], case["escaped"][-400:]))
        if case["peak_mib"] > baseline + MEMORY_BOUND_MIB:
            failures.append((case["case"], f"peak {case['peak_mib']:.0f} MiB over a baseline of {baseline:.0f}"))
    assert len(cases) > 200
    assert not failures, "\n".join(map(str, failures[:20]))
    largest = max(cases, key=lambda case: case["peak_mib"])
    slowest = max(cases, key=lambda case: case["seconds"])
    print(f"{len(cases)} mutations in {sum(case['seconds'] for case in cases):.0f} s (slowest {slowest['case']}: "
          f"{slowest['seconds']:.1f} s); largest peak {largest['peak_mib']:.0f} MiB ({largest['case']}), baseline "
          f"{baseline:.0f} MiB")
