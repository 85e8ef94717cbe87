"""`python -m train ...`: exit 0 done, 2 bad input (one line `error: ...`), 3 diverged, 1 a bug (traceback)."""
import os
import sys

import models

from .config import from_args, parser
from .errors import TrainingDiverged, UserError
from .trainer import resume, start


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.resume:
            others = [k for k, v in vars(args).items() if v is not None and k != "resume"]
            if others:
                raise UserError(f"--resume continues a run with its own options; drop --{others[0].replace('_', '-')}")
            resume(args.resume)
        else:
            start(from_args(args))
    except (UserError, models.ModelError) as exc:
        return report(exc, 2)
    except TrainingDiverged as exc:
        return report(exc, 3)
    except KeyboardInterrupt:
        return report("interrupted; continue with --resume RUN_DIR", 130)
    return 0


def report(message, code: int) -> int:
    """One line on stderr, from the first process only where torchrun started several."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
