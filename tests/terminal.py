"""Run a command as a person does, in a terminal: a pseudo-terminal of 120 x 40 as stdin, stdout and stderr,
and as the controlling terminal, so that a Ctrl-C typed into it reaches the program as SIGINT."""
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass

BAR = re.compile(r"(\S+(?: \S+)*): +\d+%\|")  # tqdm's "desc:  42%|" (the bar itself follows)


@dataclass
class Session:
    process: subprocess.Popen
    master: int
    output: bytearray

    def read(self, timeout: float = 0.1) -> None:
        """Take what the program wrote within `timeout` seconds."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.output += os.read(self.master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                pass

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def wait_for(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if condition():
                return True
            self.read()
        return condition()

    def type_ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.read()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise TimeoutError(f"{self.process.args} did not finish in {timeout} s; it printed:\n{self.text[-3000:]}")
        for _ in range(20):  # what is still in the terminal's buffer
            self.read(0.05)
        os.close(self.master)
        return self.process.returncode


def start(argv: list[str], cwd, env: dict | None = None, columns: int = 120, rows: int = 40) -> Session:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def controlling_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # As a shell starts a program in a terminal: Ctrl-C and SIGTERM neither ignored nor blocked, whatever the
        # test process had (a mask and an ignored disposition are inherited through exec; the suite's workers
        # start subprocesses from threads and fork servers that block or ignore them).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                               preexec_fn=controlling_terminal, close_fds=True)
    os.close(slave)
    return Session(process, master, bytearray())


def run(argv: list[str], cwd, env: dict | None = None, timeout: float = 600, columns: int = 120) -> tuple[int, str]:
    """(exit code, everything the terminal showed)."""
    session = start(argv, cwd, env, columns=columns)
    code = session.finish(timeout)
    return code, session.text


def bars(text: str) -> set[str]:
    """The descriptions of the tqdm bars a terminal showed."""
    return {match.group(1).strip() for match in BAR.finditer(text.replace("\r", "\n"))}
