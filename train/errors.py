"""The ways a run ends that are not bugs: a user's bad input (exit 2), a diverged run (exit 3), an interruption
(Ctrl-C: 130, SIGTERM: 143); and the command-line parsing that reports bad options the same way."""
import argparse
import math
import re
import signal
import threading
from contextlib import contextmanager


class UserError(Exception):
    """Bad input or usage. The message is one line that says what is wrong and what to do."""


class DiskFull(UserError):
    """A write failed for want of space (or quota); the file it was replacing is intact."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the step and the checkpoint kept."""


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
