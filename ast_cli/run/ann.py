"""The index's approximate search, faiss IVF with an 8-bit scalar quantizer over unit vectors (inner product =
cosine): how many lists, how many probed, training, and reading and writing its file safely. ``vectordb`` owns
when it is built and what it holds (the SQLite window ids); this module only knows faiss. faiss is imported on
first use (0.3 s), never at import.
"""

from __future__ import annotations

import os

import numpy as np

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


def read_ann(path: str):
    """A saved IVF-SQ8 index held in memory, or None when the file is missing, corrupt or something else (then it
    is built again from the rows). No vector read from it may claim more bytes than the file has; lists kept in
    another file (faiss's on-disk kind names any path) are opened read-only, then refused."""
    import faiss

    if not os.path.isfile(path):
        return None
    limit = faiss.get_deserialization_vector_byte_limit()
    faiss.set_deserialization_vector_byte_limit(os.path.getsize(path) + 1)
    try:
        index = faiss.read_index(path, faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # faiss's one kind for a file it cannot parse: the rows are the truth
        return None
    finally:
        faiss.set_deserialization_vector_byte_limit(limit)
    if not isinstance(index, faiss.IndexIVFScalarQuantizer) or index.metric_type != faiss.METRIC_INNER_PRODUCT \
            or index.sq.qtype != faiss.ScalarQuantizer.QT_8bit \
            or not isinstance(faiss.downcast_InvertedLists(index.invlists), faiss.ArrayInvertedLists):
        return None
    return index


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
    index.train(vectors)
    return index


def save_ann(index, path: str) -> None:
    """Write ``index`` to ``path`` atomically (a per-process temporary file, fsynced, renamed): a reader never
    sees half an index."""
    import faiss

    temporary = f"{path}.{os.getpid()}.tmp"
    faiss.write_index(index, temporary)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
