"""``ast index --head`` (#28): an index also stores each window's scores from heads trained on its model (what
classify gives that window with the head), searched with ``ast search --label``; a head added later (or
retrained) scores the stored windows from their stored embeddings, with no backbone pass."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ast_cli import Index
from ast_cli.cli import app
from ast_cli.errors import UsageError
from test_heads import JOINT, classify, setup  # noqa: F401 (setup: the base, another base and three heads)

pytest.importorskip("faiss")


def ast(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def index(paths, db, model, *extra):
    return ast("index", *paths, "--db", db, "--model", model, "--device", "cpu", "--dtype", "fp32", "--workers", "1",
               "--quiet", *extra)


def window_scores(db) -> dict:
    """(path, start) -> {head: {label: score}} of every stored window's head scores."""
    with sqlite3.connect(os.path.join(db, "index.sqlite")) as con:
        heads = json.loads(con.execute("SELECT value FROM meta WHERE key = 'heads'").fetchone()[0])
        rows = con.execute("SELECT path, start, head, scores FROM head_scores JOIN windows ON windows.id = window_id "
                           "JOIN files ON files.id = file_id").fetchall()
    out: dict = {}
    for path, start, head, blob in rows:
        out.setdefault((path, start), {})[head] = dict(zip(heads[head]["labels"], np.frombuffer(blob, "<f4").tolist()))
    return out


def classified(clips, base, *heads) -> dict:
    """The same shape as ``window_scores``, from ``ast classify --head ... --segments``: the reference."""
    out: dict = {}
    args = [arg for head in heads for arg in ("--head", str(head))]
    for record in classify(*map(str, clips), "--model", str(base), *args, "--no-base-head", "--segments"):
        for segment in record["segments"]:
            window = out.setdefault((os.path.abspath(record["path"]), segment["start"]), {})
            for x in segment["labels"]:
                window.setdefault(x["head"], {})[x["label"]] = x["score"]
    return out


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for window, heads in want.items():
        assert got[window].keys() == heads.keys()
        for head, labels in heads.items():
            assert got[window][head].keys() == labels.keys()
            assert max(abs(got[window][head][x] - s) for x, s in labels.items()) <= JOINT, (window, head)


def test_28_index_head_stores_what_classify_gives_each_window_with_that_head(setup, tmp_path):
    root, clips = setup["root"], setup["clips"]
    result = index(clips, tmp_path / "db", setup["base"], "--head", root / "pitch", "--head", root / "mix")
    assert result.exit_code == 0, result.stderr
    got = window_scores(tmp_path / "db")
    assert len(got) > len(clips)  # the long clip has several windows, each scored
    assert_close(got, classified(clips, setup["base"], root / "pitch", root / "mix"))
    with Index.open(str(tmp_path / "db")) as stored:
        assert sorted(stored.heads()) == ["mix", "pitch"] and stored.unscored("pitch") == 0


def test_28_index_refuses_a_head_of_another_base_before_any_write(setup, tmp_path):
    root, clips = setup["root"], setup["clips"]
    fresh = index(clips, tmp_path / "fresh", setup["base"], "--head", root / "foreign")
    assert fresh.exit_code == 2 and "another base" in fresh.stderr and not (tmp_path / "fresh").exists()
    assert index(clips[:1], tmp_path / "db", setup["base"]).exit_code == 0
    before = {name: (tmp_path / "db" / name).read_bytes() for name in os.listdir(tmp_path / "db")}
    again = index(clips, tmp_path / "db", setup["base"], "--head", root / "foreign")
    assert again.exit_code == 2 and "another base" in again.stderr
    assert {name: (tmp_path / "db" / name).read_bytes() for name in os.listdir(tmp_path / "db")} == before
    ray = index(clips, tmp_path / "ray", setup["base"], "--head", root / "pitch", "--engine", "ray")
    assert ray.exit_code == 2 and not (tmp_path / "ray").exists()


