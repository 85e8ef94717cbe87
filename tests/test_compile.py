"""`--compile auto|on|off`: the choice (known answers), a compiled run against an eager one and resumed, and a
model that fails to compile (in its forward or its backward) training exactly as an eager run after one line."""
import json

import pytest
import torch
import torch.nn as nn

import models
from conftest import TINY_RUN
from train import config as cfg
from train import step as train_step
from train import trainer
from train.errors import UserError
from train.__main__ import main as train_main

CPU = torch.device("cpu")
RUN = ["--model", "resnet20", *TINY_RUN, "--deterministic", "--attribution-images", "0", "--monitor-every", "0"]


def never_timed() -> float:
    raise AssertionError("the choice did not need the step time")


def test_the_choice_known_answers():
    assert train_step.choose_compile("on", 10, CPU, never_timed) == (True, "--compile on")
    assert train_step.choose_compile("off", 10**6, CPU, never_timed) == (False, "--compile off")
    compiled, why = train_step.choose_compile("auto", 184, CPU, never_timed)  # the demo's length
    assert not compiled and why == "auto: 184 steps, too few to repay compiling"
    compiled, why = train_step.choose_compile("auto", 64_000, CPU, lambda: 0.4)  # he2016's resnet56 on a CPU
    assert compiled and why == "auto: 64,000 steps of 0.4 s eager repay a ~90 s compile"
    assert not train_step.choose_compile("auto", 2_000, CPU, lambda: 0.01)[0]  # 20 s of steps
    warm_up = train_step.PAYBACK * train_step.COMPILE_WARM_UP["cpu"]  # the boundary: exactly ten warm-ups
    assert train_step.choose_compile("auto", 2_000, CPU, lambda: warm_up / 2_000)[0]
    assert not train_step.choose_compile("auto", 2_000, CPU, lambda: warm_up / 2_000 * 0.99)[0]
    compiled, why = train_step.choose_compile("auto", 64_000, CPU, never_timed, deterministic=True)
    assert not compiled and why.startswith("auto: --deterministic")


def test_the_option_and_older_runs():
    parse = lambda *args: cfg.parser().parse_args(["--model", "resnet20", "--dataset", "synthetic", "--out", "x",
                                                   *args])
    assert cfg.from_args(parse()).compile == "auto"
    assert cfg.from_args(parse("--compile")).compile == "on"  # as before, when it was a flag
    assert cfg.from_args(parse("--compile", "off")).compile == "off"
    with pytest.raises(SystemExit):
        parse("--compile", "sometimes")
    older = {"model": "resnet20", "dataset": "synthetic", "out": "x", "attribution_images": 2000}
    assert cfg.config_from_dict({**older, "compile": True}, "c").compile == "on"
    config = cfg.config_from_dict({**older, "compile": False}, "c")
    assert config.compile == "off" and config.recalibration_images == 2000  # as that version recalibrated
    assert cfg.config_from_dict({**older, "recalibration_images": 256}, "c").recalibration_images == 256


def test_timing_a_step_leaves_the_model_and_the_random_stream_untouched():
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = train_step.eager_step_seconds(model, (8, 3, 32, 32), 4, None, channels_last=True)
    assert 0 < seconds < 60
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())


def failing_compile(where: str):
    """torch.compile as it fails: at the first forward call (no C++ compiler), or in the backward pass after a
    forward that ran (and moved the BN buffers)."""
    class Refused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward kernel failed to build\nthe compiler's second line")

    def compile(model, backend=None):
        class Failing(nn.Module):
            def forward(self, x):
                if where == "forward":
                    raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")
                return Refused.apply(model(x))
        return Failing()
    return compile


