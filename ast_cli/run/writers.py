"""Writers: results to table, json, jsonl, csv and tsv, and one file per input (json, csv, tsv, Audacity
labels, Raven selection tables). A writer's ``close(commit=False)`` leaves an earlier output as it was.
"""

from __future__ import annotations

import contextlib
import csv
import os
from typing import IO, Iterator

from ..errors import OutputWriteError
from .options import OutputFormat
from .files import OutputLock, atomic_write
from .records import display_path, dumps, to_record
from .tagger import FileResult, LabelScore

CSV_COLUMNS = ("path", "duration", "rank", "label", "index", "score")  # with heads: "head" before "label"
NONE_OF = "(none of these)"  # the label text (CSV, table) of a single-label clip under its calibrated threshold
CSV_SEGMENT_COLUMNS = ("start", "end")


class Writer:
    """Receives results one by one; ``close(commit)`` ends the output (``commit=False``: a failed or
    interrupted run, which must leave an earlier file as it was)."""

    lock: OutputLock | None = None
    path: str | None = None
    provenance: dict | None = None  # added to JSON records
    per_input = False  # True: each result has a file of its own, and one that fails to write fails alone

    def write(self, result: FileResult) -> None:
        with self._errors():
            self._write(result)

    def _write(self, result: FileResult) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self, commit: bool = True) -> None:
        try:
            with self._errors():
                self._close(commit)
        finally:
            self._release()

    def _close(self, commit: bool) -> None:
        pass

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """An OSError of the output (disk full...) is one ``OutputWriteError`` naming it; a reader that went
        away (BrokenPipeError) is left for the front end to end quietly."""
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as exc:
            where = self.path or "standard output"
            raise OutputWriteError(f"cannot write {where}: {exc.strerror or exc}", path=self.path) from exc

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class _StreamWriter(Writer):
    """Writers whose whole output is only valid once complete (json, csv): to stdout, directly to a device,
    or to a temporary file renamed over the target on commit."""

    def __init__(self, stream: IO | None, path: str | None, direct: bool = False):
        self.path = path
        self._atomic = atomic_write(path) if path and not direct else None
        self._own = path is not None and direct
        with self._errors():
            if self._atomic is not None:
                self.stream = self._atomic.__enter__()
            elif self._own:
                self.stream = open(path, "w", encoding="utf-8", newline="")
            else:
                self.stream = stream

    def _finish(self) -> None:
        """What a complete output ends with (json's closing bracket)."""

    def _close(self, commit: bool) -> None:
        try:
            if commit or self._atomic is None:
                self._finish()
            _flush(self.stream)
            if self._atomic is not None and commit:
                atomic, self._atomic = self._atomic, None
                atomic.__exit__(None, None, None)
        finally:
            if self._atomic is not None:  # not committed, or the commit failed: the temporary file goes
                atomic, self._atomic = self._atomic, None
                _discard(atomic)
            elif self._own:
                self.stream.close()


def _flush(stream) -> None:
    try:
        stream.flush()
    except ValueError:  # already closed
        pass


def _discard(atomic) -> None:
    """End an ``atomic_write`` without renaming: its temporary file goes, the target stays as it was."""
    with contextlib.suppress(KeyboardInterrupt, OSError):
        atomic.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)


class JsonWriter(_StreamWriter):
    """One JSON array; records are written as they come (to a temporary file when ``path`` is set)."""

    def __init__(self, stream: IO | None = None, path: str | None = None, direct: bool = False):
        super().__init__(stream, path, direct)
        self.count = 0

    def _write(self, result: FileResult) -> None:
        self.stream.write("[\n  " if self.count == 0 else ",\n  ")
        self.stream.write(dumps(to_record(result, self.provenance)))
        self.count += 1

    def _finish(self) -> None:
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")


