"""Your own labels: train a classifier on AST (``head``: on frozen embeddings; ``finetune``: the whole model) and
measure a model on labeled data. The result is a normal Hugging Face AST checkpoint.

Data (``load_dataset``): a folder of subfolders, one label each (single-label), or a CSV/JSONL of ``path,labels``
with labels separated by ``;`` (multi-label; paths relative to the file). Each file gives one example per window
of the model's length, all with the file's labels; a file's score is its windows' scores aggregated as
``classify`` does (softmax: mean; sigmoid: max).

- ``head``: the pooled embedding of every window is computed once with the base model and cached on disk in
  ``extract-features``' format, in the cache every run shares (``extract.cached_embeddings``: keyed by the
  model, the window settings and each file's identity), so any rerun computes nothing again; the checkpoint's
  classifier (its LayerNorm + Linear, LayerNorm started from the base's) is trained with AdamW, cross-entropy
  for single-label data and BCE-with-logits for multi-label, with early stopping on the validation loss. The
  head sees the embeddings standardized per feature (over the training windows); that affine map is folded
  into the backbone's final LayerNorm when saving, so the checkpoint computes exactly what was trained.
- ``finetune``: every weight, on the model inputs, as the AST recipe does: SpecAugment (frequency and time
  masks, applied before normalization, as the recipe does), optional mixup, linear warm-up then cosine learning
  rate, gradient accumulation, autocast on CUDA, a checkpoint per epoch (``--resume`` continues from the last;
  Ctrl-C saves one). The dataset's own mean and std (over its real frames, as the recipe computes them) go into
  the saved ``preprocessor_config.json`` unless the base model's are kept.

The output folder holds ``config.json`` (new ``id2label``/``label2id`` and ``problem_type``),
``preprocessor_config.json``, ``model.safetensors``, ``train_log.jsonl`` (one line per epoch) and
``metrics.json`` (validation, and the clips left out as unreadable), and ``MARKER`` (what makes it an output
of this module: its mode and labels); ``transformers.ASTForAudioClassification.from_pretrained`` loads it. A run
works in ``staging_dir(out)`` and renames it to ``out`` when done, so ``out`` is never half written.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import warnings
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import AudioDecodeError, DeviceOutOfMemoryError, OutputWriteError, UsageError, is_out_of_memory
from .inputs import expand_inputs

SINGLE, MULTI = "single_label_classification", "multi_label_classification"


# -- data ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    path: str
    labels: tuple[str, ...]


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
    if len(dataset.labels) < 2:
        raise UsageError(f"{path} has {len(dataset.labels)} label(s): a classifier needs at least 2", option=option)
    return dataset


def _read_table(path: str, option: str) -> Dataset:
    base = os.path.dirname(os.path.abspath(path))
    try:
        # utf-8-sig: a CSV saved by Excel starts with a byte order mark, which would end up in the first column name
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if path.lower().endswith((".jsonl", ".ndjson")):
                rows = [_jsonl_row(path, number, line, option) for number, line in enumerate(handle, 1) if line.strip()]
            else:
                reader = csv.DictReader(handle)
                if "path" not in (reader.fieldnames or ()):
                    raise UsageError(f"{path} has no 'path' column (columns: path,labels)", option=option)
                rows = [(record["path"] or "", record.get("labels") or "") for record in reader]
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as path,labels rows: {exc}", option=option) from None
    examples = []
    for file, text in rows:
        labels = tuple(dict.fromkeys(x.strip() for x in text.split(";") if x.strip()))
        examples.append(Example(file if os.path.isabs(file) else os.path.join(base, file), labels))
    names = tuple(sorted({name for e in examples for name in e.labels}))
    return Dataset(examples, names, multi_label=True, root=base)


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


# -- metrics ---------------------------------------------------------------------------------------------

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
    from .tagger import activate

    if multi_label:
        return np.stack([activate(w, "sigmoid").max(axis=0) for w in window_logits])
    return np.stack([activate(w, "softmax").mean(axis=0) for w in window_logits])


# -- training ---------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    mode: str = "head"  # head or finetune
    epochs: int | None = None  # default: 200 (head, early stopping) or 10 (finetune)
    lr: float | None = None  # default: 1e-3 (head) or 1e-5 (finetune)
    weight_decay: float = 0.01
    batch_size: int = 64  # training examples (windows) per step
    patience: int = 15  # epochs without a better validation loss before stopping
    seed: int = 0
    mixup: float = 0.0  # finetune: probability of mixing a batch (lambda ~ Beta(10, 10), as the AST recipe)
    freq_mask: int | None = None  # finetune SpecAugment widths (default: the AST recipe's 48 bins, 192 frames per 1024)
    time_mask: int | None = None
    warmup_epochs: float = 1.0
    accumulate: int = 1
    keep_normalization: bool = False  # finetune: keep the base model's mean/std instead of the dataset's

    def resolved(self) -> "TrainConfig":
        if self.mode not in ("head", "finetune"):
            raise UsageError("must be head or finetune", option="mode")
        epochs = self.epochs or (200 if self.mode == "head" else 10)
        lr = (1e-3 if self.mode == "head" else 1e-5) if self.lr is None else self.lr
        for name, value in (("epochs", epochs), ("batch_size", self.batch_size), ("accumulate", self.accumulate),
                            ("patience", self.patience)):
            if value < 1:
                raise UsageError("must be at least 1", option=name)
        if not 0 <= self.mixup <= 1:
            raise UsageError("must be a probability from 0 to 1", option="mixup")
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(f"must be a positive number, not {lr}", option="lr")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise UsageError(f"must be a number of epochs from 0 up, not {self.warmup_epochs}", option="warmup_epochs")
        return replace(self, epochs=epochs, lr=lr)


@dataclass
class TrainResult:
    out: str
    labels: tuple[str, ...]
    multi_label: bool
    epochs: int
    best_epoch: int
    val: dict = field(default_factory=dict)
    seconds_per_epoch: float = 0.0
    failed: list = field(default_factory=list)  # [{"path", "error"}]: clips left out, unreadable


class BadClipsError(AudioDecodeError):
    """Some clips could not be read and strict training stops at any: ``failed`` [{"path", "error"}]."""

    failed: list = []


class Trainer:
    """Trains on ``train`` (validating on ``val``) from the base checkpoint ``base`` (a path), into ``out``.

    ``options``: how the base model runs (device, dtype, batch size for embedding, workers, hop).
    ``on_epoch(record)``: called with each epoch's log record (loss, validation metric).
    ``on_failure(path, error)``: called for each clip that cannot be read; it is left out (with ``strict``,
    the run stops with ``BadClipsError`` once every clip was read). ``feature_cache``: the embedding cache
    folder (default: ``embedding_cache_dir()``, shared by every run).

    The run works in ``staging_dir(out)`` and renames it into place at the end (``out`` itself is never half
    written); an interrupted finetune run leaves its last epoch there for ``resume``.
    """

    def __init__(self, base: str, train: Dataset, val: Dataset, out: str, config: TrainConfig, options,
                 feature_cache: str | None = None, on_epoch: Callable[[dict], None] | None = None,
                 model_name: str | None = None, on_failure: Callable[[str, str], None] | None = None,
                 strict: bool = False):
        from .weights import load_checkpoint

        self.base_path = base
        self.checkpoint = load_checkpoint(base)
        self.train_set, self.val_set = train, val
        self.labels = tuple(sorted(set(train.labels) | set(val.labels)))
        self.multi_label = train.multi_label
        self.out = out
        self.work = staging_dir(out)
        self.config = config.resolved()
        self.options = options
        self.feature_cache = feature_cache
        self.on_epoch = on_epoch
        self.on_failure = on_failure
        self.on_fast = None  # called with the FastChoice when a fast-mode embedding model is built
        self.strict = strict
        self.failed: list[dict] = []
        self.model_name = model_name or base

    # -- windows --------------------------------------------------------------------------------------

    def _windows(self, dataset: Dataset, kind: str) -> tuple[Dataset, list[np.ndarray]]:
        """Per readable file: (windows, D) embeddings (cached on disk) or (windows, T, F) model inputs (in
        memory); the files that could not be read are left out of the returned dataset (and reported)."""
        if kind == "embedding":
            results = self._cached_embeddings(dataset)
        else:
            from .backends import InputsBackend
            from .engine import Engine

            engine = Engine(self.checkpoint.features, InputsBackend(self.checkpoint.features),
                            batch_size=self.options.batch_size, workers=self.options.workers,
                            hop_frames=self.options.hop_frames)
            results = ((r.error or ("no audio windows" if not len(r.outputs) else None), r.outputs, r.exception)
                       for r in engine.run([e.path for e in dataset.examples]))
        windows, bad = [], []
        for example, (error, array, exception) in zip(dataset.examples, results):
            if exception is not None and is_out_of_memory(exception):  # the machine's limit, not a bad clip
                raise DeviceOutOfMemoryError(f"out of memory while computing the model's windows: {error}",
                                             batch_size=self.options.batch_size) from None
            if error:
                bad.append(example.path)
                self._fail(example.path, error)
            else:
                windows.append(array)
        return dataset.without(bad), windows

    def _fail(self, path: str, error: str) -> None:
        self.failed.append({"path": path, "error": error})
        if self.on_failure is not None:
            self.on_failure(path, error)

    def _cached_embeddings(self, dataset: Dataset) -> Iterable[tuple[str | None, np.ndarray | None]]:
        """(error, embeddings) per file, from the shared cache (``extract.cached_embeddings``)."""
        from .backends import LocalBackend
        from .extract import FeatureExtractor, cached_embeddings
        from .weights import build_model

        def extractor() -> FeatureExtractor:  # the model is built only when something is not cached yet
            backend = LocalBackend.build(build_model(self.checkpoint), self.checkpoint.features, self.options,
                                         output="embedding")
            if backend.fast_choice is not None and self.on_fast is not None:
                self.on_fast(backend.fast_choice)
            return FeatureExtractor("embedding", self.model_name, backend, self.options)

        return cached_embeddings([e.path for e in dataset.examples], self.checkpoint.source,
                                 self.checkpoint.features, self.options, extractor, self.feature_cache)

    # -- the model --------------------------------------------------------------------------------------

    def _model(self):
        """The base model with a new classifier of len(labels) outputs (LayerNorm from the base's)."""
        import torch

        from .model import AST
        from .weights import build_model

        base = build_model(self.checkpoint)
        config = replace(self.checkpoint.config, id2label=self.labels,
                         problem_type=MULTI if self.multi_label else SINGLE)
        torch.manual_seed(self.config.seed)
        model = AST(config)
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=False)
        if base.classifier is not None:
            model.classifier.layernorm.load_state_dict(base.classifier.layernorm.state_dict())
        return model

    def _loss(self, logits, targets):
        import torch.nn.functional as F

        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, targets)  # targets are (mixed) class probabilities

    # -- running -----------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> TrainResult:
        import time

        kind = "embedding" if self.config.mode == "head" else "fbank"
        self.train_set, train_windows = self._windows(self.train_set, kind)
        self.val_set, val_windows = self._windows(self.val_set, kind)
        self._check_clips()
        prepare_work(self.out, resume, self.marker())
        features = self.checkpoint.features
        if kind == "fbank" and not self.config.keep_normalization:
            features = _dataset_normalization(train_windows, features)
            train_windows = [_renormalize(w, self.checkpoint.features, features) for w in train_windows]
            val_windows = [_renormalize(w, self.checkpoint.features, features) for w in val_windows]
        x, y = _flatten(train_windows, self.train_set.targets(self.labels))
        model = self._model()
        if kind == "embedding":
            # The head learns far better from standardized embeddings (a frozen backbone's pooled output varies
            # little around a large shared part). Standardizing is an affine map per feature, which folds exactly
            # into the backbone's final LayerNorm: the saved model computes the same thing (see _fold).
            mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6 * max(float(x.std(axis=0).mean()), 1e-12))
            x = (x - mean) / std
            val_windows = [(w - mean) / std for w in val_windows]
            _fold(model, mean, std)
        started = time.monotonic()
        try:
            try:
                state = self._fit(model, kind, x, y, val_windows, features, resume)
            except Exception as exc:
                if not is_out_of_memory(exc) or isinstance(exc, DeviceOutOfMemoryError):
                    raise
                raise DeviceOutOfMemoryError(f"out of memory while training: {_first_line(exc)}",
                                             batch_size=self.config.batch_size, training=True) from None
            if state.best_weights is not None:
                model.load_state_dict(state.best_weights)
            self.save(model, features)
        except BaseException:
            if kind == "embedding":  # nothing to resume: leave nothing behind
                import shutil

                shutil.rmtree(self.work, ignore_errors=True)
            raise
        result = TrainResult(self.out, self.labels, self.multi_label, state.epoch, state.best_epoch,
                             state.best_metrics, round((time.monotonic() - started) / max(1, state.epoch), 4),
                             failed=self.failed)
        _write_json(os.path.join(self.work, "metrics.json"), _jsonable(asdict(result)))
        _swap_into_place(self.work, os.path.realpath(self.out))
        return result

    def marker(self) -> dict:
        """What ``MARKER`` records: the run's mode and labels, which ``--resume`` must match."""
        return {"mode": self.config.mode, "labels": list(self.labels), "multi_label": self.multi_label}

    def _check_clips(self) -> None:
        if self.failed and self.strict:
            raise BadClipsError(f"{clips(len(self.failed))} could not be read", failed=self.failed)
        for name, dataset in (("training", self.train_set), ("validation", self.val_set)):
            if not dataset.examples:
                raise AudioDecodeError(f"no readable {name} file is left")
        untrained = untrained_labels(self.train_set, self.val_set)
        if untrained:
            raise AudioDecodeError(f"no readable training file is left for label(s) {', '.join(untrained)}")

    def _fit(self, model, kind, x, y, val_windows, features, resume: bool) -> "_TrainState":
        """The epochs: train, validate, log, keep the best weights (finetune: a checkpoint per epoch)."""
        import torch

        device = _training_device(self.options.device)
        model.to(device)
        trainable = list(model.classifier.parameters()) if kind == "embedding" else list(model.parameters())
        optimizer = torch.optim.AdamW(trainable, lr=self.config.lr, weight_decay=self.config.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(x) / self.config.batch_size / self.config.accumulate))
        schedule = _warmup_cosine(optimizer, steps_per_epoch, self.config)
        state = _load_state(self.work, model, optimizer, schedule) if resume else _TrainState()
        if resume:  # a kill between the log line and the state file: the state says where the run is
            _trim_log(os.path.join(self.work, "train_log.jsonl"), state.epoch)
        rng = np.random.default_rng(self.config.seed + state.epoch)
        try:
            for epoch in range(state.epoch + 1, self.config.epochs + 1):
                loss = self._epoch(model, kind, x, y, optimizer, schedule, rng, device, features)
                val_loss, val_metrics = self._validate(model, kind, val_windows, device)
                state.epoch = epoch
                record = {"epoch": epoch, "loss": round(loss, 6), "val_loss": round(val_loss, 6),
                          **{k: v for k, v in val_metrics.items() if k in ("accuracy", "macro_f1", "map")},
                          "lr": optimizer.param_groups[0]["lr"]}
                if val_loss < state.best_loss - 1e-6:
                    state.best_loss, state.best_epoch, state.best_metrics = val_loss, epoch, val_metrics
                    state.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                _append_line(os.path.join(self.work, "train_log.jsonl"), json.dumps(record))
                if self.on_epoch is not None:
                    self.on_epoch(record)
                if kind == "fbank":
                    _save_state(self.work, model, optimizer, schedule, state)
                if epoch - state.best_epoch >= self.config.patience:
                    break
        except KeyboardInterrupt:
            if kind == "fbank":  # Ctrl-C keeps the work: --resume continues from here
                _save_state(self.work, model, optimizer, schedule, state)
            raise
        return state

    def _epoch(self, model, kind, x, y, optimizer, schedule, rng, device, features) -> float:
        import torch

        model.train()
        order = rng.permutation(len(x))
        total, count = 0.0, 0
        cuda = str(device).startswith("cuda")
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        for step, start in enumerate(range(0, len(order), self.config.batch_size)):
            rows = order[start : start + self.config.batch_size]
            inputs, targets = torch.from_numpy(x[rows]).to(device), torch.from_numpy(y[rows]).to(device)
            if kind == "fbank":
                inputs = _spec_augment(inputs, features, self.config, rng)
                if self.config.mixup and rng.random() < self.config.mixup and len(rows) > 1:
                    lam = float(rng.beta(10, 10))
                    perm = torch.from_numpy(rng.permutation(len(rows))).to(device)
                    inputs = lam * inputs + (1 - lam) * inputs[perm]
                    targets = lam * targets + (1 - lam) * targets[perm]
            with torch.autocast("cuda", dtype=dtype, enabled=cuda):
                logits = model.forward_head(inputs) if kind == "embedding" else model(inputs)
                loss = self._loss(logits.float(), targets)
            (loss / self.config.accumulate).backward()
            if (step + 1) % self.config.accumulate == 0 or start + self.config.batch_size >= len(order):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            total += loss.item() * len(rows)
            count += len(rows)
        return total / max(1, count)

    def _validate(self, model, kind, windows: list[np.ndarray], device) -> tuple[float, dict]:
        import torch

        model.eval()
        logits = []
        with torch.inference_mode():
            for w in windows:
                inputs = torch.from_numpy(w).to(device)
                out = model.forward_head(inputs) if kind == "embedding" else model(inputs)
                logits.append(out.float().cpu().numpy())
        targets = self.val_set.targets(self.labels)
        flat_logits = torch.from_numpy(np.concatenate(logits))
        flat_targets = torch.from_numpy(np.concatenate([np.repeat(t[None], len(w), 0) for t, w in zip(targets, logits)]))
        loss = float(self._loss(flat_logits, flat_targets))
        return loss, metrics(file_scores(logits, self.multi_label), targets, self.labels, self.multi_label)

    # -- saving ------------------------------------------------------------------------------------------

    def save(self, model, features) -> None:
        """``out`` as a Hugging Face checkpoint: config.json, preprocessor_config.json, model.safetensors."""
        save_checkpoint(self.work, model, features, self.checkpoint.source, self.multi_label)