def test_28_a_head_added_or_retrained_later_scores_the_stored_windows_without_the_backbone(setup, tmp_path,
                                                                                           monkeypatch):
    from ast_cli.tasks import index as tasks_index

    root, clips = setup["root"], setup["clips"]
    assert index(clips, tmp_path / "db", setup["base"]).exit_code == 0
    head = tmp_path / "copy" / "pitch"
    shutil.copytree(root / "pitch", head)

    def no_backbone(*args, **kwargs):
        raise AssertionError("an unchanged file was embedded again")

    monkeypatch.setattr(tasks_index, "embed_files", no_backbone)
    added = ast("index", *clips, "--db", tmp_path / "db", "--model", setup["base"], "--head", head)
    windows = len(window_scores(tmp_path / "db"))
    assert added.exit_code == 0, added.stderr
    assert f"scored {windows} stored windows with pitch" in added.stderr
    assert_close(window_scores(tmp_path / "db"), classified(clips, setup["base"], head))

    tensors = load_file(str(head / "head.safetensors"))  # retrained: other weights under the same name
    tensors["classifier.dense.bias"] = tensors["classifier.dense.bias"] + 1.5
    save_file(tensors, str(head / "head.safetensors"), metadata={"format": "pt"})
    redone = ast("index", *clips, "--db", tmp_path / "db", "--model", setup["base"], "--head", head)
    assert redone.exit_code == 0, redone.stderr
    assert "head pitch changed since it scored" in redone.stderr
    assert_close(window_scores(tmp_path / "db"), classified(clips, setup["base"], head))


def test_28_adding_heads_later_counts_each_stored_window_once_per_head_that_scored_it(setup, tmp_path):
    """#28 walk: two heads given to a later run said "scored 26 stored windows with birds, machines" of an index of
    13 windows, and a head that had scored them all was named as if it had scored them again."""
    clips, db = setup["clips"], tmp_path / "db"
    assert index(clips, db, setup["base"]).exit_code == 0
    with Index.open(db) as stored:
        windows = len(stored)
    both = ast("index", *clips, "--db", db, "--model", setup["base"], "--head", setup["root"] / "pitch",
               "--head", setup["root"] / "mix")
    assert both.exit_code == 0, both.stderr
    assert f"scored {windows} stored windows with pitch, mix\n" in both.stderr
    shutil.copy(clips[0], tmp_path / "copy.wav")
    assert index([*clips, tmp_path / "copy.wav"], db, setup["base"]).exit_code == 0  # windows neither head scored
    with Index.open(db) as stored:
        added = len(stored) - windows
    one = ast("index", *clips, tmp_path / "copy.wav", "--db", db, "--model", setup["base"],
              "--head", setup["root"] / "pitch")
    assert one.exit_code == 0, one.stderr
    assert f"scored {added} stored windows with pitch\n" in one.stderr
    again = ast("index", *clips, tmp_path / "copy.wav", "--db", db, "--model", setup["base"],
                "--head", setup["root"] / "pitch", "--head", setup["root"] / "mix")
    assert again.exit_code == 0, again.stderr
    assert f"scored {added} stored windows with mix\n" in again.stderr and "pitch" not in again.stderr


def test_28_search_label_ranks_windows_by_a_stored_heads_probability(setup, tmp_path):
    root, clips = setup["root"], setup["clips"]
    db = tmp_path / "db"
    assert index(clips, db, setup["base"], "--head", root / "pitch", "--head", root / "mix").exit_code == 0
    scores = sorted((s["pitch"]["high"] for s in window_scores(db).values()), reverse=True)
    result = ast("search", db, "--label", "high", "--head", "pitch", "-f", "jsonl", "--top", "3")
    assert result.exit_code == 0, result.stderr
    hits = [json.loads(line)["score"] for line in result.stdout.splitlines()]
    assert hits == pytest.approx(scores[:3], abs=1e-6)
    floor = ast("search", db, "--label", "high", "--head", "pitch", "-f", "jsonl", "--min-score", scores[1])
    assert len(floor.stdout.splitlines()) == 2
    tonal = ast("search", db, "--label", "tonal", "-f", "jsonl", "--top", "1")  # only mix has it
    assert json.loads(tonal.stdout)["score"] == pytest.approx(max(s["mix"]["tonal"] for s in window_scores(db).values()),
                                                              abs=1e-6)
    both = ast("search", db, "--label", "high")
    assert both.exit_code == 2 and "pick one with --head" in both.stderr
    unknown = ast("search", db, "--label", "high", "--head", "nope")
    assert unknown.exit_code == 2 and "no scores of a head named 'nope'" in unknown.stderr
    assert index([root / "mixhigh0.wav"], db, setup["base"]).exit_code == 0  # stored without the heads
    partial = ast("search", db, "--label", "high", "--head", "pitch")
    assert partial.exit_code == 0 and "not scored by head pitch" in partial.stderr


