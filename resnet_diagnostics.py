"""The console command `resnet-diag COMMAND ...` and the guard that keeps a user's project folder out of our
imports.

`python -m diagnostics.flops` puts the working directory first on `sys.path`, so a user's own `train.py`,
`models.py` or `analyses/` there would be imported instead of ours and run. `own_modules_first()`, called by
every package that is a way in (train, diagnostics, benchmarks) before it imports the others, takes the working
directory off `sys.path` unless it is where these packages live; relative data and output paths still mean the
working directory. What Python imports before any of our code runs cannot be guarded: a `train.py` in the
working directory *is* `python -m train` there. `resnet-diag train ...` (installed with the package, its
`sys.path[0]` the folder of the script) works from any folder.
"""
import os
import runpy
import sys

CONSOLE_VARIABLE = "RESNET_DIAG_CONSOLE_COMMAND"  # set by `resnet-diag NAME` for the usage lines
COMMANDS = {"train": "train", **{name: f"diagnostics.{name}" for name in (
    "curves", "evaluate", "flops", "responses", "gradients", "spikes", "trust", "attributions", "report")}}


OPENMP_SPIN = "10000"  # GOMP_SPINCOUNT: libgomp spins 300,000 times by default (docs/performance.md)


def start_command() -> None:
    """What every way in (train, diagnostics, benchmarks) does first under `python -m`: our modules first, Ctrl-C
    while the imports run (torch's take seconds) one line and exit 130, matplotlib's file-only backend, so that
    an `MPLBACKEND` naming no backend cannot stop matplotlib's import (the commands draw to files only), and
    OpenMP threads that wait briefly before they sleep: two of our processes on one machine (a run training, a
    diagnostic reading yesterday's checkpoints) kept 11-33% of their solo speed with libgomp's long spin, each
    spinning on the cores the other needs, and 51-70% with it shortened (benchmarks.side_by_side). Before torch
    is imported, which is when libgomp reads it; a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is left alone."""
    if sys.argv[:1] != ["-m"]:
        return
    own_modules_first()
    sys.excepthook = _interrupted_while_starting(sys.excepthook)
    os.environ["MPLBACKEND"] = "Agg"
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN


def _interrupted_while_starting(previous):
    """An excepthook: a KeyboardInterrupt that reached the top (the commands' mains catch their own, so this is
    one in the imports) is one line and exit 130; anything else goes to `previous`."""
    def hook(kind, value, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, traceback)
        print("error: interrupted while starting; nothing was written", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # sys.exit cannot leave an excepthook
    return hook


def own_modules_first() -> None:
    """Under `python -m` only (while Python looks for the module, sys.argv[0] is "-m"): a notebook or script that
    imports us from its own folder keeps that folder on its path."""
    if sys.argv[:1] != ["-m"]:
        return
    here = os.path.dirname(os.path.realpath(__file__))
    cwd = os.path.realpath(os.getcwd())
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != cwd or cwd == here]


def prog(module: str) -> str:
    """How the user typed the command, for its usage line: `resnet-diag flops` or `python -m diagnostics.flops`."""
    command = next((name for name, target in COMMANDS.items() if target == module), None)
    console = command and os.environ.get(CONSOLE_VARIABLE) == command
    return f"resnet-diag {command}" if console else f"python -m {module}"


def usage() -> str:
    return ("usage: resnet-diag COMMAND [OPTIONS ...]\n"
            f"commands: {', '.join(COMMANDS)}; each is `python -m {COMMANDS['flops'].replace('flops', 'NAME')}` "
            "(train: `python -m train`), with the same options: resnet-diag COMMAND --help")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    os.environ[CONSOLE_VARIABLE] = argv[0]  # for the usage lines; removed when the command ends
    sys.argv = ["-m", *argv[1:]]  # as `python -m` has it while the packages are imported
    try:
        runpy.run_module(COMMANDS[argv[0]], run_name="__main__", alter_sys=True)  # exits as that command does
    finally:
        del os.environ[CONSOLE_VARIABLE]
    return 0


if __name__ == "__main__":
    sys.exit(main())