def save_checkpoint(out: str, model, features, base_source: str, multi_label: bool) -> None:
    from safetensors.torch import save

    from .hub import CONFIG_NAME, PREPROCESSOR_NAME, SAFETENSORS_NAME
    from .output import atomic_write

    base_dir = base_source if os.path.isdir(base_source) else os.path.dirname(base_source)
    raw: dict = {}
    if os.path.isfile(os.path.join(base_dir, CONFIG_NAME)):
        with open(os.path.join(base_dir, CONFIG_NAME), encoding="utf-8") as handle:
            raw = json.load(handle)
    cfg = model.config
    raw.update({field: getattr(cfg, field) for field in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                         "intermediate_size", "layer_norm_eps", "patch_size",
                                                         "frequency_stride", "time_stride", "max_length",
                                                         "num_mel_bins", "hidden_act", "qkv_bias")})
    raw.update(model_type="audio-spectrogram-transformer", architectures=["ASTForAudioClassification"],
               id2label={str(i): name for i, name in enumerate(cfg.id2label)},
               label2id={name: i for i, name in enumerate(cfg.id2label)},
               problem_type=MULTI if multi_label else SINGLE)
    raw.pop("num_labels", None)
    preprocessor = {"feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1, "padding_side": "right",
                    "padding_value": 0.0, "return_attention_mask": False, "do_normalize": features.do_normalize,
                    "max_length": features.max_length, "num_mel_bins": features.num_mel_bins,
                    "mean": float(features.mean), "std": float(features.std), "sampling_rate": features.sampling_rate}
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    with _writing(os.path.join(out, SAFETENSORS_NAME)) as path, atomic_write(path, "wb") as handle:
        handle.write(save(state, metadata={"format": "pt"}))
    _write_json(os.path.join(out, CONFIG_NAME), raw)
    _write_json(os.path.join(out, PREPROCESSOR_NAME), preprocessor)