def test_28_shards_with_heads_merge_into_what_one_run_stores(setup, tmp_path):
    root, clips = setup["root"], setup["clips"]
    assert index(clips, tmp_path / "whole", setup["base"], "--head", root / "pitch").exit_code == 0
    for shard in ("1/2", "2/2"):
        result = index(clips, tmp_path / "parts", setup["base"], "--head", root / "pitch", "--shard", shard)
        assert result.exit_code == 0, result.stderr
    Index.open(str(tmp_path / "parts")).close()
    assert_close(window_scores(tmp_path / "parts"), window_scores(tmp_path / "whole"))


def _scored_store(directory, files: int, windows: int = 50, labels: int = 3):
    """A store of ``files`` x ``windows`` synthetic 8-d windows, each scored by a registered head ``h``."""
    from ast_cli.run import headscores
    from ast_cli.run.vectordb import FileRecord, VectorStore

    rng = np.random.default_rng(0)
    store = VectorStore.open(str(directory))
    store.claim({"model": "synthetic"})
    with store.transaction():
        headscores.register(store.db, {"h": {"digest": "d", "labels": [f"l{i}" for i in range(labels)],
                                             "single_label": False, "path": "/h"}})
        for f in range(files):
            store._put(FileRecord(f"/f{f}", 1, 1, 10.0, None, [(w, w + 1.0) for w in range(windows)],
                                  rng.standard_normal((windows, 8)).astype(np.float32),
                                  scores={"h": rng.random((windows, labels)).astype(np.float32)}))
    return store


def _sqlite_steps(store, action) -> int:
    """How many SQLite VM steps (in hundreds) ``action`` takes on ``store``: a measure of rows visited that no
    machine's speed changes."""
    ticks = [0]

    def tick():
        ticks[0] += 1
        return 0

    store.db.set_progress_handler(tick, 100)
    try:
        action()
    finally:
        store.db.set_progress_handler(None, 100)
    return ticks[0]


def test_28_storing_or_merging_a_file_visits_no_other_windows_scores(tmp_path):
    """head_scores is keyed (head, window_id): dropping a file's scores (every put does, a new file too) and
    reading them for a merge went by window_id alone, a scan of every stored score per file, so indexing or
    merging N windows cost O(N^2) (200,000 windows, a 527-label head: 70 ms per file put, 62 ms per merged file;
    with the window_id index 4 ms and 1 ms)."""
    from ast_cli.run import headscores
    from ast_cli.run.vectordb import FileRecord

    costs = []
    for files in (10, 100):
        store = _scored_store(tmp_path / str(files), files)
        record = FileRecord("/new", 1, 1, 10.0, None, [(w, w + 1.0) for w in range(50)],
                            np.ones((50, 8), np.float32), scores={"h": np.ones((50, 3), np.float32)})
        ids = [r[0] for r in store.db.execute("SELECT id FROM windows WHERE file_id = 1")]
        costs.append((_sqlite_steps(store, lambda: store.put(record)),
                      _sqlite_steps(store, lambda: headscores.of_windows(store.db, ids))))
        store.close()
    (put_small, read_small), (put_large, read_large) = costs
    assert put_large < 2 * put_small + 5 and read_large < 2 * read_small + 5, costs  # 10x the store: not 10x the work


