"""benchmarks/index_storage.py (#27, the measurement behind the index's storage): its quick mode runs every
candidate and the exact baseline finds what exact search finds. Speed is never checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"usearch": "usearch", "faiss": "faiss-cpu", "lancedb": "lancedb + pylance"}


@pytest.mark.slow  # a whole process that builds seven small indexes: ~10 s on 2 cores
def test_27_storage_benchmark_quick_mode(tmp_path):
    missing = [package for module, package in MODULES.items() if find_spec(module) is None]
    if missing:
        pytest.skip(f"the index candidates are not installed ({', '.join(missing)}); "
                    "pip install usearch faiss-cpu lancedb pylance")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "index_storage.py"), "--sizes", "2000",
                           "--quick", "--workdir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["candidate"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"exact-f32", "exact-f16", "usearch-f16", "usearch-i8", "faiss-hnsw", "faiss-ivf-sq8",
                            "lancedb-ivfpq"}
    assert results["exact-f32"]["recall"] == 1.0  # the same float32 search as the reference
    # float16 storage rounds scores at ~1e-3: it may swap a near-tie at 10th place, no more in 50 queries.
    assert results["exact-f16"]["recall"] >= 0.99
    for result in results.values():
        assert 0.0 < result["recall"] <= 1.0 and result["disk_bytes_per_vector"] > 0 and result["p50_ms"] > 0