# -- helpers ------------------------------------------------------------------------------------------------

@dataclass
class _TrainState:
    epoch: int = 0
    best_epoch: int = 0
    best_loss: float = float("inf")
    best_metrics: dict = field(default_factory=dict)
    best_weights: dict | None = None


def _state_dir(out: str) -> str:
    return os.path.join(out, "checkpoint")


def _save_state(out, model, optimizer, schedule, state: _TrainState) -> None:
    """The last epoch's weights and optimizer state, and the best epoch's weights (when another), for
    ``--resume`` (plain tensors: loadable with ``weights_only=True``)."""
    import torch

    directory = _state_dir(out)
    os.makedirs(directory, exist_ok=True)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
               "epoch": state.epoch, "best_epoch": state.best_epoch, "best_loss": state.best_loss,
               "best_metrics": json.dumps(_jsonable(state.best_metrics))}
    if state.best_weights is not None and state.best_epoch != state.epoch:
        payload["best_model"] = state.best_weights
    path = os.path.join(directory, "trainer_state.pt")
    try:
        torch.save(payload, path + ".part")
        os.replace(path + ".part", path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        with suppress(OSError):
            os.unlink(path + ".part")
        reason = getattr(exc, "strerror", None) or _first_line(exc)
        raise OutputWriteError(f"cannot write {path}: {reason}", path=path) from None


def _load_state(out, model, optimizer, schedule) -> _TrainState:
    import torch

    from .errors import CheckpointError

    path = os.path.join(_state_dir(out), "trainer_state.pt")
    try:
        with warnings.catch_warnings():  # torch warns about a tampered file's pickle protocol: it is refused anyway
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        schedule.load_state_dict(payload["schedule"])
        state = _TrainState(int(payload["epoch"]), int(payload["best_epoch"]), float(payload["best_loss"]),
                            json.loads(payload["best_metrics"]))
        best = payload.get("best_model", payload["model"])
        state.best_weights = {k: v.detach().cpu().clone() for k, v in best.items()}
    except Exception:  # UnpicklingError, a missing key, a wrong shape: all mean unusable
        # torch's own message ends by suggesting weights_only=False, i.e. running the file's code: never echo it.
        raise CheckpointError(f"not a safe training state file: {path} (not a PyTorch file of plain tensors "
                              "written by this training run)", path=path,
                              hint="nothing in a model file is ever executed; train again without resuming") from None
    return state


# -- the output folder ---------------------------------------------------------------------------------------

MARKER = ".ast-train.json"  # in every folder ast train writes: what makes it "an ast training output"
STAGING_SUFFIX = ".ast-train"


def staging_dir(out: str) -> str:
    """The folder a run works in, beside ``out`` (through a symlink: beside its target), renamed to ``out``
    when it is done."""
    out = os.path.realpath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}{STAGING_SUFFIX}")


