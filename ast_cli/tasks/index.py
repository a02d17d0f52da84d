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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from ..errors import UsageError
from ..run.vectordb import SHARDS_DIR, SQLITE_NAME, FileRecord, Hit, VectorStore, require_ann_backend

BATCH_BYTES = 64 << 20  # a backfill batch's float32 embeddings and scores: bounded however wide the model and head

if TYPE_CHECKING:
    from ..audio.inputs import InputFile
    from ..run.engine import FileOutput


def shard_file(shard: tuple[int, int] | None) -> str:
    """Where a run writes, inside the database directory: the index, or its shard's part."""
    return SQLITE_NAME if shard is None else os.path.join(SHARDS_DIR, f"{shard[0]}-of-{shard[1]}.sqlite")


def weights_digest(path: str) -> str:
    """sha256 of a local checkpoint's weights file (``path``: the file, or a folder holding it)."""
    import hashlib

    from ..checkpoint.weights import PICKLE_NAME, SAFETENSORS_NAME

    if os.path.isdir(path):
        path = next((os.path.join(path, name) for name in (SAFETENSORS_NAME, PICKLE_NAME)
                     if os.path.isfile(os.path.join(path, name))), path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def identity_of(model: str, path: str, local: bool, config, features, hop_seconds: float, compute: str) -> dict:
    """What the stored vectors depend on: the model (``model``: hub id@commit or the resolved path, plus the
    weights' sha256 for a local one), its input format, the hop between windows and the precision."""
    from dataclasses import asdict

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
    files that the given paths no longer hold (``gone``: dropped with ``--prune``)."""

    todo: list = field(default_factory=list)
    unchanged: int = 0
    gone: list[str] = field(default_factory=list)
    pruned: int = 0


def covered(path: str, arguments: Iterable[str]) -> bool:
    """Whether a stored ``path`` is one the command-line ``arguments`` name: the file itself, a file below a
    named folder, or a match of a glob pattern (``-``, a list on stdin, names nothing in advance)."""
    import fnmatch

    for argument in arguments:
        root = os.path.abspath(argument) if argument != "-" else None
        if root and (path == root or path.startswith(root.rstrip(os.sep) + os.sep) or fnmatch.fnmatchcase(path, root)):
            return True
    return False


def plan_index(items: list[InputFile], stored: Iterable[FileRecord], arguments: Iterable[str] = ()) -> Plan:
    """Compare the inputs with what is stored (size and mtime decide; a stored error is retried). ``gone``: the
    stored files under ``arguments`` (the paths as given) that the inputs no longer hold."""
    known = {record.path: record for record in stored}
    plan = Plan()
    for item in items:
        record = known.get(file_key(item.path))
        if record is not None and record.error is None and item.error is None and \
                (record.size, record.mtime_ns) == _stat(item.path):
            plan.unchanged += 1
        else:
            plan.todo.append(item)
    found = {file_key(item.path) for item in items}
    plan.gone = sorted(path for path in known if path not in found and covered(path, arguments))
    return plan


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


def head_entry(head) -> dict:
    """How the index records a head (``checkpoint.heads.Head``): its labels, kind and folder, and a digest of its
    two files (the same name with another digest: retrained, so its stored scores are dropped and redone)."""
    return {"digest": head_digest(head.path), "labels": list(head.labels), "single_label": head.single_label,
            "path": os.path.abspath(head.path)}


def head_digest(folder: str) -> str:
    """sha256 of a head folder's two files, in order."""
    import hashlib

    from ..checkpoint.heads import HEAD_CONFIG, HEAD_WEIGHTS

    digest = hashlib.sha256()
    for name in (HEAD_CONFIG, HEAD_WEIGHTS):
        with open(os.path.join(folder, name), "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


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


def _read_span(path: str, begin: int, end: int) -> np.ndarray:
    """Samples ``begin`` to ``end`` (16 kHz mono) of an audio file, read block by block: memory stays bounded
    however long the file."""
    from ..audio.decode import AudioReader
    from ..errors import AudioDecodeError

    pieces, offset = [], 0
    try:
        for block in AudioReader(path).blocks():
            if offset + block.shape[0] > begin:
                pieces.append(block[max(0, begin - offset) : end - offset])
            offset += block.shape[0]
            if offset >= end:
                break
    except AudioDecodeError as exc:  # the reason alone would not say which file
        raise AudioDecodeError(f"{path}: {exc}", needs_ffmpeg=exc.needs_ffmpeg) from None
    return np.concatenate(pieces) if pieces else np.empty(0, np.float32)


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
        self.fallback: str | None = None  # the precision queries run in where the index's cannot run here

    @classmethod
    def open(cls, db: str, read_only: bool | None = None) -> "Index":
        """Open the index in directory ``db``, merging the shards that finished runs left there; ``read_only``:
        write nothing (``run.readonly.open_store``: by default so where ``db`` cannot be written)."""
        from ..run.readonly import open_store

        require_ann_backend()
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
        """Load the index's model from ``path`` (its folder moved): refused unless its weights are the ones the
        index recorded (a hub model is found by its id and revision, never elsewhere)."""
        try:
            same = weights_digest(path) == self.identity.get("weights")
        except OSError:  # not there, or no weights in it
            same = False
        if not same:
            raise UsageError(f"{path} does not hold the weights {self.store.directory} was made with "
                             f"({self.identity.get('model')})", option="model")
        self.model = path

    def model_source(self) -> str:
        """Where the index's model loads from: ``use_model``'s path, its recorded path, else its hub id@revision."""
        path = self.model or self.identity.get("model_path") or self.identity.get("model") or ""
        if os.path.exists(path) or not self.identity.get("weights"):
            return path if os.path.exists(path) else self.identity["model"]
        raise UsageError(f"the model {self.store.directory} was made with is no longer at {path}", option="model",
                         hint="give the folder where it is now (its weights are checked against the index's)")

    def _unchanged_heads(self) -> list[str]:
        """The folders of the heads the index scores that still hold what it scored with. ``ast index --fast
        --head`` chose its mode with them (the choice keeps their probabilities within the bound too), so a
        query embedded with them runs in the mode the index's windows were stored in."""
        folders = []
        for entry in self.heads().values():
            try:
                if head_digest(entry["path"]) == entry["digest"]:
                    folders.append(entry["path"])
            except (OSError, KeyError, TypeError):  # gone, unreadable, or an index older than the digests
                pass
        return folders

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
        from ..constants import FRAME_SECONDS

        if not start >= 0:  # a negative sample offset would slice from the end of the first block
            raise UsageError(f"the query window cannot start before the audio: {start:g} s", option="start")
        if end is not None and not end > start:
            raise UsageError(f"{end:g} s is not after the start, {start:g} s", option="end")
        first = int(round(start / FRAME_SECONDS)) * 160  # samples: whole frames, as the engine's windows start
        window = int(self.identity["features"]["max_length"]) * 160
        length = min(window, int(round((end - start) * 16000))) if end is not None else window
        # + the last frame's overlap (400-sample frames, 160 apart); an unreadable query fails before the model loads
        piece = _read_span(path, first, first + max(0, length) + 240) if length > 0 else np.empty(0, np.float32)
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
        """(head name, column) of ``label`` among the stored heads' labels (``head``: that head only); None when
        no head is named and none has the label (it is then the model's own)."""
        heads = self.heads()
        if head is not None and head not in heads:
            raise UsageError(f"the index holds no scores of a head named {head!r}", option="head",
                             hint=f"its heads: {', '.join(sorted(heads)) or 'none'} (ast index --head DIR adds one)")
        found = [(name, column) for name, entry in sorted(heads.items())
                 if head in (None, name) and (column := _column(entry["labels"], label)) is not None]
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

    def label_vector(self, label: str) -> np.ndarray:
        """The direction in embedding space along which the model's logit for ``label`` grows: the classifier
        row scaled by its LayerNorm's gain, centred (LayerNorm ignores a shift along the all-ones vector). Read
        from the checkpoint's float32 tensors: the model is not built (an int8 or bf16 one has no plain weights)."""
        from ..checkpoint.hub import resolve_model
        from ..checkpoint.weights import load_checkpoint

        checkpoint = load_checkpoint(resolve_model(self.model_source()))
        names = {name.lower(): i for i, name in enumerate(checkpoint.config.id2label)}
        if label.lower() not in names:
            raise UsageError(f"{label!r} is not one of the model's labels" if names else
                             f"{label!r} is not a label of any head the index holds scores of, and its model has "
                             "no labels of its own (a bare encoder)", option="label",
                             hint=None if names else "index it again with a head trained on this model")
        state = checkpoint.state_dict
        row = state["classifier.dense.weight"][names[label.lower()]].float().numpy()
        direction = row * state["classifier.layernorm.weight"].float().numpy()
        return direction - direction.mean()


__all__ = ["Index", "Plan", "covered", "embed_files", "file_key", "head_entry", "identity_of", "plan_index",
           "score_heads", "score_stored", "shard_file", "stored_embeddings", "to_record"]
