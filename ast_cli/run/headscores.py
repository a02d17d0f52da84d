"""Heads' scores in a window index (``ast index --head``): per window and head, the head's probabilities (float32,
one per label), computed from the stored pooled embedding, which is exactly what the head runs on in classify.

    head_scores(head TEXT, window_id INTEGER, scores BLOB)   one row per (head, window); PRIMARY KEY (head, window_id),
                                                              and an index on window_id (a file's rows, every head)
    meta 'heads'                                              {name: {"digest", "labels", "single_label", "path"}}

A file's scores are written in the transaction that writes its windows, so they are stored whole or not at all.
A head registered again with other weights (another digest) has its old scores dropped in the same transaction;
``unscored`` then gives the stored windows it has yet to score (added by a run without it, or by a run before it
changed), which the caller scores from the stored vectors: no backbone pass.
"""

from __future__ import annotations

import heapq
import json
import os
import sqlite3
from typing import Iterator

import numpy as np

DTYPE = np.dtype("<f4")
SCAN_BATCH = 10_000  # rows read per step: bounded memory however many windows are stored
SCHEMA = """
CREATE TABLE IF NOT EXISTS head_scores (head TEXT NOT NULL, window_id INTEGER NOT NULL, scores BLOB NOT NULL,
    PRIMARY KEY (head, window_id)) WITHOUT ROWID;
-- a file's rows by window id (dropped with it, moved by a merge): a lookup, not a scan of every head's scores
CREATE INDEX IF NOT EXISTS head_scores_window ON head_scores(window_id);  -- (window_id, head): a dense key
"""


def registered(db: sqlite3.Connection) -> dict:
    """The heads this store holds scores of: name -> {"digest", "labels", "single_label", "path"}."""
    row = db.execute("SELECT value FROM meta WHERE key = 'heads'").fetchone()
    return json.loads(row[0]) if row else {}


def register(db: sqlite3.Connection, heads: dict) -> list[str]:
    """Record ``heads`` (name -> entry, as ``registered``); a name stored with another digest has its scores
    dropped. Call inside a transaction. Returns the names whose scores were dropped."""
    known = registered(db)
    changed = [name for name, entry in heads.items() if name in known and known[name]["digest"] != entry["digest"]]
    db.executemany("DELETE FROM head_scores WHERE head = ?", [(name,) for name in changed])
    db.execute("INSERT OR REPLACE INTO meta VALUES ('heads', ?)", (json.dumps({**known, **heads}),))
    return changed


def put(db: sqlite3.Connection, window_ids: list[int], scores: dict) -> None:
    """Store ``scores`` (head name -> (W, L) probabilities) of the windows ``window_ids`` (W of them, in order)."""
    for name, rows in scores.items():
        rows = np.ascontiguousarray(rows, dtype=DTYPE)
        db.executemany("INSERT OR REPLACE INTO head_scores VALUES (?, ?, ?)",
                       [(name, window_id, row.tobytes()) for window_id, row in zip(window_ids, rows)])


def delete_file(db: sqlite3.Connection, path: str) -> None:
    """Drop the scores of every window of the stored file ``path`` (before its windows go)."""
    db.execute("DELETE FROM head_scores WHERE window_id IN (SELECT windows.id FROM windows JOIN files ON "
               "files.id = file_id WHERE path = ?)", (path,))


def of_windows(db: sqlite3.Connection, window_ids: list[int]) -> dict:
    """head name -> (W, L) stored scores of ``window_ids``, for the heads that scored all of them."""
    by_head: dict[str, dict[int, bytes]] = {}
    for start in range(0, len(window_ids), 500):  # SQLite's bound on ? parameters
        part = window_ids[start:start + 500]
        for name, window_id, blob in db.execute(
                f"SELECT head, window_id, scores FROM head_scores WHERE window_id IN ({','.join('?' * len(part))})",
                part):
            by_head.setdefault(name, {})[window_id] = blob
    return {name: np.stack([np.frombuffer(rows[i], DTYPE) for i in window_ids])
            for name, rows in by_head.items() if len(rows) == len(window_ids)}


