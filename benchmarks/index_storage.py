"""Which store should ``ast index`` use (#27)? Add rate, search latency, recall@10 and disk per vector, measured.

Synthetic window embeddings: 768-d float32, clustered like real ones (2,000 Gaussian clusters, each with its own
spread, L2-normalized), generated once into a .npy under --workdir and memory-mapped; a smaller size is a prefix
of a larger file. Queries: half are database vectors perturbed a little (a window close to an indexed one), half
are fresh vectors from the same clusters (a new recording of a known sound). The recall reference is exact float32
cosine search over all vectors.

Candidates (each writes one directory; disk is everything in it):
  exact-f32 / exact-f16   numpy matrix @ query (the baseline), matrix in a .npy, metadata in SQLite
  usearch-f16 / -i8       usearch HNSW (cosine) + SQLite (WAL) metadata rows, as Perch Hoplite stores them
  faiss-hnsw / faiss-ivf  faiss IndexHNSWFlat / IVF + SQ8 (inner product on unit vectors) + SQLite metadata
  lancedb-ivfpq           a Lance table (id, file, start, end, vector) with an IVF_PQ index and refine
Each ANN candidate is searched at growing ef / nprobes until recall@10 >= --target (0.95); latency is then timed at
that setting, one query at a time, on the index reopened from disk. Numpy only (no torch), 2 threads.

    python benchmarks/index_storage.py --sizes 2000 --quick                  # seconds: every candidate runs
    python benchmarks/index_storage.py --sizes 100000,1000000 --json out.json
    python benchmarks/index_storage.py --sizes 300000 --candidates faiss-hnsw   # one candidate, one size
"""

from __future__ import annotations

import argparse
import os

THREADS = os.environ.setdefault("AST_BENCH_THREADS", "2")
# Thread pools are sized when the libraries load, so the limits go in before any import of numpy or lance.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LANCE_CPU_THREADS"):
    os.environ.setdefault(_name, THREADS)
os.environ.setdefault("LANCE_LOG", "error")  # lance's Rust deprecation warnings, one per query, drown the table

import json  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

DIM = 768
CLUSTERS = 2000
TOP = 10
CHUNK = 50_000  # rows generated / added per step: bounded memory at 1M x 768
WINDOWS_PER_FILE = 600  # metadata shape: a 10-minute recording at a 1 s hop
SEED = 0
# Extra distributions each candidate installs into a venv that already has numpy (pyarrow comes with the ray extra).
PACKAGES = {"usearch": ["usearch", "numkong"], "faiss": ["faiss-cpu"],
            "lancedb": ["lancedb", "pylance", "lance-namespace", "lance-namespace-urllib3-client", "deprecation",
                        "overrides"]}


@dataclass
class Result:
    candidate: str
    size: int
    build_s: float = 0.0
    add_rate: float = 0.0  # vectors/s, metadata rows and index build included
    open_s: float = 0.0  # reopen from disk + first query
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    recall: float = 0.0
    disk_bytes_per_vector: float = 0.0
    setting: str = ""  # the search setting the latency was timed at
    tried: dict = field(default_factory=dict)  # setting -> recall@10
    load_before: float = 0.0
    load_after: float = 0.0
    note: str = ""


# -------------------------------------------------------------------------------------------------- data


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clusters(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres (CLUSTERS, DIM), unit length, and each cluster's spread: the norm of its noise relative to
    the centre, 0.4-1.0, so members share cosine 0.5-0.85 with each other (tight and loose sounds)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((CLUSTERS, DIM), dtype=np.float32))
    return centres, rng.uniform(0.4, 1.0, CLUSTERS).astype(np.float32)


def sample(rng: np.random.Generator, count: int, centres: np.ndarray, spread: np.ndarray) -> np.ndarray:
    label = rng.integers(0, len(centres), count)
    noise = rng.standard_normal((count, DIM), dtype=np.float32)
    return unit(centres[label] + noise * (spread[label] / np.sqrt(DIM))[:, None]).astype(np.float32)


