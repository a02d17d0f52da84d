"""Search over an index of N windows through our own code path (issue #27: p50 <= 20 ms at 1,000,000 windows on
2 cores with recall@10 >= 0.95 against exact search).

Builds a ``VectorStore`` (SQLite rows + the faiss IVF-SQ8 cache, exactly as ``ast index`` does: one ``put`` per
file of 600 windows, then ``ann()`` as the end of an ``ast index`` run does) of synthetic clustered unit vectors
(768-d; 2,000 clusters whose members share cosine 0.5-0.85, as ``benchmarks/index_storage.py`` of the storage
measurement generates them), then times ``VectorStore.search(query, top=10)`` (candidates re-scored from the
float32 rows, hits read back with their paths) and its recall@10 against exact float32 search over every vector.
Queries: half stored windows slightly perturbed (cosine ~0.995), half fresh members of the clusters.

    python benchmarks/index_search.py                      # 100,000 windows (~2 minutes on 2 cores)
    python benchmarks/index_search.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ast_cli.run import vectordb
from ast_cli.run.vectordb import FileRecord, VectorStore

DIM = 768
CLUSTERS = 2000
WINDOWS_PER_FILE = 600  # a 10-minute recording at a 1 s hop
QUERIES = 200
TOP = 10


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return unit(rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)), rng.uniform(0.4, 1.0, CLUSTERS)


def members(rng: np.random.Generator, count: int, centres: np.ndarray, spread: np.ndarray) -> np.ndarray:
    label = rng.integers(0, len(centres), count)
    noise = rng.standard_normal((count, DIM), dtype=np.float32)
    return unit(centres[label] + noise * (spread[label] / np.sqrt(DIM)).astype(np.float32)[:, None])


def build(directory: str, size: int) -> tuple[np.ndarray, float, float]:
    """Store ``size`` windows; returns (the vectors, seconds storing rows, seconds building the ANN)."""
    centres, spread = clusters()
    rng = np.random.default_rng(1)
    data = np.empty((size, DIM), np.float32)
    store = VectorStore.open(directory)
    store.claim({"model": "synthetic"})
    rows_s = 0.0
    for first in range(0, size, WINDOWS_PER_FILE):
        count = min(WINDOWS_PER_FILE, size - first)
        data[first:first + count] = members(rng, count, centres, spread)
        record = FileRecord(f"/archive/{first // WINDOWS_PER_FILE:06d}.wav", 1, 1, float(count), None,
                            [(float(w), w + 1.0) for w in range(count)], data[first:first + count])
        started = time.perf_counter()
        store.put(record)
        rows_s += time.perf_counter() - started
    started = time.perf_counter()
    store.ann()
    ann_s = time.perf_counter() - started
    store.close()
    return data, rows_s, ann_s


def queries(data: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(2)
    near = data[np.sort(rng.integers(0, len(data), QUERIES // 2))]
    near = unit(near + rng.standard_normal(near.shape, dtype=np.float32) * (0.1 / np.sqrt(DIM)))
    return np.concatenate([near, members(rng, QUERIES - QUERIES // 2, *clusters())])


def exact_keys(data: np.ndarray, query: np.ndarray) -> list[set]:
    """The (path, start) of each query's exact top 10 (float32 inner products of unit vectors)."""
    scores = np.concatenate([query @ data[s:s + 100_000].T for s in range(0, len(data), 100_000)], axis=1)
    best = np.argpartition(-scores, TOP, axis=1)[:, :TOP]
    return [{(f"/archive/{i // WINDOWS_PER_FILE:06d}.wav", float(i % WINDOWS_PER_FILE)) for i in row}
            for row in best]


def measure(size: int, workdir: str) -> dict:
    directory = os.path.join(workdir, f"db-{size}")
    load_before = os.getloadavg()[0]
    data, rows_s, ann_s = build(directory, size)
    query = queries(data)
    truth = exact_keys(data, query)
    del data
    started = time.perf_counter()
    store = VectorStore.open(directory)  # a new reader, as each ``ast search`` is: reads the saved index
    store.search(query[0], TOP)
    open_s = time.perf_counter() - started
    times, found = [], []
    for q in query:
        started = time.perf_counter()
        hits = store.search(q, TOP)
        times.append((time.perf_counter() - started) * 1000)
        found.append({(h.path, h.start) for h in hits})
    index = store.ann()
    store.close()
    disk = sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())
    shutil.rmtree(directory)
    return {"size": size, "rows_s": rows_s, "ann_s": ann_s, "add_rate": size / (rows_s + ann_s),
            "open_s": open_s, "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "recall": float(np.mean([len(f & t) / TOP for f, t in zip(found, truth)])),
            "lists": index.nlist, "probes": vectordb.probes(index.nlist), "bytes_per_vector": disk / size,
            "load": f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"}


def cpu_name() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                    platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--workdir", default=None, help="where the databases are built (default: a temp folder)")
    args = parser.parse_args()
    print(f"# {cpu_name()}, {os.cpu_count()} cores, EXACT_LIMIT {vectordb.EXACT_LIMIT}")
    print("| windows | store rows s | build ANN s | add rate (windows/s) | open + 1st search s | p50 ms | p99 ms "
          "| recall@10 | lists / probed | disk B/window | load avg |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for size in args.sizes:
            r = measure(size, workdir)
            print(f"| {r['size']:,} | {r['rows_s']:.1f} | {r['ann_s']:.1f} | {r['add_rate']:,.0f} | {r['open_s']:.2f} "
                  f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['recall']:.3f} | {r['lists']} / {r['probes']} "
                  f"| {r['bytes_per_vector']:,.0f} | {r['load']} |", flush=True)


if __name__ == "__main__":
    main()
