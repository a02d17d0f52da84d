"""Find more like this: the pooled embedding of every window of an archive in one database directory, and
search over it by an example window (or a label's classifier direction).

    >>> index = Index.open("archive.db")            # what ``ast index recordings/ --db archive.db`` built
    >>> len(index), index.files()[0].path
    >>> for hit in index.search("door.wav", top=5):  # the query's first window, embedded with the index's model
    ...     print(hit.path, hit.start, hit.end, round(hit.score, 3))

Storage is ``run.vectordb`` (SQLite + faiss); this module plans (which inputs are new, changed or gone),
embeds with the engine (the windows ``classify`` uses) and stores each file as it finishes, and embeds queries
with the model named in the database.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from ..errors import ModelNotFoundError, UsageError
from ..run.vectordb import SHARDS_DIR, SQLITE_NAME, FileRecord, Hit, VectorStore, require_ann_backend
from .calibrate import weights_digest

BATCH_BYTES = 64 << 20  # a backfill batch's float32 embeddings and scores: bounded however wide the model and head

if TYPE_CHECKING:
    from ..audio.inputs import InputFile
    from ..run.engine import FileOutput


def shard_file(shard: tuple[int, int] | None) -> str:
    """Where a run writes, inside the database directory: the index, or its shard's part."""
    return SQLITE_NAME if shard is None else os.path.join(SHARDS_DIR, f"{shard[0]}-of-{shard[1]}.sqlite")


def identity_of(model: str, path: str, local: bool, config, features, hop_seconds: float, compute: str) -> dict:
    """What the stored vectors depend on: the model (``model``: hub id@commit or the resolved path, plus the
    weights' sha256 for a local one), its input format, the hop between windows and the precision."""
    return {"model": model, "weights": weights_digest(path) if local else None, "hidden_size": config.hidden_size,
            "features": asdict(features), "hop_seconds": round(hop_seconds, 6), "compute": compute,
            "model_path": os.path.realpath(path)}


def file_key(path: str) -> str:
    """How the index names a file: its absolute path (a rerun from another folder finds it again)."""
    return os.path.abspath(path)


def _stat(path: str) -> tuple[int | None, int | None]:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None, None
    return info.st_size, info.st_mtime_ns


@dataclass
class Plan:
    """What a run does: ``todo`` (new, changed or failed before), how many are ``unchanged``, and the stored
    files that are gone (``gone``: dropped by a ``--prune`` run)."""

    todo: list = field(default_factory=list)
    unchanged: int = 0
    gone: list[str] = field(default_factory=list)
    pruned: int = 0


def plan_index(items: list[InputFile], stored: Iterable[FileRecord], prune_below: Iterable[str] = ()) -> Plan:
    """Compare the inputs with what is stored (size and mtime decide; a stored error is retried). ``prune_below``
    (a ``--prune`` run's arguments, as given): ``gone`` holds the stored files they name that no longer exist, and
    an input that names such files but is itself gone (a deleted file or folder, a pattern that matches nothing
    now) is not tried again: its files are pruned instead."""
    from ..audio.inputs import gone, named_by

    known = {record.path: record for record in stored}
    plan, prune_below, dropped = Plan(), list(prune_below), set()
    if prune_below:
        missing = sorted({item.path for item in items if item.error is not None and gone(item.path)})
        plan.gone = sorted(path for path in known if named_by(path, prune_below + missing) and gone(path))
        dropped = {name for name in missing if any(named_by(path, [name]) for path in plan.gone)}
    for item in (item for item in items if item.path not in dropped):
        record = known.get(file_key(item.path))
        if record is not None and record.error is None and item.error is None and \
                (record.size, record.mtime_ns) == _stat(item.path):
            plan.unchanged += 1
        else:
            plan.todo.append(item)
    return plan