def read_marker(folder: str) -> dict | None:
    """The marker of an ast training output in ``folder``, or None when it is not one."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_out(out: str, *, overwrite: bool, resume: bool, marker: dict) -> None:
    """Before any work: ``out`` is absent, empty, or an ast training output that ``overwrite`` replaces or
    ``resume`` continues (with the same mode and labels as ``marker``)."""
    from .output import check_writable_dir

    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out} exists and is not a folder", option="out")
    check_writable_dir(os.path.dirname(os.path.abspath(out)), option="out")
    if not os.path.isdir(out) or not os.listdir(out):
        if resume and _state_time(staging_dir(out)) == 0:
            raise UsageError(f"nothing to resume in {out} (no checkpoint/trainer_state.pt)", option="resume")
        return _check_resumable(staging_dir(out), marker) if resume else None
    found = read_marker(out)
    if found is None:
        raise UsageError(f"{out} is not empty and is not an ast training output: nothing in it is replaced",
                         option="out", hint="choose a new or empty folder")
    if resume:
        return _check_resumable(out if _state_time(out) >= _state_time(staging_dir(out)) else staging_dir(out),
                                marker)
    if not overwrite:
        raise UsageError(f"{out} already holds a training run", option="out", suggest={"overwrite": True})


def _check_resumable(folder: str, marker: dict) -> None:
    found = read_marker(folder) or {}
    if _state_time(folder) == 0:
        raise UsageError(f"nothing to resume in {folder} (no checkpoint/trainer_state.pt)", option="resume")
    for key in ("mode", "multi_label", "labels"):
        if found.get(key) != marker[key]:
            raise UsageError(f"cannot resume {folder}: its {key} {found.get(key)!r} differ(s) from this run's "
                             f"{marker[key]!r}", option="resume", hint="train into a new folder instead")


def _state_time(folder: str) -> float:
    """When ``folder``'s training state was saved (0: none)."""
    try:
        return os.stat(os.path.join(_state_dir(folder), "trainer_state.pt")).st_mtime_ns
    except OSError:
        return 0


