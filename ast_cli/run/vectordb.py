"""The window index's storage, the one place that knows the backend: SQLite holds the truth, a faiss IVF index
(8-bit scalar quantized, inner product on unit vectors) is a cache derived from it.

A database is one directory::

    DIR/index.sqlite            meta (key -> JSON: the model identity, schema, generation), files, windows
    DIR/vectors-<gen>.faiss     IVF-SQ8 over every window (ids: the SQLite window ids), built from SQLite when the
                                store passes ``EXACT_LIMIT`` windows; <gen> is the generation it was built at (stale
                                ones go); a file that does not read back as what was written is rebuilt, never trusted
    DIR/shards/K-of-N.sqlite    what ``--shard K/N`` wrote: the same schema, merged into index.sqlite by the
                                next writer (or ``open``) once no run holds it

A file's ``files`` row and all its ``windows`` rows (start, end, float32 embedding) are written in one
transaction (WAL journal): a killed run leaves each file wholly stored or absent, so a rerun stores every window
exactly once. Vectors are kept as given (float32, little-endian); search normalizes them (cosine). Below
``EXACT_LIMIT`` windows search is exact (numpy over every vector), above it approximate (faiss proposes candidates,
which are scored again exactly from the float32 rows).

No model here: storing and searching vectors needs numpy, sqlite3 and faiss only.
"""

from __future__ import annotations

import glob
import json
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ..errors import OutputWriteError, UsageError
from . import headscores
from .ann import (ANN_SUFFIX, TRAIN_PER_LIST, TRAIN_SAMPLE, add_rows, enough_probed, fingerprint, generation_of, ids_in,
                  lists_for, probes, read_ann, remove_stale, save_ann, trained_ann)
from .files import ShardLock
from .records import path_from_store, stored_path
from .sqlstore import Transaction, checked_meta, failure
from .vectorrows import DTYPE, ID_BATCH, best, check_width, decoded, matrix, rows_of, scan, unit, width_of

SCHEMA_VERSION = 1
SQLITE_NAME = "index.sqlite"
SHARDS_DIR = "shards"
EXACT_LIMIT = 20_000  # windows: exact search below (a 20,000 x 768 float32 matrix is 61 MB), ANN above
INSTALL_HINT = 'pip install "ast-cli[index]"'
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, size INTEGER,
    mtime_ns INTEGER, duration REAL, error TEXT);
