"""Results out: records (the stable JSON schema), table/json/jsonl/csv/tsv writers, and output files that never
harm what was there before.

``plan_output`` checks an output before any work (format from the extension, not a directory, not one of the
inputs, not an existing non-empty file unless resuming or overwriting, writable, not used by another run) and
returns an ``OutputTarget``; ``target.open()`` then gives the writer. Files are written so that a failed or
interrupted run leaves an earlier output byte for byte as it was:

- json, csv, tsv: into a temporary file beside the target, renamed over it only when the run completes
  (``close(commit=True)``); an interrupted run discards it. A symlink is written through (its target is
  replaced, the link stays); a device or FIFO (``/dev/stdout``, ``>(gzip)``) is written directly.
- jsonl: line by line into the file itself (flushed per line, so ``tail -f`` and ``--resume`` see each
  record); fsync only where there is a disk behind it.

New files get the mode the umask allows; a replaced file keeps its mode. From planning (before a resumed
output is read) to the end of writing, a run holds an exclusive lock (a second run on the same output stops
with one line). Paths that are not valid UTF-8 (a
``caf\\xe9.wav`` from a latin-1 file system) are written as JSON ``\\udcXX`` escapes, which ``json.loads`` +
``os.fsencode`` turn back into the original bytes.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Iterator, Sequence, TextIO

from ..errors import OutputWriteError, UsageError
from .options import OutputFormat
from .tagger import FileResult, LabelScore

CSV_COLUMNS = ("path", "duration", "rank", "label", "index", "score")
CSV_SEGMENT_COLUMNS = ("start", "end")
TEMP_SUFFIX = ".ast-tmp"  # our temporary files: `.<name>.<random>.ast-tmp` beside the output
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, APFS, NTFS)
_BESIDE_ROOM = 32  # what our names add to `.<name>`: `.<random>.ast-tmp` (17), `.ast-lock` (9)


EXTENSIONS = {".json": OutputFormat.json, ".jsonl": OutputFormat.jsonl, ".ndjson": OutputFormat.jsonl,
              ".csv": OutputFormat.csv, ".tsv": OutputFormat.tsv}


# -- records -------------------------------------------------------------------------------------------


def _labels(labels: list[LabelScore]) -> list[dict]:
    return [{"label": x.label, "index": x.index, "score": x.score} for x in labels]


def to_record(result: FileResult, provenance: dict | None = None) -> dict:
    """The JSON record of one file. Keys ``path``, ``duration``, ``labels``, ``error`` are the stable schema;
    ``segments`` appears with ``--segments``; ``size`` and ``mtime`` identify the file for ``--resume``;
    ``provenance`` (``model`` and ``settings``: what made the scores) comes last."""
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
    record.update(provenance or {})
    return record


def dumps(record: dict, indent: int | None = None) -> str:
    """One record as JSON text that is always valid UTF-8: names with undecodable bytes (held as surrogate
    escapes) are written with ``\\u`` escapes, which ``json.loads`` reads back to the same string."""
    text = json.dumps(record, ensure_ascii=False, allow_nan=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True, allow_nan=False, indent=indent)
    return text


def display_path(path: str) -> str:
    """A path for text outputs (CSV, table, messages): undecodable bytes shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if _has_surrogates(path) else path


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# -- output files --------------------------------------------------------------------------------------


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def beside(path: str) -> str:
    """The stem of our files beside ``path`` (temporary files, the lock): ``<folder>/.<name>``, or, where the
    name is too long to take our suffixes within NAME_MAX, ``<folder>/.<hash of the name>``, so that any name
    the file system allows can be an output."""
    path = os.path.realpath(path)
    name = os.path.basename(path)
    if len(os.fsencode(name)) + 1 + _BESIDE_ROOM > NAME_MAX:
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return os.path.join(os.path.dirname(path), "." + name)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it over ``path`` only on success, so an interrupted
    run never leaves a half-written file. A symlink is written through; the file gets the mode the umask
    allows, or keeps the mode of the file it replaces."""
    path = os.path.realpath(path)  # through symlinks: the link stays a link
    fd, tmp = _temp_file(path)
    try:
        try:
            os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _temp_file(path: str) -> tuple[int, str]:
    """A new temporary file beside ``path``: (descriptor, name)."""
    stem = beside(path)
    return tempfile.mkstemp(prefix=os.path.basename(stem) + ".", suffix=TEMP_SUFFIX, dir=os.path.dirname(stem))


def remove_stale_temp_files(path: str, older_than: float = 0.0) -> int:
    """Remove our temporary files beside ``path`` left by runs that were killed (the caller holds the lock of
    ``path``, so no live run owns them). Returns how many were removed."""
    pattern = f"{glob.escape(beside(path))}.*{TEMP_SUFFIX}"
    removed = 0
    for stale in glob.glob(pattern):
        with contextlib.suppress(OSError):
            if time.time() - os.stat(stale).st_mtime >= older_than:
                os.unlink(stale)
                removed += 1
    return removed


class OutputLock:
    """An exclusive advisory lock for one output, held while a run writes it (flock on a lock file beside it;
    the kernel releases it when the process dies, so a killed run never blocks the next)."""

    def __init__(self, path: str):
        self.output = path
        self.path = beside(path) + ".ast-lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write beside {self.path}: {exc.strerror or exc}", option="output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another run is writing {self.output} right now", option="output") from None
        if not _same_file(fd, self.path):  # the run that held it removed it meanwhile: lock the one there now
            os.close(fd)
            return self.acquire()
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _kind(path: str) -> str:
    """``missing``, ``regular`` (through symlinks), ``directory`` or ``special`` (device, FIFO, socket)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise UsageError(f"cannot use {path}: {exc.strerror or exc}", option="output") from None
    if stat.S_ISDIR(info.st_mode):
        return "directory"
    return "regular" if stat.S_ISREG(info.st_mode) else "special"