def test_28_search_by_a_label_reads_that_labels_score_only(tmp_path):
    """best() read each row's whole blob (4 bytes per label of the head) to take one float: its memory grew with
    the head's labels (10,000 rows of a 527-label head: 21 MB a batch; of a 100,000-label one, 4 GB)."""
    import tracemalloc

    from ast_cli.run import headscores

    store = _scored_store(tmp_path / "db", 4, labels=5000)  # 200 windows, 20 kB of scores each
    want = store.db.execute("SELECT window_id, scores FROM head_scores").fetchall()
    want = sorted(((-np.frombuffer(blob, "<f4")[4321], window_id) for window_id, blob in want))[:5]
    tracemalloc.start()
    try:
        got = headscores.best(store.db, "h", 4321, 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [(window_id, -score) for score, window_id in want]
    assert peak < 1_000_000, peak  # 200 x 20 kB = 4 MB when the whole rows are read
    store.db.execute("UPDATE head_scores SET scores = zeroblob(8) WHERE window_id = 7")  # damaged: 2 labels
    with pytest.raises(ValueError, match="do not fit its labels"):  # an error, not every later row shifted
        headscores.best(store.db, "h", 4321, 5)


def test_28_search_top_larger_than_the_index_returns_every_window(tmp_path, monkeypatch):
    """``ast search --label`` along the classifier direction (or by example) past the exact size asked faiss for
    4 x --top candidates: --top 10**12 allocated 14.6 TiB (a MemoryError; at 3 * 10**8 the process was killed)."""
    from test_index import _ann_store

    store, queries = _ann_store(tmp_path, monkeypatch, files=4)  # 200 windows, searched through the ANN
    hits = store.search(queries[0], 10**12)
    assert 0 < len(hits) <= len(store) and hits == store.search(queries[0], len(store))


@pytest.mark.parametrize("tensor, value", [("classifier.dense.bias", float("nan")), ("standardize.std", 0.0)])
def test_28_a_head_with_nan_weights_is_refused_not_ranked_first(setup, tmp_path, tensor, value):
    """A NaN weight (or a zero std: inf) made every stored score NaN, which search printed as 1.0000 for every
    window; classify failed every file as 'audio far outside [-1, 1]'. Now a corrupt head, before any write."""
    root, clips = setup["root"], setup["clips"]
    head = tmp_path / "pitch"
    shutil.copytree(root / "pitch", head)
    tensors = load_file(str(head / "head.safetensors"))
    tensors[tensor][0] = value
    save_file(tensors, str(head / "head.safetensors"), metadata={"format": "pt"})
    result = index(clips, tmp_path / "db", setup["base"], "--head", head)
    assert result.exit_code == 2 and "non-finite" in result.stderr and not (tmp_path / "db").exists()


@pytest.mark.parametrize("by", ["head", "vector"])
def test_28_search_reads_one_state_of_the_index_while_a_run_prunes(tmp_path, monkeypatch, by):
    """A search ranked window ids, then read each one's file and times: a run that pruned (or re-indexed) the
    file in between made that read come back empty, and search failed ("cannot unpack non-iterable NoneType
    object"). Both are now read in one snapshot."""
    from ast_cli.run import headscores
    from ast_cli.run.vectordb import VectorStore

    store = _scored_store(tmp_path / "db", 3)
    rank = (headscores, "best") if by == "head" else (VectorStore, "_exact")
    ranked = getattr(*rank)

    def then_pruned(*args, **kwargs):
        found = ranked(*args, **kwargs)
        other = VectorStore.open(str(tmp_path / "db"))  # another process's run
        other.remove(["/f0", "/f1", "/f2"])
        other.close()
        return found

    monkeypatch.setattr(*rank, then_pruned)
    stored = Index(store)
    hits = stored.search_head("l1", top=3) if by == "head" else store.search(np.ones(8, np.float32), top=3)
    assert len(hits) == 3 and {hit.path for hit in hits} <= {"/f0", "/f1", "/f2"}
    assert len(stored) == 0  # the prune is there for the next search


def test_28_search_label_takes_the_label_of_that_case_when_a_head_has_two(tmp_path):
    """A head may have "Bird" and "bird" (ast train keeps both); --label bird searched "Bird"'s scores (the first
    match ignoring case)."""
    from ast_cli.errors import UsageError
    from ast_cli.run import headscores

    store = _scored_store(tmp_path / "db", 2)
    with store.transaction():
        headscores.register(store.db, {"h": {"digest": "d", "labels": ["Bird", "bird", "cat"], "single_label": False,
                                             "path": "/h"}})
    stored = Index(store)
    assert stored.head_of("bird") == ("h", 1) and stored.head_of("Bird") == ("h", 0)
    assert stored.head_of("CAT") == ("h", 2)
    best = max(np.frombuffer(blob, "<f4")[1] for (blob,) in store.db.execute("SELECT scores FROM head_scores"))
    assert stored.search_head("bird", top=1)[0].score == pytest.approx(best, abs=1e-6)
    with pytest.raises(UsageError, match="but for case"):
        stored.head_of("BIRD")


def test_28_search_min_score_past_1_is_refused_not_an_empty_answer(tmp_path):
    """No score (cosine, probability) exceeds 1: --min-score 80 (a percentage) answered nothing with exit 0."""
    _scored_store(tmp_path / "db", 1).close()
    result = ast("search", tmp_path / "db", "--label", "l0", "--min-score", "80")
    assert result.exit_code == 2 and "--min-score" in result.stderr and result.stdout == ""
    assert ast("search", tmp_path / "db", "--label", "l0", "--min-score", "0.5", "-f", "csv").exit_code == 0


def test_28_shard_runs_with_a_head_leave_the_stored_windows_to_a_run_without_shard_and_search_says_so(setup, tmp_path):
    """--shard runs with --head over an index whose files are all stored score nothing (each writes only its part);
    search said the windows were stored by "a run without it", which was not so, and not how to score them."""
    root, clips = setup["root"], setup["clips"]
    db = tmp_path / "db"
    assert index(clips, db, setup["base"]).exit_code == 0
    for shard in ("1/2", "2/2"):
        assert index(clips, db, setup["base"], "--head", root / "pitch", "--shard", shard).exit_code == 0
    searched = ast("search", db, "--label", "high")
    assert searched.exit_code == 0 and "(without --shard) scores them" in searched.stderr
    assert index(clips, db, setup["base"], "--head", root / "pitch").exit_code == 0
    assert "not scored" not in ast("search", db, "--label", "high").stderr


def test_28_the_unscored_scan_looks_up_the_narrow_index_not_the_score_rows(tmp_path):
    """Every ``ast index --head`` run scans for windows the head has not scored; each lookup went through the
    primary key, whose pages hold the score rows (2 kB each for 527 labels): 1.2 s at 200,000 windows with
    nothing to do, 0.25 s through the (window_id, head) index."""
    from ast_cli.run import headscores

    store = _scored_store(tmp_path / "db", 2)
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    assert list(headscores.unscored(store.db, "h")) == []
    store.db.set_trace_callback(None)
    scan = next(sql for sql in statements if "NOT EXISTS" in sql)
    plan = " ".join(row[3] for row in store.db.execute("EXPLAIN QUERY PLAN " + scan))
    assert "COVERING INDEX head_scores_window" in plan, plan


def test_28_backfill_batches_shrink_with_the_heads_labels(tmp_path, monkeypatch):
    """A backfill batch was 10,000 windows whatever the head: with 100,000 labels (read_head's bound) its scores
    alone were 4 GB. Batches now hold BATCH_BYTES of embeddings and scores."""
    import torch

    from ast_cli.checkpoint.heads import Head
    from ast_cli.tasks import index as tasks_index

    store = _scored_store(tmp_path / "db", 2)  # 100 windows of 8-d
    store.db.execute("DELETE FROM head_scores")
    labels = tuple(f"l{i}" for i in range(5000))
    zeros, ones = torch.zeros(8), torch.ones(8)
    head = Head("h", "/h", labels, False, "synthetic", "", tensors={
        "standardize.mean": zeros, "standardize.std": ones, "classifier.layernorm.weight": ones,
        "classifier.layernorm.bias": zeros, "classifier.dense.weight": torch.zeros(len(labels), 8),
        "classifier.dense.bias": torch.zeros(len(labels))})
    monkeypatch.setattr(tasks_index, "BATCH_BYTES", 1 << 20)  # 1 MB / (4 x 5,008 floats) = 52 windows
    batches: list[int] = []
    assert tasks_index.score_stored(store, [head], lambda name, n: batches.append(n)) == 100
    assert batches == [52, 48]


def test_26_3_search_embeds_queries_in_the_mode_index_fast_head_chose(setup, tmp_path, monkeypatch):
    """``ast index --fast --head`` chooses its mode with the heads' probabilities compared too; a search of that
    index loaded the model without them, so it calibrated again (and could pick another mode than the stored
    windows had). It now loads the heads the index scores, and finds the index run's choice."""
    from ast_cli.run import fast

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    calls = []

    def calibrate(model, device="cpu", attn=None, heads=(), embeddings=False, timings=None):
        calls.append(len(heads))
        return [fast.Candidate("fp32", 100.0, 0.0), fast.Candidate("bf16", 50.0, 0.004) if not heads
                else fast.Candidate("bf16", 50.0, 0.5)]  # unfaithful to the head: fp32 with it, bf16 without

    monkeypatch.setattr(fast, "calibrate", calibrate)
    monkeypatch.setattr(fast, "candidate_names", lambda device: [("fp32", None), ("bf16", None)])
    clips, db, head = setup["clips"], tmp_path / "db", tmp_path / "pitch"
    shutil.copytree(setup["root"] / "pitch", head)
    made = ast("index", *clips, "--db", db, "--model", setup["base"], "--device", "cpu", "--fast", "--workers", "1",
               "--quiet", "--head", head)
    assert made.exit_code == 0, made.stderr
    with Index.open(str(db)) as stored:
        stored.search(clips[0], top=1)
        assert (calls, stored.fast_choice.mode) == ([1], "fp32")  # the index run's choice, from the cache
    (head / "head.json").write_text((head / "head.json").read_text() + " ")  # no longer what the index scored with
    with Index.open(str(db)) as stored:
        stored.search(clips[0], top=1)
        assert (calls, stored.fast_choice.mode) == ([1, 0], "bf16")  # without it: its own choice


def test_s8_12_search_label_prefers_the_exact_case_whether_a_heads_or_the_models_own(setup, tmp_path):
    """s8 #12: with a head that has ``noise``, ``--label Noise`` searched the head's ``noise`` (case-folded) and
    the model's own ``Noise`` could not be reached. The same name wins; case-folding only when nothing has it."""
    root, clips = setup["root"], setup["clips"]
    db = tmp_path / "db"
    assert index(clips, db, setup["base"], "--head", root / "pitch").exit_code == 0
    with Index.open(str(db)) as stored:
        column = stored.heads()["pitch"]["labels"].index("noise")
        assert stored.head_of("noise") == stored.head_of("NOISE", "pitch") == ("pitch", column)
        assert stored.head_of("Noise") is None and stored.head_of("Noise", "pitch") == ("pitch", column)
        with pytest.raises(UsageError, match="'NOISE' is head pitch's 'noise' and the model's 'Noise' but for case"):
            stored.head_of("NOISE")  # neither the very name: ambiguous (it took the head's; found by a review)
        model = [hit.score for hit in stored.search(stored.label_vector("Noise"), 2)]
    head = sorted((s["pitch"]["noise"] for s in window_scores(db).values()), reverse=True)[:2]
    for label, want in (("Noise", model), ("noise", head)):
        result = ast("search", db, "--label", label, "-f", "jsonl", "--top", "2")
        assert result.exit_code == 0, result.stderr
        assert [json.loads(line)["score"] for line in result.stdout.splitlines()] == pytest.approx(want, abs=1e-6)
    assert ast("search", db, "--label", "NOISE").exit_code == 2
    assert model != pytest.approx(head, abs=1e-3)  # the two are told apart
