"""Resuming a run into an existing JSONL output: which sources are done, and repairing a torn last line.

A run writes one JSON line per file as it finishes, so after a crash, a kill -9 or Ctrl-C the output holds
every finished file, and at most a torn last line. ``Journal.read`` reads such an output WITHOUT changing it and
refuses anything else (a JSON array, CSV, audio, a line that is not one of our records in the middle): nothing
is touched unless the run can start. ``repair()`` cuts a torn last line just before the run appends; a last
record that is whole but lacks its newline (an editor, ``head -c``) is kept, and gets its newline instead.

A file counts as done when its latest record has no error and the same size and modification time as the file
on disk now; failed files are tried again (their new record comes later in the file: the latest record wins).
Paths are compared resolved, so ``a.wav`` and ``/abs/a.wav`` are the same file.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import UsageError


def path_key(path: str) -> str:
    """How records and sources are matched: the resolved path."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.abspath(path)


@dataclass
class Journal:
    """The records already in ``path``, latest per file, and where its intact part ends."""

    path: str
    records: dict[str, dict] = field(default_factory=dict)  # path_key -> latest record
    intact_bytes: int = 0  # length of the part made of whole lines
    size: int = 0  # length of the file when read
    lines: int = 0
    unterminated: bool = False  # the last line is a whole record without its newline

    @classmethod
    def read(cls, path: str) -> "Journal":
        """Read ``path`` (missing or empty: no records). Raises ``UsageError`` (touching nothing) for anything
        that is not a JSONL output of ours, except a torn last line, which ``repair()`` will cut."""
        journal = cls(path)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return journal
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}", option="output") from None
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{path} is not a regular file: there is nothing to resume from", option="resume")
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}", option="output") from None
        journal.size = len(data)
        lines = data.split(b"\n")
        torn = lines.pop()  # what follows the last newline: b"" when the file ends with one
        position = 0
        for number, line in enumerate(lines, 1):
            position += len(line) + 1
            if not line.strip():
                continue
            record = _record(line)
            if record is None:
                raise UsageError(
                    f"{path} line {number} is not a record of an `ast` JSONL output: refusing to resume into it "
                    "(nothing was changed)", option="resume")
            journal.records[path_key(record["path"])] = record
            journal.lines += 1
        last = _record(torn) if torn.strip() else None
        if last is not None:  # a whole record, only its newline missing: keep it
            journal.records[path_key(last["path"])] = last
            journal.lines += 1
            journal.unterminated = True
            position += len(torn)
        journal.intact_bytes = position
        if torn.strip() and not lines and last is None and not torn.lstrip().startswith(b"{"):
            raise UsageError(f"{path} is not a JSONL output of `ast`: refusing to resume into it "
                             "(nothing was changed)", option="resume")
        return journal

    @property
    def torn(self) -> bool:
        return self.intact_bytes != self.size

    def is_done(self, path: str, size: int | None, mtime: float | None) -> bool:
        """The latest record of ``path`` succeeded and still describes the file on disk."""
        record = self.records.get(path_key(path))
        if record is None or size is None or mtime is None or record.get("error") is not None:
            return False
        rec_size, rec_mtime = record.get("size"), record.get("mtime")
        if not isinstance(rec_size, int) or isinstance(rec_size, bool) or not isinstance(rec_mtime, (int, float)):
            return False
        return rec_size == size and abs(rec_mtime - mtime) < 1e-6

    def pending(self, sources: Iterable) -> list:
        """The sources (with ``name`` and ``identity()``) that are not done yet, in order."""
        todo = []
        for source in sources:
            size, mtime = source.identity()
            if not self.is_done(source.name, size, mtime):
                todo.append(source)
        return todo

    def check(self, settings) -> None:
        """Refuse (``UsageError``, changing nothing) to add records made otherwise than the ones there:
        ``settings.mismatch`` (``extract.Settings``) reads each record's ``model`` and ``settings``."""
        for key, record in self.records.items():
            made = record.get("settings")
            malformed = _malformed(record)
            if malformed:
                raise UsageError(f"{self.path} holds a malformed record ({record['path']}: {malformed}): refusing to "
                                 "resume into it (nothing was changed)", option="resume",
                                 suggest={"resume": None, "overwrite": True})
            why = (settings.mismatch({"model": record["model"], **made}) if "model" in record and isinstance(made, dict)
                   else "it names no model (an older ast wrote it)")
            if why:
                raise self.refusal(key, record, why)

    def refusal(self, key: str, record: dict, why: str) -> UsageError:
        """What ``check`` raises for ``record`` (under ``key``), made otherwise (``why``)."""
        return UsageError(
            f"{self.path} holds records made with another model or settings ({record['path']}: {why}): "
            "refusing to resume into it (nothing was changed)", option="resume",
            suggest={"resume": None, "overwrite": True})

    def repair(self) -> None:
        """Cut a torn last line (a run killed mid-write), or end a whole last record with its newline, so that
        appending starts on a line boundary. Checks that the file is still the one that was read."""
        if not (self.torn or self.unterminated):
            return
        with open(self.path, "rb+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() != self.size:
                raise UsageError(f"{self.path} changed while this run started: refusing to resume into it",
                                 option="resume")
            if self.torn:
                handle.truncate(self.intact_bytes)
            else:
                handle.write(b"\n")


def _malformed(record: dict) -> str | None:
    """What is wrong with the shape of a record that names its model (None: nothing): a model that is no string,
    settings that are no object, or a hop or window that is no number of seconds."""
    if "model" not in record:
        return None  # an older ast's record: ``check`` says so
    made = record.get("settings")
    if not isinstance(record["model"], str) or not isinstance(made, dict):
        return "its model or settings are not what ast writes"
    for key in ("hop_seconds", "window_seconds"):
        value = made.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            return f"settings.{key} is {json.dumps(value)}, not a number of seconds"
    return None


def _record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("path"), str):
        return record
    return None
