"""How the process starts and ends: SIGTERM handled like Ctrl-C, a closed stdout pipe ends quietly as Unix
filters do, and a closed or broken stderr never stops a run (messages are best effort, data is not)."""

from __future__ import annotations

import atexit
import os
import signal
import sys

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a filter whose reader went away
EXIT_TERMINATED = 143  # 128 + SIGTERM
stdout_closed = False  # the process started with stdout closed (>&-): data must go to --output
_finishing = False  # the run is committing its output: a signal no longer interrupts it


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that the same clean-up runs."""


def _on_signal(signum, frame) -> None:
    if _finishing:
        return  # the output is being (or has been) replaced: the run ends as it would have, 0 or 1
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def finishing() -> None:
    """From now on Ctrl-C and SIGTERM no longer interrupt the run: it is committing its output. Either the
    output is replaced and the run reports how it went, or a signal came earlier and it is not replaced and the
    run exits 130/143, never both. (Python runs signal handlers between bytecodes, so the one flag decides.)"""
    global _finishing
    _finishing = True


def _devnull(mode: str = "w"):
    return open(os.devnull, mode, encoding="utf-8")


def run_main(app) -> None:
    global stdout_closed
    if sys.stdout is None:  # started with stdout closed (>&-): data needs --output; nothing may crash
        sys.stdout = _devnull()
        stdout_closed = True
    if sys.stderr is None:  # 2>&-
        sys.stderr = _devnull()
    if sys.stdin is None:
        sys.stdin = _devnull("r")
    global _finishing
    _finishing = False
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup, a shell's background job: stay ignored
            signal.signal(signum, _on_signal)
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exit_code(exc)
    except BrokenPipeError:
        code = EXIT_BROKEN_PIPE
    _quiet_exit(code)


def exit_code(exc: SystemExit) -> int:
    """The process exit code a ``SystemExit`` stands for (None: 0; a message: 1)."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def _quiet_exit(code: int) -> None:
    """Flush stdout and stderr; where a reader went away, point the descriptor at /dev/null so that Python's
    own flush at exit prints nothing."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            getattr(sys, name).flush()
        except BrokenPipeError:
            code = EXIT_BROKEN_PIPE if fd == 1 and code == 0 else code
            _to_devnull(fd)
            setattr(sys, name, _devnull())  # what could not be flushed must not fail Python's own exit
        except (OSError, ValueError):
            _to_devnull(fd)
            setattr(sys, name, _devnull())
    if code in (130, EXIT_TERMINATED):
        # Interrupted: the output is closed and flushed. End now, with this code: waiting for decoder threads
        # to finish their block would delay the exit, and CPython turns a Ctrl-C that landed inside some C
        # extensions' start-up code into death by SIGINT at exit, whatever was handled since.
        os._exit(code)
    sys.exit(code)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # bytes: smaller blocks come from the heap, where a freed one is reused (glibc's maximum)
TRIM_THRESHOLD = 256 << 20  # bytes of freed heap kept for reuse rather than handed back to the kernel


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of returning them to the kernel: a forward's
    activations (up to a few MB each, freed layer by layer) then land on pages already mapped, where glibc's
    default (blocks over its moving mmap threshold get fresh pages, and freed heap past twice that goes back to
    the kernel) gave some processes 5-17 k page faults per bf16 forward (~10% slower forwards there) and others
    none; with it no process has them (2-core Sapphire Rapids: ~170 k faults per six-clip ``classify --fast``
    against 175-570 k; its wall time 3.56 s against 3.69 in one set of runs, within noise in later ones). Memory
    stays bounded by the run's peak: what is kept is what a window needed. Only for the ``ast`` process
    (``main_process``), only with glibc, and never where the user tuned malloc (``MALLOC_*_`` variables,
    ``GLIBC_TUNABLES``). True if set."""
    import ctypes

    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr
        return False
    if ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "malloc" in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def end_process(code: int) -> None:
    """End this process with ``code``: without CPython's teardown where it may be skipped, else as usual."""
    if _can_skip_teardown():
        _exit_without_teardown(code)
    sys.exit(code)


def _can_skip_teardown() -> bool:
    """Whether this process may end without CPython's teardown: only once torch is loaded (where the teardown
    costs: ~0.4 s of freeing torch's modules and libraries, a tenth of a six-clip ``ast classify --fast`` run on
    the 2-core Sapphire Rapids development CPU), never under a profiler or tracer (cProfile and coverage write
    their results after ``main`` returns), and only where this CPython has the hooks the teardown would run."""
    import threading

    return ("torch" in sys.modules and sys.getprofile() is None and sys.gettrace() is None
            and hasattr(threading, "_shutdown") and hasattr(atexit, "_run_exitfuncs"))


def _exit_without_teardown(code: int) -> None:
    """End the process as CPython's own exit would, less the teardown nothing is waiting for: wait for the
    threads that are still working (``threading._shutdown``, CPython's first step: it also joins a reader pool's
    threads), run every ``atexit`` handler (logging's flush, ``weakref.finalize`` clean-ups such as temporary
    directories, Ray's shutdown), flush stdout and stderr, then ``os._exit``. Every output file is closed (and
    atomically renamed) before a command returns, so nothing buffered is left behind."""
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _to_devnull(fd: int) -> None:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass
