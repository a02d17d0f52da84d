"""The index's approximate search, faiss IVF with an 8-bit scalar quantizer over unit vectors (inner product =
cosine): how many lists, how many probed, training, and reading and writing its file safely. ``vectordb`` owns
when it is built and what it holds (the SQLite window ids); this module only knows faiss. faiss is imported on
first use (0.3 s), never at import.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct

import numpy as np

from ..errors import OutputWriteError

ANN_SUFFIX = ".faiss"
TRAIN_SAMPLE = 100_000  # rows the IVF centroids are trained on, at most (k-means wants >= 39 per list)
TRAIN_PER_LIST = 50  # rows sampled per list: k-means's cost grows with rows x lists, its quality stops at ~40


def generation_of(path: str) -> int:
    stem = os.path.basename(path)[len("vectors-"):-len(ANN_SUFFIX)]
    return int(stem) if stem.isdigit() else -1


def lists_for(count: int) -> int:
    """IVF lists for ``count`` windows: about sqrt(N) (1,000 at a million), with >= 39 training rows per list in
    the sample. A search scans 1/16 of the vectors whatever the count of lists (see ``probes``); more lists only
    cost more k-means (benchmarks/index_search.py: 4 sqrt(N) took 80 s to build 100,000, sqrt(N) 13.5 s)."""
    return max(1, min(int(np.sqrt(count)), min(count, TRAIN_SAMPLE) // 39))


def probes(lists: int) -> int:
    """Lists scanned per search: 1/32 of them, and at least 32 (all of a small index's): recall@10 >= 0.95 even
    on unclustered vectors below ~1,000 lists, where IVF is at its worst (real embeddings cluster more than that);
    4x the candidates asked for are re-scored exactly. At 1,000,000 windows (1,000 lists) 1/16 took 25 ms per
    query on a quiet 2-core Sapphire Rapids, over the 20 ms aimed at (benchmarks/index_search.py)."""
    return min(lists, max(32, lists // 32))


def enough_probed(index, candidates: int) -> bool:
    """Whether the lists a search probes hold, on average, at least twice the ``candidates`` asked for. Past that
    the answer is thin, not approximate: the probed lists run dry (``--top 100000`` of 25,011 windows found 6,350,
    32 lists of 158 probed), and the best windows in the lists not probed go missing. At a million windows (1,000
    lists, 32 probed) exact scans begin at 4,000 hits (16,000 candidates)."""
    return 2 * candidates <= index.ntotal * index.nprobe / index.nlist


def read_ann(path: str):
    """A saved IVF-SQ8 index held in memory, or None when the file is missing (another search may have removed a
    stale one meanwhile), corrupt or something else (then it is built again from the rows). faiss reads the open
    file once every count in it is known to fit in its size (``_walk``), never more bytes a vector than the file
    has, and never by its path (faiss's on-disk lists open whatever file they name: those are refused)."""
    import faiss

    if not os.path.isfile(path):  # not a FIFO either: opening one would wait for a writer
        return None
    limit = faiss.get_deserialization_vector_byte_limit()
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if not _walk(_Fields(handle, size)):
                return None
            handle.seek(0)
            faiss.set_deserialization_vector_byte_limit(size + 1)
            index = faiss.read_index(faiss.PyCallbackIOReader(handle.read), faiss.IO_FLAG_READ_ONLY)
    except (OSError, ValueError, struct.error, RuntimeError):  # gone; or cut short, or faiss's kind for a bad file
        return None
    finally:
        faiss.set_deserialization_vector_byte_limit(limit)
    if not isinstance(index, faiss.IndexIVFScalarQuantizer) or index.metric_type != faiss.METRIC_INNER_PRODUCT \
            or index.sq.qtype != faiss.ScalarQuantizer.QT_8bit \
            or not isinstance(faiss.downcast_InvertedLists(index.invlists), faiss.ArrayInvertedLists):
        return None
    return index


_HEADER = "<4siqqqBi"  # an index's tag, d, ntotal, two unused, is_trained, metric (0: inner product, nothing after)


class _Fields:
    """Little-endian fields of an open file, read in order; a count is checked against the bytes after it before
    anything is sized from it."""

    def __init__(self, handle, size: int):
        self.handle, self.left = handle, size

    def take(self, layout: str) -> tuple:
        size = struct.calcsize(layout)
        if size > self.left:
            raise ValueError("the file ends inside a field")
        self.left -= size
        return struct.unpack(layout, self.handle.read(size))

    def skip(self, item: int) -> int:
        """Pass over a counted vector (faiss's uint64 count, then that many items of ``item`` bytes); its bytes."""
        size = self.take("<Q")[0] * item
        if size > self.left:
            raise ValueError("a vector claims more bytes than the file has")
        self.handle.seek(size, os.SEEK_CUR)
        self.left -= size
        return size

    def words(self) -> np.ndarray:
        """A counted vector of uint64, read once its count is known to fit in the file."""
        size = self.take("<Q")[0] * 8
        if size > self.left:
            raise ValueError("a vector claims more bytes than the file has")
        self.left -= size
        return np.frombuffer(self.handle.read(size), "<u8")


def _walk(fields: _Fields) -> bool:
    """Whether the file is laid out as ``save_ann`` writes it (faiss's write_index of an IndexIVFScalarQuantizer,
    faiss/impl/index_write.cpp: IVF-SQ8 over a flat inner-product quantizer, no direct map, array lists), every
    count in it within the bytes that follow it. faiss sizes some allocations from a count before it reads what is
    counted (56 bytes a list from ``ilar``'s list count), beyond the reach of its vector byte limit."""
    tag, d, total, *_, metric = fields.take(_HEADER)
    lists = fields.take("<Qq")[0]  # nlist, nprobe
    quantizer, quantizer_d, centroids, *_, quantizer_metric = fields.take(_HEADER)
    if (tag, quantizer, metric, quantizer_metric) != (b"IwSq", b"IxFI", 0, 0) or not 0 < d == quantizer_d \
            or not 0 < lists == centroids or fields.skip(4) != 4 * lists * d:  # the centroids, float32
        return False
    direct_map = fields.take("<B")[0]
    if direct_map != 0 or fields.skip(8) != 0:  # no map from ids to lists
        return False
    *_, sq_d, code_size = fields.take("<iifQQ")  # qtype, range statistic and its argument, d, code size
    if (sq_d, code_size) != (d, d) or fields.skip(4) != 8 * d:  # 8 bits a dimension; trained: 2 floats each
        return False
    code_size_again, _, array_tag, lists_again, list_code_size, kind = fields.take("<QB4sQQ4s")  # B: by_residual
    if (code_size_again, array_tag, lists_again, list_code_size) != (d, b"ilar", lists, d):
        return False
    sizes = fields.words()  # "full": each list's size; "sprs": (list, size) pairs of those not empty
    if kind == b"full" and sizes.size == lists:
        rows = sum(int(n) for n in sizes)
    elif kind == b"sprs" and sizes.size % 2 == 0 and (sizes[::2] < lists).all():
        rows = sum(int(n) for n in sizes[1::2])
    else:
        return False
    return rows == total and rows * (d + 8) == fields.left  # then each list's codes (d bytes) and ids (8)


def ids_in(index) -> np.ndarray:
    """Every window id an IVF index holds."""
    import faiss

    lists = index.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(index.nlist)
             if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def fingerprint(index) -> tuple[int, float, int | None]:
    """(count, sum, max) of the ids an index holds: what SQLite says of its windows when it holds them all."""
    ids = ids_in(index)
    return ids.size, float(ids.sum()), int(ids.max()) if ids.size else None


def trained_ann(vectors: np.ndarray, lists: int):
    """An empty IVF-SQ8 index over ``vectors``' dimension (inner product: they are unit), trained on them."""
    import faiss

    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], lists,
                                          faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    index.train(np.nan_to_num(vectors, nan=0.0))
    return index


def add_rows(index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add (n, D) unit rows under their window ids. A row that is no direction (NaN) goes in as zeros: faiss may
    propose it, and its exact re-score (NaN) drops it; its id stays, so the index still holds every stored id."""
    index.add_with_ids(np.nan_to_num(vectors, nan=0.0), ids)


def remove_stale(paths: list[str], current: str) -> None:
    """Remove the ``.faiss`` files other than ``current``. Concurrent searches race to do this (and to read the
    newest of them): a file gone already is no error."""
    for path in paths:
        if path != current:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def save_ann(index, path: str) -> None:
    """Write ``index`` to ``path`` atomically (a per-process temporary file, fsynced, renamed): a reader never
    sees half an index. A write that fails (a full disk) leaves no temporary file: an OutputWriteError."""
    import faiss

    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        faiss.write_index(index, temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as exc:  # faiss says "... (No space left on device)" in a RuntimeError
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        found = re.search(r"\(([^()]+)\)\s*$", str(exc))
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else found[1] if found else str(exc)
        raise OutputWriteError(f"{path} could not be saved: {reason}", path=path) from None
