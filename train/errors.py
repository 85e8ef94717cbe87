"""The ways a run ends that are not bugs: a user's bad input (exit 2), a diverged run (exit 3), an interruption
(Ctrl-C: 130, SIGTERM: 143); and the command-line parsing that reports bad options the same way."""
import argparse
import math
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable

import models


class UserError(Exception):
    """Bad input or usage. The message is one line that says what is wrong and what to do."""


class DiskFull(UserError):
    """A write failed for want of space (or quota); the file it was replacing is intact."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the step and the checkpoint kept."""


BAD_INPUT = (UserError, models.ModelError)  # what every command turns into one line and exit 2
DETAIL_LIMIT = 150  # characters of another library's message quoted in ours


def first_line(exc: BaseException) -> str:
    """What went wrong, for a one-line message: the exception's first line, cut at DETAIL_LIMIT characters, or its
    type where it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:DETAIL_LIMIT] if text else type(exc).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `error: ...` and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


MAX_INT = 2**31 - 1  # what any count or seed of ours may be: far beyond any real use, within every int type


def integer(text: str, minimum: int = 0) -> int:
    """An integer in ASCII digits from `minimum` to 2^31 - 1 (Python's int() would also take '١٢' or '1_000')."""
    digits = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", digits):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    value = int(digits)
    if not minimum <= value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"{value} must be {'a positive' if minimum == 1 else 'a non-negative'} "
                                         f"integer up to {MAX_INT}")
    return value


def positive_int(text: str) -> int:
    return integer(text, 1)


def non_negative_int(text: str) -> int:
    return integer(text, 0)


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def bounded_float(minimum: float, inclusive: bool, maximum: float = math.inf) -> Callable[[str], float]:
    """A parser of finite numbers from `minimum` (itself where `inclusive`) to below `maximum`."""
    def parse(text: str) -> float:
        value = finite_float(text)
        if value < minimum or (value == minimum and not inclusive) or value >= maximum:
            raise argparse.ArgumentTypeError(f"{value:g} must be {'at least' if inclusive else 'above'} {minimum:g}"
                                             + (f" and below {maximum:g}" if math.isfinite(maximum) else ""))
        return value
    return parse


def finite_float(text: str) -> float:
    """A number, but not NaN or infinite (float() takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds (temporary files removed) as after Ctrl-C."""


@contextmanager
def sigterm_as_interrupt():
    """Inside, SIGTERM unwinds the program like Ctrl-C, as `Terminated`; the handler before is put back after
    (a command line run in-process, by a test or a notebook, leaves no handler behind)."""
    def handler(signum, frame):
        raise Terminated()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may take signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a program a signal ended: 130 Ctrl-C, 143 SIGTERM."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def run_command(main: Callable[[], None], interrupted: Callable[[], str] = lambda: "interrupted; nothing was written"
                ) -> int:
    """Run `main()` as a command and return its exit code: 0 done; bad input 2 and a diverged run 3, each one line
    `error: ...` on stderr; Ctrl-C or SIGTERM 130 / 143 with `interrupted()`'s line; a bug raises (traceback).
    Where torchrun started several processes, the first alone prints."""
    def error(message, code: int) -> int:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {message}", file=sys.stderr)
        return code
    try:
        with sigterm_as_interrupt():
            main()
    except BAD_INPUT as exc:
        return error(exc, 2)
    except TrainingDiverged as exc:
        return error(exc, 3)
    except KeyboardInterrupt as exc:
        return error(interrupted(), interrupted_exit_code(exc))
    return 0
