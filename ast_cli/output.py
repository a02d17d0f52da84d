"""Rendering results: records (the stable JSON schema), writers for table/json/jsonl/csv, atomic files,
and the JSONL journal that ``--resume`` reads."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from typing import IO, Iterator

from .tagger import FileResult, LabelScore

FORMATS = ("table", "json", "jsonl", "csv")
CSV_COLUMNS = ("path", "duration", "rank", "label", "index", "score")
CSV_SEGMENT_COLUMNS = ("start", "end")


def _labels(labels: list[LabelScore]) -> list[dict]:
    return [{"label": x.label, "index": x.index, "score": x.score} for x in labels]


def to_record(result: FileResult) -> dict:
    """The JSON record of one file. Keys ``path``, ``duration``, ``labels``, ``error`` are the stable schema;
    ``segments`` appears with ``--segments``; ``size`` and ``mtime`` identify the file for ``--resume``."""
    record = {
        "path": result.path,
        "duration": None if result.duration is None else round(result.duration, 6),
        "labels": _labels(result.labels),
        "error": result.error,
    }
    if result.segments is not None:
        record["segments"] = [{"start": s.start, "end": s.end, "labels": _labels(s.labels)} for s in result.segments]
    record["size"] = result.size
    record["mtime"] = result.mtime
    return record


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it over ``path`` only on success, so an
    interrupted run never leaves a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Writer:
    """Receives results one by one; ``close(commit)`` ends the output (``commit=False``: discard it)."""

    def write(self, result: FileResult) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self, commit: bool = True) -> None:
        pass


class _StreamWriter(Writer):
    """Common part of writers that produce text to stdout or to an atomically replaced file."""

    def __init__(self, stream: IO | None, path: str | None):
        self._atomic = atomic_write(path) if path else None
        self.stream = self._atomic.__enter__() if self._atomic else stream

    def close(self, commit: bool = True) -> None:
        self.stream.flush()
        if self._atomic is not None:
            if commit:
                self._atomic.__exit__(None, None, None)
            else:
                with contextlib.suppress(KeyboardInterrupt):
                    self._atomic.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
            self._atomic = None


class JsonWriter(_StreamWriter):
    """One JSON array; records are written as they come (to a temporary file when ``path`` is set)."""

    def __init__(self, stream: IO | None = None, path: str | None = None):
        super().__init__(stream, path)
        self.count = 0

    def write(self, result: FileResult) -> None:
        self.stream.write("[\n  " if self.count == 0 else ",\n  ")
        self.stream.write(json.dumps(to_record(result), ensure_ascii=False))
        self.count += 1

    def close(self, commit: bool = True) -> None:
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")
        super().close(commit)


class JsonlWriter(Writer):
    """One line per file, flushed as soon as it is written, so ``tail -f`` and ``--resume`` see it."""

    def __init__(self, stream: IO | None = None, path: str | None = None, append: bool = False):
        self._own = path is not None
        self.stream = open(path, "a" if append else "w", encoding="utf-8") if path else stream

    def write(self, result: FileResult) -> None:
        self.stream.write(json.dumps(to_record(result), ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self, commit: bool = True) -> None:
        self.stream.flush()
        if self._own:
            os.fsync(self.stream.fileno())
            self.stream.close()


class CsvWriter(_StreamWriter):
    """One row per (file, label): ``path,duration,rank,label,index,score`` (+ ``start,end`` with segments),
    then ``error``. File-level rows have empty start/end; a failed file is one row with its error."""

    def __init__(self, stream: IO | None = None, path: str | None = None, segments: bool = False):
        super().__init__(stream, path)
        self.segments = segments
        self.columns = CSV_COLUMNS + (CSV_SEGMENT_COLUMNS if segments else ()) + ("error",)
        self.csv = csv.writer(self.stream, lineterminator="\n")
        self.csv.writerow(self.columns)

    def _rows(self, result: FileResult, labels: list[LabelScore], span: tuple | None) -> None:
        duration = "" if result.duration is None else round(result.duration, 6)
        extra = (span if span else ("", "")) if self.segments else ()
        for rank, item in enumerate(labels, 1):
            self.csv.writerow((result.path, duration, rank, item.label, item.index, item.score) + extra + ("",))

    def write(self, result: FileResult) -> None:
        if result.error is not None:
            duration = "" if result.duration is None else round(result.duration, 6)
            blank = ("", "") if self.segments else ()
            self.csv.writerow((result.path, duration, "", "", "", "") + blank + (result.error,))
            return
        self._rows(result, result.labels, None)
        for segment in result.segments or []:
            self._rows(result, segment.labels, (segment.start, segment.end))
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:05.2f}" if hours else f"{minutes}:{secs:05.2f}"


class TableWriter(Writer):
    """A rich table per file (rank, label, score), and a timeline of windows with ``--segments``."""

    def __init__(self, console):
        self.console = console

    def write(self, result: FileResult) -> None:
        from rich.table import Table

        if result.error is not None:
            return  # reported on stderr, one line, by the CLI
        from rich.text import Text

        title = f"{result.path} ({result.duration:.2f} s)" if result.duration is not None else result.path
        self.console.print(Text(title, style="bold"), soft_wrap=True)  # a long path must not wrap
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("rank", justify="right")
        table.add_column("label")
        table.add_column("score", justify="right")
        for rank, item in enumerate(result.labels, 1):
            table.add_row(str(rank), item.label, f"{item.score:.4f}")
        self.console.print(table)
        if result.segments:
            timeline = Table(title="timeline", title_justify="left", show_edge=False, pad_edge=False)
            timeline.add_column("start", justify="right")
            timeline.add_column("end", justify="right")
            timeline.add_column("labels")
            for segment in result.segments:
                labels = ", ".join(f"{x.label} {x.score:.2f}" for x in segment.labels[:5]) or "-"
                timeline.add_row(_clock(segment.start), _clock(segment.end), labels)
            self.console.print(timeline)
        self.console.print()


# -- resume journal ------------------------------------------------------------------------------


def read_journal(path: str) -> dict[str, dict]:
    """Records already in a JSONL output, by path. A torn last line (a run killed mid-write) is cut off
    the file, so that appending continues from a clean line boundary."""
    done: dict[str, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as handle:
        data = handle.read()
        good_end = 0
        position = 0
        for line in io.BytesIO(data):
            position += len(line)
            if not line.endswith(b"\n"):
                break  # torn: no newline
            try:
                record = json.loads(line)
            except ValueError:
                break  # torn or garbage: everything from here is dropped
            if isinstance(record, dict) and "path" in record:
                done[record["path"]] = record
            good_end = position
        if good_end != len(data):
            handle.truncate(good_end)
    return done


def already_done(record: dict | None, size: int | None, mtime: float | None) -> bool:
    """A journal record still describes the file on disk (same size and modification time)."""
    if record is None or size is None:
        return False
    return record.get("size") == size and record.get("mtime") is not None and abs(record["mtime"] - mtime) < 1e-6
