"""Calibrated thresholds on disk: ``thresholds.json`` in a model's folder (or any file named for it), which
``ast evaluate --calibrate`` writes and ``--threshold calibrated`` reads.

The file is JSON: ``format`` and ``version`` (what it is), ``thresholds`` (label -> the score from which the label
counts as present), ``activation`` and ``aggregate`` (the scores they are thresholds of: sigmoid or softmax, and
how window scores became a file's score), then what it came from (``model``, ``weights_sha256``, ``data``,
``target``, ``created``) and the per-label ``report``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import UsageError

FILE_NAME = "thresholds.json"
FORMAT, VERSION = "ast-cli thresholds", 1
MAX_BYTES = 16 << 20  # a report for 100,000 labels is a few MB: anything larger is not one of ours


@dataclass(frozen=True)
class Calibration:
    """Thresholds read from ``path``: label -> score, on scores made with ``activation`` and ``aggregate``."""

    path: str
    thresholds: dict[str, float]
    activation: str
    aggregate: str

    def check(self, activation: str, aggregate: str | None = None) -> None:
        """A UsageError when scores made with ``activation`` (and ``aggregate``, when one was asked for) are not
        the scores these thresholds were chosen on."""
        for option, asked, own in (("activation", activation, self.activation), ("aggregate", aggregate,
                                                                                   self.aggregate)):
            if asked is not None and asked != own:
                raise UsageError(f"the thresholds in {self.path} were chosen on {own} scores, not {asked}",
                                 option=option, suggest={option: own})


def beside_model(model: str) -> str | None:
    """Where a model's thresholds live: ``thresholds.json`` in it when ``model`` is a local directory, else None
    (a hub model's folder is the hub cache, which is never written to; a weights file has no folder of its own)."""
    from ..checkpoint.names import looks_local

    if looks_local(model) and os.path.isdir(model):
        return os.path.join(model, FILE_NAME)
    return None


def read_thresholds(path: str) -> Calibration:
    """The thresholds in ``path``; a missing, oversized or malformed file is a UsageError (``option``: thresholds)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}", option="thresholds") from None
    if len(data) > MAX_BYTES:
        raise UsageError(f"{path} is larger than {MAX_BYTES >> 20} MB: not a thresholds file", option="thresholds")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: '[' nested 200,000 deep
        raise UsageError(f"{path} is not JSON: {exc}", option="thresholds") from None
    return _checked(document, path)


def _checked(document, path: str) -> Calibration:
    def bad(why: str) -> UsageError:
        return UsageError(f"{path} is not a thresholds file of this tool: {why}", option="thresholds",
                          hint="write one with `ast evaluate MODEL DATA --calibrate precision=0.9`")

    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise bad(f"no \"format\": \"{FORMAT}\"")
    if document.get("version") != VERSION:
        raise bad(f"version {document.get('version')!r}, this tool reads version {VERSION}")
    thresholds = document.get("thresholds")
    if not isinstance(thresholds, dict):
        raise bad("no \"thresholds\" object")
    for label, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise bad(f"the threshold of {label!r} is {value!r}, not a score from 0 to 1")
    if document.get("activation") not in ("sigmoid", "softmax") or document.get("aggregate") not in ("max", "mean"):
        raise bad("\"activation\" must be sigmoid or softmax and \"aggregate\" max or mean")
    return Calibration(path, {str(k): float(v) for k, v in thresholds.items()}, document["activation"],
                       document["aggregate"])


def write_thresholds(path: str, document: dict) -> None:
    """Write ``document`` (with the format's name and version) to ``path`` atomically: an earlier file stays
    byte for byte as it was until the new one is complete."""
    from .files import atomic_write

    text = json.dumps({"format": FORMAT, "version": VERSION, **document}, indent=2, allow_nan=False)
    with atomic_write(path) as handle:
        handle.write(text + "\n")

