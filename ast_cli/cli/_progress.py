"""Progress on stderr: files done/total, hours of audio, speed as x real-time, ETA. Off when stderr is not a
terminal or with ``--quiet``. ``summary``: the end-of-run line of every batch command."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class BatchProgress:
    """Counts files and audio seconds; draws a rich progress bar when ``enabled``."""

    def __init__(self, console, total: int, enabled: bool, description: str = "tagging"):
        self.console = console
        self.total = total
        self.enabled = enabled and total > 0
        self.audio_seconds = 0.0
        self.started = time.monotonic()
        self._progress = None
        self._task = None
        self.description = description

    def __enter__(self) -> "BatchProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[noun]}"),
                TextColumn("{task.fields[audio]}"),
                TextColumn("{task.fields[speed]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, audio="", speed="",
                                                 noun="file" if self.total == 1 else "files")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    @contextmanager
    def above(self) -> Iterator[None]:
        """Write to stdout on the bar's terminal: the bar is taken off the screen, the text goes where it stood,
        the bar is drawn again below it. (Written while the bar is up, the text would start at the bar's line
        end, and the bar's first line would stay on the screen, glued to it.)"""
        if self._progress is None or not sys.stdout.isatty():
            yield
            return
        self._progress.stop()  # transient: the bar is erased and the cursor is back where it began
        try:
            yield
        finally:
            sys.stdout.flush()
            self._progress.start()

    @property
    def realtime_factor(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.audio_seconds / elapsed if elapsed > 0 else 0.0

    def advance(self, duration: float | None) -> None:
        self.audio_seconds += duration or 0.0
        if self._progress is not None:
            self._progress.update(
                self._task,
                advance=1,
                audio=audio_amount(self.audio_seconds),
                speed=f"{self.realtime_factor:.1f}x real-time",
            )


def audio_amount(seconds: float) -> str:
    """How much audio: ``42 s``, ``7.5 min``, ``3.21 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s of audio"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min of audio"
    return f"{seconds / 3600:.2f} h of audio"


class DownloadBar:
    """``hub.DownloadProgress`` on stderr: one rich bar on a terminal (gone when done), else one line
    ``downloading MODEL (SIZE) to CACHE``."""

    def __init__(self, console):
        self.console = console
        self._progress = None
        self._task = None

    def start(self, model: str, size: int | None, cache) -> None:
        if not self.console.is_terminal:
            from ._errors import say

            say(self.console, f"downloading {model} ({megabytes(size)}) to {cache}")
            return
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._progress = Progress(TextColumn("downloading {task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(model, total=size)

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=nbytes)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def download_progress(console, quiet: bool) -> DownloadBar | None:
    """What a command passes as ``progress`` to the hub's downloads: nothing with ``--quiet``."""
    return None if quiet else DownloadBar(console)


def megabytes(size: int | None) -> str:
    """``346 MB``, ``0.2 MB``; ``size unknown`` for None."""
    if size is None:
        return "size unknown"
    return f"{size / 1e6:.0f} MB" if size >= 10e6 else f"{size / 1e6:.1f} MB"


def summary(console, counts: str, progress: BatchProgress, where: str) -> None:
    """The end-of-run line on stderr (``classify``, ``extract-features``): what became of the files (``counts``),
    how much audio in how long, and where the results are (``where``)."""
    from ._errors import say

    elapsed = time.monotonic() - progress.started
    speed = f" ({progress.realtime_factor:.1f}x real-time)" if progress.audio_seconds else ""
    say(console, f"{counts}; {audio_amount(progress.audio_seconds)} in {elapsed:.1f} s{speed}; {where}")
