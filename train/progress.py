"""Progress of long work, for the trainer and every diagnostic alike.

On a terminal, a tqdm bar on stderr, with result lines written above it. Anywhere else (a log file, CI, a
notebook, a pipe, a terminal that reports no width, where tqdm would draw nothing) a bar would be noise or
invisible and silence would hide a 20-minute epoch, so a short line such as
`train: 120/780 steps (15%), 1m 02s elapsed, about 5m 40s left` goes to stderr at most every
`RESNET_DIAG_PROGRESS_SECONDS` seconds (default 30; 0 prints one line per update).
"""
import math
import os
import sys
import time

from .errors import UserError

INTERVAL_VARIABLE = "RESNET_DIAG_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
PLURALS = {"batch": "batches", "it": "iterations"}


def interval_seconds() -> float:
    """The interval between progress lines off a terminal: the default where the variable is unset or empty; a
    value that is not a finite number >= 0 is bad input (the commands check it before any work), not a silent
    default that would leave the user wondering why their setting does nothing."""
    text = os.environ.get(INTERVAL_VARIABLE, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{INTERVAL_VARIABLE}={text[:40]!r} must be a number of seconds >= 0 between progress lines; "
                        f"set a number such as 10, or unset it for the default {DEFAULT_INTERVAL:g}")
    return value


def shows_a_bar() -> bool:
    """stderr is a terminal with a width: `script` or an editor's shell started without one reports 0 columns."""
    if sys.stderr is None or not sys.stderr.isatty():  # None: stderr closed (2>&-) or pythonw
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):
        return False


def duration(seconds: float) -> str:
    """42s, 3m 05s, 1h 02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class Progress:
    """`update(n)` after each unit of work, `write(line)` for a result line, `close()` (or `with`) at the end.

    `enabled=False` shows nothing (a DDP rank other than the first); lines from `write` are printed anyway."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.count = self.initial = initial
        self.enabled, self.bar = enabled, None
        self.interval = interval_seconds()
        self.started = self.last_line = time.monotonic()
        if enabled and shows_a_bar():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                            file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if now - self.last_line >= self.interval and sys.stderr is not None:
                self.last_line = now
                print(self.line(now), file=sys.stderr, flush=True)

    def set_total(self, total: int) -> None:
        """The amount of work changed (a live run's files were listed again)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def line(self, now: float | None = None) -> str:
        """`desc: count/total units (percent), elapsed, about ... left`."""
        elapsed = (now if now is not None else time.monotonic()) - self.started
        units = PLURALS.get(self.unit, self.unit + "s")
        if self.total:
            text = f"{self.desc}: {self.count:,}/{self.total:,} {units} ({self.count / self.total:.0%})"
        else:
            text = f"{self.desc}: {self.count:,} {units}"
        text += f", {duration(elapsed)} elapsed"
        done = self.count - self.initial
        if self.total and done > 0 and self.count < self.total:
            text += f", about {duration((self.total - self.count) * elapsed / done)} left"
        return text

    def write(self, line: str) -> None:
        """A line on stdout, above the bar where there is one."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable, total: int | None = None, desc: str = "", unit: str = "it"):
    """The items of `iterable`, with a `Progress` counting them."""
    with Progress(total, desc, unit) as progress:
        for item in iterable:
            yield item
            progress.update(1)
