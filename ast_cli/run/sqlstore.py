"""The SQLite side of the window store (``vectordb``): its transactions, its ``meta`` table read with each known
key's type checked, and SQLite's failures as the library's errors naming the file (a file that is not a database
or is damaged: a UsageError; a full disk: an OutputWriteError).
"""

from __future__ import annotations

import json
import sqlite3

from ..errors import OutputWriteError, UsageError

SQLITE_FULL = 13  # SQLite's code for "database or disk is full"
REBUILD_HINT = "index the files again into a new directory"
META_TYPES = {"identity": dict, "schema": int, "generation": int, "heads": dict}


def failure(exc: sqlite3.Error, path: str) -> Exception:
    """The library's error for SQLite's ``exc`` on the store at ``path`` (``exc`` itself when it is neither)."""
    if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "database or disk is full" in str(exc):
        return OutputWriteError(f"writing {path} failed: database or disk is full", path=path,
                                hint="make room where the index is, then run again")
    if type(exc) is sqlite3.DatabaseError:  # not a database, or damaged (its subclasses: locked, I/O, full...)
        return UsageError(f"{path} is not an index database: {exc}", option="db")
    return exc


def checked_meta(rows, path: str) -> dict:
    """The (key, JSON value) rows of a store's ``meta`` as a dict, each key of ``META_TYPES`` of its type and each
    head's entry a dict with a list of labels: a hand-edited value is a damaged store, said naming the file."""
    meta = {}
    for key, text in rows:
        kind = META_TYPES.get(key, object)
        try:
            meta[key] = value = json.loads(text)
            fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        except (TypeError, ValueError):  # not JSON
            fits = False
        if fits and key == "heads":
            fits = all(isinstance(entry, dict) and isinstance(entry.get("labels"), list) for entry in value.values())
        if not fits:
            raise UsageError(f"{path} is damaged: its meta {key!r} is {str(text)[:80]}", hint=REBUILD_HINT)
    return meta


class Transaction:
    """``with``: BEGIN IMMEDIATE (``begin``) ... COMMIT, or ROLLBACK on any exception (Ctrl-C included); a failure
    of SQLite as ``failure`` says it (the store at ``path``)."""

    def __init__(self, db: sqlite3.Connection, path: str, begin: str = "BEGIN IMMEDIATE"):
        self.db, self.path, self.begin = db, path, begin

    def __enter__(self):
        if not self.db.in_transaction:
            self.db.execute(self.begin)
            self.owner = True
        else:
            self.owner = False
        return self.db

    def __exit__(self, kind, exc, tb):
        if self.owner and kind is None:
            try:
                self.db.execute("COMMIT")
                return False
            except sqlite3.Error as error:  # a full disk, found when the journal is written
                exc = error
        if self.owner and self.db.in_transaction:  # SQLite rolls back by itself after some failures
            self.db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise failure(exc, self.path) from None
        return False