@dataclass
class OutputTarget:
    """A checked output: ``format``, ``path`` (None: stdout), the resume ``journal`` (or None)."""

    format: OutputFormat
    path: str | None = None
    kind: str = "missing"
    append: bool = False
    journal: object = None
    stream: TextIO | None = None
    lock: OutputLock | None = field(default=None, repr=False)

    def take_lock(self) -> None:
        """Hold the output's lock (a file, not a device), before its contents are read or written."""
        if self.lock is None and self.path is not None and self.kind != "special":
            lock = OutputLock(self.path)
            lock.acquire()
            self.lock = lock

    def release(self) -> None:
        """Let the lock go (a run that stops before or after writing; the writer's close does it too)."""
        if self.lock is not None:
            self.lock.release()

    def open(self, segments: bool = False, provenance: dict | None = None) -> "Writer":
        """The writer (for a file: holding the lock, taken now if ``plan_output`` did not; the writer
        releases it). ``provenance``: added to every JSON record (see ``to_record``)."""
        import sys

        stream = self.stream or sys.stdout
        if self.format is OutputFormat.table:
            from rich.console import Console

            return TableWriter(Console(file=stream, highlight=False, soft_wrap=False))
        if self.path is not None and self.kind != "special":
            self.take_lock()
            remove_stale_temp_files(self.path)
            if self.journal is not None:
                self.journal.repair()
        if self.format is OutputFormat.jsonl:
            writer: Writer = JsonlWriter(stream, self.path, append=self.append, fsync=self.kind != "special")
        elif self.format is OutputFormat.json:
            writer = JsonWriter(stream, self.path, direct=self.kind == "special")
        else:
            writer = CsvWriter(stream, self.path, segments=segments, direct=self.kind == "special",
                               delimiter="\t" if self.format is OutputFormat.tsv else ",")
        writer.lock = self.lock
        writer.provenance = provenance
        return writer


