"""Session 8 review (#13, the index and search side): a damaged store, a full disk, an infinite window bound and an
unusable --db are one line naming the file or the option (no "unexpected error"), before the model loads where no
model is needed, and leave what was stored as it was."""

from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pytest

from ast_cli.errors import UsageError
from ast_cli.run import vectordb
from test_index import _ann_store, _directory_bytes, archive, ast, index, stored, varied

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint):
    """(index directory, its audio files, the model) of two short files indexed with the tiny checkpoint."""
    folder = tmp_path_factory.mktemp("built")
    files = archive(folder / "in", 2)
    assert index([folder / "in"], folder / "db", tiny_checkpoint[0]).exit_code == 0
    return folder / "db", files, tiny_checkpoint[0]


def _copy(built, tmp_path):
    return shutil.copytree(built[0], tmp_path / "db")


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test when a command loads the model."""
    from ast_cli.cli import index as cli_index

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_index, "load_tagger", refuse)


def _train(csv, db, out):
    return ast("train", csv, "--features-db", db, "--out", out, "--quiet")


def test_s8_13_a_corrupt_index_or_shard_is_one_line_naming_the_file(built, tmp_path, no_model):
    db, files, model = _copy(built, tmp_path), built[1], built[2]
    rows = [f"{files[i % 2]},{0.64 * (i // 2)},{0.64 * (i // 2 + 1)},1.0,{'door' if i % 2 else '-'}" for i in range(4)]
    (tmp_path / "hits.csv").write_text("path,start,end,score,label\n" + "\n".join(rows) + "\n")
    (db / "index.sqlite").write_bytes(b"garbage")
    before = _directory_bytes(db)
    reason = f"{db}/index.sqlite is not an index database: file is not a database"
    for result, line in ((ast("search", db, files[0]), f"Error: DB: {reason}"),
                         (index([files[0]], db, model), f"Error: --db: {reason}"),
                         (_train(tmp_path / "hits.csv", db, tmp_path / "det"), f"Error: --features-db: {reason}")):
        assert result.exit_code == 2 and result.stderr.splitlines()[-1] == line, result.output
    assert _directory_bytes(db) == before
    shutil.rmtree(db)
    db = _copy(built, tmp_path)
    (db / "shards").mkdir()
    (db / "shards" / "1-of-2.sqlite").write_bytes((db / "index.sqlite").read_bytes()[:5000])  # a truncated shard
    result = ast("search", db, files[0])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"Error: DB: {db}/shards/1-of-2.sqlite is not an index database: ")
    missing = ast("search", tmp_path / "nowhere", files[0])
    assert missing.exit_code == 2 and missing.stderr.startswith(f"Error: DB: {tmp_path / 'nowhere'} is not an index")


def test_s8_13_a_full_disk_during_index_is_one_line_and_keeps_what_was_stored(built, tmp_path, monkeypatch):
    """SQLite's "database or disk is full" was "unexpected error: OperationalError" (PRAGMA max_page_count stands
    in for the disk here: SQLite answers the same SQLITE_FULL)."""
    db, model = _copy(built, tmp_path), built[2]
    before = stored(db)
    more = [varied(tmp_path / "more" / "long.wav", 40.0, seed=7)]  # 60 windows: more pages than there are
    real = vectordb.VectorStore.open.__func__

    def full(cls, directory, file=vectordb.SQLITE_NAME):
        store = real(cls, directory, file)
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages}")
        return store

    monkeypatch.setattr(vectordb.VectorStore, "open", classmethod(full))
    result = index(more, db, model)
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        f"Error: writing {db}/index.sqlite failed: database or disk is full",
        "Hint: make room where the index is, then run again"], result.output
    monkeypatch.undo()
    assert stored(db) == before


def test_s8_13_an_infinite_query_window_bound_is_a_usage_error(built):
    db, files, _ = built
    for option in ("--start", "--end"):
        result = ast("search", db, files[0], option, "inf")
        assert result.exit_code == 2 and result.stderr.splitlines() == [f"Error: {option}: inf s is not a time in "
                                                                         "the audio"], result.output


@pytest.mark.parametrize("key, value", [("generation", '"abc"'), ("identity", "[1, 2]"), ("heads", '{"h": 5}'),
                                        ("schema", "not json")])
def test_s8_13_hand_edited_meta_is_one_line_naming_the_file(built, tmp_path, no_model, key, value):
    db, files, model = _copy(built, tmp_path), built[1], built[2]
    with sqlite3.connect(db / "index.sqlite") as connection:
        connection.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
    connection.close()
    line = f"Error: {db}/index.sqlite is damaged: its meta {key!r} is {value}"
    for result in (ast("search", db, files[0]), ast("search", db, "--label", "Speech"), index([files[0]], db, model)):
        assert result.exit_code == 2 and result.stderr.splitlines()[0] == line, result.output


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_s8_13_an_impossible_db_is_refused_before_the_model_loads(built, no_model):
    result = index([built[1][0]], "/proc/nope", built[2])
    assert result.exit_code == 2 and result.stderr.startswith("Error: --db: cannot write in /proc/nope: "), \
        result.output


def test_s8_13_a_stored_vector_of_another_length_is_a_damaged_index(tmp_path, monkeypatch):
    """One short row was read as part of a reshaped matrix ("the query has 24 dimensions, the index 22")."""
    store, queries = _ann_store(tmp_path, monkeypatch, files=4)
    window, blob = store.db.execute("SELECT id, vector FROM windows WHERE id = 7").fetchone()
    store.db.execute("UPDATE windows SET vector = ? WHERE id = ?", (blob[:-8], window))
    for limit in (10**6, 100):  # exact, and through the ANN
        monkeypatch.setattr(vectordb, "EXACT_LIMIT", limit)
        fresh = vectordb.VectorStore.open(str(tmp_path / "db"))
        with pytest.raises(UsageError, match=f"{fresh.path} is damaged: a stored vector has 22 values, not 24"):
            fresh.search(queries[0], 10)
    with pytest.raises(UsageError, match="is damaged"):
        fresh.vectors_of("/f0")
    assert np.isfinite(queries).all()


def test_s8_review_a_damaged_first_row_is_the_one_named(tmp_path):
    """The width was the first stored row's: a short first row made every other row "the damaged one" (a
    stored vector has 24 values, not 22). The index's recorded hidden size is the width now."""
    store = vectordb.VectorStore.open(str(tmp_path / "db"))
    store.claim({"model": "synthetic", "hidden_size": 24})
    rng = np.random.default_rng(0)
    store.put(vectordb.FileRecord("/f0", 1, 1, 10.0, None, [(w, w + 1.0) for w in range(5)],
                                  rng.standard_normal((5, 24)).astype(np.float32)))
    first, blob = store.db.execute("SELECT id, vector FROM windows ORDER BY id LIMIT 1").fetchone()
    store.db.execute("UPDATE windows SET vector = ? WHERE id = ?", (blob[:-8], first))
    store.db.commit()
    with pytest.raises(UsageError, match="a stored vector has 22 values, not 24"):
        store.search(rng.standard_normal(24).astype(np.float32), 3)