def prepare_work(out: str, resume: bool, marker: dict) -> None:
    """A fresh ``staging_dir(out)``, or for ``resume`` the newer of it (an interrupted run) and ``out``."""
    import shutil

    work = staging_dir(out)
    if resume and _state_time(work) > _state_time(out):
        return
    shutil.rmtree(work, ignore_errors=True)  # ours by name: left by a run that was killed
    if resume:
        shutil.copytree(out, work, copy_function=_link_or_copy, symlinks=True)
    else:
        os.makedirs(work)
    _write_json(os.path.join(work, MARKER), marker)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link for files that are only ever replaced; a copy of the log, which is appended to."""
    import shutil

    if not source.endswith(".jsonl"):
        try:
            return os.link(source, target)
        except OSError:
            pass
    shutil.copy2(source, target)


def _swap_into_place(work: str, out: str) -> None:
    """Rename the finished ``work`` folder to ``out``: one rename when ``out`` is absent or empty; else an
    atomic exchange (Linux), or two renames elsewhere; then the previous output is removed."""
    import errno
    import shutil

    try:
        os.rename(work, out)  # replaces an empty folder too
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputWriteError(f"cannot move {work} to {out}: {exc.strerror or exc}", path=out) from None
    if not _exchange(work, out):
        old = work + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(work, out)
        work = old
    shutil.rmtree(work, ignore_errors=True)


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), second)


@contextmanager
def _writing(path: str) -> Iterator[str]:
    """Name ``path`` in the error when writing it fails (a full disk names no file by itself)."""
    try:
        yield path
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path}: {exc.strerror or exc}", path=path) from None


def _write_json(path: str, data) -> None:
    from .output import atomic_write

    with _writing(path), atomic_write(path) as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def _trim_log(path: str, epochs: int) -> None:
    """Keep the log's records of the first ``epochs`` epochs (and drop a torn last line)."""
    from .output import atomic_write

    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] <= epochs:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if kept != lines:
        with _writing(path), atomic_write(path) as handle:
            handle.write("".join(line + "\n" for line in kept))


