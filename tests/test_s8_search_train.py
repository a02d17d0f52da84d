"""Session 8, second hostile review of index/search/train (s8-h24): names that are not UTF-8, non-finite training
data, indexes searched read-only, on another machine or with the model moved, and small input checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import tone

pytest.importorskip("faiss")
NOT_UTF8 = os.fsdecode(b"b\xff.wav")  # a latin-1 name: held as a surrogate escape


def write_audio(path, seconds: float, seed: int = 0):
    """conftest's tone at ``path``, a name that need not be UTF-8 (opened by its bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(os.fsencode(path), tone(seconds, seed=seed), 16000)


def ast(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def two_labels(root, extra: dict | None = None):
    """Two labels of three one-window clips each, plus ``extra`` (label -> file name -> samples)."""
    rng = np.random.default_rng(2)
    for label, freq in (("high", 3000), ("low", 200)):
        (root / label).mkdir(parents=True)
        for i in range(3):
            t = np.arange(9000) / 16000
            x = 0.3 * np.sin(2 * np.pi * freq * (1 + 0.05 * i) * t) + 0.02 * rng.standard_normal(t.size)
            sf.write(str(root / label / f"{i}.wav"), x.astype(np.float32), 16000)
    for label, files in (extra or {}).items():
        for name, samples in files.items():
            sf.write(os.fsencode(root / label / name), samples, 16000, subtype="FLOAT")
    return root


def train(data, out, model, *extra):
    return ast("train", data, "--out", out, "--model", model, "--val-split", "0.34", "--epochs", "2", "--quiet",
               *extra)


# -- N1: a file name that is not valid UTF-8 --------------------------------------------------------------------

def test_s8_N1_a_non_utf8_name_is_indexed_searchable_and_resumable(tiny_checkpoint, tmp_path):
    folder = tmp_path / "arch"
    for i, name in enumerate(["a.wav", NOT_UTF8, "c.wav"]):
        write_audio(folder / name, 1.0, seed=i)
    db, model = tmp_path / "arch.db", tiny_checkpoint[0]
    first = ast("index", folder, "--db", db, "--model", model, "--workers", "1")
    assert first.exit_code == 0 and "3 indexed, 0 unchanged, 0 failed" in first.stderr, first.stderr
    again = ast("index", folder, "--db", db, "--model", model, "--workers", "1")
    assert again.exit_code == 0 and "0 indexed, 3 unchanged, 0 failed" in again.stderr, again.stderr
    query = folder / NOT_UTF8
    found = ast("search", db, query, "--top", "6", "-f", "jsonl")
    assert found.exit_code == 0, found.stderr
    paths = {json.loads(line)["path"] for line in found.stdout.splitlines()}
    assert str(query) in paths and os.path.exists(os.fsencode(str(query)))  # round-trips to the same bytes
    shown = ast("search", db, query, "--top", "6", "-f", "csv")
    assert str(folder / "b\\xff.wav") in shown.stdout  # as classify shows it
    others = ast("search", db, query, "--top", "6", "-f", "jsonl", "--exclude-file")
    assert others.exit_code == 0 and str(query) not in {json.loads(x)["path"] for x in others.stdout.splitlines()}


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_s8_N1_extract_features_records_a_non_utf8_source_name(tiny_checkpoint, tmp_path, fmt):
    write_audio(tmp_path / "in" / NOT_UTF8, 1.0)
    result = ast("extract-features", tmp_path / "in", "--out", tmp_path / "out", "--model", tiny_checkpoint[0],
                 "--format", fmt, "--quiet")
    assert result.exit_code == 0, result.stderr
    from ast_cli.tasks.extract import read_metadata

    output = str(tmp_path / "out" / NOT_UTF8) + "." + fmt
    assert read_metadata(output, fmt)["source"] == str(tmp_path / "in" / NOT_UTF8)


def test_s8_N1_train_and_evaluate_take_a_non_utf8_name(tiny_checkpoint, tmp_path):
    data = two_labels(tmp_path / "data")
    os.link(data / "low" / "0.wav", os.fsencode(data / "low" / NOT_UTF8))
    trained = train(data, tmp_path / "out", tiny_checkpoint[0])
    assert trained.exit_code == 0, trained.stderr
    evaluated = ast("evaluate", tmp_path / "out", data, "--quiet")
    assert evaluated.exit_code == 0, evaluated.stderr


# -- N3: non-finite training data ------------------------------------------------------------------------------

def tree_digest(folder) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def all_finite(path) -> bool:
    from safetensors.numpy import load_file

    return all(np.isfinite(v).all() for v in load_file(str(path)).values())


def test_s8_N3_a_non_finite_clip_fails_alone_and_the_model_stays_finite(tiny_checkpoint, tmp_path):
    loud = np.full(9000, 3e38, np.float32)
    loud[::2] = -3e38
    data = two_labels(tmp_path / "data", {"low": {"loud.wav": loud}})
    out = tmp_path / "out"
    result = train(data, out, tiny_checkpoint[0])
    assert result.exit_code == 1, result.stderr
    assert [line for line in result.stderr.splitlines() if "loud.wav" in line] == \
        [f"error: {data / 'low' / 'loud.wav'}: non-finite embeddings (audio far outside [-1, 1], or a damaged cache "
         "or index)"]
    failed = json.loads((out / "metrics.json").read_text())["failed"]
    assert [os.path.basename(f["path"]) for f in failed] == ["loud.wav"]
    assert all_finite(out / "model.safetensors") and all_finite(out / "head.safetensors")


def test_s8_N3_a_nan_in_a_cached_embedding_fails_that_clip_alone(tiny_checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    data, cache = two_labels(tmp_path / "data"), tmp_path / "cache"
    first = train(data, tmp_path / "first", tiny_checkpoint[0], "--features-dir", cache)
    assert first.exit_code == 0, first.stderr
    victim = sorted(cache.rglob("*.safetensors"))[0]
    with safe_open(str(victim), framework="np") as handle:
        metadata, embedding = handle.metadata(), handle.get_tensor("embedding")
    save_file({"embedding": np.full_like(embedding, np.nan)}, str(victim), metadata=metadata)
    out = tmp_path / "second"
    result = train(data, out, tiny_checkpoint[0], "--features-dir", cache)
    assert result.exit_code == 1 and result.stderr.count("non-finite embeddings") == 1, result.stderr
    assert len(json.loads((out / "metrics.json").read_text())["failed"]) == 1
    assert all_finite(out / "model.safetensors") and all_finite(out / "head.safetensors")


def test_s8_N3_a_loss_that_goes_non_finite_saves_nothing_and_keeps_the_earlier_output(tiny_checkpoint, tmp_path):
    data, out = two_labels(tmp_path / "data"), tmp_path / "out"
    assert train(data, out, tiny_checkpoint[0]).exit_code == 0
    before = tree_digest(tmp_path)
    result = train(data, out, tiny_checkpoint[0], "--overwrite", "--lr", "1e30")
    assert result.exit_code == 1, result.stderr
    assert result.stderr.splitlines()[-2:] == ["Error: the training loss became non-finite in epoch 1: nothing was "
                                               "saved", "Hint: train again with a lower learning rate"]
    assert tree_digest(tmp_path) == before


# -- N10 + N18: an index search cannot write; a database that is not an index -----------------------------------

def indexed(tmp_path, model, *extra):
    """An index of three one-second files under tmp_path/in, in tmp_path/db."""
    for i in range(3):
        write_audio(tmp_path / "in" / f"{i}.wav", 1.0, seed=i)
    result = ast("index", tmp_path / "in", "--db", tmp_path / "db", "--model", model, "--workers", "1", "--quiet",
                 *extra)
    assert result.exit_code == 0, result.stderr
    return tmp_path / "db"


def test_s8_N10_a_read_only_open_writes_nothing_and_builds_the_ann_in_memory(tiny_checkpoint, tmp_path, monkeypatch):
    from ast_cli import Index
    from ast_cli.run import vectordb
    from ast_cli.run.readonly import ReadOnlyStore

    db = indexed(tmp_path, tiny_checkpoint[0])
    with Index.open(str(db)) as index:
        query = index.store.vectors_of(str(tmp_path / "in" / "1.wav"))[1][0]
        exact = index.search(query, 3)
    before = tree_digest(db)
    monkeypatch.setattr(vectordb, "EXACT_LIMIT", 1)  # an approximate search, with no ANN file saved yet
    with Index.open(str(db), read_only=True) as index:
        assert isinstance(index.store, ReadOnlyStore)
        assert [h.path for h in index.search(query, 3)] == [h.path for h in exact]
    assert tree_digest(db) == before and sorted(os.listdir(db)) == ["index.sqlite"]


@pytest.mark.slow  # whole processes in a mount namespace
def test_s8_N10_search_answers_on_a_read_only_mount_and_says_the_shards_wait(tiny_checkpoint, tmp_path):
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (a mount namespace) to mount a folder read-only")
    db = indexed(tmp_path, tiny_checkpoint[0])
    from ast_cli.tasks.distributed import shard_of

    new = tmp_path / "in" / "new.wav"
    write_audio(new, 1.0, seed=9)
    part = f"{shard_of(os.path.abspath(new), 2)}/2"  # the part that holds the new file (its path's hash)
    shard = ast("index", tmp_path / "in", "--db", db, "--model", tiny_checkpoint[0], "--shard", part, "--quiet")
    assert shard.exit_code == 0, shard.stderr
    before = tree_digest(db)
    search = f"{sys.executable} -m ast_cli search {db} {tmp_path / 'in' / '0.wav'} --top 1 -f jsonl"
    done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {db} {db} && mount -o remount,bind,ro {db} "
                           f"{db} && {search}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(tmp_path / "in" / "0.wav")
    assert done.stderr.splitlines() == [f"note: {db} cannot be written here: 1 shard not merged (searched without "
                                        "them)"]
    assert tree_digest(db) == before


@pytest.mark.slow  # whole processes in a mount namespace
def test_s9_a_read_only_index_with_a_log_and_no_shm_says_so(tiny_checkpoint, tmp_path):
    """A writer's -wal copied without its -shm onto a read-only mount: SQLite cannot make the -shm it needs to read
    the log. It used to say "not an index database"."""
    import shutil
    import sqlite3
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (a mount namespace) to mount a folder read-only")
    db = indexed(tmp_path, tiny_checkpoint[0])
    writer = sqlite3.connect(db / "index.sqlite")  # a live writer's log, copied as a colleague would
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.executescript("CREATE TABLE scratch(x); DROP TABLE scratch;")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("index.sqlite", "index.sqlite-wal"):
        shutil.copyfile(db / name, copy / name)
    writer.close()
    before = tree_digest(copy)
    search = f"{sys.executable} -m ast_cli search {copy} {tmp_path / 'in' / '0.wav'} --top 1 -f jsonl"
    done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {copy} {copy} && mount -o remount,bind,ro "
                           f"{copy} {copy} && {search}"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"Error: DB: {copy / 'index.sqlite'} has a write-ahead log (-wal) and no -shm "
                                  "file beside it"), done.stderr
    assert "Hint: search it once where its folder can be written, or copy the folder" in done.stderr
    assert tree_digest(copy) == before


def test_s8_N18_a_sqlite_file_that_is_not_an_index_is_refused_untouched(tmp_path):
    import hashlib
    import sqlite3

    for name, table in (("notes", "notes(x)"), ("meta", "meta(key, value)")):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "index.sqlite"
        with sqlite3.connect(path) as db:
            db.execute(f"CREATE TABLE {table}")
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        result = ast("search", tmp_path / name, tmp_path / "query.wav")
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and str(path) in result.stderr, \
            result.stderr
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before and os.listdir(tmp_path / name) == \
            ["index.sqlite"]


# -- N9: an index made on a GPU, searched on a CPU --------------------------------------------------------------

def set_identity(db, **changes) -> None:
    """Change what the index records about how it was made (as another machine or an older run would have)."""
    import sqlite3

    with sqlite3.connect(db / "index.sqlite") as con:
        identity = json.loads(con.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()[0])
        con.execute("UPDATE meta SET value = ? WHERE key = 'identity'", (json.dumps({**identity, **changes}),))


def test_s8_N9_an_fp16_index_is_searched_in_fp32_on_a_cpu(tiny_checkpoint, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 runs here: nothing falls back")
    db = indexed(tmp_path, tiny_checkpoint[0])
    set_identity(db, compute="fp16")  # what a GPU with default options records
    query = tmp_path / "in" / "1.wav"
    result = ast("search", db, query, "--top", "1", "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    hit = json.loads(result.stdout)
    assert hit["path"] == str(query) and hit["score"] > 0.999  # fp16's rounding of the stored window, at most
    assert result.stderr.splitlines() == ["note: the index was made in fp16, which does not run here: the query is "
                                          "embedded in fp32 (scores within fp16's rounding of the stored ones)"]


# -- N8: the index's model moved --------------------------------------------------------------------------------

def test_s8_N8_search_takes_the_moved_model_by_model_and_checks_its_weights(tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    from ast_cli.run.tagger import Tagger

    moved = tmp_path / "old"
    shutil.copytree(tiny_checkpoint[0], moved)
    db = indexed(tmp_path, moved)
    moved.rename(tmp_path / "new")
    query = tmp_path / "in" / "2.wav"
    lost = ast("search", db, query)
    assert lost.exit_code == 2 and lost.stderr.splitlines() == [
        f"Error: --model: the model {db} was made with is no longer at {moved}",
        "Hint: give the folder where it is now (its weights are checked against the index's)"], lost.stderr
    found = ast("search", db, query, "--model", tmp_path / "new", "--top", "3", "-f", "jsonl")
    assert found.exit_code == 0 and str(query) in {json.loads(x)["path"] for x in found.stdout.splitlines()}
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "new", other)
    with open(other / "model.safetensors", "ab") as handle:  # another weights file
        handle.write(b" ")
    monkeypatch.setattr(Tagger, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    refused = ast("search", db, query, "--model", other)
    assert refused.exit_code == 2 and refused.stderr.splitlines() == [
        f"Error: --model: {other} does not hold the model {db} was made with ({moved}): other weights"]
    (other / "model.safetensors").write_bytes((tmp_path / "new" / "model.safetensors").read_bytes())
    pre = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps({**pre, "mean": 0.0}))  # found by a review
    refused = ast("search", db, query, "--model", other)
    assert refused.exit_code == 2 and refused.stderr.splitlines() == [
        f"Error: --model: {other} does not hold the model {db} was made with ({moved}): other input format"]


# -- N20: a head retrained after it scored the index ------------------------------------------------------------

def test_s8_N20_search_label_says_the_head_changed_since_it_scored_the_index(tiny_checkpoint, tmp_path):
    data, head = two_labels(tmp_path / "data"), tmp_path / "hd"
    assert train(data, head, tiny_checkpoint[0]).exit_code == 0
    db = indexed(tmp_path, tiny_checkpoint[0], "--head", head)
    same = ast("search", db, "--label", "high", "--top", "1")
    assert same.exit_code == 0 and same.stderr == "", same.stderr
    assert train(data, head, tiny_checkpoint[0], "--overwrite", "--epochs", "3").exit_code == 0  # retrained in place
    changed = ast("search", db, "--label", "high", "--top", "1")
    assert changed.exit_code == 0 and changed.stdout == same.stdout  # the stored scores, as before
    assert changed.stderr.splitlines() == [f"note: head hd changed since it scored {db}: these are its old scores; "
                                           f"ast index ... --db {db} --head {head} scores the index again"]


# -- N21: small ones ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """A model load fails the test: the check under test comes before it."""
    from ast_cli.checkpoint import weights

    monkeypatch.setattr(weights, "load_checkpoint", lambda *a, **k: pytest.fail("the model loaded first"))


def test_s8_N21_deeply_nested_thresholds_are_a_usage_error(tiny_checkpoint, tmp_path, no_model_load):
    (tmp_path / "deep.json").write_text("[" * 200_000)
    result = ast("classify", tmp_path / "x.wav", "--model", tiny_checkpoint[0], "--threshold", "calibrated",
                 "--thresholds", tmp_path / "deep.json")
    assert result.exit_code == 2 and result.stderr.startswith(f"Error: --thresholds: {tmp_path / 'deep.json'} is "
                                                              "not JSON: maximum recursion depth"), result.stderr


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_s8_N21_a_csv_field_over_the_csv_limit_is_a_usage_error(tiny_checkpoint, tmp_path, no_model_load, command):
    data = tmp_path / "big.csv"
    data.write_text("path,labels\n" + "x" * 140_000 + ",a\n")
    args = [data, "--out", tmp_path / "out", "--model", tiny_checkpoint[0]] if command == "train" else \
        [tiny_checkpoint[0], data]
    result = ast(command, *args)
    assert result.exit_code == 2 and result.stderr == f"Error: DATA: cannot read {data} as path,labels rows: field " \
                                                      "larger than field limit (131072)\n", result.stderr


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_s8_N21_a_seed_out_of_range_is_refused_before_the_model_loads(tiny_checkpoint, tmp_path, no_model_load, seed):
    result = train(two_labels(tmp_path / "data"), tmp_path / "out", tiny_checkpoint[0], "--seed", seed)
    assert result.exit_code == 2 and result.stderr == f"Error: --seed: must be from 0 to 2**63 - 1, not {seed}\n"


def test_s8_N21_an_empty_db_is_refused_before_the_model_loads(tiny_checkpoint, tmp_path, no_model_load):
    write_audio(tmp_path / "a.wav", 1.0)
    result = ast("index", tmp_path / "a.wav", "--db", "", "--model", tiny_checkpoint[0])
    assert result.exit_code == 2 and result.stderr == "Error: --db: is empty: it names the index directory\n"


def test_s8_N21_search_says_stdin_audio_is_not_a_query(tmp_path):
    result = ast("search", tmp_path / "db", "-")
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        "Error: QUERY is an audio file: audio on stdin (-) is not taken as a query",
        "Hint: save it to a file and give its path"]


def test_s8_N21_a_directory_in_a_data_csv_is_named_a_directory(tiny_checkpoint, tmp_path):
    data = two_labels(tmp_path / "data")
    rows = [f"{path},{path.parent.name}" for path in sorted(data.rglob("*.wav"))] + ["high,high"]
    (data / "list.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    result = train(data / "list.csv", tmp_path / "out", tiny_checkpoint[0])
    assert result.exit_code == 1 and f"error: {data / 'high'}: a directory" in result.stderr.splitlines()
