"""The window vectors a store holds (``vectordb``), as numpy: decoded with every row's length checked (a row of
another length is a damaged store, never reshaped), made unit (a row that is not finite, or of length 0, becomes
NaN: it never scores), and ranked exactly, ``ID_BATCH`` rows at a time past the exact-search size.
"""

from __future__ import annotations

import sqlite3

import numpy as np

from ..errors import UsageError
from .sqlstore import REBUILD_HINT

DTYPE = np.dtype("<f4")
ID_BATCH = 10_000  # rows read from SQLite per step past the exact size: bounded memory at millions of windows


def decoded(blobs: list[bytes], where: str, width: int | None = None) -> np.ndarray:
    """(n, D) float32 of stored vectors: D = ``width``, or the first one's length; one of another length is a
    damaged store (``where``: its file)."""
    width = width if width is not None else len(blobs[0]) // DTYPE.itemsize if blobs else 0
    for blob in blobs:
        if len(blob) != width * DTYPE.itemsize:
            raise UsageError(f"{where} is damaged: a stored vector has {len(blob) / DTYPE.itemsize:g} values, "
                             f"not {width}", hint=REBUILD_HINT)
    return np.frombuffer(b"".join(blobs), DTYPE).reshape(len(blobs), width)


def unit(vectors: np.ndarray) -> np.ndarray:
    """(n, D) rows scaled to length 1; a row that is not finite or has length 0 is NaN: it is no direction, and
    its scores are NaN, which never rank."""
    norms = np.linalg.norm(vectors, axis=1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out = (vectors / norms[:, None]).astype(np.float32)
    out[~(np.isfinite(norms) & (norms > 0))] = np.nan
    return out


def best(ids: np.ndarray, scores: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``want`` best (ids, scores), best first, ties by id; a NaN score (a row that is no direction) never
    ranks."""
    scored = ~np.isnan(scores)
    ids, scores = ids[scored], scores[scored]
    order = np.lexsort((ids, -scores))[:want]
    return ids[order], scores[order]


def matrix(db: sqlite3.Connection, where: str, after: int = -1, limit: int = -1,
           width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (N, D) unit vectors) of the windows with an id above ``after``, by id (at most ``limit``)."""
    rows = db.execute("SELECT id, vector FROM windows WHERE id > ? ORDER BY id LIMIT ?", (after, limit)).fetchall()
    if not rows:
        return np.empty(0, np.int64), np.empty((0, width or 0), np.float32)
    return np.array([r[0] for r in rows], np.int64), unit(decoded([r[1] for r in rows], where, width))


def rows_of(db: sqlite3.Connection, where: str, ids: np.ndarray,
            width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (n, D) unit vectors) of the windows with these ids that are stored, by id."""
    rows = db.execute(f"SELECT id, vector FROM windows WHERE id IN ({','.join('?' * ids.size)}) ORDER BY id",
                      ids.tolist()).fetchall()
    return np.array([r[0] for r in rows], np.int64), unit(decoded([r[1] for r in rows], where, width))


def width_of(db: sqlite3.Connection) -> int | None:
    """How many values every stored vector has: the model's hidden size the index records, else the first stored
    vector's length (so that a damaged first row is the one named); None: none stored."""
    import json

    row = db.execute("SELECT length(vector) FROM windows ORDER BY id LIMIT 1").fetchone()
    if row is None:
        return None
    try:
        hidden = json.loads(db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()[0])["hidden_size"]
    except (sqlite3.Error, TypeError, ValueError, KeyError, IndexError):  # no meta (a bare store), or hand-edited
        hidden = None
    return hidden if isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0 else \
        row[0] // DTYPE.itemsize


def check_width(vectors: np.ndarray, query: np.ndarray) -> None:
    if vectors.shape[1] != query.shape[0]:
        raise UsageError(f"the query has {query.shape[0]} dimensions, the index {vectors.shape[1]}")


def scan(db: sqlite3.Connection, where: str, query: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``want`` windows most like unit ``query`` (D,), exactly: every row scored, ``ID_BATCH`` at a time
    (memory: one batch and the best so far)."""
    found_ids, found_scores = np.empty(0, np.int64), np.empty(0, np.float32)
    after, width = -1, width_of(db)
    while True:
        ids, vectors = matrix(db, where, after, ID_BATCH, width)
        if not ids.size:
            return found_ids, found_scores
        check_width(vectors, query)
        found_ids, found_scores = best(np.concatenate([found_ids, ids]),
                                       np.concatenate([found_scores, vectors @ query]), want)
        after = int(ids[-1])
