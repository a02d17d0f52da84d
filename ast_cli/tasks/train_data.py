"""Labeled data for ``ast train`` and ``ast evaluate``: a folder of label subfolders (single-label) or a
CSV/JSONL of ``path,labels`` (multi-label); splitting off validation data.
"""


from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import UsageError
from ..audio.inputs import expand_inputs


SINGLE, MULTI = "single_label_classification", "multi_label_classification"


@dataclass(frozen=True)
class Example:
    path: str
    labels: tuple[str, ...]
    start: float | None = None  # one window of the file (a row of ``ast search --format csv``); None: all of it


@dataclass
class Dataset:
    """Labeled files. ``root``: the data folder, or the folder of the table. ``empty``: class folders that held
    no audio file (left out)."""

    examples: list[Example]
    labels: tuple[str, ...]
    multi_label: bool
    root: str | None = None
    empty: tuple[str, ...] = ()

    def targets(self, labels: tuple[str, ...] | None = None) -> np.ndarray:
        """(files, K) 0/1 matrix over ``labels`` (default: the dataset's own)."""
        labels = labels or self.labels
        index = {name: i for i, name in enumerate(labels)}
        out = np.zeros((len(self.examples), len(labels)), np.float32)
        for row, example in enumerate(self.examples):
            for name in example.labels:
                if name not in index:
                    raise UsageError(f"label {name!r} of {example.path} is not one of the model's labels",
                                     option="data")
                out[row, index[name]] = 1.0
        return out

    def subset(self, rows: Iterable[int]) -> "Dataset":
        return replace(self, examples=[self.examples[i] for i in rows])

    def without(self, paths: Iterable[str]) -> "Dataset":
        drop = set(paths)
        return replace(self, examples=[e for e in self.examples if e.path not in drop])

    def regular_files(self) -> tuple["Dataset", list[dict]]:
        """The dataset without its FIFOs, sockets and devices, and a failure for each: reading one could wait
        forever for a writer (a file named in training data is not a stream named on the command line)."""
        from ..audio.inputs import NOT_REGULAR, regular_or_missing

        irregular = [e.path for e in self.examples if not regular_or_missing(e.path)]
        return self.without(irregular), [{"path": path, "error": "a directory" if os.path.isdir(path) else NOT_REGULAR}
                                         for path in irregular]