class JsonlWriter(Writer):
    """One line per file, flushed as soon as it is written, so ``tail -f`` and ``--resume`` see it.

    A file that is not appended to (new, or replaced with ``--overwrite``) starts as a temporary file beside it,
    renamed over the target with its first record: a run that writes no record (interrupted, failed) leaves an
    earlier file byte for byte, and from the first record on the file holds whole lines of what the run did,
    which ``--resume`` continues. ``direct``: a device or FIFO, written as it is."""

    def __init__(self, stream: IO | None = None, path: str | None = None, append: bool = False, fsync: bool = True,
                 direct: bool = False):
        self.path = path
        self._own = path is not None
        self._fsync = fsync
        self._atomic = atomic_write(path) if path and not (append or direct) else None
        with self._errors():
            if self._atomic is not None:
                self.stream = self._atomic.__enter__()
            else:
                self.stream = open(path, "a" if append else "w", encoding="utf-8") if path else stream

    def _write(self, result: FileResult) -> None:
        self.stream.write(dumps(to_record(result, self.provenance)) + "\n")
        self.stream.flush()
        if self._atomic is not None:
            self._replace()

    def _replace(self) -> None:
        """The temporary file (fsynced) takes the target's place; the run appends to it from now on."""
        atomic, self._atomic = self._atomic, None
        atomic.__exit__(None, None, None)
        self.stream = open(os.path.realpath(self.path), "a", encoding="utf-8")

    def _close(self, commit: bool) -> None:
        try:
            if commit and self._atomic is not None:  # a complete run with no record: an empty output
                self._replace()
            _flush(self.stream)
            if self._own and self._fsync and not self.stream.closed:  # closed: its replacing failed
                os.fsync(self.stream.fileno())
        finally:
            if self._atomic is not None:  # no record written: the earlier file stays
                atomic, self._atomic = self._atomic, None
                _discard(atomic)
            elif self._own:
                self.stream.close()


class CsvWriter(_StreamWriter):
    """One row per (file, label): ``path,duration,rank,label,index,score`` (+ ``start,end`` with segments),
    then ``error``; a clip that is none of the labels (calibrated, single-label) has one row labelled NONE_OF, one
    with no label at all (none reached the threshold) one row with the label empty.
    File-level rows have empty start/end; a failed file is one row with its error. With ``heads``, a ``head``
    column before ``label``, and ranks counted within each head."""

    def __init__(self, stream: IO | None = None, path: str | None = None, segments: bool = False,
                 direct: bool = False, delimiter: str = ",", heads: bool = False):
        super().__init__(stream, path, direct)
        self.segments, self.heads = segments, heads
        columns = CSV_COLUMNS[:3] + ("head",) + CSV_COLUMNS[3:] if heads else CSV_COLUMNS
        self.columns = columns + (CSV_SEGMENT_COLUMNS if segments else ()) + ("error",)
        self.csv = csv.writer(self.stream, lineterminator="\n", delimiter=delimiter)
        self.csv.writerow(self.columns)

    def _rows(self, result: FileResult, labels: list[LabelScore], span: tuple | None) -> None:
        duration = "" if result.duration is None else round(result.duration, 6)
        extra = (span if span else ("", "")) if self.segments else ()
        path = display_path(result.path)
        for head, items in by_head(labels):
            for rank, item in enumerate(items, 1):
                named = (head, item.label) if self.heads else (item.label,)
                self.csv.writerow((path, duration, rank, *named, item.index, item.score) + extra + ("",))

    def _write(self, result: FileResult) -> None:
        if result.error is not None:
            duration = "" if result.duration is None else round(result.duration, 6)
            blank = ("",) * (len(self.columns) - 3)  # every column but path, duration and error
            self.csv.writerow((display_path(result.path), duration) + blank + (result.error,))
            return
        self._rows(result, result.labels, None)
        if result.none_of or not result.labels:  # a row of its own, so the file is not mistaken for one that was
            # never tagged: none of the labels (calibrated, single-label), or no label reached --threshold
            duration = "" if result.duration is None else round(result.duration, 6)
            label = NONE_OF if result.none_of else ""
            named = ("", label) if self.heads else (label,)  # in the label column, with heads too
            self.csv.writerow((display_path(result.path), duration, "", *named, "", "")
                              + (("", "") if self.segments else ()) + ("",))
        for segment in result.segments or []:
            self._rows(result, segment.labels, (segment.start, segment.end))
        self.stream.flush()


def by_head(labels: list[LabelScore]) -> list[tuple[str | None, list[LabelScore]]]:
    """Labels grouped by head, in order (a result holds each head's labels together)."""
    import itertools

    return [(head, list(items)) for head, items in itertools.groupby(labels, key=lambda x: x.head)]


