"""`python -m MODULE ARGS` as a process of its own that does not pay for importing torch again: multiprocessing's
fork server imports the command lines once (in a fresh interpreter that never ran a torch operation, so that
forking it is safe), and each command is a child forked from it, with its own exit code, stdout, stderr, working
directory and environment. The bad-input table's rows cost their work instead of a few seconds of imports each."""
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback

# What the commands import, but not the commands' own modules, which runpy must execute as __main__ fresh.
PRELOAD = ["torch", "torchvision", "xarray", "matplotlib.pyplot", "models", "train.trainer", "train.config",
           "analyses.responses", "analyses.spikes", "diagnostics.common", "diagnostics.plotting"]
_context = None


def _context_with_preload():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(module: str, argv: list[str], cwd: str, env: dict | None, out: str, err: str) -> None:
    code = 1
    try:
        for fd, path in ((1, out), (2, err)):
            target = os.open(path, os.O_WRONLY)
            os.dup2(target, fd)
            os.close(target)
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stdin = open(os.devnull)
        os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = [module, *argv]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_module(module: str, argv: list[str], *, cwd, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
        process = _context_with_preload().Process(target=_child,
                                                  args=(module, argv, str(cwd), env, out.name, err.name))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([module, *argv], timeout)
        code = process.exitcode if process.exitcode >= 0 else 128 - process.exitcode
        return subprocess.CompletedProcess([module, *argv], code, open(out.name, errors="replace").read(),
                                           open(err.name, errors="replace").read())