def plan_output(path: str | None, fmt: OutputFormat | str | None, *, resume: bool = False, overwrite: bool = False,
                inputs: Sequence = (), default: str = "jsonl") -> OutputTarget:
    """Check an output before any work, and decide its format. Raises ``UsageError`` (touching nothing).

    ``fmt`` None: from the extension of ``path`` (.json, .jsonl/.ndjson, .csv, .tsv), else ``default``.
    """
    fmt = OutputFormat(fmt) if fmt is not None else None
    inferred = EXTENSIONS.get(os.path.splitext(path)[1].lower()) if path else None
    if fmt is not None and inferred is not None and fmt is not inferred and fmt is not OutputFormat.table:
        raise UsageError(f"{path} looks like {inferred.value}, but the format asked for is {fmt.value}",
                         option="format", hint="drop --format, or name the file after its format")
    fmt = fmt or inferred or OutputFormat(default)
    if resume and overwrite:
        raise UsageError("resuming keeps the output, overwriting replaces it: choose one", option="resume")
    if path is None:
        if resume:
            raise UsageError("needs an output file (--output FILE.jsonl)", option="resume")
        return OutputTarget(fmt)
    if fmt in (OutputFormat.audacity, OutputFormat.raven):
        raise UsageError(f"{fmt.value} files describe one recording each: write them with --output-dir DIR",
                         option="format")
    if fmt is OutputFormat.table:
        raise UsageError("a table goes to the terminal; a file takes json, jsonl, csv or tsv", option="output")
    if resume and fmt is not OutputFormat.jsonl:
        raise UsageError("resuming needs a JSONL output (one record per line)", option="resume",
                         suggest={"format": "jsonl"})
    kind = _kind(path)
    if kind == "directory":
        raise UsageError(f"{path} is a directory", option="output")
    for item in inputs:
        name = getattr(item, "path", item)
        with contextlib.suppress(OSError):
            if kind != "missing" and os.path.samefile(name, path):
                raise UsageError(f"{path} is also one of the inputs: refusing to overwrite it", option="output")
        if os.path.realpath(name) == os.path.realpath(path):
            raise UsageError(f"{path} is also one of the inputs: refusing to overwrite it", option="output")
    target = OutputTarget(fmt, path, kind)
    if kind == "regular" and os.path.getsize(path) > 0 and not (resume or overwrite):
        raise UsageError(f"{path} exists and is not empty", option="output",
                         hint="--resume continues it (jsonl), --overwrite replaces it")
    if kind != "special":
        _check_writable(path)
    target.take_lock()  # before reading the journal: a second run must not resume from what the first writes
    if resume:
        from .resume import Journal

        try:
            target.journal = Journal.read(path)
        except BaseException:
            target.release()
            raise
        target.append = True
    return target


def check_writable_dir(out_dir: str, option: str = "out") -> None:
    """Fail before any work where nothing can be written below ``out_dir`` (a read-only file system, no
    permission), probing its nearest existing ancestor with a temporary file."""
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ast-probe-", suffix=TEMP_SUFFIX, dir=existing)
    except OSError as exc:
        raise UsageError(f"cannot write in {out_dir}: {exc.strerror or exc}", option=option) from None
    os.close(fd)
    os.unlink(probe)


def _check_writable(path: str) -> None:
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    if not os.path.isdir(directory):
        raise UsageError(f"the folder of {path} does not exist", option="output")
    try:
        fd, probe = _temp_file(real)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}", option="output") from None
    os.close(fd)
    os.unlink(probe)
    if os.path.exists(real) and not os.access(real, os.W_OK):
        raise UsageError(f"cannot write {path}: permission denied", option="output")


# -- writers -------------------------------------------------------------------------------------------


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
                with contextlib.suppress(KeyboardInterrupt, OSError):
                    atomic.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
            elif self._own:
                self.stream.close()


def _flush(stream) -> None:
    try:
        stream.flush()
    except ValueError:  # already closed
        pass


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
    """One line per file, flushed as soon as it is written, so ``tail -f`` and ``--resume`` see it."""

    def __init__(self, stream: IO | None = None, path: str | None = None, append: bool = False, fsync: bool = True):
        self.path = path
        self._own = path is not None
        self._fsync = fsync
        with self._errors():
            self.stream = open(path, "a" if append else "w", encoding="utf-8") if path else stream

    def _write(self, result: FileResult) -> None:
        self.stream.write(dumps(to_record(result, self.provenance)) + "\n")
        self.stream.flush()

    def _close(self, commit: bool) -> None:
        try:
            _flush(self.stream)
            if self._own and self._fsync:
                os.fsync(self.stream.fileno())
        finally:
            if self._own:
                self.stream.close()


class CsvWriter(_StreamWriter):
    """One row per (file, label): ``path,duration,rank,label,index,score`` (+ ``start,end`` with segments),
    then ``error``. File-level rows have empty start/end; a failed file is one row with its error."""

    def __init__(self, stream: IO | None = None, path: str | None = None, segments: bool = False,
                 direct: bool = False, delimiter: str = ","):
        super().__init__(stream, path, direct)
        self.segments = segments
        self.columns = CSV_COLUMNS + (CSV_SEGMENT_COLUMNS if segments else ()) + ("error",)
        self.csv = csv.writer(self.stream, lineterminator="\n", delimiter=delimiter)
        self.csv.writerow(self.columns)

    def _rows(self, result: FileResult, labels: list[LabelScore], span: tuple | None) -> None:
        duration = "" if result.duration is None else round(result.duration, 6)
        extra = (span if span else ("", "")) if self.segments else ()
        path = display_path(result.path)
        for rank, item in enumerate(labels, 1):
            self.csv.writerow((path, duration, rank, item.label, item.index, item.score) + extra + ("",))

    def _write(self, result: FileResult) -> None:
        if result.error is not None:
            duration = "" if result.duration is None else round(result.duration, 6)
            blank = ("", "") if self.segments else ()
            self.csv.writerow((display_path(result.path), duration, "", "", "", "") + blank + (result.error,))
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

    def _write(self, result: FileResult) -> None:
        from rich.table import Table
        from rich.text import Text

        if result.error is not None:
            return  # reported on stderr, one line, by the CLI
        path = display_path(result.path)
        title = f"{path} ({result.duration:.2f} s)" if result.duration is not None else path
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


