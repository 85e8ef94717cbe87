"""The benchmarks in their smallest form: each runs, prints the machine line, a table and `summary:` lines with
numbers; odd sizes work (analysis_overhead --images 256 used to crash); bad options are one line, exit 2; the
GPU check runs shrunk on a CPU. Figures are not checked: speed targets are the benchmarks' business, not tests'.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import (analysis_overhead, common, compile_choice, depth_scaling, monitor_cost, spikes_cost,
                        train_throughput)
from conftest import run_command

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["--dataset", "synthetic", "--repeats", "1"]
NUMBER = r"-?[\d,]+(\.\d+)?"
SUMMARY = re.compile(rf"^summary: .+: ({NUMBER}(x|%| img/s| min)|not measured \(.+\))")


pytestmark = pytest.mark.usefixtures("one_thread")  # two threads on cores other work shares: 5x slower steps


def summaries(out: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.startswith("summary:")]
    assert lines, out
    for line in lines:
        assert SUMMARY.match(line), line
    return lines


def assert_machine_line(line: str) -> None:
    assert line.startswith("# machine: ")
    assert f"torch threads {torch.get_num_threads()}" in line
    assert f"capability {torch.backends.cpu.get_cpu_capability()}" in line
    for flag in common.BF16_FLAGS:
        assert re.search(rf"{flag} (yes|no)", line), line
    assert "GPU: " in line


# ---------------------------------------------------------------------------------------------------------------
# What the benchmarks share


def test_machine_line_names_the_flags_that_decide_bf16(monkeypatch):
    monkeypatch.setattr(common, "cpu_flags", lambda: {"avx512f", "avx2", "amx_tile"})
    line = common.machine_line(torch.device("cpu"))
    assert_machine_line(line)
    assert "flags avx512f yes, avx512_bf16 no, amx_bf16 no;" in line


def test_bf16_is_measured_where_native_or_forced(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "native_bf16", lambda device: (False, "this CPU has no bf16 instructions"))
    assert common.bf16_plan(cpu, forced=False) == (
        False, False, "no native bf16: this CPU has no bf16 instructions; --bf16 forces it")
    measured, native, why = common.bf16_plan(cpu, forced=True)
    assert (measured, native) == (True, False) and why.endswith("not native here: this CPU has no bf16 instructions")
    monkeypatch.setattr(common, "native_bf16", lambda device: (True, "this CPU has AMX (amx_bf16)"))
    assert common.bf16_plan(cpu, forced=False) == (True, True, "this CPU has AMX (amx_bf16)")


@pytest.mark.parametrize("n_images, batch_size, sizes", [
    (256, 128, [128, 128]), (100, 128, [100]), (300, 128, [128, 128, 44]), (1, 1, [1]), (5, 3, [3, 2])])
def test_fixed_batches_hold_exactly_the_images_asked_for(n_images, batch_size, sizes):
    batches = common.fixed_batches(n_images, batch_size, "cpu")
    assert [len(x) for x, _ in batches] == sizes
    assert [len(y) for _, y in batches] == sizes


def test_target_lines_say_figure_goal_and_verdict():
    assert common.Target("a / b", 1.29, 1.2).line() == "summary: a / b: 1.29x (target >= 1.20x): met"
    assert common.Target("a / b", 1.35, 1.3, at_most=True).line() == "summary: a / b: 1.35x (target <= 1.30x): MISSED"
    assert (common.Target("cost", 0.0214, 0.03, at_most=True, unit="%", reason="why").line()
            == "summary: cost: 2.1% (target <= 3.0%): met; why")
    assert (common.Target("bf16", None, 2.0, reason="no native bf16").line()
            == "summary: bf16: not measured (no native bf16)")
    assert (common.Target("speed", 1234.4, None, unit=" img/s", fmt=",.0f").line()
            == "summary: speed: 1,234 img/s: no target here")


def test_interleaved_takes_the_median_after_a_warm_up_round(monkeypatch):
    calls, rounds = [], {}
    seconds = iter([9.0, 5.0, 1.0, 3.0, 2.0])  # the warm-up round (9.0) is not counted
    monkeypatch.setattr(common, "timed", lambda function, device: (function(), next(seconds))[1])
    result = common.interleaved({"run": lambda: calls.append(1)}, 4, torch.device("cpu"),
                                common.Progress(None, "", enabled=False), rounds=rounds)
    assert len(calls) == 5
    assert result == {"run": 2.5} and rounds == {"run": [5.0, 1.0, 3.0, 2.0]}


# ---------------------------------------------------------------------------------------------------------------
# Each benchmark, smallest


def test_train_throughput_smallest():
    code, out, err = run_command(train_throughput, ["--models", "resnet20", "--steps", "1", "--batch-size", "4",
                                                    "--workers", "1", "--bf16", "--no-compile", *TINY_DATA])
    assert code == 0, err
    lines = out.splitlines()
    assert_machine_line(lines[0])
    assert re.search(rf"^resnet20 +{NUMBER} +{NUMBER} +{NUMBER}x +{NUMBER} +{NUMBER}x$", out, re.M), out
    found = summaries(out)
    assert any("resnet20 ours fp32 / typical fp32 loop" in line for line in found)
    assert any(re.search(r"resnet20 ours bf16 (eager )?/ typical fp32 loop", line) and "not measured" not in line
               for line in found)  # "eager" where this CPU has native bf16


def test_with_native_bf16_the_3x_target_is_judged_on_the_compiled_bf16_loop_a_long_run_gets(monkeypatch):
    """Issue 30 raised the native-bf16 target to 3x the typical fp32 loop, for the loop a long run trains:
    compiled, as --compile auto chooses for he2016's 64,000 iterations (the eager bf16 loop was at its ceiling,
    2.29x). On a CPU with native bf16 (here made to say so) the benchmark times the compiled bf16 loop by default
    and judges the target on it; with --no-compile it says that target was not measured, and why."""
    monkeypatch.setattr(common, "native_bf16", lambda device: (True, "this CPU has AMX (amx_bf16)"))
    tiny = ["--models", "resnet20", "--steps", "1", "--batch-size", "4", "--workers", "0", "--compile-backend",
            "eager", *TINY_DATA]
    code, out, err = run_command(train_throughput, tiny)
    assert code == 0, err
    assert re.search(rf"^resnet20 +{NUMBER}( +{NUMBER} +{NUMBER}x){{3}}$", out, re.M), out  # fp32, bf16, bf16 compiled
    assert "ours bf16 compiled" in out and "ours fp32 compiled" not in out
    found = summaries(out)
    target = [line for line in found if "ours bf16 compiled (a long run, as --compile auto trains it)" in line]
    assert len(target) == 1 and re.search(r": [\d.]+x \(target >= 3\.00x\): (met|MISSED)$", target[0]), found
    assert any("ours bf16 eager / typical fp32 loop" in line and "no target here" in line for line in found)
    code, out, err = run_command(train_throughput, [*tiny, "--no-compile"])
    assert code == 0, err
    assert any("ours bf16 compiled" in line and "not measured (--no-compile was given" in line
               for line in summaries(out)), out
    cpu = torch.device("cpu")
    assert train_throughput.compiled_variants(None, native=False, device=cpu) == ()
    assert train_throughput.compiled_variants(True, native=False, device=cpu) == ("ours fp32", "ours bf16")


def test_each_cpu_kind_is_judged_on_its_own_target_and_loop():
    """Known answers for `targets` from made-up rates (typical 100 img/s): with native bf16 the 3x target reads the
    compiled bf16 loop (290: missed, where the eager bf16 loop's 320 would have met it), not measured without it;
    without native bf16 the 1.2x target reads ours in fp32, and an emulated bf16 has no target."""
    cpu = torch.device("cpu")
    rates = {"typical fp32": 100.0, "ours fp32": 125.0, "ours bf16": 320.0, "ours bf16 compiled": 290.0}
    native = {t.name.split(" / ")[0]: t for t in train_throughput.targets("m", rates, cpu, True, True, "")}
    compiled = native["m ours bf16 compiled (a long run, as --compile auto trains it)"]
    assert (compiled.figure, compiled.goal, compiled.verdict) == (pytest.approx(2.9), 3.0, "MISSED")
    assert native["m ours bf16 eager"].verdict == "no target here" and native["m ours fp32"].goal is None
    del rates["ours bf16 compiled"]
    (first, *_) = train_throughput.targets("m", rates, cpu, True, True, "")
    assert first.verdict == "not measured" and "--no-compile" in first.reason
    fp32, bf16 = train_throughput.targets("m", rates, cpu, True, False, "")
    assert (fp32.figure, fp32.goal, fp32.verdict) == (pytest.approx(1.25), 1.2, "met") and bf16.goal is None
    fp32, bf16 = train_throughput.targets("m", {"typical fp32": 100.0, "ours fp32": 110.0}, cpu, False, False, "why")
    assert fp32.verdict == "MISSED" and (bf16.verdict, bf16.reason) == ("not measured", "why")


def test_monitor_cost_measures_inside_the_trainers_epoch():
    code, out, err = run_command(monitor_cost, ["--models", "resnet20", "--steps", "2", "--every", "1", "--batch-size",
                                                "4", "--probe-images", "3", "--attribution-images", "5", *TINY_DATA])
    assert code == 0, err
    assert_machine_line(out.splitlines()[0])
    row = next(line.split() for line in out.splitlines() if line.startswith("resnet20"))
    assert row[1] == "fp32" and row[5] == "2"  # two measurements in an epoch of two steps at every 1
    monitor, attribution, together = (float(cell.rstrip("%")) for cell in (row[8], row[11], row[12]))
    assert together == pytest.approx(monitor + attribution, abs=0.11)
    (line,) = [line for line in summaries(out) if "fp32" in line]
    assert "BN monitor at every 100 steps and the attribution" in line and "(target <= 3.0%)" in line


def test_compile_choice_times_eager_and_compiled_steps_and_judges_auto():
    # aot_eager: the trainer's TrainStep under torch.compile without inductor's C++ build (minutes on 2 cores)
    code, out, err = run_command(compile_choice, ["--models", "resnet20", "--steps", "2", "--batch-size", "4",
                                                  "--backend", "aot_eager", "--repeats", "1"])
    assert code == 0, err
    assert_machine_line(out.splitlines()[0])
    lines = summaries(out)
    assert len(lines) == 3 and "a run as auto chooses against the better choice, at 184 and 64,000 steps" in lines[0]
    assert lines[2].endswith(": met")  # aot_eager computes what eager does


def test_analysis_overhead_with_a_batch_larger_than_the_images():
    code, out, err = run_command(analysis_overhead, ["--models", "resnet20", "--images", "2", "--batch-size", "128",
                                                     "--memory-batches", "1", "--repeats", "1"])
    assert code == 0, err
    assert "seconds for 2 images in batches of 2" in out
    assert len(summaries(out)) == 2  # no memory probe at --memory-batches 1


def test_analysis_overhead_memory_probe_at_sizes_that_do_not_divide():
    """The memory probe used to take a quarter of --images in batches of 128: no batch at --images 256."""
    code, out, err = run_command(analysis_overhead, ["--models", "resnet20", "--images", "5", "--batch-size", "3",
                                                     "--memory-batches", "2", "--repeats", "1"])
    assert code == 0, err
    assert_machine_line(out.splitlines()[0])
    assert "peak resident memory of gradients on resnet20: " in out and "after 1 batch of 3" in out
    assert [line.split(":")[1].strip() for line in summaries(out)] == [
        "responses / bare eval forward, worst of resnet20", "gradients / bare forward+backward, worst of resnet20",
        "peak resident memory of responses, 2 batches / 1 batch",
        "peak resident memory of gradients, 2 batches / 1 batch"]


def test_depth_scaling_smallest():
    code, out, err = run_command(depth_scaling, ["--models", "resnet20", "plain20", "--images", "3", "--batch-size",
                                                 "2", "--repeats", "1"])
    assert code == 0, err
    assert_machine_line(out.splitlines()[0])
    assert re.search(r"^resnet20 +19 ", out, re.M) and re.search(r"^plain20 +19 ", out, re.M), out
    (line,) = summaries(out)
    assert "spread of the time per response layer" in line


def test_spikes_cost_smallest():
    argv = ["--train-images", "16", "--epochs", "2", "--n-images", "8", "--recal-images", "8", *TINY_DATA]
    code, out, err = run_command(spikes_cost, argv)
    assert code == 0, err
    assert_machine_line(out.splitlines()[0])
    assert "2 epoch checkpoints" in out and "8 validation images" in out
    assert re.search(rf"^ratio +{NUMBER}x +{NUMBER}x$", out, re.M), out  # the median, then each round's
    (line,) = summaries(out)
    assert "spike diagnosis / 2 plain validation passes" in line and "(target <= 4.00x)" in line


# ---------------------------------------------------------------------------------------------------------------
# Bad options and the GPU check


@pytest.mark.parametrize("module, argv, phrase", [
    (analysis_overhead, ["--images", "0"], "--images"),
    (analysis_overhead, ["--batch-size", "-1"], "--batch-size"),
    (train_throughput, ["--models", "resnet7"], "unknown model 'resnet7'"),
    (train_throughput, ["--steps", "1.5"], "--steps"),
    (monitor_cost, ["--every", "0"], "--every"),
    (monitor_cost, ["--steps", "4", "--every", "5"], "give --steps at least 5"),
    (depth_scaling, ["--repeats", "0"], "--repeats"),
    (spikes_cost, ["--run", "/nonexistent/run"], "not a run directory"),
])
def test_bad_options_are_one_line(module, argv, phrase):
    code, out, err = run_command(module, argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err


def test_each_command_names_itself():
    from benchmarks import gpu
    for module in (analysis_overhead, compile_choice, depth_scaling, gpu, monitor_cost, spikes_cost,
                   train_throughput):
        assert module.parser().prog == f"python -m {module.__name__}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine with a GPU the check runs for real")
def test_gpu_check_without_a_gpu_says_to_shrink():
    from benchmarks import gpu
    code, out, err = run_command(gpu, [])
    assert code == 2 and "--shrink" in err and err.count("\n") == 1


def test_gpu_check_runs_shrunk_on_a_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESNET_DIAG_PROGRESS_SECONDS": "0"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--shrink"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert_machine_line(out.splitlines()[0].replace("torch threads 1", f"torch threads {torch.get_num_threads()}"))
    for part in ("throughput", "monitor", "compile", "overhead", "he2016"):
        assert f"\n## {part}\n" in out
    table = out.split("\n## summary\n")[1].splitlines()
    assert table[0].split() == ["part", "target", "figure", "goal", "verdict"]
    parts = {row.split()[0] for row in table[1:]}
    assert parts == {"throughput", "monitor", "compile", "overhead", "he2016", "all"}
    assert "ours fp32 compiled" in out  # torch.compile's path, traced by the eager backend
    assert re.search(r"^all +the GPU check's wall time +[\d.]+ min +<= 5\.0 min +(met|MISSED)$", out, re.M), out
    assert re.search(r"^train_throughput: \d+/\d+ runs", result.stderr, re.M), result.stderr  # progress off a tty


# ---------------------------------------------------------------------------------------------------------------
# The BN monitor as a Lightning callback (the pytorch-lightning extra)


@pytest.mark.parametrize("clock", [[], ["--cpu-time"]])
def test_lightning_cost_fits_a_real_trainer_with_and_without_the_callback(capsys, clock):
    pytest.importorskip("pytorch_lightning")
    from benchmarks import lightning_cost
    assert lightning_cost.parser().prog == "python -m benchmarks.lightning_cost"
    code, out, err = run_command(lightning_cost, ["--models", "resnet20", "--steps", "2", "--every", "1",
                                                  "--batch-size", "4", "--probe-images", "3", "--attribution-images",
                                                  "5", "--recalibration-images", "5", "--repeats", "1", *clock])
    assert code == 0, err
    assert_machine_line(out.splitlines()[0])
    assert out.splitlines()[1].startswith("CPU seconds, " if clock else "seconds, ")
    row = next(line.split() for line in out.splitlines() if line.startswith("resnet20"))
    assert row[1] == "fp32" and row[5] == "1"  # steps 1 and 2: the probe is complete after the first, step 2 measured
    monitor, attribution, together = (float(cell.rstrip("%")) for cell in (row[8], row[11], row[12]))
    assert together == pytest.approx(monitor + attribution, abs=0.11)
    (line,) = summaries(out)
    assert "BNMonitorCallback at every 100 steps and the attribution" in line and "(target <= 3.0%)" in line
    logged = "".join(capsys.readouterr())  # Lightning's logger writes to the stream it found when imported
    assert "GPU available" not in out + err + logged  # its banner, once per fit, is kept out of the report
    code, out, err = run_command(lightning_cost, ["--steps", "4", "--every", "5"])
    assert code == 2 and "give --steps at least 5" in err


def test_side_by_side_times_each_kind_alone_and_paired_under_each_setting():
    from benchmarks import side_by_side
    code, out, err = run_command(side_by_side, ["--model", "resnet20", "--seconds", "0.2", "--settings", "ours"])
    assert code == 0, err  # three processes of torch's imports: one setting is enough to check the table's shape
    assert_machine_line(out.splitlines()[0])
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] == ["ours"]}
    assert set(rows) == {"ours"} and all(float(cell) > 0 for cell in rows["ours"][1:5])
    lines = summaries(out)
    assert len(lines) == 2 and all("share of its solo speed" in line and "(target >= 40.0%)" in line
                                   for line in lines)
