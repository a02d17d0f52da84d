"""Planning an output before any work: one file (``plan_output``) or one file per input (``plan_output_dir``).
records.py makes the records, writers.py the writers, files.py the atomic files and locks.

``plan_output`` checks an output before any work (format from the extension, not a directory, not one of the
inputs, not an existing non-empty file unless resuming or overwriting, writable, not used by another run) and
returns an ``OutputTarget``; ``target.open()`` then gives the writer. Files are written so that a failed or
interrupted run leaves an earlier output byte for byte as it was:

- json, csv, tsv: into a temporary file beside the target, renamed over it only when the run completes
  (``close(commit=True)``); an interrupted run discards it. A symlink is written through (its target is
  replaced, the link stays); a device or FIFO (``/dev/stdout``, ``>(gzip)``) is written directly.
- jsonl: line by line (flushed per line, so ``tail -f`` and ``--resume`` see each record); appended to the
  file itself when resuming, else to a temporary file that replaces the target with the first record (a run
  that writes none leaves an earlier file as it was); fsync only where there is a disk behind it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Sequence, TextIO

from ..errors import UsageError
from .options import OutputFormat
from .resume import Journal, path_key
from .files import OutputLock, _check_writable, _kind, check_writable_dir, remove_stale_temp_files
from .writers import CsvWriter, JsonWriter, JsonlWriter, PerFileWriter, TableWriter, Writer


EXTENSIONS = {".json": OutputFormat.json, ".jsonl": OutputFormat.jsonl, ".ndjson": OutputFormat.jsonl,
              ".csv": OutputFormat.csv, ".tsv": OutputFormat.tsv}


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

    def open(self, segments: bool = False, provenance: dict | None = None, heads: bool = False) -> "Writer":
        """The writer (for a file: holding the lock, taken now if ``plan_output`` did not; the writer
        releases it). ``provenance``: added to every JSON record (see ``to_record``); ``heads``: labels name
        their head (a CSV column)."""
        import sys

        stream = self.stream or sys.stdout
        if self.format is OutputFormat.table:
            from .files import console

            return TableWriter(console(file=stream, highlight=False, soft_wrap=False, emoji=False))
        if self.path is not None and self.kind != "special":
            self.take_lock()
            remove_stale_temp_files(self.path)
            if self.journal is not None:
                self.journal.repair()
        if self.format is OutputFormat.jsonl:
            writer: Writer = JsonlWriter(stream, self.path, append=self.append, fsync=self.kind != "special",
                                         direct=self.kind == "special")
        elif self.format is OutputFormat.json:
            writer = JsonWriter(stream, self.path, direct=self.kind == "special")
        else:
            writer = CsvWriter(stream, self.path, segments=segments, direct=self.kind == "special",
                               delimiter="\t" if self.format is OutputFormat.tsv else ",", heads=heads)
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
    if fmt in (OutputFormat.audacity, OutputFormat.raven):  # to a file or to stdout: one recording per file
        raise UsageError(f"{fmt.value} files describe one recording each: write them with --output-dir DIR",
                         option="format")
    if path is None:
        if resume:
            raise UsageError("needs an output file (--output FILE.jsonl)", option="resume")
        return OutputTarget(fmt)
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
        try:
            target.journal = Journal.read(path)
        except BaseException:
            target.release()
            raise
        target.append = True
    return target


PER_FILE_SUFFIXES = {OutputFormat.json: ".json", OutputFormat.csv: ".csv", OutputFormat.tsv: ".tsv",
                     OutputFormat.audacity: ".labels.txt", OutputFormat.raven: ".selections.txt"}


@dataclass
class OutputDir:
    """``--output-dir``: one result file per input, at the input's path mirrored below ``path``."""

    path: str
    format: OutputFormat
    outputs: dict[str, str] = field(default_factory=dict)  # source name -> its result file
    journal: object = None  # json: the results already there (``Results``), checked as --resume checks its own

    @property
    def needs_segments(self) -> bool:
        """Label tracks and selection tables are made of windows."""
        return self.format in (OutputFormat.audacity, OutputFormat.raven)

    def open(self, segments: bool = False, provenance: dict | None = None, heads: bool = False) -> "Writer":
        writer = PerFileWriter(self.outputs, self.format, segments, heads)
        writer.provenance = provenance
        return writer

    def release(self) -> None:
        """Nothing to let go: each file is written atomically, with no lock."""


def plan_output_dir(path: str, fmt: OutputFormat | str | None, items: Sequence, *, overwrite: bool = False
                    ) -> tuple[OutputDir, list]:
    """Check ``--output-dir`` before any work; returns it and the items still to do (a file's result already
    there is done, unless ``overwrite``; audio piped on stdin never is: nothing ties it to an earlier ``-``). A
    json result is done only while the input has the size and mtime it records; ``target.journal`` holds those
    records, for the check of their model and settings."""
    from ..audio.inputs import claim_outputs

    fmt = OutputFormat(fmt) if fmt is not None else OutputFormat.json
    if fmt not in PER_FILE_SUFFIXES:
        raise UsageError(f"one file per input takes {', '.join(f.value for f in PER_FILE_SUFFIXES)}",
                         option="format")
    if _kind(path) not in ("missing", "directory"):
        raise UsageError(f"{path} exists and is not a directory", option="output_dir")
    check_writable_dir(path, option="output_dir")
    target, todo = OutputDir(path, fmt, journal=Results(path) if fmt is OutputFormat.json else None), []
    inputs = {os.path.realpath(getattr(item, "path", item)) for item in items}
    for item, output in claim_outputs(items, path, PER_FILE_SUFFIXES[fmt]):
        if os.path.realpath(output) in inputs:
            raise UsageError(f"{output} is also one of the inputs: refusing to overwrite it", option="output_dir")
        target.outputs[item.path] = output
        if overwrite or item.error is not None or item.source is not None or not os.path.isfile(output):
            todo.append(item)
        elif fmt is OutputFormat.json and not target.journal.done(item.path, output):
            todo.append(item)  # the input changed since its result was made
    return target, todo


@dataclass
class Results(Journal):
    """The json results already in an ``--output-dir`` (``path``), read before any work: ``done`` tells whether an
    input's result still describes it (size and mtime, as ``--resume`` does), ``check`` (``Journal``'s) refuses
    results made with another model or settings, naming one of them."""

    files: dict[str, str] = field(default_factory=dict)  # path_key of the input -> its result file

    def done(self, source: str, output: str) -> bool:
        from ..audio.sources import FileSource

        record = _result_record(output)
        self.records[path_key(source)], self.files[path_key(source)] = record, output
        return self.is_done(source, *FileSource(source).identity())

    def refusal(self, key: str, record: dict, why: str) -> UsageError:
        return UsageError(f"{self.path} holds results made with another model or settings ({self.files[key]}: "
                          f"{why}): refusing to mix them (nothing was changed)", option="output_dir",
                          hint="--overwrite replaces them, or write to another --output-dir")


def _result_record(output: str) -> dict:
    """The record in a json result file; a file that holds none is refused, never replaced."""
    import json

    try:
        with open(output, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError) as exc:
        record = exc
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        raise UsageError(f"{output} is not a result file of `ast`: refusing to replace it (nothing was changed)",
                         option="output_dir", hint="move it away, or write to another --output-dir")
    return record
