"""Results as records: the stable JSON schema (``to_record``, ``dumps``) and how a path is shown and stored.

Paths that are not valid UTF-8 (a ``caf\\xe9.wav`` from a latin-1 file system) are written as JSON ``\\udcXX``
escapes, which ``json.loads`` + ``os.fsencode`` turn back into the original bytes.
"""

from __future__ import annotations

import json
import os

from .tagger import FileResult, LabelScore


def label_records(labels: list[LabelScore]) -> list[dict]:
    """Each label as ``{"label", "index", "score"}``, led by ``"head"`` when it is a head's (``--head``)."""
    return [({"head": x.head} if x.head is not None else {}) | {"label": x.label, "index": x.index, "score": x.score}
            for x in labels]


def to_record(result: FileResult, provenance: dict | None = None) -> dict:
    """The JSON record of one file. Keys ``path``, ``duration``, ``labels``, ``error`` are the stable schema;
    ``none_of`` (true) marks a single-label clip whose best label is under its
    calibrated threshold; ``segments`` appears with ``--segments``; ``size`` and ``mtime`` identify the file for ``--resume``;
    ``provenance`` (``model`` and ``settings``: what made the scores) comes last."""
    record = {
        "path": result.path,
        "duration": None if result.duration is None else round(result.duration, 6),
        "labels": label_records(result.labels),
        "error": result.error,
    }
    if result.none_of:  # single-label, calibrated: none of the model's labels (``labels`` is empty)
        record["none_of"] = True
    if result.segments is not None:
        record["segments"] = [{"start": s.start, "end": s.end, "labels": label_records(s.labels)}
                              for s in result.segments]
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
    return os.fsencode(path).decode("utf-8", "backslashreplace") if has_surrogates(path) else path


def stored_path(path: str) -> str | bytes:
    """A path as SQLite can hold it: the text, or, where it is not valid UTF-8, its bytes (a BLOB, which
    ``path_from_store`` turns back into the same name)."""
    return os.fsencode(path) if has_surrogates(path) else path


def path_from_store(value: str | bytes) -> str:
    """A path as ``stored_path`` stored it."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def has_surrogates(text: str) -> bool:
    """Whether ``text`` holds bytes that are not UTF-8 (as surrogate escapes: a name from the file system)."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