def check_stores(db: str, identity: dict | None = None) -> None:
    """A UsageError, read only and before anything is written, when a store in ``db`` (the index, or a part a
    ``--shard`` run wrote) was made with another model or settings than ``identity`` (this run's) or, without
    it, than the others. A part is named: an index never takes parts it cannot merge, and one that holds such a
    part (an older version let it in) says which file it is."""
    from ..run.vectordb import check_identity, read_identity, shard_paths

    index, run = os.path.join(db, SQLITE_NAME), identity is not None
    for path in [index, *shard_paths(db)]:
        stored = read_identity(path)
        if stored is None or identity is None:
            identity = identity or stored
            continue
        if path == index:
            check_identity(stored, identity, db)
            continue
        try:
            check_identity(stored, identity, path)
        except UsageError as exc:
            raise UsageError(str(exc), option="db", hint="every part of an index is made with the same model and "
                             "settings: " + ("give those, or delete that file" if run else "delete that file") +
                             " (the files it holds are then indexed again)") from None


def to_record(item: InputFile, out: FileOutput, identity: tuple[int | None, int | None]) -> FileRecord:
    """One engine output (embeddings per window) as the index stores it."""
    error = out.error
    if error is None and (out.outputs is None or len(out.outputs) == 0):
        error = "no audio windows"
    if error is None and not np.isfinite(out.outputs).all():
        error = "the model gave non-finite embeddings (the audio is far outside [-1, 1]?)"
    windows = [(round(start, 6), round(end, 6)) for start, end in out.windows] if error is None else []
    return FileRecord(file_key(item.path), *identity, duration=out.duration, error=error, windows=windows,
                      vectors=None if error else out.outputs)


def score_heads(heads, vectors: np.ndarray | None) -> dict | None:
    """head name -> (W, L) float32 probabilities of each head on the (W, D) stored embeddings (what classify
    reports with the head: softmax for a single-label head, sigmoid for the others)."""
    import torch

    from ..run.tagger import activate

    if vectors is None or not heads:
        return None
    with torch.inference_mode():
        pooled = torch.from_numpy(np.array(vectors, dtype=np.float32))  # a copy: stored rows are read-only
        return {head.name: activate(head(pooled).numpy(), "softmax" if head.single_label else "sigmoid"
                                    ).astype(np.float32) for head in heads}