CREATE TABLE IF NOT EXISTS windows (id INTEGER PRIMARY KEY AUTOINCREMENT, file_id INTEGER NOT NULL REFERENCES files(id),
    start REAL NOT NULL, "end" REAL NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS windows_file ON windows(file_id);
""" + headscores.SCHEMA


def require_ann_backend() -> None:
    """A UsageError naming the extra to install when faiss is missing. Found, not imported: importing faiss takes
    ~0.3 s, which only an ANN search (past ``EXACT_LIMIT``) needs to pay. (faiss loaded before ``ray.init`` is
    fine, unlike usearch, which aborted the process.)"""
    from importlib.util import find_spec

    if find_spec("faiss") is None:
        raise UsageError("the index needs faiss", hint=INSTALL_HINT)


@dataclass
class FileRecord:
    """One input as stored: its identity (size, mtime), and its windows ((start, end) seconds) with their
    (windows, D) vectors, or the error that made it fail (no windows)."""

    path: str
    size: int | None
    mtime_ns: int | None
    duration: float | None = None
    error: str | None = None
    windows: list[tuple[float, float]] = field(default_factory=list)
    vectors: np.ndarray | None = None
    window_count: int = 0
    scores: dict | None = None  # head name -> (windows, labels) probabilities (``ast index --head``)


@dataclass(frozen=True)
class Hit:
    """One window found: score is the cosine similarity to the query."""

    path: str
    start: float
    end: float
    score: float


class VectorStore:
    """One SQLite file of the schema above (the index, or one shard of it)."""

    lock: "ShardLock | None" = None  # held while a --shard run writes this part
    _rows: tuple | None = None  # (generation, ids, unit vectors) for exact search
    _ann: tuple | None = None  # (generation, faiss index) for approximate search
    unsaved: Exception | None = None  # why the faiss index built here could not be saved (it is searched all the same)

    def __init__(self, path: str, directory: str):
        self.path, self.directory = path, directory
        try:
            self.db = sqlite3.connect(path, timeout=60, isolation_level=None)  # transactions are ours (BEGIN)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit is atomic; a crash loses at most the last
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as exc:  # not a database (or damaged), a full disk
            raise failure(exc, path) from None
        self.meta()  # a hand-edited meta: said now, naming the file

    @classmethod
    def open(cls, directory: str, file: str = SQLITE_NAME) -> "VectorStore":
        os.makedirs(os.path.join(directory, os.path.dirname(file)), exist_ok=True)
        return cls(os.path.join(directory, file), directory)

    def close(self) -> None:
        self.db.close()
        if self.lock is not None:
            self.lock.release()

    # -- meta --------------------------------------------------------------------------------------

    def meta(self) -> dict:
        return checked_meta(self.db.execute("SELECT key, value FROM meta"), self.path)

    def _set_meta(self, **values) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(key, json.dumps(value)) for key, value in values.items()])

    def claim(self, identity: dict) -> None:
        """Record ``identity`` (what made the vectors) in an empty store; a store made otherwise is refused."""
        meta = self.meta()
        if "identity" not in meta:
            with self.transaction():
                self._set_meta(identity=identity, schema=SCHEMA_VERSION, generation=0)
            return
        check_identity(meta["identity"], identity, self.directory)

    @property
    def generation(self) -> int:
        return self.meta().get("generation", 0)

    # -- writing ---------------------------------------------------------------------------------------

    def transaction(self):
        return Transaction(self.db, self.path)

    def snapshot(self):
        """``with``: every read inside sees the store as of the first one (WAL), so a run that replaces or prunes
        files meanwhile cannot take away windows between a search ranking their ids and reading their rows."""
        return Transaction(self.db, self.path, "BEGIN DEFERRED")

    def put(self, record: FileRecord) -> None:
        """Store one file (replacing what was stored for its path), all in one transaction."""
        with self.transaction():
            self._put(record)
            self._bump()

    def _put(self, record: FileRecord) -> None:
        self._delete([record.path])
        row = (stored_path(record.path), record.size, record.mtime_ns, record.duration, record.error)
        cursor = self.db.execute("INSERT INTO files (path, size, mtime_ns, duration, error) VALUES (?,?,?,?,?)", row)
        if record.vectors is not None and record.error is None:
            vectors = np.ascontiguousarray(record.vectors, dtype=DTYPE)  # (W, D)
            self.db.executemany('INSERT INTO windows (file_id, start, "end", vector) VALUES (?, ?, ?, ?)',
                                [(cursor.lastrowid, start, end, row.tobytes())
                                 for (start, end), row in zip(record.windows, vectors)])
            if record.scores:
                ids = self.db.execute("SELECT id FROM windows WHERE file_id = ? ORDER BY id", (cursor.lastrowid,))
                headscores.put(self.db, [r[0] for r in ids], record.scores)

    def _delete(self, paths: Iterable[str]) -> None:
        rows = [(stored_path(path),) for path in paths]  # not UTF-8: bytes
        for (path,) in rows:
            headscores.delete_file(self.db, path)
        self.db.executemany("DELETE FROM windows WHERE file_id IN (SELECT id FROM files WHERE path = ?)", rows)
        self.db.executemany("DELETE FROM files WHERE path = ?", rows)

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def remove(self, paths: Iterable[str]) -> None:
        """Drop these files and their windows, in one transaction."""
        with self.transaction():
            self._delete(paths)
            self._bump()

    def merge_shards(self) -> int:
        """Move every finished shard under ``DIR/shards`` into this store (a shard that a run still holds is
        left for later); returns how many were merged. Each shard goes in one transaction, then is deleted:
        a crash in between merges it again, which replaces the same files (never duplicates)."""
        merged = 0
        for path in shard_paths(self.directory):
            lock = ShardLock(path)
            if not lock.try_acquire():
                continue
            try:
                self._merge(path)
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(path + suffix):
                        os.unlink(path + suffix)
                merged += 1
            finally:
                lock.release()
        return merged

    def _merge(self, path: str) -> None:
        shard = VectorStore(path, self.directory)
        try:
            identity = shard.meta().get("identity")
            if identity is not None:
                self.claim(identity)
            with self.transaction():
                headscores.register(self.db, headscores.registered(shard.db))  # a changed head: its old scores go
                for record in shard.records():
                    self._put(record)
                self._bump()
        finally:
            shard.close()

    def records(self) -> Iterator[FileRecord]:
        """Every stored file with its windows and vectors (for merging)."""
        for file_id, path, size, mtime_ns, duration, error in self.db.execute("SELECT * FROM files").fetchall():
            rows = self.db.execute('SELECT start, "end", vector, id FROM windows WHERE file_id = ? ORDER BY id',
                                   (file_id,)).fetchall()
            vectors = decoded([r[2] for r in rows], self.path, width_of(self.db)) if rows else None
            yield FileRecord(path_from_store(path), size, mtime_ns, duration, error, [(r[0], r[1]) for r in rows],
                             vectors, scores=headscores.of_windows(self.db, [r[3] for r in rows]))

    # -- reading ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]

    def files(self) -> list[FileRecord]:
        """Every stored file (no vectors), by path; ``window_count``: its windows."""
        rows = self.db.execute("SELECT path, size, mtime_ns, duration, error, (SELECT COUNT(*) FROM windows "
                               "WHERE file_id = files.id) FROM files ORDER BY path").fetchall()
        return [FileRecord(path_from_store(p), s, m, d, e, window_count=n) for p, s, m, d, e, n in rows]

    def vectors_of(self, path: str) -> tuple[list[tuple[float, float]], np.ndarray]:
        """The (start, end) and (W, D) vectors of one stored file (W = 0 when it is not stored)."""
        rows = self.db.execute('SELECT start, "end", vector FROM windows JOIN files ON files.id = file_id '
                               "WHERE path = ? ORDER BY windows.id", (stored_path(path),)).fetchall()
        vectors = decoded([r[2] for r in rows], self.path, width_of(self.db) if rows else 0)
        return [(r[0], r[1]) for r in rows], vectors

    def _matrix(self, after: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (N, D) unit vectors) of every window (with an id above ``after``)."""
        return matrix(self.db, self.path, after, width=width_of(self.db))

    def search(self, query: np.ndarray, top: int = 10, *, exclude_path: str | None = None,
               min_score: float | None = None) -> list[Hit]:
        """The ``top`` windows most like ``query`` (D,) by cosine similarity, best first. Past ``EXACT_LIMIT``
        windows the ANN proposes them, unless it cannot vouch for the answer: too many wanted for the lists it
        probes, or ``min_score`` leaving fewer than ``top`` (then more may lie in lists not probed): every row is
        then scored (seconds at a million windows, against the ANN's 12 ms)."""
        query = unit(np.asarray(query, np.float32).reshape(1, -1))[0]
        if np.isnan(query).any():  # NaN would score every window 1.0 (min(1.0, nan))
            raise UsageError("the query vector is no direction: it has values that are not finite, or only zeros")
        with self.snapshot():
            excluded = self._ids_of(exclude_path) if exclude_path else set()
            # MAX(id) bounds the count without a scan of a million rows (ids only grow: AUTOINCREMENT)
            count = self.db.execute("SELECT MAX(id) FROM windows").fetchone()[0] or 0
            if count == 0 or top <= 0:
                return []
            want = min(top + len(excluded), count)  # --top 10**12 asks faiss for no more rows than there are
            found = self._exact(query, want) if count <= EXACT_LIMIT else self._approximate(query, want)
            keep = [] if found is None else _kept(*found, excluded, min_score)[:top]
            if found is None or count > EXACT_LIMIT and min_score is not None and len(keep) < top:
                keep = _kept(*scan(self.db, self.path, query, want), excluded, min_score)[:top]
            return self._hits(keep)

    def _ids_of(self, path: str) -> set[int]:
        rows = self.db.execute("SELECT windows.id FROM windows JOIN files ON files.id = file_id WHERE path = ?",
                               (stored_path(path),))
        return {r[0] for r in rows}

    def _exact(self, query: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        generation = self.generation  # the rows are read once per generation: repeated searches reuse them
        if self._rows is None or self._rows[0] != generation:
            self._rows = (generation, *self._matrix())
        _, ids, vectors = self._rows
        check_width(vectors, query)
        return best(ids, vectors @ query, want)  # ties by insertion order

    def _approximate(self, query: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The ANN's candidates (four times as many as wanted), scored again exactly from the stored float32
        rows: scores and order never carry the index's 8-bit rounding, and the extra candidates make up for it.
        None when the lists it probes hold too few windows to vouch for them (``enough_probed``)."""
        index = self.ann()
        if index is None:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if index.d != query.shape[0]:
            raise UsageError(f"the query has {query.shape[0]} dimensions, the index {index.d}")
        index.nprobe = probes(index.nlist)
        if not enough_probed(index, 4 * want):
            return None
        candidates = np.unique(index.search(query.reshape(1, -1), 4 * want)[1][0])
        ids, vectors = rows_of(self.db, self.path, candidates[candidates >= 0], index.d)
        return best(ids, vectors @ query, want)

    def _ann_path(self) -> str:
        return os.path.join(self.directory, f"vectors-{self.generation}{ANN_SUFFIX}")

    def ann_is_current(self) -> bool:
        return os.path.isfile(self._ann_path())

    def ann(self):
        """The faiss index of this generation: read when saved (and it holds exactly the stored windows), else
        brought up to date from the last one saved (windows gone removed, windows added since added: ids only
        grow; retrained when the store outgrew its lists) or built, then saved and the stale ones deleted."""
        generation = self.generation
        if self._ann is not None and self._ann[0] == generation:
            return self._ann[1]
        path = self._ann_path()
        count, total, last = self.db.execute("SELECT COUNT(*), TOTAL(id), MAX(id) FROM windows").fetchone()
        if count == 0:
            return None  # nothing to train on, nothing to find
        index = read_ann(path)
        if index is None or fingerprint(index) != (count, total, last):  # corrupt, foreign or not these rows
            index = self._update_ann(path)
        self._ann = (generation, index)
        return index

    def _update_ann(self, path: str):
        stale = sorted(glob.glob(os.path.join(self.directory, f"vectors-*{ANN_SUFFIX}")), key=generation_of)
        index = read_ann(stale[-1]) if stale else None
        ids = np.array([r[0] for r in self.db.execute("SELECT id FROM windows ORDER BY id")], np.int64)
        if index is not None and lists_for(ids.size) >= 2 * index.nlist:
            index = None  # grown about 4x since trained: new centroids, or the lists grow too long to scan
        known = ids_in(index) if index is not None else np.empty(0, np.int64)
        if index is None:
            index = self._trained(ids)
        else:
            index.remove_ids(np.setdiff1d(known, ids))
        missing = np.setdiff1d(ids, known)  # added since; or never there, when the file was not this store's
        for start in range(0, missing.size, ID_BATCH):
            add_rows(index, *rows_of(self.db, self.path, missing[start:start + ID_BATCH], index.d))
        try:
            save_ann(index, path)
        except OutputWriteError as exc:  # a full disk: this process searches the index it holds, the stale stay
            self.unsaved = exc
        else:
            remove_stale(stale, path)
        return index

    def _trained(self, ids: np.ndarray):
        """An empty IVF-SQ8 index (inner product: the vectors are unit) trained on a sample of the stored rows."""
        lists = lists_for(ids.size)
        rows = min(ids.size, TRAIN_SAMPLE, TRAIN_PER_LIST * lists)
        sample = np.sort(np.random.default_rng(0).choice(ids, rows, replace=False))
        width = width_of(self.db)
        vectors = np.concatenate([rows_of(self.db, self.path, sample[i:i + ID_BATCH], width)[1]
                                  for i in range(0, sample.size, ID_BATCH)])
        return trained_ann(vectors, lists)

    def _hits(self, keep: list[tuple[int, float]]) -> list[Hit]:
        out = []
        for window_id, score in keep:
            path, start, end = self.db.execute('SELECT path, start, "end" FROM windows JOIN files ON '
                                               "files.id = file_id WHERE windows.id = ?", (window_id,)).fetchone()
            out.append(Hit(path_from_store(path), start, end, round(min(1.0, float(score)), 6)))
        return out


def _read_only(path: str) -> sqlite3.Connection:
    """A connection that writes nothing: immutable (no -wal/-shm files appear beside a store a run then refuses)
    unless a WAL is there (a killed writer's, or a live one's), which is then read through."""
    from urllib.request import pathname2url

    mode = "ro" if os.path.exists(path + "-wal") else "ro&immutable=1"
    return sqlite3.connect(f"file:{pathname2url(os.path.abspath(path))}?mode={mode}", uri=True, timeout=60)


def _query_read_only(path: str, sql: str) -> list | None:
    """Rows of ``sql`` on the store at ``path``, read only; None when there is no store (or no schema yet)."""
    if not os.path.isfile(path):
        return None
    try:
        db = _read_only(path)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if "no such table" in str(exc) and os.path.getsize(path) == 0:  # created, then killed before the schema
            return None
        if os.path.exists(path + "-wal") and not os.path.exists(path + "-shm") and "unable to open" in str(exc):
            raise UsageError(f"{path} has a write-ahead log (-wal) and no -shm file beside it, which SQLite could "
                             "not create to read the log (a read-only folder?)", option="db",
                             hint="search it once where its folder can be written, or copy the folder") from None
        raise UsageError(f"{path} is not an index database: {exc}", option="db") from None


def read_identity(path: str) -> dict | None:
    """The identity recorded in the store at ``path``, read without writing anything (None: none yet)."""
    rows = _query_read_only(path, "SELECT key, value FROM meta")  # every key checked: before the model loads
    return checked_meta(rows, path).get("identity") if rows else None


def read_files(path: str) -> list[FileRecord]:
    """The files stored at ``path`` (no vectors), read without writing anything."""
    rows = _query_read_only(path, "SELECT path, size, mtime_ns, duration, error FROM files") or []
    return [FileRecord(path_from_store(row[0]), *row[1:]) for row in rows]


def shard_paths(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, SHARDS_DIR, "*.sqlite")))


def _kept(ids: np.ndarray, scores: np.ndarray, excluded: set[int], min_score: float | None) -> list:
    """(id, score) of the ranked windows not excluded, scoring at least ``min_score``."""
    return [(i, s) for i, s in zip(ids.tolist(), scores.tolist())
            if i not in excluded and (min_score is None or s >= min_score)]


def check_identity(stored: dict, wanted: dict, directory: str) -> None:
    """A UsageError when ``wanted`` (this run's model and window settings) is not what made the store."""
    for key in sorted(set(stored) | set(wanted)):
        if key == "model" and stored.get("weights") and stored.get("weights") == wanted.get("weights"):
            continue  # the same weights found at another path (another node of a cluster)
        if key != "model_path" and stored.get(key) != wanted.get(key):
            raise UsageError(f"{directory} was made with {key} {stored.get(key)!r}, not {wanted.get(key)!r}",
                             option="db", hint="index into another --db, or give the model and settings it was made with")


__all__ = ["EXACT_LIMIT", "SHARDS_DIR", "SQLITE_NAME", "FileRecord", "Hit", "ShardLock", "VectorStore", "check_identity",
           "read_files", "read_identity", "require_ann_backend", "shard_paths"]
