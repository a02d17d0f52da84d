"""Session 8 review of the index's approximate search (run/ann.py, run/vectordb.py): a .faiss file is read only once
its sizes fit the file, stale ones vanish without errors, answers past the exact limit are complete, a full disk
costs only the saved copy, and vectors that are not finite never score."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ast_cli.run import ann, vectordb
from test_index import _ann_store, archive, ast, index

faiss = pytest.importorskip("faiss")


def test_s8_3_a_faiss_count_beyond_the_file_is_refused_before_faiss_reads_it(tmp_path, monkeypatch):
    """faiss sizes 56 bytes a list from ``ilar``'s list count before reading them (40,000,000 in a 1 MB file took
    7 GB), beyond its vector byte limit: the counts are checked against the file's size before faiss reads it, and
    a file that fails is rebuilt from SQLite."""
    store, queries = _ann_store(tmp_path, monkeypatch)
    answers = [store.search(q, 10) for q in queries]
    saved = tmp_path / "db" / f"vectors-{store.generation}.faiss"
    good = saved.read_bytes()
    lists_at = good.index(b"ilar") + 4
    read: list[bool] = []  # whether each file faiss was given is the good one
    real = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda reader, *args: read.append(saved.read_bytes() == good)
                        or real(reader, *args))
    for at, value in ((lists_at, 40_000_000), (37, 10**9), (lists_at + 8 + 8 + 4 + 8, 1 << 40)):  # ilar's lists,
        data = bytearray(good)  # the IVF header's lists (after the tag and the index header), the first list's size
        data[at:at + 8] = value.to_bytes(8, "little")
        saved.write_bytes(bytes(data))
        assert ann.read_ann(str(saved)) is None
        again = vectordb.VectorStore.open(str(tmp_path / "db"))
        assert [again.search(q, 10) for q in queries] == answers and saved.read_bytes() == good  # rebuilt
        again.close()
    assert vectordb.VectorStore.open(str(tmp_path / "db")).search(queries[0], 10) == answers[0]  # read as saved
    assert read == [True]


def test_s8_3_a_sparse_list_layout_still_reads(tmp_path):
    """faiss writes the list sizes as (list, size) pairs when most lists are empty: that layout is checked too."""
    rng = np.random.default_rng(0)
    index = ann.trained_ann(rng.standard_normal((64 * 39, 24)).astype(np.float32), 64)
    index.add_with_ids(rng.standard_normal((5, 24)).astype(np.float32), np.arange(5, dtype=np.int64))
    ann.save_ann(index, str(tmp_path / "vectors-1.faiss"))
    assert b"sprs" in (tmp_path / "vectors-1.faiss").read_bytes()
    assert ann.read_ann(str(tmp_path / "vectors-1.faiss")).ntotal == 5


def test_s8_4_a_stale_faiss_file_another_search_removed_is_no_error(tmp_path, monkeypatch):
    """Searches that find the index one generation behind each bring it up to date, read the newest stale file
    and remove the stale ones: one that another search removed first (listed, then gone) is no error."""
    store, queries = _ann_store(tmp_path, monkeypatch)
    store.search(queries[0], 1)
    store.put(vectordb.FileRecord("/new", 1, 1, 1.0, None, [(0.0, 1.0)], queries[:1]))  # the saved one is stale
    real = vectordb.glob.glob

    def listed_then_removed(pattern):
        found = real(pattern)
        for path in found:  # the other search's work, just after this one listed them
            os.unlink(path)
        return found

    monkeypatch.setattr(vectordb.glob, "glob", listed_then_removed)
    again = vectordb.VectorStore.open(str(tmp_path / "db"))
    assert again.search(queries[0], 1)[0].path == "/new" and again.ann().ntotal == len(again)
    monkeypatch.setattr(vectordb.glob, "glob", real)
    assert [p.name for p in (tmp_path / "db").glob("*.faiss")] == [f"vectors-{again.generation}.faiss"]


def test_s8_4_a_faiss_file_removed_while_it_is_read_is_read_whole(tmp_path, monkeypatch):
    """faiss reads the file through the handle whose sizes were checked: removed meanwhile, it still reads."""
    store, queries = _ann_store(tmp_path, monkeypatch)
    answers = [store.search(q, 10) for q in queries]
    saved = tmp_path / "db" / f"vectors-{store.generation}.faiss"
    real = ann._walk

    def walked_then_removed(fields):
        fits = real(fields)
        saved.unlink()
        return fits

    monkeypatch.setattr(ann, "_walk", walked_then_removed)
    assert ann.read_ann(str(saved)).ntotal == len(store)
    monkeypatch.setattr(ann, "_walk", real)
    again = vectordb.VectorStore.open(str(tmp_path / "db"))
    assert [again.search(q, 10) for q in queries] == answers


def _windows(hits) -> list[tuple[str, float]]:
    return [(hit.path, hit.start) for hit in hits]


def test_s8_8_past_the_exact_limit_top_k_and_min_score_answers_are_complete(tmp_path, monkeypatch):
    """The ANN probes some lists: asked for more than they hold (4 candidates a hit), or with --min-score leaving
    fewer than --top, its answer was partial (--top 100000 of 25,011 windows: 6,350). Those are scanned exactly."""
    store, queries = _ann_store(tmp_path, monkeypatch)  # 2,000 windows in 44 lists, searched through the ANN
    monkeypatch.setattr(vectordb, "EXACT_LIMIT", 10**6)
    exact = [store.search(q, 2000) for q in queries]
    monkeypatch.setattr(vectordb, "EXACT_LIMIT", 100)
    monkeypatch.setattr(vectordb, "probes", lambda lists: 4)  # 4 of 44 lists probed: about 180 windows
    scans = []
    real = vectordb.scan
    monkeypatch.setattr(vectordb, "scan", lambda *args: scans.append(args[-1]) or real(*args))
    for query, truth in zip(queries, exact):
        assert _windows(store.search(query, 2000)) == _windows(truth)
        threshold = (truth[5].score + truth[6].score) / 2  # six windows score more
        found = store.search(query, 10, min_score=threshold)
        assert _windows(found) == _windows(h for h in truth if h.score >= threshold)
        assert [h.score for h in found] == pytest.approx([h.score for h in truth[:len(found)]], abs=1e-6)
    assert scans == [2000, 10] * len(queries)
    store.search(queries[0], 10)  # what the probed lists can answer is not scanned
    store.search(queries[0], 3, min_score=exact[0][6].score)  # nor --min-score once --top windows pass it
    assert len(scans) == 2 * len(queries)


def _disk_full(monkeypatch):
    """faiss.write_index as on a full disk: part of the file written, then faiss's RuntimeError."""
    def write_index(index, path):
        with open(path, "wb") as handle:
            handle.write(b"IwSq" + b"\0" * 1000)
        raise RuntimeError(f"Error in void faiss::write_InvertedLists(...): write error in {path}: 1528 != 4960 "
                           "(No space left on device)")

    monkeypatch.setattr(faiss, "write_index", write_index)