def _append_line(path: str, line: str) -> None:
    with _writing(path), open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def _training_device(device: str) -> str:
    from .backends import pick_device

    return pick_device(device)


def _fold(model, mean: np.ndarray, std: np.ndarray) -> None:
    """Make the backbone's pooled output standardized, in place: pooled = gamma * n + beta (the mean of two
    LayerNorm outputs), so (pooled - mean) / std = (gamma / std) * n + (beta - mean) / std."""
    import torch

    norm = model.audio_spectrogram_transformer.layernorm
    with torch.no_grad():
        norm.weight.div_(torch.from_numpy(std).to(norm.weight))
        norm.bias.sub_(torch.from_numpy(mean).to(norm.bias)).div_(torch.from_numpy(std).to(norm.bias))


def _flatten(windows: list[np.ndarray], targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every window an example with its file's targets."""
    x = np.concatenate(windows).astype(np.float32)
    y = np.concatenate([np.repeat(t[None], len(w), 0) for t, w in zip(targets, windows)]).astype(np.float32)
    return x, y


def _warmup_cosine(optimizer, steps_per_epoch: int, config: TrainConfig):
    import torch

    total = max(1, steps_per_epoch * config.epochs)
    warmup = max(1, round(steps_per_epoch * config.warmup_epochs)) if config.mode == "finetune" else 1

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _spec_augment(inputs, features, config: TrainConfig, rng):
    """Frequency and time masks (AST recipe: up to 48 bins, up to 192 of 1024 frames), masking the log-mel to
    0 before normalization, as the recipe's torchaudio masks do: (0 - mean) / (2 std) after it."""
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


def _dataset_normalization(windows: list[np.ndarray], features):
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


def _renormalize(windows: np.ndarray, old, new) -> np.ndarray:
    raw = windows * (2 * old.std) + old.mean if old.do_normalize else windows
    return ((raw - new.mean) / (2 * new.std)).astype(np.float32)


def clips(count: int) -> str:
    return f"{count} clip" if count == 1 else f"{count} clips"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


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


# -- evaluation ---------------------------------------------------------------------------------------------

def evaluate(tagger, dataset: Dataset, threshold: float = 0.5, feature_cache: str | None = None) -> dict:
    """Metrics of ``tagger`` on ``dataset``; its labels are matched by name (every data label must be one).
    Window embeddings come from (and go to) the shared cache (``feature_cache``: another folder), so a second
    evaluation of the same model and files, or one of the base model ``train`` used, computes nothing again."""
    index = {name: i for i, name in enumerate(tagger.labels)}
    missing = sorted(set(dataset.labels) - set(index))
    if missing:
        raise UsageError(f"the model has no label {missing[0]!r} (and {len(missing) - 1} more)" if len(missing) > 1
                         else f"the model has no label {missing[0]!r}", option="data")
    scores = np.zeros((len(dataset.examples), len(tagger.labels)))
    failed, keep = [], []
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
    if not keep:  # nothing to measure: no metrics (numpy would warn on empty arrays)
        return {"files": 0, "failed": failed}
    columns = [index[name] for name in dataset.labels]
    report = metrics(scores[keep][:, columns], dataset.subset(keep).targets(), dataset.labels, dataset.multi_label,
                     threshold)
    report["failed"] = failed
    return _jsonable(report)


def _file_logits(tagger, dataset: Dataset, feature_cache: str | None) -> Iterator[tuple[str | None, np.ndarray]]:
    """(error, (windows, K) logits) per file: the classifier on cached embeddings, or (a ``Tagger`` that does
    not know its weights file) the whole model."""
    from .extract import FeatureExtractor, cached_embeddings, embedding_cache_dir
    from .output import check_writable_dir

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