def tiny_step(seed: int, **options) -> train_step.TrainStep:
    """A small net with BN and dropout (whose masks draw from torch's random stream) in a TrainStep."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return train_step.TrainStep(model, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                                torch.amp.GradScaler("cpu", enabled=False), nn.CrossEntropyLoss(), None, **options)


def test_the_fallback_puts_back_the_buffers_and_the_random_stream(monkeypatch):
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    eager = tiny_step(0, compiled=False)
    torch.manual_seed(5)
    expected = [eager(x, y)[0].item() for _ in range(3)]
    monkeypatch.setattr(torch, "compile", failing_compile("backward"))
    lines = []
    failed = tiny_step(0, compiled=True, write=lines.append)
    torch.manual_seed(5)
    assert [failed(x, y)[0].item() for _ in range(3)] == expected  # the failed forward's dropout masks drawn again
    assert all(torch.equal(a, b) for a, b in zip(failed.model.state_dict().values(),
                                                 eager.model.state_dict().values()))
    assert failed.failure.startswith("RuntimeError: backward kernel failed to build") and len(lines) == 1


def test_a_compilers_own_error_is_named_and_ddp_stops_in_one_line(monkeypatch):
    inner = RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nsee the docs")
    wrapped = torch._dynamo.exc.BackendCompilerFailed(lambda gm, inputs: gm, inner, None)
    assert train_step.compile_failure(wrapped) == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    monkeypatch.setattr(torch, "compile", failing_compile("forward"))
    step = tiny_step(0, compiled=True, fall_back=False)  # DDP: the processes' collectives would not match again
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(UserError, match=r"^torch.compile failed \(RuntimeError: InvalidCxxCompiler: no working C\+\+ "
                                        r"compiler found\); train with --compile off$"):
        step(x, y)


def final_state(run_dir) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)["state_dict"]


def test_a_model_that_fails_to_compile_trains_as_the_eager_run(tmp_path, monkeypatch, capsys):
    autotuner = torch.backends.cudnn.benchmark
    assert train_main([*RUN, "--epochs", "1", "--compile", "off", "--out", str(tmp_path / "eager")]) == 0
    # --deterministic's global flags end with the run: an in-process caller keeps its own
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark == autotuner
    expected = final_state(tmp_path / "eager")
    for where in ("forward", "backward"):  # a failure in backward comes after a forward that ran
        capsys.readouterr()
        with monkeypatch.context() as patch:
            patch.setattr(torch, "compile", failing_compile(where))
            assert train_main([*RUN, "--epochs", "1", "--compile", "on", "--out", str(tmp_path / where)]) == 0
        out, err = capsys.readouterr()
        failed = [line for line in (out + err).splitlines() if "compile" in line and "failed" in line]
        assert len(failed) == 1 and failed[0].startswith("compile: torch.compile failed (RuntimeError: ")
        assert failed[0].endswith("; training eagerly") and "second line" not in failed[0]
        assert "Traceback" not in err
        config = json.loads((tmp_path / where / "config.json").read_text())
        assert (config["compile_used"], config["compile_reason"]) == ("off", "--compile on, then it failed")
        got = final_state(tmp_path / where)
        assert all(torch.equal(got[k], expected[k]) for k in expected), where  # the first step taken again exactly


def test_a_compiled_run_agrees_with_the_eager_run_and_resumes_compiled(tmp_path, monkeypatch, capsys):
    # aot_eager: torch.compile's graph capture and autograd tracing without inductor's C++ build (minutes on a
    # 2-core CPU); benchmarks/compile_choice.py runs inductor itself.
    monkeypatch.setattr(train_step, "COMPILE_BACKEND", "aot_eager")
    assert train_main([*RUN, "--compile", "off", "--out", str(tmp_path / "eager")]) == 0
    check_weights = trainer.check_weights

    def interrupted_in_epoch_2(model, epoch, run_dir):
        if epoch == 2:
            raise KeyboardInterrupt
        check_weights(model, epoch, run_dir)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "check_weights", interrupted_in_epoch_2)
        assert train_main([*RUN, "--compile", "--out", str(tmp_path / "compiled")]) != 0
    assert not (tmp_path / "compiled" / "epoch_002.pt").exists()
    capsys.readouterr()
    assert train_main(["--resume", str(tmp_path / "compiled")]) == 0
    out = capsys.readouterr().out
    assert "compile: the first compiled step took" in out  # compiled again, as the run started
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert (config["compile"], config["compile_used"], config["compile_reason"]) == ("on", "on", "--compile on")
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert not [key for key in state["state_dict"] if "_orig_mod" in key]
    expected = final_state(tmp_path / "eager")
    for key, value in expected.items():
        torch.testing.assert_close(state["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    eager_steps = torch.load(tmp_path / "eager" / "last.pt", weights_only=True)["step_history"]
    assert [row[2] for row in state["step_history"]] == pytest.approx([row[2] for row in eager_steps], rel=1e-4)
