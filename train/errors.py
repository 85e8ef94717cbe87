"""The two ways a run ends that are not bugs, a user's bad input (exit 2) and a diverged run (exit 3), and
the command-line parsing that reports bad options the same way."""
import argparse


class UserError(Exception):
    """Bad input or usage. The message is one line that says what is wrong and what to do."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the step and the checkpoint kept."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `error: ...` and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value