def vectors(workdir: Path, size: int) -> np.ndarray:
    """(size, DIM) float32, memory-mapped: the first rows of the smallest cached file that is large enough."""
    cached = sorted(workdir.glob(f"vectors-d{DIM}-c{CLUSTERS}-s{SEED}-n*.npy"), key=lambda p: int(p.stem.split("-n")[1]))
    for path in cached:
        if int(path.stem.split("-n")[1]) >= size:
            return np.load(path, mmap_mode="r")[:size]
    path = workdir / f"vectors-d{DIM}-c{CLUSTERS}-s{SEED}-n{size}.npy"
    partial = path.with_suffix(".partial.npy")
    centres, spread = clusters()
    rng = np.random.default_rng(SEED + 1)
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(size, DIM))
    for start in range(0, size, CHUNK):
        out[start:start + CHUNK] = sample(rng, min(CHUNK, size - start), centres, spread)
    out.flush()
    del out
    partial.rename(path)  # a killed run leaves no truncated file that a later run would trust
    return np.load(path, mmap_mode="r")


def queries(data: np.ndarray, count: int) -> np.ndarray:
    """(count, DIM): half database rows perturbed (cosine ~0.995 to their source), half fresh cluster members."""
    rng = np.random.default_rng(SEED + 2)
    near = np.asarray(data[np.sort(rng.integers(0, len(data), count // 2))])
    near = unit(near + rng.standard_normal(near.shape, dtype=np.float32) * (0.1 / np.sqrt(DIM)))
    fresh = sample(rng, count - count // 2, *clusters())
    return np.ascontiguousarray(np.concatenate([near, fresh]), dtype=np.float32)


def exact_top(data: np.ndarray, query: np.ndarray, top: int = TOP) -> np.ndarray:
    """(Q, top) row ids of the highest cosine (inner product of unit vectors), best first, float32 in chunks."""
    best_score = np.full((len(query), 0), -np.inf, np.float32)
    best_id = np.zeros((len(query), 0), np.int64)
    for start in range(0, len(data), CHUNK * 4):
        scores = query @ np.asarray(data[start:start + CHUNK * 4]).T  # (Q, chunk)
        part = np.argpartition(-scores, min(top, scores.shape[1] - 1), axis=1)[:, :top]
        best_score = np.concatenate([best_score, np.take_along_axis(scores, part, 1)], axis=1)
        best_id = np.concatenate([best_id, part + start], axis=1)
        keep = np.argsort(-best_score, axis=1)[:, :top]
        best_score, best_id = np.take_along_axis(best_score, keep, 1), np.take_along_axis(best_id, keep, 1)
    return best_id


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / TOP over queries (found may hold -1 for missing results)."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / TOP for f, t in zip(found, truth)]))


# -------------------------------------------------------------------------------------------------- storage


def write_metadata(directory: Path, size: int) -> None:
    """The rows ``ast index`` keeps per window (file, start, end) and per file, in SQLite with WAL."""
    con = sqlite3.connect(directory / "index.sqlite")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT, size INTEGER, mtime REAL, model TEXT)")
    con.execute("CREATE TABLE windows (id INTEGER PRIMARY KEY, file_id INTEGER, start REAL, end REAL)")
    files = (size + WINDOWS_PER_FILE - 1) // WINDOWS_PER_FILE
    con.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?)",
                    ((f, f"archive/site_{f % 40:03d}/rec_{f:07d}.wav", 115_200_044, 1.7e9 + f, "ast-audioset")
                     for f in range(files)))
    with con:
        for start in range(0, size, CHUNK):
            con.executemany("INSERT INTO windows VALUES (?, ?, ?, ?)",
                            ((i, i // WINDOWS_PER_FILE, float(i % WINDOWS_PER_FILE), i % WINDOWS_PER_FILE + 10.24)
                             for i in range(start, min(size, start + CHUNK))))
    con.close()


def metadata_rows(directory: Path, ids: list[int]) -> list[tuple]:
    """What a search returns besides the ids: path, start, end (timed with the search)."""
    con = sqlite3.connect(directory / "index.sqlite")
    marks = ",".join("?" * len(ids))
    rows = con.execute(f"SELECT w.id, f.path, w.start, w.end FROM windows w JOIN files f ON f.id = w.file_id "
                       f"WHERE w.id IN ({marks})", ids).fetchall()
    con.close()
    return rows


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def install_mb(group: str) -> float:
    """Bytes the candidate's distributions occupy in site-packages (their RECORD files), in MB."""
    total = 0
    for name in PACKAGES.get(group, []):
        dist = metadata.distribution(name)
        total += sum(os.path.getsize(dist.locate_file(f)) for f in dist.files or [] if
                     os.path.isfile(dist.locate_file(f)))
    return total / 1e6


# -------------------------------------------------------------------------------------------------- candidates
# Each candidate: build(directory, data, quick) -> None; open(directory) -> search(queries, setting) -> (Q, TOP) ids;
# settings: the search knobs to try, cheapest first.


class Exact:
    group = ""

    def __init__(self, dtype):
        self.dtype = dtype

    def build(self, directory, data, quick):
        out = np.lib.format.open_memmap(directory / "vectors.npy", mode="w+", dtype=self.dtype, shape=data.shape)
        for start in range(0, len(data), CHUNK):
            out[start:start + CHUNK] = data[start:start + CHUNK]
        out.flush()

    def settings(self, size, quick):
        return [None]

    def open(self, directory):
        matrix = np.load(directory / "vectors.npy", mmap_mode="r")

        # float16 is storage only: numpy has no float16 BLAS (its f16 matmul is ~8x slower than f32 here), so
        # each chunk is widened to float32 on the way, as a real store would do.
        return lambda query, setting: exact_top(matrix, query)


class Usearch:
    group = "usearch"

    def __init__(self, dtype):
        self.dtype = dtype

    def build(self, directory, data, quick):
        from usearch.index import Index

        # connectivity 16 / expansion_add 128 are usearch's defaults; 32 more links buy recall on clustered data.
        index = Index(ndim=DIM, metric="cos", dtype=self.dtype, connectivity=16 if quick else 32,
                      expansion_add=128)
        for start in range(0, len(data), CHUNK):
            block = np.ascontiguousarray(data[start:start + CHUNK])
            index.add(np.arange(start, start + len(block)), block, threads=int(THREADS))
        index.save(str(directory / "vectors.usearch"))

    def settings(self, size, quick):
        return [16, 32, 64, 128, 256, 512]

    def open(self, directory):
        from usearch.index import Index

        index = Index.restore(str(directory / "vectors.usearch"), view=True)  # memory-mapped: opens instantly

        def search(query, setting):
            index.expansion_search = setting
            return index.search(query, TOP, threads=int(THREADS)).keys.reshape(len(query), -1).astype(np.int64)
        return search


class Faiss:
    group = "faiss"

    def __init__(self, kind):
        self.kind = kind

    def build(self, directory, data, quick):
        import faiss

        faiss.omp_set_num_threads(int(THREADS))
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(DIM, 16 if quick else 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 128
        else:
            lists = max(8, int(np.sqrt(len(data))))
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(DIM), DIM, lists, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
            train = np.random.default_rng(SEED).choice(len(data), min(len(data), lists * 40), replace=False)
            index.train(np.ascontiguousarray(data[np.sort(train)]))
        for start in range(0, len(data), CHUNK):
            index.add(np.ascontiguousarray(data[start:start + CHUNK]))
        faiss.write_index(index, str(directory / "vectors.faiss"))

    def settings(self, size, quick):
        return [16, 32, 64, 128, 256, 512] if self.kind == "hnsw" else [1, 2, 4, 8, 16, 32, 64, 128]

    def open(self, directory):
        import faiss

        index = faiss.read_index(str(directory / "vectors.faiss"))

        def search(query, setting):
            if self.kind == "hnsw":
                index.hnsw.efSearch = setting
            else:
                index.nprobe = setting
            return index.search(query, TOP)[1]
        return search


class Lance:
    group = "lancedb"

    def build(self, directory, data, quick):
        import lancedb
        import pyarrow as pa
        from lancedb.index import IvfPq

        def batches():
            for start in range(0, len(data), CHUNK):
                block = np.ascontiguousarray(data[start:start + CHUNK])
                ids = np.arange(start, start + len(block))
                yield pa.RecordBatch.from_arrays(
                    [pa.array(ids), pa.array(ids // WINDOWS_PER_FILE, pa.int32()),
                     pa.array((ids % WINDOWS_PER_FILE).astype(np.float32)),
                     pa.array((ids % WINDOWS_PER_FILE + 10.24).astype(np.float32)),
                     pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), DIM)],
                    ["id", "file_id", "start", "end", "vector"])

        schema = pa.schema([("id", pa.int64()), ("file_id", pa.int32()), ("start", pa.float32()),
                            ("end", pa.float32()), ("vector", pa.list_(pa.float32(), DIM))])
        table = lancedb.connect(directory).create_table("windows", pa.RecordBatchReader.from_batches(schema, batches()))
        # 96 sub-vectors of 8 dims (8 bits each); partitions ~ sqrt(N), as LanceDB advises.
        table.create_index("vector", config=IvfPq(
            distance_type="cosine", num_partitions=max(4, int(np.sqrt(len(data)))), num_sub_vectors=96))

    def settings(self, size, quick):
        return [(p, r) for p in (8, 16, 32, 64) for r in (5, 10, 20, 40)]

    def open(self, directory):
        import lancedb

        table = lancedb.connect(directory).open_table("windows")

        def search(query, setting):
            nprobes, refine = setting
            found = []
            for q in query:
                rows = (table.search(q).distance_type("cosine").nprobes(nprobes).refine_factor(refine).limit(TOP)
                        .select(["id", "_distance"]).to_arrow())
                ids = rows.column("id").to_numpy()
                found.append(np.pad(ids, (0, TOP - len(ids)), constant_values=-1))
            return np.stack(found)
        return search


CANDIDATES = {"exact-f32": lambda: Exact(np.float32), "exact-f16": lambda: Exact(np.float16),
              "usearch-f16": lambda: Usearch("f16"), "usearch-i8": lambda: Usearch("i8"),
              "faiss-hnsw": lambda: Faiss("hnsw"), "faiss-ivf-sq8": lambda: Faiss("ivf"), "lancedb-ivfpq": Lance}


# -------------------------------------------------------------------------------------------------- measuring


def tune(search, query, truth, settings, target) -> tuple[object, dict]:
    """The cheapest setting whose recall@10 reaches the target (else the best one tried), and every recall seen."""
    tried = {}
    for setting in settings:
        tried[str(setting)] = recall(search(query, setting), truth)
        if tried[str(setting)] >= target:
            return setting, tried
    best = max(tried, key=tried.get)
    return next(s for s in settings if str(s) == best), tried


def latency(search, directory, query, setting, budget_s) -> list[float]:
    """Milliseconds per query, one at a time (the metadata lookup of the hits included), within a time budget."""
    times = []
    stop = time.perf_counter() + budget_s
    for q in query:
        start = time.perf_counter()
        ids = search(q[None], setting)[0]
        if (directory / "index.sqlite").exists():  # LanceDB keeps the rows in its own table
            metadata_rows(directory, [int(i) for i in ids if i >= 0])
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > stop and len(times) >= 20:
            break
    return times


def measure(name, data, query, truth, workdir, args) -> Result:
    candidate = CANDIDATES[name]()
    directory = workdir / f"{name}-n{len(data)}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    result = Result(name, len(data), load_before=os.getloadavg()[0])
    start = time.perf_counter()
    if not isinstance(candidate, Lance):
        write_metadata(directory, len(data))
    candidate.build(directory, data, args.quick)
    result.build_s = time.perf_counter() - start
    result.add_rate = len(data) / result.build_s
    result.disk_bytes_per_vector = disk_bytes(directory) / len(data)
    start = time.perf_counter()
    search = candidate.open(directory)
    search(query[:1], candidate.settings(len(data), args.quick)[0])
    result.open_s = time.perf_counter() - start
    setting, result.tried = tune(search, query, truth, candidate.settings(len(data), args.quick), args.target)
    result.recall, result.setting = result.tried[str(setting)], str(setting)
    times = latency(search, directory, query, setting, args.latency_budget)
    result.p50_ms, result.p99_ms = float(np.percentile(times, 50)), float(np.percentile(times, 99))
    result.note = f"{len(times)} timed queries"
    result.load_after = os.getloadavg()[0]
    if not args.keep:
        shutil.rmtree(directory)
    return result


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    wanted = sorted(f for f in flags if f.startswith(("amx", "avx512")))
    return f"{names[0] if names else 'unknown'} ({os.cpu_count()} CPUs; {' '.join(wanted) or 'no AVX-512/AMX'})"


def versions() -> dict:
    out = {}
    for name in ("numpy", "usearch", "faiss-cpu", "lancedb", "pylance", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def available(name: str) -> bool:
    group = CANDIDATES[name]().group
    try:
        return all(metadata.distribution(p) for p in PACKAGES.get(group, []))
    except metadata.PackageNotFoundError:
        return False


def table(results: list[Result]) -> str:
    head = (f"{'candidate':<15} {'vectors':>9} {'build s':>8} {'add/s':>9} {'open s':>7} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'recall@10':>9} {'B/vector':>8} {'setting':>10} {'load':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.candidate:<15} {r.size:>9,} {r.build_s:>8.1f} {r.add_rate:>9,.0f} {r.open_s:>7.2f} "
                     f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.recall:>9.3f} {r.disk_bytes_per_vector:>8.0f} "
                     f"{r.setting:>10} {r.load_before:>4.1f}-{r.load_after:<4.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated vector counts")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated: " + ", ".join(CANDIDATES))
    parser.add_argument("--queries", type=int, default=500, help="queries for recall (and latency, within budget)")
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 a setting must reach")
    parser.add_argument("--latency-budget", type=float, default=60.0, help="seconds of timed queries per candidate")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ast-index-bench"))
    parser.add_argument("--json", type=Path, help="write the results and environment here")
    parser.add_argument("--keep", action="store_true", help="keep each candidate's directory")
    parser.add_argument("--quick", action="store_true", help="50 queries, 2 s of latency, smaller graphs: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.queries, args.latency_budget = min(args.queries, 50), 2.0
    args.workdir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.candidates.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    skipped = [n for n in names if not available(n)]
    environment = {"cpu": cpu(), "threads": int(THREADS), "versions": versions(), "skipped": skipped,
                   "install_mb": {g: round(install_mb(g), 1) for g in PACKAGES if g in
                                  {CANDIDATES[n]().group for n in names if n not in skipped}}}
    print(f"{environment['cpu']}, {THREADS} threads; {environment['versions']}; install MB "
          f"{environment['install_mb']}" + (f"; skipped (not installed): {', '.join(skipped)}" if skipped else ""))
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        data = vectors(args.workdir, size)
        query = queries(data, args.queries)
        truth = exact_top(data, query)
        for name in names:
            if name not in skipped:
                results.append(measure(name, data, query, truth, args.workdir, args))
                print(table(results[-1:]).splitlines()[-1] if len(results) > 1 else table(results), flush=True)
                if args.json:
                    write_json(args.json, environment, results)
    print()
    print(table(results))


def write_json(path: Path, environment: dict, results: list[Result]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"environment": environment, "results": [asdict(r) for r in results]}, indent=1))
    partial.replace(path)


if __name__ == "__main__":
    main()
