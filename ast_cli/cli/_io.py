"""File descriptors and streams: C-library noise kept off stderr while a batch runs (``native_stderr_silenced``,
in ``run.files`` so that the tasks use it too), our records kept apart from libraries that print on stdout."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from ..run.files import native_stderr_silenced

__all__ = ["native_stderr_silenced", "stdout_for_data_only"]


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
