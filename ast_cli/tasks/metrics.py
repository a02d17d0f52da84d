"""How good a model is on labeled data: average precision, accuracy and the rest (``metrics``), a file's score
from its windows' (``file_scores``), ``score_dataset``, which runs a Tagger over a dataset, and ``evaluate``.
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import UsageError
from .train_data import Dataset


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision-recall steps (as sklearn's average_precision_score), for one class."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order] > 0
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def metrics(scores: np.ndarray, targets: np.ndarray, labels: tuple[str, ...], multi_label: bool,
            threshold: float = 0.5) -> dict:
    """Single-label: accuracy, macro-F1, confusion (rows: true, columns: predicted). Multi-label: mAP over
    labels with positives, per-label AP and F1 at ``threshold``."""
    if not multi_label:
        truth, predicted = targets.argmax(axis=1), scores.argmax(axis=1)
        k = len(labels)
        confusion = np.zeros((k, k), dtype=int)
        np.add.at(confusion, (truth, predicted), 1)
        f1 = []
        for i in range(k):
            tp, fp, fn = confusion[i, i], confusion[:, i].sum() - confusion[i, i], confusion[i, :].sum() - confusion[i, i]
            if confusion[i, :].sum():
                f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return {"accuracy": float((truth == predicted).mean()), "macro_f1": float(np.mean(f1)),
                "files": int(len(truth)), "labels": list(labels), "confusion": confusion.tolist()}
    per_label = {}
    for i, name in enumerate(labels):
        ap = average_precision(scores[:, i], targets[:, i])
        on = scores[:, i] >= threshold
        tp = float((on & (targets[:, i] > 0)).sum())
        f1 = 2 * tp / (on.sum() + (targets[:, i] > 0).sum()) if (on.sum() + targets[:, i].sum()) else float("nan")
        per_label[name] = {"ap": ap, "f1": float(f1), "positives": int(targets[:, i].sum())}
    aps = [v["ap"] for v in per_label.values() if not math.isnan(v["ap"])]
    return {"map": float(np.mean(aps)) if aps else float("nan"), "threshold": threshold,
            "files": int(len(scores)), "per_label": per_label}


def file_scores(window_logits: list[np.ndarray], multi_label: bool) -> np.ndarray:
    """(files, K) scores from each file's (windows, K) logits, aggregated as classify does."""
    from ..run.tagger import activate

    if multi_label:
        return np.stack([activate(w, "sigmoid").max(axis=0) for w in window_logits])
    return np.stack([activate(w, "softmax").mean(axis=0) for w in window_logits])


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class Scored:
    """A dataset as the model scores it: ``scores`` (files, K) over ``labels`` (the data's), each file's score as
    classify makes it (single-label: softmax, mean over windows; multi-label: sigmoid, max), its ``targets``
    (files, K) 0/1, the files' ``paths``, and the files that could not be scored (``failed``: path, error)."""

    scores: np.ndarray
    targets: np.ndarray
    labels: tuple[str, ...]
    paths: list[str]
    multi_label: bool
    failed: list[dict]

    @property
    def activation(self) -> str:
        return "sigmoid" if self.multi_label else "softmax"

    @property
    def aggregate(self) -> str:
        return "max" if self.multi_label else "mean"


def evaluate(tagger, dataset: Dataset, threshold: float = 0.5, feature_cache: str | None = None) -> dict:
    """Metrics of ``tagger`` on ``dataset``; its labels are matched by name (every data label must be one).
    Window embeddings come from (and go to) the shared cache (``feature_cache``: another folder), so a second
    evaluation of the same model and files, or one of the base model ``train`` used, computes nothing again."""
    return report(score_dataset(tagger, dataset, feature_cache), threshold)


def report(scored: Scored, threshold: float = 0.5) -> dict:
    """``metrics`` of scored data, plus its ``failed`` files, as JSON-ready values (NaN: None)."""
    if not len(scored.paths):  # nothing to measure: no metrics (numpy would warn on empty arrays)
        return {"files": 0, "failed": scored.failed}
    out = metrics(scored.scores, scored.targets, scored.labels, scored.multi_label, threshold)
    out["failed"] = scored.failed
    return _jsonable(out)


def check_labels(labels: tuple[str, ...], data_labels, model: str = "") -> None:
    """A UsageError unless every label of the data is one of ``labels`` (the model's): it needs no model loaded,
    only its labels. A bare encoder (no labels at all) is named as such: it has nothing to measure."""
    if not labels:
        raise UsageError(f"{model or 'the model'} has no labels of its own (a bare encoder): nothing to measure",
                         hint="evaluate a head trained on it: head-mode training writes a "
                                             "folder with the labels")
    missing = sorted(set(data_labels) - set(labels))
    if missing:
        raise UsageError(f"the model has no label {missing[0]!r} (and {len(missing) - 1} more)" if len(missing) > 1
                         else f"the model has no label {missing[0]!r}", option="data")


def score_dataset(tagger, dataset: Dataset, feature_cache: str | None = None) -> Scored:
    """``dataset`` scored by ``tagger`` (see ``evaluate``); unreadable files are left out, named in ``failed``."""
    check_labels(tagger.labels, dataset.labels, tagger.name)
    dataset, failed = dataset.regular_files()
    scores = np.zeros((len(dataset.examples), len(tagger.labels)))
    keep = []
    for row, (example, (error, logits)) in enumerate(zip(dataset.examples, _file_logits(tagger, dataset,
                                                                                         feature_cache))):
        if error is None:
            scores[row] = file_scores([logits], dataset.multi_label)[0]  # as classify: softmax mean, sigmoid max
            if not np.isfinite(scores[row]).all():
                error = "the model gave non-finite scores (the audio is far outside [-1, 1]?)"
        if error is not None:
            failed.append({"path": example.path, "error": error})
        else:
            keep.append(row)
    columns = [tagger.labels.index(name) for name in dataset.labels]
    kept = dataset.subset(keep)
    return Scored(scores[keep][:, columns], kept.targets(), dataset.labels, [e.path for e in kept.examples],
                  dataset.multi_label, failed)


def _file_logits(tagger, dataset: Dataset, feature_cache: str | None) -> Iterator[tuple[str | None, np.ndarray]]:
    """(error, (windows, K) logits) per file: the classifier on cached embeddings, or (a ``Tagger`` that does
    not know its weights file) the whole model."""
    from .extract import FeatureExtractor, cached_embeddings, embedding_cache_dir
    from ..run.files import check_writable_dir

    paths = [e.path for e in dataset.examples]
    try:
        check_writable_dir(feature_cache or embedding_cache_dir())
        cached = getattr(tagger, "source", None) is not None
    except UsageError:  # a read-only cache: evaluate all the same
        cached = False
    if not cached:
        for out in tagger.engine().run(paths):
            empty = out.error is None and (out.outputs is None or not len(out.outputs))
            yield ("no audio windows" if empty else out.error), out.outputs
        return
    for error, embeddings, _ in cached_embeddings(paths, tagger.source, tagger.features, tagger.options,
                                                  lambda: FeatureExtractor.embeddings(tagger), feature_cache):
        yield error, None if error else tagger.head(embeddings)
