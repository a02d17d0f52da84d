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
``metrics.json`` (validation, and the clips left out as unreadable), ``MARKER`` (what makes it an output of this
module: its mode and labels), and in head mode what makes it a head (``checkpoint.heads``: ``head.json``,
``head.safetensors``); ``transformers.ASTForAudioClassification.from_pretrained`` loads it. A run
works in ``staging_dir(out)`` and renames it to ``out`` when done, so ``out`` is never half written.

This module is the ``Trainer``; ``train_data`` reads the data, ``metrics`` measures (``evaluate``), ``train_state``
writes the output folder and the state a resumed run starts from.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import numpy as np

from ..errors import AstError, AudioDecodeError, DeviceOutOfMemoryError, UsageError, is_out_of_memory
from .metrics import _jsonable, file_scores, metrics
from .train_data import (MULTI, SINGLE, Dataset, clips, dataset_normalization, renormalize, spec_augment,
                         untrained_labels)
from .train_state import (_TrainState, _append_line, _first_line, _load_state, _save_state, _swap_into_place,
                          _trim_log, _write_json, prepare_work, save_checkpoint, save_head, staging_dir)


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
        if not 0 <= self.seed < 2**63:  # torch.manual_seed takes 64 bits, numpy's generators no negative seed
            raise UsageError(f"must be from 0 to 2**63 - 1, not {self.seed}", option="seed")
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


class NonFiniteError(AstError):
    """Training went non-finite (a NaN or infinite loss or weight): the run stops and saves nothing."""


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
                 strict: bool = False, features_db: str | None = None):
        from ..checkpoint.weights import load_checkpoint

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
        self.features_db = features_db  # head: the embeddings stored by ``ast index`` there (base: its model)

    # -- windows --------------------------------------------------------------------------------------

    def _windows(self, dataset: Dataset, kind: str) -> tuple[Dataset, list[np.ndarray]]:
        """Per readable file: (windows, D) embeddings (cached on disk) or (windows, T, F) model inputs (in
        memory); the files that could not be read are left out of the returned dataset (and reported)."""
        dataset, irregular = dataset.regular_files()
        for failure in irregular:
            self._fail(failure["path"], failure["error"])
        if kind == "embedding":
            if self.features_db:
                from .index import stored_embeddings

                results = stored_embeddings(self.features_db, dataset.examples)
            else:
                results = self._cached_embeddings(dataset)
        else:
            from ..run.backends import InputsBackend
            from ..run.engine import Engine

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
            if not error and not np.isfinite(array).all():  # a NaN would make every trained weight NaN
                error = "non-finite embeddings (audio far outside [-1, 1], or a damaged cache or index)" \
                    if kind == "embedding" else "non-finite model inputs (audio far outside [-1, 1])"
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
        from ..run.backends import LocalBackend
        from .extract import FeatureExtractor, cached_embeddings
        from ..checkpoint.weights import build_model

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

        from ..checkpoint.model import AST
        from ..checkpoint.weights import backbone_fingerprint, build_model

        base = build_model(self.checkpoint)
        self.base_fingerprint = backbone_fingerprint(base)  # what a head made here is bound to
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
            features = dataset_normalization(train_windows, features)
            train_windows = [renormalize(w, self.checkpoint.features, features) for w in train_windows]
            val_windows = [renormalize(w, self.checkpoint.features, features) for w in val_windows]
        x, y = _flatten(train_windows, self.train_set.targets(self.labels))
        model, standardize = self._model(), None
        if kind == "embedding":
            # The head learns far better from standardized embeddings (a frozen backbone's pooled output varies
            # little around a large shared part). Standardizing is an affine map per feature, which folds exactly
            # into the backbone's final LayerNorm: the saved model computes the same thing (see _fold).
            mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6 * max(float(x.std(axis=0).mean()), 1e-12))
            x = (x - mean) / std
            val_windows = [(w - mean) / std for w in val_windows]
            _fold(model, mean, std)
            standardize = (mean, std)
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
            self.save(model, features, standardize)
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
        """What ``MARKER`` records: the run's mode, labels and base, which ``--resume`` must match."""
        from ..checkpoint.names import model_identity

        return {"mode": self.config.mode, "labels": list(self.labels), "multi_label": self.multi_label,
                "base": model_identity(self.model_name, self.base_path)}

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
                if not (math.isfinite(loss) and math.isfinite(val_loss)):  # nothing of this epoch is kept
                    raise NonFiniteError(f"the training loss became non-finite in epoch {epoch}: nothing was saved",
                                         hint="train again with a lower learning rate")
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
                inputs = spec_augment(inputs, features, self.config, rng)
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

    def save(self, model, features, standardize: tuple | None = None) -> None:
        """``out`` as a Hugging Face checkpoint: config.json, preprocessor_config.json, model.safetensors; with
        ``standardize`` (head mode: the embeddings' (D,) mean and std) also usable as a head (``save_head``).
        A model with a non-finite weight is never saved."""
        import torch

        if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
            raise NonFiniteError("training gave non-finite weights: nothing was saved",
                                 hint="train again with a lower learning rate")
        save_checkpoint(self.work, model, features, self.checkpoint.source, self.multi_label)
        if standardize is not None:
            save_head(self.work, model, *standardize, self.multi_label, (self.model_name, self.base_path),
                      self.base_fingerprint)


def _training_device(device: str) -> str:
    from ..run.backends import pick_device

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
