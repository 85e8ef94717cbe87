"""`python -m train ...`: exit 0 done, 2 bad input (one line `error: ...`), 3 diverged, 130 / 143 interrupted by
Ctrl-C / SIGTERM (one line: what was kept, how to continue), 1 a bug (traceback)."""
import sys
from pathlib import Path

from . import checkpoint as ckpt
from . import rundir
from .config import from_args, parser
from .errors import UserError, run_command
from .progress import interval_seconds
from .trainer import resume, start


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_command(lambda: run(args), lambda: interrupted(args.resume or args.out))


def run(args) -> None:
    interval_seconds()  # a bad RESNET_DIAG_PROGRESS_SECONDS is one line before any work, not after config.json
    if args.resume:
        others = [k for k, v in vars(args).items() if v is not None and k != "resume"]
        if others:
            raise UserError(f"--resume continues a run with its own options; drop --{others[0].replace('_', '-')}")
        resume(args.resume)
    else:
        start(from_args(args))


def interrupted(run_dir) -> str:
    """What an interrupted run kept, read off its directory, and the command that continues it."""
    if run_dir is None or not rundir.is_run_dir(run_dir):
        return "interrupted before training started; nothing was written"
    last = Path(run_dir) / "last.pt"
    again = f"python -m train --resume {run_dir}"
    if not last.is_file():
        return f"interrupted in the first epoch; nothing was kept: start again from step 0 with {again}"
    try:
        epoch = ckpt.read(last).get("epoch", "?")
    except UserError:
        epoch = "?"
    return f"interrupted; {last} keeps epoch {epoch}: continue with {again}"


if __name__ == "__main__":
    sys.exit(main())