def load_dataset(path: str, option: str = "data") -> Dataset:
    """A folder of label subfolders (single-label), or a ``.csv``/``.jsonl`` of ``path,labels`` (multi-label).
    ``option``: the parameter that named ``path``, for errors."""
    if os.path.isdir(path):
        examples, empty = [], []
        for sub in sorted(p for p in Path(path).iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = [Example(item.path, (sub.name,)) for item in expand_inputs([str(sub)])]
            examples += found
            if not found:
                empty.append(sub.name)
        labels = tuple(sorted({e.labels[0] for e in examples}))
        dataset = Dataset(examples, labels, multi_label=False, root=path, empty=tuple(empty))
    elif os.path.isfile(path):
        dataset = _read_table(path, option)
    else:
        raise UsageError(f"no such data folder or file: {path}", option=option)
    if len(dataset.examples) == 0:
        raise UsageError(f"{path} holds no labeled audio files", option=option,
                         hint="a folder of label subfolders, or a CSV/JSONL of path,labels")
    _check_labels(dataset.labels, path, option)
    negatives = dataset.multi_label and any(not e.labels for e in dataset.examples)
    if len(dataset.labels) < 2 - negatives:  # one label and negatives: a detector for that label
        found = (f"only one label, {dataset.labels[0]}," if dataset.labels
                 else "no label (every row's labels are empty or '-': negatives)")
        raise UsageError(f"{path} has {found} and a classifier needs two labels, or one label and negatives",
                         option=option, hint="one subfolder per label; in a CSV/JSONL, the rows' labels (several: a;b), "
                                             "empty or '-' for a negative")
    return dataset


def _check_labels(labels: tuple[str, ...], path: str, option: str) -> None:
    """The labels a head can be saved with (``checkpoint.heads``' rule), checked before anything is trained."""
    from ..checkpoint.heads import MAX_LABELS, good_label

    bad = next((name for name in labels if not good_label(name)), None)
    if bad is not None:
        raise UsageError(f"{path}: label {bad!r} cannot name a class: a label is printable (no tab or other "
                         "control character) and not blank", option=option)
    if len(labels) > MAX_LABELS:
        raise UsageError(f"{path} has {len(labels):,} labels; a classifier takes at most {MAX_LABELS:,}",
                         option=option)


def _read_table(path: str, option: str) -> Dataset:
    base = os.path.dirname(os.path.abspath(path))
    try:
        # utf-8-sig: a CSV saved by Excel starts with a byte order mark, which would end up in the first column name
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if path.lower().endswith((".jsonl", ".ndjson")):
                rows = [_jsonl_row(path, number, line, option) for number, line in enumerate(handle, 1) if line.strip()]
            else:
                rows = _csv_rows(path, csv.DictReader(handle), option)
    except (OSError, ValueError, RecursionError, csv.Error) as exc:  # csv.Error: a field over 131072 characters
        raise UsageError(f"cannot read {path} as path,labels rows: {exc}", option=option) from None
    examples = []
    for file, text, *start in rows:
        labels = tuple(dict.fromkeys(x.strip() for x in text.split(";") if x.strip() not in ("", "-")))
        examples.append(Example(file if os.path.isabs(file) else os.path.join(base, file), labels, *start))
    names = tuple(sorted({name for e in examples for name in e.labels}))
    return Dataset(examples, names, multi_label=True, root=base)


def _csv_rows(path: str, reader: csv.DictReader, option: str) -> list[tuple]:
    """(path, labels, start or None) rows: ``path,labels``, or ``ast search``'s ``path,start,end,score,label`` (an
    empty label or ``-`` is a negative). A row with a ``start`` is that one window of its file."""
    columns = reader.fieldnames or ()
    if "path" not in columns:
        raise UsageError(f"{path} has no 'path' column (found: {','.join(columns)}; expected: path,labels)",
                         option=option)
    text = "label" if "label" in columns and "start" in columns and "labels" not in columns else "labels"
    rows = []
    for number, record in enumerate(reader, 2):
        start, end = ((record.get(key) or "").strip() for key in ("start", "end"))
        try:
            seconds = float(start) if start or end else None
        except ValueError:
            seconds = None
        if (start or end) and not (seconds is not None and math.isfinite(seconds) and seconds >= 0):
            raise UsageError(f"{path} line {number}: 'start' must be a number of seconds from 0 (found {start!r})",
                             option=option)
        rows.append((record["path"] or "", record.get(text) or "", seconds))
    return rows


def refuse_windows(dataset: Dataset, path: str, option: str = "data", hint: str | None = None) -> None:
    """A UsageError when ``dataset`` lists windows (rows with a start, as ``ast search``'s csv): read from the
    audio, each would stand for its whole file; only an index that stored them has each window on its own."""
    windowed = sum(example.start is not None for example in dataset.examples)
    if windowed:
        raise UsageError(f"{path} lists windows ({windowed} rows with a start), which would be taken as whole files",
                         option=option, hint=hint)


def _jsonl_row(path: str, number: int, line: str, option: str) -> tuple[str, str]:
    """(path, labels joined by ;) of one JSONL line; a wrong type is a ``UsageError`` naming the line and field."""
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
        raise UsageError(f"{path} line {number}: 'path' must be a non-empty string", option=option)
    labels = record.get("labels", "")
    if isinstance(labels, list) and all(isinstance(x, str) for x in labels):
        labels = ";".join(labels)
    if not isinstance(labels, str):
        raise UsageError(f"{path} line {number}: 'labels' must be a string or a list of strings", option=option)
    return record["path"], labels


def split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Stratified (by a file's first label), seeded: about ``fraction`` of each label's files for validation,
    at least one file of each label with two or more kept for training."""
    if not 0 < fraction < 1:
        raise UsageError("must be between 0 and 1", option="val_split")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for row, example in enumerate(dataset.examples):
        by_label.setdefault(example.labels[0] if example.labels else "", []).append(row)
    train, val = [], []
    for rows in by_label.values():
        rng.shuffle(rows)
        cut = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
        val += rows[:cut]
        train += rows[cut:]
    if not val:
        raise UsageError(f"no file is left for validation: every label has a single file ({len(train)} files)",
                         option="val_split", hint="give validation data, or more files per label")
    return dataset.subset(sorted(train)), dataset.subset(sorted(val))


def untrained_labels(train: Dataset, val: Dataset) -> list[str]:
    """Labels of the data that no training file has (the classifier could never learn them)."""
    return sorted((set(train.labels) | set(val.labels)) - {name for e in train.examples for name in e.labels})


def clips(count: int) -> str:
    return f"{count} clip" if count == 1 else f"{count} clips"


# -- windows for training: normalization and augmentation ----------------------------------------


def spec_augment(inputs, features, config, rng):
    """Frequency and time masks (AST recipe: up to 48 bins, up to 192 of 1024 frames; ``config``: a
    ``TrainConfig``'s ``freq_mask``/``time_mask``), masking the log-mel to 0 before normalization, as the recipe's
    torchaudio masks do: (0 - mean) / (2 std) after it."""
    batch, frames, bins = inputs.shape
    freq = config.freq_mask if config.freq_mask is not None else min(48, bins // 4)
    time_ = config.time_mask if config.time_mask is not None else max(1, round(192 * frames / 1024))
    fill = (0.0 - features.mean) / (2 * features.std) if features.do_normalize else 0.0
    inputs = inputs.clone()
    for b in range(batch):
        width = int(rng.integers(0, freq + 1))
        start = int(rng.integers(0, bins - width + 1))
        inputs[b, :, start : start + width] = fill
        width = int(rng.integers(0, time_ + 1))
        start = int(rng.integers(0, frames - width + 1))
        inputs[b, start : start + width, :] = fill
    return inputs


def dataset_normalization(windows: list[np.ndarray], features):
    """The dataset's mean and std of the log-mel over its real frames (the AST recipe's statistics); padded
    frames (all bins at the normalized value of 0) are left out."""
    raw = []
    for w in windows:
        flat = w.reshape(-1, w.shape[-1])
        values = flat * (2 * features.std) + features.mean if features.do_normalize else flat
        real = ~np.all(flat == (0.0 - features.mean) / (2 * features.std), axis=1)  # padded frames left out
        raw.append(values[real])
    values = np.concatenate(raw)
    return replace(features, mean=float(values.mean()), std=float(values.std()), do_normalize=True)


def renormalize(windows: np.ndarray, old, new) -> np.ndarray:
    raw = windows * (2 * old.std) + old.mean if old.do_normalize else windows
    return ((raw - new.mean) / (2 * new.std)).astype(np.float32)