def unscored(db: sqlite3.Connection, name: str, batch: int = SCAN_BATCH) -> Iterator[tuple[list[int], np.ndarray]]:
    """(window ids, (n, D) stored vectors) of the windows head ``name`` has not scored, ``batch`` rows at a time (each
    batch should be scored and ``put`` before the next is asked for)."""
    after = -1
    # by id from where the last batch ended; each row looked up in the window_id index, not the primary key, whose
    # pages hold the scores (a 527-label head: 1.2 s -> 0.25 s at 200,000 windows when all are scored)
    while True:
        rows = db.execute("SELECT id, vector FROM windows WHERE id > ? AND NOT EXISTS (SELECT 1 FROM head_scores "
                          "INDEXED BY head_scores_window WHERE head = ? AND window_id = windows.id) "
                          "ORDER BY id LIMIT ?",
                          (after, name, batch)).fetchall()
        if not rows:
            return
        after = rows[-1][0]
        yield [r[0] for r in rows], np.frombuffer(b"".join(r[1] for r in rows), DTYPE).reshape(len(rows), -1)


def missing(db: sqlite3.Connection, name: str) -> int:
    """How many stored windows head ``name`` has not scored."""
    return db.execute("SELECT (SELECT COUNT(*) FROM windows) - (SELECT COUNT(*) FROM head_scores WHERE head = ? "
                      "AND window_id IN (SELECT id FROM windows))", (name,)).fetchone()[0]


def head_entry(head) -> dict:
    """How the index records a head (``checkpoint.heads.Head``): its labels, kind and folder, and a digest of its
    two files (the same name with another digest: retrained, so its stored scores are dropped and redone)."""
    return {"digest": head_digest(head.path), "labels": list(head.labels), "single_label": head.single_label,
            "path": os.path.abspath(head.path)}


def same_head(entry: dict) -> bool:
    """Whether a head the index records still has the files it scored with (not gone, unreadable or changed)."""
    try:
        return head_digest(entry["path"]) == entry["digest"]
    except (OSError, KeyError, TypeError):
        return False


def head_digest(folder: str) -> str:
    """sha256 of a head folder's two files, in order."""
    import hashlib

    from ..checkpoint.heads import HEAD_CONFIG, HEAD_WEIGHTS

    digest = hashlib.sha256()
    for name in (HEAD_CONFIG, HEAD_WEIGHTS):
        with open(os.path.join(folder, name), "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def best(db: sqlite3.Connection, name: str, column: int, top: int, min_score: float | None = None
         ) -> list[tuple[int, float]]:
    """(window id, score) of the ``top`` windows with the highest stored score in ``column`` of head ``name``,
    best first (ties: the earlier window), scanned a batch at a time."""
    kept: list[tuple[float, int]] = []  # a min-heap of (score, -id): the worst kept one first
    after = -1
    while True:
        # only the label's 4 bytes of each row: memory and time do not grow with the head's labels
        rows = db.execute("SELECT window_id, substr(scores, ?, 4) FROM head_scores WHERE head = ? AND window_id > ? "
                          "ORDER BY window_id LIMIT ?", (4 * column + 1, name, after, SCAN_BATCH)).fetchall()
        if not rows:
            break
        after = rows[-1][0]
        blob = b"".join(r[1] for r in rows)
        if len(blob) != 4 * len(rows):  # a row shorter than the head's labels: never written so, and misaligning
            raise ValueError(f"the index's scores of head {name} do not fit its labels (a damaged database?)")
        scores = np.frombuffer(blob, DTYPE).astype(np.float32)
        for i in np.argsort(-scores, kind="stable")[:top]:
            if min_score is not None and scores[i] < min_score:
                break
            item = (float(scores[i]), -rows[i][0])
            if len(kept) < top:
                heapq.heappush(kept, item)
            elif item > kept[0]:
                heapq.heapreplace(kept, item)
    return [(-negative, score) for score, negative in sorted(kept, reverse=True)]


__all__ = ["SCHEMA", "best", "delete_file", "head_digest", "head_entry", "missing", "of_windows", "put", "register",
           "registered", "same_head", "unscored"]
