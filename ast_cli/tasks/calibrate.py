"""Calibrated thresholds: per label, the score from which a label counts as present, chosen on labeled data
so that it reaches a target (``precision=P``, ``recall=R`` or the best ``f1``), and where they are written.

A threshold is placed halfway between the lowest score it keeps and the next score down: on the data every
threshold in that gap gives the same counts, and the middle of it leaves room for the last bits a score moves
by between runs (cached embeddings vs the whole model, another CPU).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..constants import MIN_POSITIVES
from ..errors import UsageError
from .metrics import Scored

_EPS = 1e-12  # 9/10 >= 0.9 must hold whatever the last bit of a division


@dataclass(frozen=True)
class Target:
    """What a threshold must reach: ``metric`` precision or recall at ``value``, or f1 (its maximum)."""

    metric: str
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``precision=0.9``, ``recall=0.8`` or ``f1``; anything else is a UsageError (option ``calibrate``)."""
        name, _, value = text.strip().lower().partition("=")
        if name == "f1" and not value:
            return cls("f1")
        if name in ("precision", "recall") and value:
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if 0.0 < number <= 1.0:
                return cls(name, number)
            raise UsageError(f"the {name} must be a number above 0 and at most 1, not {value!r}", option="calibrate")
        raise UsageError(f"{text!r} is not a target", option="calibrate",
                         hint="precision=P, recall=R (P, R from 0 to 1), or f1")

    def __str__(self) -> str:
        return self.metric if self.value is None else f"{self.metric}={self.value:g}"


@dataclass(frozen=True)
class LabelCalibration:
    """One label's outcome. ``status``: calibrated, unreachable (``best``: the best value of the target's metric
    at any threshold), too few positives, or no positives; the metrics are those at ``threshold`` on the data."""

    label: str
    status: str
    positives: int
    threshold: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    best: float | None = None


def calibrate(scored: Scored, target: Target, min_positives: int = MIN_POSITIVES,
              every_label: tuple[str, ...] = ()) -> list[LabelCalibration]:
    """Each label of ``scored``: for precision, the lowest threshold whose precision reaches the target (the most
    recall at that precision); for recall, the highest whose recall does (the most precision); for f1, the one
    with the highest F1. Labels with fewer than ``min_positives`` positive files are not calibrated, nor those of
    ``every_label`` (the model's) that the data does not have (no positives)."""
    found = [_one(scored.labels[k], scored.scores[:, k], scored.targets[:, k] > 0, target, min_positives)
             for k in range(len(scored.labels))]
    return found + [LabelCalibration(name, "no positives", 0) for name in every_label if name not in scored.labels]


def _one(label: str, scores: np.ndarray, positive: np.ndarray, target: Target, min_positives: int) -> LabelCalibration:
    positives = int(positive.sum())
    if positives == 0 or positives < min_positives:
        return LabelCalibration(label, "no positives" if positives == 0 else "too few positives", positives)
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], np.cumsum(positive[order])  # (N,): keeping the top n+1 finds hits[n] positives
    kept = np.arange(1, len(ranked) + 1)
    cuts = np.flatnonzero(np.r_[ranked[:-1] > ranked[1:], True])  # a threshold can fall only between two scores
    precision, recall = hits[cuts] / kept[cuts], hits[cuts] / positives
    f1 = 2 * hits[cuts] / (kept[cuts] + positives)
    value = {"precision": precision, "recall": recall, "f1": f1}[target.metric]
    if target.metric == "f1":
        chosen = int(np.argmax(f1))
    else:
        reached = np.flatnonzero(value >= target.value - _EPS)
        if not len(reached):
            return LabelCalibration(label, "unreachable", positives, best=float(value.max()))
        chosen = int(reached[-1] if target.metric == "precision" else reached[0])
    cut = cuts[chosen]
    below = ranked[cut + 1] if cut + 1 < len(ranked) else max(0.0, ranked[cut] - 1e-6)
    return LabelCalibration(label, "calibrated", positives, float((ranked[cut] + below) / 2),
                            float(precision[chosen]), float(recall[chosen]), float(f1[chosen]))


def file_sha256(path: str) -> str:
    """The SHA-256 of a file (the weights thresholds were calibrated on), read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: str) -> str:
    """sha256 of a local checkpoint's weights file (``path``: the file, or a folder holding it)."""
    from ..checkpoint.names import weights_path

    return file_sha256(weights_path(path))


def document(results: list[LabelCalibration], scored: Scored, target: Target, data: str, model: str,
             weights: str | None) -> dict:
    """What ``thresholds.json`` holds: the thresholds, the scores they apply to, and what they came from."""
    from dataclasses import asdict
    from datetime import datetime, timezone

    paths = sorted(os.path.realpath(p) for p in scored.paths)
    files_sha256 = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
    return {"thresholds": {r.label: r.threshold for r in results if r.status == "calibrated"},
            "activation": scored.activation, "aggregate": scored.aggregate, "target": str(target),
            "model": model, "weights_sha256": weights,
            "data": {"paths": [os.path.realpath(data)], "files": len(paths), "files_sha256": files_sha256},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "report": [asdict(r) for r in results]}


def destination(model: str, out: str | None, cache_dir: str | None = None) -> str:
    """Where the thresholds of ``model`` go: ``out``, else ``thresholds.json`` in the model's folder when it is a
    local directory. A hub model, a weights file or a place in the hub cache without ``out`` is a UsageError
    (``option`` thresholds_out), and so is a place that cannot be written: checked before any work."""
    from ..checkpoint.names import hub_cache_dir
    from ..run.files import check_writable_dir
    from ..run.thresholds import beside_model

    path = out or beside_model(model)
    if path is None:
        raise UsageError(f"{model} is not a local model folder: its thresholds need a file of their own",
                         option="thresholds_out", suggest={"thresholds_out": "FILE"})
    cache = os.path.realpath(hub_cache_dir(cache_dir))
    if os.path.commonpath([os.path.realpath(path), cache]) == cache:
        raise UsageError(f"{path} is in the hub cache, which this tool never writes to", option="thresholds_out",
                         suggest={"thresholds_out": "FILE"})
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder, not a file", option="thresholds_out")
    if out is not None and os.path.lexists(path):  # a typo must not replace the model's weights or the data's CSV
        _check_replaceable(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"the folder of {path} does not exist", option="thresholds_out")
    try:
        check_writable_dir(folder, option="thresholds_out")
    except UsageError as exc:
        raise UsageError(str(exc), option="thresholds_out",
                         suggest={} if out else {"thresholds_out": "FILE"}) from None
    return path


def _check_replaceable(path: str) -> None:
    """A UsageError (option thresholds_out) unless the file at ``path`` is a thresholds file, which a new
    calibration may replace."""
    from ..run.thresholds import read_thresholds

    try:
        read_thresholds(path)
    except UsageError:
        raise UsageError(f"{path} exists and is not a thresholds file: refusing to replace it", option="thresholds_out",
                         hint="give a new file, or remove this one first") from None