def score_stored(store: VectorStore, heads, on_batch: Callable[[str, int], None] | None = None) -> int:
    """Score with ``heads`` every stored window they have not scored (stored before they were given, or before
    they changed), from the stored embeddings, one transaction per batch; returns how many scores (windows
    times heads): ``on_batch`` tells them apart."""
    from ..run import headscores

    done = 0
    for head in heads:
        width = head.tensors["standardize.mean"].numel() + len(head.labels)  # floats per window in and out
        rows = max(1, min(headscores.SCAN_BATCH, BATCH_BYTES // (4 * width)))  # 100,000 labels: 167 rows
        for ids, vectors in headscores.unscored(store.db, head.name, rows):
            with store.transaction():
                headscores.put(store.db, ids, score_heads([head], vectors))
            done += len(ids)
            if on_batch is not None:
                on_batch(head.name, len(ids))
    return done


def embed_files(items: list[InputFile], tagger, on_progress: Callable | None = None
                ) -> Iterator[tuple[FileRecord, FileOutput]]:
    """Embed every window of ``items`` with the local engine; one (record, engine output) each, in order."""
    from ..audio.sources import as_sources

    identities = [_stat(item.path) for item in items]  # before reading: a file changed meanwhile is redone next run
    engine = tagger.engine(tagger.backend.with_output("embedding"))
    outputs = engine.run(as_sources(items), on_progress=on_progress)
    try:
        for item, identity, out in zip(items, identities, outputs):
            yield to_record(item, out, identity), out
    finally:
        engine.stop()


def stored_embeddings(db: str, examples: Iterable) -> Iterator[tuple[str | None, np.ndarray | None, None]]:
    """(error, (windows, D) embeddings, None) per training example (``train_data.Example``) from the index in
    ``db``: the window that starts at the example's ``start``, or every window of its file. Nothing is computed."""
    with Index.open(db) as index:
        for example in examples:
            windows, vectors = index.store.vectors_of(file_key(example.path))
            if example.start is not None:  # starts are stored rounded to the microsecond; csv keeps them
                vectors = vectors[[i for i, (start, _) in enumerate(windows) if abs(start - example.start) < 1e-3][:1]]
            where = "" if example.start is None else f" at {example.start:g} s"
            yield (None, vectors, None) if len(vectors) else (f"no window{where} in the index {db}", None, None)


def _column(labels: list[str], label: str) -> int | None:
    """Where ``label`` is in a head's ``labels``: that name exactly, else the one name that differs only in case
    (a head may have both "Bird" and "bird": then the case given picks)."""
    if label in labels:
        return labels.index(label)
    folded = [i for i, name in enumerate(labels) if name.lower() == label.lower()]
    if len(folded) > 1:
        raise UsageError(f"{label!r} is {' and '.join(repr(labels[i]) for i in folded)} but for case",
                         option="label", hint="give the label with its case")
    return folded[0] if folded else None


class Index:
    """A window index directory (``ast index`` made it): ``len`` (windows), ``files()``, ``search()``."""

    def __init__(self, store: VectorStore):
        self.store = store
        self._tagger = None
        self.model: str | None = None  # ``use_model``: where the index's model is now
        self._checked: str | None = None  # the recorded model path, once found to hold the index's model
        self.fallback: str | None = None  # the precision queries run in where the index's cannot run here

    @classmethod
    def open(cls, db: str, read_only: bool | None = None) -> "Index":
        """Open the index in directory ``db``, merging the shards that finished runs left there; ``read_only``:
        write nothing (``run.readonly.open_store``: by default so where ``db`` cannot be written)."""
        from ..run.readonly import open_store

        require_ann_backend()
        check_stores(db)  # parts that cannot be merged: refused before anything is written
        return cls(open_store(db, read_only))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.store)

    def files(self) -> list[FileRecord]:
        return self.store.files()

    @property
    def identity(self) -> dict:
        return self.store.meta().get("identity") or {}

    def tagger(self, options=None):
        """The model that made the index (``model_source``), loaded once, run in the precision the index was made
        in (fp32 where that is fp16 and there is no GPU)."""
        if self._tagger is None:
            from ..run.backends import pick_device
            from ..run.options import RunOptions
            from ..run.tagger import Tagger

            identity = self.identity
            compute = identity.get("compute", "fp32")
            if options is None and compute == "fp16" and pick_device() == "cpu":  # a GPU's default: refused on CPUs
                compute = self.fallback = "fp32"
            options = options or RunOptions(
                hop_seconds=identity.get("hop_seconds"), fast=compute == "fast",
                quantize="int8" if compute == "int8" else "none",
                dtype=compute if compute in ("fp32", "fp16", "bf16") else "auto")
            heads = self._unchanged_heads() if options.fast else []
            self._tagger = Tagger.load(self.model_source(), options, heads=heads, embeddings=True)
        return self._tagger

    def use_model(self, path: str) -> None:
        """Load the index's model from ``path`` (its folder moved): refused unless it holds the weights and input
        format the index recorded (a hub model is found by its id and revision, never elsewhere)."""
        self.model = path
        self.model_source()

    def model_source(self) -> str:
        """Where the index's model loads from: ``use_model``'s path, its recorded path, else its hub id@revision;
        a ``UsageError`` when a local model is no longer at its recorded path, or the path now holds other weights
        (sha256) or input format, which would embed unlike the stored windows."""
        from ..checkpoint.weights import read_configs

        identity = self.identity
        path = self.model or identity.get("model_path") or ""
        if self.model is None and not os.path.exists(path):
            if identity.get("weights"):  # a local model that moved
                raise UsageError(f"the model {self.store.directory} was made with is no longer at {path}",
                                 option="model", hint="give the folder where it is now (its weights are checked "
                                                      "against the index's)")
            return identity["model"]
        if self._checked == path:  # a search asks up to three times: the weights are read once
            return path
        try:
            changed = "weights" if (identity.get("weights") or self.model) and \
                weights_digest(path) != identity.get("weights") else None
        except OSError:  # no weights file there (any more)
            changed = "weights"
        if changed is None and os.path.isdir(path):
            config, features = read_configs(Path(path))
            if (asdict(features), config.hidden_size) != (identity.get("features"), identity.get("hidden_size")):
                changed = "input format"
        if changed and self.model is not None:
            raise UsageError(f"{path} does not hold the model {self.store.directory} was made with "
                             f"({identity.get('model')}): other {changed}", option="model")
        if changed:
            raise UsageError(f"{self.store.directory} was made with the model at {path}, whose {changed} changed "
                             "since", hint="put back the model it was made with, or index again into a new "
                                           "database with this one")
        self._checked = path
        return path

    def _unchanged_heads(self) -> list[str]:
        """The folders of the heads the index scores that still hold what it scored with. ``ast index --fast
        --head`` chose its mode with them (the choice keeps their probabilities within the bound too), so a
        query embedded with them runs in the mode the index's windows were stored in."""
        from ..run import headscores

        return [entry["path"] for entry in self.heads().values() if headscores.same_head(entry)]

    @property
    def fast_choice(self):
        """What ``--fast`` runs for an index made with it, once a query has loaded the model; else None."""
        return None if self._tagger is None else self._tagger.backend.fast_choice

    def search(self, query, top: int = 10, *, start: float = 0.0, end: float | None = None,
               exclude_file: bool = False, min_score: float | None = None) -> list[Hit]:
        """Windows most like ``query``, best first: a (D,) vector, or audio (a file, or 16 kHz mono samples),
        whose window from ``start`` (to ``end``) seconds the index's model embeds. ``exclude_file``: not the query
        file's own windows."""
        vector, exclude = np.asarray(query if not isinstance(query, (str, os.PathLike)) else [], np.float32), None
        if isinstance(query, (str, os.PathLike)):
            vector = self.embed_query(str(query), start, end)
            exclude = file_key(str(query)) if exclude_file else None
        elif vector.ndim == 1 and vector.shape[0] != self.identity.get("hidden_size"):  # 16 kHz samples
            vector = self.embed_samples(vector[int(round(start * 100)) * 160 :])  # whole 10 ms frames
        return self.store.search(vector, top, exclude_path=exclude, min_score=min_score)

    def embed_query(self, path: str, start: float = 0.0, end: float | None = None) -> np.ndarray:
        """(D,) embedding of one window of ``path``: from ``start`` to ``end`` (default: one model window),
        cut on the 10 ms frame grid so that a window the index holds embeds exactly as stored."""
        import math

        from ..audio.decode import read_span
        from ..constants import FRAME_SECONDS

        for value, option in ((start, "start"), (end, "end")):
            if value is not None and not math.isfinite(value):  # inf samples: an OverflowError below
                raise UsageError(f"{value:g} s is not a time in the audio", option=option)
        if not start >= 0:  # a negative sample offset would slice from the end of the first block
            raise UsageError(f"the query window cannot start before the audio: {start:g} s", option="start")
        if end is not None and not end > start:
            raise UsageError(f"{end:g} s is not after the start, {start:g} s", option="end")
        first = int(round(start / FRAME_SECONDS)) * 160  # samples: whole frames, as the engine's windows start
        window = int(self.identity["features"]["max_length"]) * 160
        length = min(window, int(round((end - start) * 16000))) if end is not None else window
        # + the last frame's overlap (400-sample frames, 160 apart); an unreadable query fails before the model loads
        piece = read_span(path, first, first + max(0, length) + 240) if length > 0 else np.empty(0, np.float32)
        if piece.shape[0] == 0:
            raise UsageError(f"{path} has no audio from {start:g} s" + (f" to {end:g} s" if end is not None else ""),
                             option="start")
        return self.embed_samples(piece, name=path)

    def embed_samples(self, samples: np.ndarray, name: str = "<array>") -> np.ndarray:
        """(D,) embedding of the first window of 16 kHz mono ``samples``, with the index's model."""
        from ..audio.sources import ArraySource

        tagger = self.tagger()
        engine = tagger.engine(tagger.backend.with_output("embedding"))
        out = next(iter(engine.run([ArraySource(samples, name=name)])))
        if out.error is not None:
            raise UsageError(f"{name}: {out.error}", option="query")
        return out.outputs[0]

    def heads(self) -> dict:
        """The heads whose scores the index holds (``ast index --head``): name -> labels, kind, folder, digest."""
        from ..run import headscores

        return headscores.registered(self.store.db)

    def head_of(self, label: str, head: str | None = None) -> tuple[str, int] | None:
        """(head name, column) of ``label`` among the stored heads' (``head``: that head's) labels, or None: the model's
        own. The very name wins, a head's or the model's; else one that differs only in case."""
        heads = self.heads()
        if head is not None and head not in heads:
            raise UsageError(f"the index holds no scores of a head named {head!r}", option="head",
                             hint=f"its heads: {', '.join(sorted(heads)) or 'none'} (ast index --head DIR adds one)")
        candidates = [(name, entry["labels"]) for name, entry in sorted(heads.items()) if head in (None, name)]
        found = [(name, labels.index(label)) for name, labels in candidates if label in labels]
        if not found:  # a name that differs only in case, unless the model's own label is this one exactly
            found = [(name, column) for name, labels in candidates if (column := _column(labels, label)) is not None]
            own = [name for name in self.model_labels() if name.lower() == label.lower()] if head is None else []
            if found and label in own:
                return None
            if found and own:  # DOG: a head's dog and the model's Dog, neither the very name
                raise UsageError(f"{label!r} is head {found[0][0]}'s {heads[found[0][0]]['labels'][found[0][1]]!r} "
                                 f"and the model's {own[0]!r} but for case", option="label",
                                 hint="give the label with its case (or the head with --head NAME)")
        if head is not None and not found:
            raise UsageError(f"{label!r} is not one of head {head}'s labels", option="label")
        if len(found) > 1:
            raise UsageError(f"heads {' and '.join(name for name, _ in found)} both have a label {label!r}",
                             option="label", hint="pick one with --head NAME")
        return found[0] if found else None

    def search_head(self, label: str, head: str | None = None, top: int = 10, min_score: float | None = None
                    ) -> list[Hit]:
        """The windows a stored head scores highest for ``label`` (its probability, as classify reports it with
        that head), best first; only windows the head has scored (``unscored``: how many it has not)."""
        from ..run import headscores

        found = self.head_of(label, head)
        if found is None:
            raise UsageError(f"{label!r} is not a label of any head the index holds scores of", option="label")
        with self.store.snapshot():
            return self.store._hits(headscores.best(self.store.db, *found, top, min_score))

    def unscored(self, head: str) -> int:
        """How many stored windows head ``head`` has not scored (a run without ``--head`` for it added them)."""
        from ..run import headscores

        return headscores.missing(self.store.db, head)

    def model_labels(self) -> tuple[str, ...]:
        """The labels of the index's model itself (its config's, or a bare weights file's); none when it is gone."""
        from ..checkpoint.hub import resolve_model
        from ..checkpoint.weights import load_checkpoint, read_configs

        try:
            path = resolve_model(self.model_source())
        except ModelNotFoundError:  # then only a head can have the label
            return ()
        return (read_configs(path)[0] if path.is_dir() else load_checkpoint(path).config).id2label

    def label_vector(self, label: str) -> np.ndarray:
        """The direction in embedding space along which the model's logit for ``label`` grows: the classifier
        row scaled by its LayerNorm's gain, centred (LayerNorm ignores a shift along the all-ones vector). Read
        from the checkpoint's float32 tensors: the model is not built (an int8 or bf16 one has no plain weights)."""
        from ..checkpoint.hub import resolve_model
        from ..checkpoint.weights import load_checkpoint

        checkpoint = load_checkpoint(resolve_model(self.model_source()))
        column = _column(names := list(checkpoint.config.id2label), label)
        if column is None:
            raise UsageError(f"{label!r} is not one of the model's labels" if names else
                             f"{label!r} is not a label of any head the index holds scores of, and its model has "
                             "no labels of its own (a bare encoder)", option="label",
                             hint=None if names else "index it again with a head trained on this model")
        state = checkpoint.state_dict
        row = state["classifier.dense.weight"][column].float().numpy()
        direction = row * state["classifier.layernorm.weight"].float().numpy()
        return direction - direction.mean()


__all__ = ["Index", "Plan", "check_stores", "embed_files", "file_key", "identity_of", "plan_index",
           "score_heads", "score_stored", "shard_file", "stored_embeddings", "to_record"]