def test_s8_11_a_full_disk_costs_only_the_saved_faiss_file(tiny_checkpoint, tmp_path, monkeypatch):
    """Saving the ANN on a full disk was "unexpected error: RuntimeError" and left a .tmp per try: now the temporary
    file goes, the search answers from the index built in memory, and stderr says once that it was not saved."""
    store, queries = _ann_store(tmp_path, monkeypatch)
    store.search(queries[0], 1)
    stale = (tmp_path / "db" / f"vectors-{store.generation}.faiss").read_bytes()
    store.put(vectordb.FileRecord("/new", 1, 1, 1.0, None, [(0.0, 1.0)], queries[:1]))
    _disk_full(monkeypatch)
    assert store.search(queries[0], 1)[0].path == "/new" and store.ann().ntotal == len(store)
    assert str(store.unsaved).endswith("could not be saved: No space left on device")
    saved = [p for p in (tmp_path / "db").iterdir() if p.suffix in (".tmp", ".faiss")]
    assert [p.read_bytes() for p in saved] == [stale]  # the stale one stays, as it was
    monkeypatch.setattr(vectordb, "EXACT_LIMIT", 5)
    files = archive(tmp_path / "in", 2)
    for result in (index([tmp_path / "in"], tmp_path / "cli", tiny_checkpoint[0]),
                   ast("search", tmp_path / "cli", files[0], "--top", "2", "-f", "csv")):
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines()[-1:] == [f"warning: {tmp_path / 'cli'}/vectors-{2}.faiss could not be "
                                                   "saved: No space left on device"]
        assert not [p for p in (tmp_path / "cli").iterdir() if p.suffix in (".tmp", ".faiss")]
    assert len(result.stdout.splitlines()) == 3


def test_s8_14_a_vector_that_is_no_direction_never_scores(tmp_path, monkeypatch):
    """min(1.0, nan) scored a NaN query 1.0 against every window, and a stored NaN row 1.0 against every query:
    such a query is refused, and a stored row that is not finite (or all zeros) never ranks, exact or by the ANN."""
    from ast_cli.errors import UsageError

    store, queries = _ann_store(tmp_path, monkeypatch)
    bad = np.array([[np.nan] * 24, [0.0] * 24, [np.inf] + [0.0] * 23], np.float32)
    store.put(vectordb.FileRecord("/bad", 1, 1, 3.0, None, [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)], bad))
    for limit in (10**6, 100):  # exact, then through the ANN (whose lists hold the bad rows' ids as zeros)
        monkeypatch.setattr(vectordb, "EXACT_LIMIT", limit)
        for query in queries:
            hits = store.search(query, 10)
            assert len(hits) == 10 and "/bad" not in {h.path for h in hits} and hits[0].score < 1.0
        everything = store.search(queries[0], 10**6)
        assert len(everything) == len(store) - 3 and "/bad" not in {h.path for h in everything}
        for query in bad:
            with pytest.raises(UsageError, match="no direction"):
                store.search(query, 10)
    assert store.ann().ntotal == len(store)
