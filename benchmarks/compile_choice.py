"""What `--compile auto` decides against what compiling gives: per model, the eager step auto times, the compile's
warm-up (the first compiled step, inductor's cache emptied: a user's first run), the compiled and eager training
steps, the first steps' losses compiled against eager, and the run length from which compiling pays back.

Targets: at the two lengths the issue names (the demo's 184 steps, he2016's 64,000 iterations), a run as auto
chooses takes at most 1/PAYBACK (10%) longer than with the better choice (eager: steps x eager step; compiled:
warm-up + steps x compiled step, as measured), which is what auto's rule promises; the warm-up auto assumes
(`train.step.COMPILE_WARM_UP`) is at least the measured one; and the compiled first steps' losses agree with the
eager ones (relative difference at most 1e-3 in fp32, 2e-2 in bf16). Each model trains in the precision
`--precision auto` picks on the machine (bf16 where the CPU or GPU has it natively).

Run: `python -m benchmarks.compile_choice [--models resnet20 plain20 resnet56] [--steps 20] [--backend inductor]`.
"""
import sys
import time

import torch
from torch._inductor.utils import fresh_cache

import models
from analyses.common import synchronize
from diagnostics.common import main_guard
from train.errors import UserError, positive_int
from train.step import COMPILE_WARM_UP, PAYBACK, choose_compile, eager_step_seconds
from train.trainer import native_bf16

from . import common

LENGTHS = (184, 64_000)  # the demo's run, he2016's
CHECKED_STEPS = 3  # the first steps whose losses are compared


def parser():
    p = common.parser("benchmarks.compile_choice", __doc__, models_default=["resnet20", "plain20", "resnet56"])
    p.add_argument("--steps", type=positive_int, default=20, help="training steps per timed round (default 20)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="default 128")
    p.add_argument("--backend", default="inductor", help="torch.compile's backend (default inductor, the trainer's)")
    return p


def measure_model(name: str, dtype, batches, args, device, progress) -> dict:
    torch.manual_seed(0)
    initial = models.build(name).state_dict()
    built = {}
    for kind in ("eager", "compiled"):
        built[kind] = models.build(name).to(device, memory_format=torch.channels_last)
        built[kind].load_state_dict(initial)
    shape = tuple(batches[0][0].shape)
    auto_seconds = eager_step_seconds(built["eager"], shape, 10, dtype, channels_last=True)
    steps = {kind: common.trainer_step(model, common.sgd(model, fused=device.type == "cuda"), dtype,
                                       compiled=kind == "compiled", backend=args.backend)
             for kind, model in built.items()}
    losses = {kind: [] for kind in steps}
    torch._dynamo.reset()
    with fresh_cache():  # inductor's caches, on disk and in memory, emptied: a user's first run
        for i, (x, y) in enumerate(batches[:CHECKED_STEPS]):
            for kind, step in steps.items():
                synchronize(device)
                started = time.perf_counter()
                losses[kind].append(step(x, y)[0].item())
                if i == 0 and kind == "compiled":
                    warm_up = time.perf_counter() - started
        if steps["compiled"].failure:
            raise UserError(f"{name}: torch.compile failed ({steps['compiled'].failure}); the compiled figures "
                            "would be the eager model's")
        run = lambda step: [step(x, y) for x, y in batches]
        seconds = common.interleaved({kind: (lambda s=step: run(s)) for kind, step in steps.items()}, args.repeats,
                                     device, progress)
    per_step = {kind: took / len(batches) for kind, took in seconds.items()}
    agreement = max(abs(c - e) / abs(e) for c, e in zip(losses["compiled"], losses["eager"]))
    return {"auto": auto_seconds, "warm_up": warm_up, "agreement": agreement, **per_step}


def measure(args, device: torch.device) -> common.Report:
    native, why = native_bf16(device)
    dtype, precision = (torch.bfloat16, "bf16") if native else (None, "fp32")
    batches = common.fixed_batches(args.steps * args.batch_size, args.batch_size, device)
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    report = common.Report(
        f"seconds per training step of batch {args.batch_size} in {precision} ({why}), median of {args.repeats} "
        f"interleaved rounds of {args.steps} steps after a warm-up round; warm-up: the first compiled step with "
        f"{args.backend}'s cache empty",
        ["model", "auto's eager step", "eager step", "compiled step", "speed-up", "warm-up s", "pays back after",
         *(f"auto at {n:,}" for n in LENGTHS), "loss rel. diff"],
        notes=[f"auto compiles a run whose eager steps add up to ten assumed warm-ups "
               f"({COMPILE_WARM_UP[device.type]:.0f} s here); 'pays back after': warm-up / (eager - compiled step); "
               f"'auto at N': its choice and how much longer the run takes with it than with the better one"])
    tolerance = 2e-2 if dtype is not None else 1e-3
    with common.progress(len(args.models) * (args.repeats + 1) * 2, "compile_choice") as progress:
        for name in args.models:
            m = measure_model(name, dtype, batches, args, device, progress)
            saved = m["eager"] - m["compiled"]
            pays_after = m["warm_up"] / saved if saved > 0 else float("inf")
            choices = [choose_compile("auto", n, device, lambda: m["auto"])[0] for n in LENGTHS]
            seconds = [(m["warm_up"] + n * m["compiled"], n * m["eager"]) for n in LENGTHS]  # compiled, eager
            regret = [(compiled if choice else eager) / min(compiled, eager) - 1
                      for choice, (compiled, eager) in zip(choices, seconds)]
            report.rows.append([name, f"{m['auto']:.3f}", f"{m['eager']:.3f}", f"{m['compiled']:.3f}",
                                f"{m['eager'] / m['compiled']:.2f}x", f"{m['warm_up']:.0f}",
                                "never" if saved <= 0 else f"{pays_after:,.0f} steps",
                                *(f"{'on' if c else 'off'} (+{r:.1%})" for c, r in zip(choices, regret)),
                                f"{m['agreement']:.1e}"])
            report.targets += [
                common.Target(f"{name}: a run as auto chooses against the better choice, at "
                              f"{' and '.join(f'{n:,}' for n in LENGTHS)} steps, the larger excess", max(regret),
                              1 / PAYBACK, at_most=True, unit="%"),
                common.Target(f"{name}: measured warm-up over the {COMPILE_WARM_UP[device.type]:.0f} s auto assumes",
                              m["warm_up"] / COMPILE_WARM_UP[device.type], 1.0, at_most=True),
                common.Target(f"{name}: first {CHECKED_STEPS} losses compiled vs eager, largest relative difference",
                              m["agreement"], tolerance, at_most=True, unit="%")]
    return report


def main(argv=None) -> None:
    common.main(parser, measure, argv)


if __name__ == "__main__":
    sys.exit(main_guard(main))