# -- one result file per input ------------------------------------------------------------------------

PER_FILE_SUFFIXES = {OutputFormat.json: ".json", OutputFormat.csv: ".csv", OutputFormat.tsv: ".tsv",
                     OutputFormat.audacity: ".labels.txt", OutputFormat.raven: ".selections.txt"}
RAVEN_COLUMNS = ("Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)", "High Freq (Hz)",
                 "Label", "Index", "Score")


@dataclass
class OutputDir:
    """``--output-dir``: one result file per input, at the input's path mirrored below ``path``."""

    path: str
    format: OutputFormat
    outputs: dict[str, str] = field(default_factory=dict)  # source name -> its result file
    journal: object = None

    @property
    def needs_segments(self) -> bool:
        """Label tracks and selection tables are made of windows."""
        return self.format in (OutputFormat.audacity, OutputFormat.raven)

    def open(self, segments: bool = False, provenance: dict | None = None) -> "Writer":
        writer = PerFileWriter(self.outputs, self.format, segments)
        writer.provenance = provenance
        return writer

    def release(self) -> None:
        """Nothing to let go: each file is written atomically, with no lock."""


def plan_output_dir(path: str, fmt: OutputFormat | str | None, items: Sequence, *, overwrite: bool = False
                    ) -> tuple[OutputDir, list]:
    """Check ``--output-dir`` before any work; returns it and the items still to do (a file's result already
    there is done, unless ``overwrite``)."""
    from ..audio.inputs import claim_outputs

    fmt = OutputFormat(fmt) if fmt is not None else OutputFormat.json
    if fmt not in PER_FILE_SUFFIXES:
        raise UsageError(f"one file per input takes {', '.join(f.value for f in PER_FILE_SUFFIXES)}",
                         option="format")
    if _kind(path) not in ("missing", "directory"):
        raise UsageError(f"{path} exists and is not a directory", option="output_dir")
    check_writable_dir(path, option="output_dir")
    target, todo = OutputDir(path, fmt), []
    inputs = {os.path.realpath(getattr(item, "path", item)) for item in items}
    for item, output in claim_outputs(items, path, PER_FILE_SUFFIXES[fmt]):
        if os.path.realpath(output) in inputs:
            raise UsageError(f"{output} is also one of the inputs: refusing to overwrite it", option="output_dir")
        target.outputs[item.path] = output
        if overwrite or item.error is not None or not os.path.isfile(output):
            todo.append(item)
    return target, todo


class PerFileWriter(Writer):
    """Writes each result to its own file, atomically; a failed file gets no file (its error goes to stderr,
    and a rerun tries it again). A file that cannot be written (a name too long) is that input's failure only."""

    per_input = True

    def __init__(self, outputs: dict[str, str], fmt: OutputFormat, segments: bool):
        self.outputs, self.format, self.segments = outputs, fmt, segments

    def _write(self, result: FileResult) -> None:
        if result.error is not None:
            return
        self.path = self.outputs[result.path]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_write(self.path) as handle:
            if self.format is OutputFormat.json:
                handle.write(dumps(to_record(result, self.provenance), indent=2) + "\n")
            elif self.format in (OutputFormat.csv, OutputFormat.tsv):
                rows = CsvWriter(handle, segments=self.segments,
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
    return "".join(f"{start:.6f}\t{end:.6f}\t{x.label} ({x.score:.3f})\n"
                   for start, end, labels in _spans(result) for x in labels)


def raven_table(result: FileResult) -> str:
    """A Raven selection table (as BirdNET writes them): one selection per window and label, full band."""
    lines = ["\t".join(RAVEN_COLUMNS)]
    number = 0
    for start, end, labels in _spans(result):
        for x in labels:
            number += 1
            lines.append("\t".join(map(str, (number, "Spectrogram 1", 1, f"{start:.6f}", f"{end:.6f}", 0, 8000,
                                             x.label, x.index, f"{x.score:.6f}"))))
    return "\n".join(lines) + "\n"
