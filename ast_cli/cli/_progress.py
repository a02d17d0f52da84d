"""Progress on stderr: files done/total, hours of audio, speed as x real-time, ETA. Off when stderr is not a
terminal or with ``--quiet``."""

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
