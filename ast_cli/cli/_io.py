"""File descriptors and streams: C-library noise kept off stderr while a batch runs."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def native_stderr_silenced(enabled: bool = True) -> Iterator[None]:
    """Send what C libraries print on file descriptor 2 (mpg123's "Note: Trying to resync...", ffmpeg,
    libsndfile) to /dev/null while a batch runs, so that stderr carries only our progress and one line
    per failure. Python's own ``sys.stderr`` keeps writing to the real stderr. Off with --debug."""
    if not enabled:
        yield
        return
    import io
    import warnings

    try:
        python_fd = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        python_fd = None  # sys.stderr is not a real file (a test runner's capture): leave it alone
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    old_stderr = sys.stderr
    if python_fd == 2:
        sys.stderr = open(os.dup(saved), "w", encoding=old_stderr.encoding or "utf-8", errors="backslashreplace",
                          buffering=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library warnings are not the user's business without --debug
            yield
    finally:
        if sys.stderr is not old_stderr:
            try:  # stderr may be full or gone (2>/dev/full): messages are best effort
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            try:
                sys.stderr.close()
            except (OSError, ValueError):
                pass
            sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def stdout_for_data_only() -> Iterator:
    """A private stream to the real stdout for our records, while file descriptor 1 and ``sys.stdout`` point at
    stderr: libraries that print on stdout (Ray's raylet messages about a worker that died) cannot get into
    the data. Yields the data stream; restores everything after."""
    import io

    try:
        if sys.stdout.fileno() != 1:
            raise ValueError("sys.stdout is not file descriptor 1")
        sys.stdout.flush()
        real = os.dup(1)
    except (OSError, ValueError, io.UnsupportedOperation, AttributeError):  # not a real file (a test runner)
        yield sys.stdout
        return
    data = open(real, "w", encoding="utf-8", errors="strict", closefd=True)
    old = sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield data
    finally:
        try:
            data.flush()
        finally:
            sys.stdout = old
            os.dup2(real, 1)
            data.close()
