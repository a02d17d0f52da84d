"""How the process starts and ends: SIGTERM handled like Ctrl-C, a closed stdout pipe ends quietly as Unix
filters do, and a closed or broken stderr never stops a run (messages are best effort, data is not)."""

from __future__ import annotations

import os
import signal
import sys

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a filter whose reader went away
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that the same clean-up runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _devnull(mode: str = "w"):
    return open(os.devnull, mode, encoding="utf-8")


def run_main(app) -> None:
    if sys.stdout is None:  # started with stdout closed (>&-): data needs --output; nothing may crash
        sys.stdout = _devnull()
    if sys.stderr is None:  # 2>&-
        sys.stderr = _devnull()
    if sys.stdin is None:
        sys.stdin = _devnull("r")
    signal.signal(signal.SIGTERM, _on_sigterm)
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BrokenPipeError:
        code = EXIT_BROKEN_PIPE
    _quiet_exit(code)


def _quiet_exit(code: int) -> None:
    """Flush stdout and stderr; where a reader went away, point the descriptor at /dev/null so that Python's
    own flush at exit prints nothing."""
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        try:
            stream.flush()
        except BrokenPipeError:
            code = EXIT_BROKEN_PIPE if fd == 1 and code == 0 else code
            _to_devnull(fd)
        except (OSError, ValueError):
            _to_devnull(fd)
    sys.exit(code)


def _to_devnull(fd: int) -> None:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass
