"""Progress on stderr: files done/total, hours of audio, speed as x real-time, ETA. Off when stderr is not a
terminal or with ``--quiet``."""

from __future__ import annotations

import time


class BatchProgress:
    """Counts files and audio seconds; draws a rich progress bar when ``enabled``."""

    def __init__(self, console, total: int, enabled: bool, description: str = "tagging"):
        self.console = console
        self.total = total
        self.enabled = enabled and total > 0
        self.done = 0
        self.failed = 0
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
                TextColumn("files"),
                TextColumn("{task.fields[audio]}"),
                TextColumn("{task.fields[speed]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, audio="0.00 h", speed="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    @property
    def realtime_factor(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.audio_seconds / elapsed if elapsed > 0 else 0.0

    def advance(self, duration: float | None, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)
        self.audio_seconds += duration or 0.0
        if self._progress is not None:
            self._progress.update(
                self._task,
                advance=1,
                audio=f"{self.audio_seconds / 3600:.2f} h",
                speed=f"{self.realtime_factor:.1f}x real-time",
            )