def qualified(item: LabelScore) -> str:
    """``head:label`` for a label of a head, else the label."""
    return item.label if item.head is None else f"{item.head}:{item.label}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:05.2f}" if hours else f"{minutes}:{secs:05.2f}"


class TableWriter(Writer):
    """A rich table per file (rank, label, score), and a timeline of windows with ``--segments``."""

    def __init__(self, console):
        self.console = console

    def _write(self, result: FileResult) -> None:
        from rich.table import Table
        from rich.text import Text

        if result.error is not None:
            return  # reported on stderr, one line, by the CLI
        path = display_path(result.path)
        title = f"{path} ({result.duration:.2f} s)" if result.duration is not None else path
        self.console.print(Text(title, style="bold"), soft_wrap=True)  # a long path must not wrap
        for head, items in by_head(result.labels) or [(None, [])]:
            # Text, not str: rich reads "[...]" in a str as markup (a label "[/]" crashed the run) and ":x:" as emoji
            table = Table(title=None if head is None else Text(head), title_justify="left", show_edge=False,
                          pad_edge=False)
            table.add_column("rank", justify="right")
            table.add_column("label")
            table.add_column("score", justify="right")
            for rank, item in enumerate(items, 1):
                table.add_row(str(rank), Text(item.label), f"{item.score:.4f}")
            if result.none_of:
                table.add_row("", NONE_OF, "")
            self.console.print(table)
        if result.segments:
            timeline = Table(title="timeline", title_justify="left", show_edge=False, pad_edge=False)
            timeline.add_column("start", justify="right")
            timeline.add_column("end", justify="right")
            timeline.add_column("labels")
            for segment in result.segments:
                labels = ", ".join(f"{qualified(x)} {x.score:.2f}" for _, items in by_head(segment.labels)
                                   for x in items[:5]) or "-"
                timeline.add_row(_clock(segment.start), _clock(segment.end), Text(labels))
            self.console.print(timeline)
        self.console.print()

RAVEN_COLUMNS = ("Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)", "High Freq (Hz)",
                 "Label", "Index", "Score")

class PerFileWriter(Writer):
    """Writes each result to its own file, atomically; a failed file gets no file (its error goes to stderr,
    and a rerun tries it again). A file that cannot be written (a name too long) is that input's failure only."""

    per_input = True

    def __init__(self, outputs: dict[str, str], fmt: OutputFormat, segments: bool, heads: bool = False):
        self.outputs, self.format, self.segments, self.heads = outputs, fmt, segments, heads

    def _write(self, result: FileResult) -> None:
        if result.error is not None:
            return
        self.path = self.outputs[result.path]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_write(self.path) as handle:
            if self.format is OutputFormat.json:
                handle.write(dumps(to_record(result, self.provenance), indent=2) + "\n")
            elif self.format in (OutputFormat.csv, OutputFormat.tsv):
                rows = CsvWriter(handle, segments=self.segments, heads=self.heads,
                                 delimiter="\t" if self.format is OutputFormat.tsv else ",")
                rows.write(result)
            elif self.format is OutputFormat.audacity:
                handle.write(audacity_labels(result))
            else:
                handle.write(raven_table(result))


def _spans(result: FileResult) -> list[tuple[float, float, list[LabelScore]]]:
    if result.segments:
        return [(s.start, s.end, s.labels) for s in result.segments]
    return [(0.0, result.duration or 0.0, result.labels)]


def audacity_labels(result: FileResult) -> str:
    """An Audacity label track (File > Import > Labels): ``start<TAB>end<TAB>label`` per window and label."""
    return "".join(f"{start:.6f}\t{end:.6f}\t{qualified(x)} ({x.score:.3f})\n"
                   for start, end, labels in _spans(result) for x in labels)


def raven_table(result: FileResult) -> str:
    """A Raven selection table (as BirdNET writes them): one selection per window and label, full band."""
    lines = ["\t".join(RAVEN_COLUMNS)]
    number = 0
    for start, end, labels in _spans(result):
        for x in labels:
            number += 1
            lines.append("\t".join(map(str, (number, "Spectrogram 1", 1, f"{start:.6f}", f"{end:.6f}", 0, 8000,
                                             qualified(x), x.index, f"{x.score:.6f}"))))
    return "\n".join(lines) + "\n"
