"""Opening an index store to search it (``open_store``): read-write where the index can be written, else read only
(a read-only mount, a colleague's files). Read only, nothing is written: no journal switch, no schema, finished
shards are left unmerged, and an approximate index that is missing or stale is built in memory, not saved.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UsageError
from .ann import add_rows
from .vectordb import ID_BATCH, SHARDS_DIR, SQLITE_NAME, VectorStore, _read_only, read_identity
from .vectorrows import rows_of


def open_store(directory: str, read_only: bool | None = None) -> VectorStore:
    """The store of the index in ``directory``, with the shards that finished runs left there merged in; read only
    when ``read_only``, or, by default, where ``directory`` cannot be written. A database that records no model
    (not made by ``ast index``) is refused, untouched."""
    path = os.path.join(directory, SQLITE_NAME)
    if not os.path.isfile(path) and not os.path.isdir(os.path.join(directory, SHARDS_DIR)):
        raise UsageError(f"{directory} is not an index (no {SQLITE_NAME} in it)", option="db",
                         hint="ast index PATH... --db DIR builds one")
    if os.path.isfile(path) and os.path.getsize(path) and read_identity(path) is None:  # read, nothing written
        raise UsageError(f"{path} is not an ast index: it records no model", option="db")
    if read_only is None:
        read_only = not all(os.access(p, os.W_OK) for p in (directory, path) if os.path.exists(p))
    if not read_only:
        store = VectorStore.open(directory)
        store.merge_shards()
        return store
    if not os.path.isfile(path):
        raise UsageError(f"{directory} cannot be written here, and its shards are not merged into an index yet",
                         option="db", hint="search it once where it can be written")
    return ReadOnlyStore(directory)


class ReadOnlyStore(VectorStore):
    """``VectorStore`` over ``DIR/index.sqlite``, read only (immutable unless a writer's WAL is there)."""

    def __init__(self, directory: str):
        self.path, self.directory = os.path.join(directory, SQLITE_NAME), directory
        self.db = _read_only(self.path)

    def merge_shards(self) -> int:
        return 0  # a merge writes: the shards stay for a run that can

    def _update_ann(self, path: str):
        """The approximate index of every stored window, trained and filled in memory (``path`` is not written)."""
        ids = np.array([r[0] for r in self.db.execute("SELECT id FROM windows ORDER BY id")], np.int64)
        index = self._trained(ids)
        for start in range(0, ids.size, ID_BATCH):
            add_rows(index, *rows_of(self.db, self.path, ids[start:start + ID_BATCH], index.d))
        return index


__all__ = ["ReadOnlyStore", "open_store"]
