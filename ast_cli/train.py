"""Your own labels: train a classifier on AST (``head``: on frozen embeddings; ``finetune``: the whole model) and
measure a model on labeled data. The result is a normal Hugging Face AST checkpoint.

Data (``load_dataset``): a folder of subfolders, one label each (single-label), or a CSV/JSONL of ``path,labels``
with labels separated by ``;`` (multi-label; paths relative to the file). Each file gives one example per window
of the model's length, all with the file's labels; a file's score is its windows' scores aggregated as
``classify`` does (softmax: mean; sigmoid: max).

- ``head``: the pooled embedding of every window is computed once with the base model and cached on disk in
  ``extract-features``' format (a rerun with other training settings computes nothing again); the checkpoint's
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
``metrics.json`` (validation); ``transformers.ASTForAudioClassification.from_pretrained`` loads it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import UsageError
from .inputs import InputFile, expand_inputs

SINGLE, MULTI = "single_label_classification", "multi_label_classification"


# -- data ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    path: str
    labels: tuple[str, ...]


@dataclass
class Dataset:
    """Labeled files. ``root``: the folder paths are mirrored below in the feature cache."""

    examples: list[Example]
    labels: tuple[str, ...]
    multi_label: bool
    root: str | None = None

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

    def inputs(self) -> list[InputFile]:
        return [InputFile(e.path, root=self.root) for e in self.examples]

    def subset(self, rows: Iterable[int]) -> "Dataset":
        return replace(self, examples=[self.examples[i] for i in rows])


def load_dataset(path: str) -> Dataset:
    """A folder of label subfolders (single-label), or a ``.csv``/``.jsonl`` of ``path,labels`` (multi-label)."""
    if os.path.isdir(path):
        examples = []
        for sub in sorted(p for p in Path(path).iterdir() if p.is_dir() and not p.name.startswith(".")):
            for item in expand_inputs([str(sub)]):
                examples.append(Example(item.path, (sub.name,)))
        labels = tuple(sorted({e.labels[0] for e in examples}))
        dataset = Dataset(examples, labels, multi_label=False, root=path)
    elif os.path.isfile(path):
        dataset = _read_table(path)
    else:
        raise UsageError(f"no such data folder or file: {path}", option="data")
    if len(dataset.examples) == 0:
        raise UsageError(f"{path} holds no labeled audio files", option="data",
                         hint="a folder of label subfolders, or a CSV/JSONL of path,labels")
    if len(dataset.labels) < 2:
        raise UsageError(f"{path} has {len(dataset.labels)} label(s): a classifier needs at least 2", option="data")
    return dataset


def _read_table(path: str) -> Dataset:
    base = os.path.dirname(os.path.abspath(path))
    rows: list[tuple[str, str]] = []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            if path.lower().endswith((".jsonl", ".ndjson")):
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        record = json.loads(line)
                        labels = record.get("labels", "")
                        rows.append((record["path"], ";".join(labels) if isinstance(labels, list) else labels))
            else:
                for record in csv.DictReader(handle):
                    rows.append((record["path"], record.get("labels") or ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read {path} as path,labels rows: {exc}", option="data") from None
    examples = []
    for file, text in rows:
        labels = tuple(dict.fromkeys(x.strip() for x in text.split(";") if x.strip()))
        examples.append(Example(file if os.path.isabs(file) else os.path.join(base, file), labels))
    names = tuple(sorted({name for e in examples for name in e.labels}))
    return Dataset(examples, names, multi_label=True, root=base)


def split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Stratified (by a file's first label), seeded: about ``fraction`` of each label's files for validation."""
    if not 0 < fraction < 1:
        raise UsageError("must be between 0 and 1", option="val_split")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for row, example in enumerate(dataset.examples):
        by_label.setdefault(example.labels[0] if example.labels else "", []).append(row)
    train, val = [], []
    for rows in by_label.values():
        rng.shuffle(rows)
        cut = max(1, round(len(rows) * fraction)) if len(rows) > 1 else 0
        val += rows[:cut]
        train += rows[cut:]
    return dataset.subset(sorted(train)), dataset.subset(sorted(val))


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
        lr = self.lr or (1e-3 if self.mode == "head" else 1e-5)
        for name, value in (("epochs", epochs), ("batch_size", self.batch_size), ("accumulate", self.accumulate),
                            ("patience", self.patience)):
            if value < 1:
                raise UsageError("must be at least 1", option=name)
        if not 0 <= self.mixup <= 1:
            raise UsageError("must be a probability from 0 to 1", option="mixup")
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


class Trainer:
    """Trains on ``train`` (validating on ``val``) from the base checkpoint ``base`` (a path), into ``out``.

    ``options``: how the base model runs (device, dtype, batch size for embedding, workers, hop).
    ``on_epoch(record)``: called with each epoch's log record (loss, validation metric).
    """

    def __init__(self, base: str, train: Dataset, val: Dataset, out: str, config: TrainConfig, options,
                 feature_cache: str | None = None, on_epoch: Callable[[dict], None] | None = None,
                 model_name: str | None = None):
        from .weights import load_checkpoint

        self.base_path = base
        self.checkpoint = load_checkpoint(base)
        self.train_set, self.val_set = train, val
        self.labels = tuple(sorted(set(train.labels) | set(val.labels)))
        self.multi_label = train.multi_label
        self.out = out
        self.config = config.resolved()
        self.options = options
        self.feature_cache = feature_cache
        self.on_epoch = on_epoch
        self.model_name = model_name or base

    # -- windows --------------------------------------------------------------------------------------

    def _windows(self, dataset: Dataset, kind: str) -> list[np.ndarray]:
        """Per file: (windows, D) embeddings (cached on disk) or (windows, T, F) model inputs (in memory)."""
        from .errors import AudioDecodeError

        if kind == "embedding":
            return self._cached_embeddings(dataset)
        from .backends import InputsBackend
        from .engine import Engine

        engine = Engine(self.checkpoint.features, InputsBackend(self.checkpoint.features),
                        batch_size=self.options.batch_size, workers=self.options.workers,
                        hop_frames=self.options.hop_frames)
        out = []
        for example, result in zip(dataset.examples, engine.run([e.path for e in dataset.examples])):
            if result.error:
                raise AudioDecodeError(f"{example.path}: {result.error}")
            out.append(result.outputs)
        return out

    def _cached_embeddings(self, dataset: Dataset) -> list[np.ndarray]:
        from .backends import LocalBackend
        from .errors import AudioDecodeError
        from .extract import FeatureExtractor, Settings, extract_features, plan_outputs
        from .weights import build_model

        cache = self.feature_cache or os.path.join(self.out, "embeddings")
        settings = Settings.of("embedding", self.model_name, self.options)
        jobs = plan_outputs(dataset.inputs(), cache, "safetensors", settings)
        if any(not job.exists for job in jobs):
            backend = LocalBackend.build(build_model(self.checkpoint), self.checkpoint.features, self.options,
                                         output="embedding")
            extractor = FeatureExtractor("embedding", self.model_name, backend, self.options)
            for result in extract_features(jobs, extractor):
                if result.error:
                    raise AudioDecodeError(f"{result.path}: {result.error}")
        from safetensors.numpy import load_file

        return [load_file(job.output)["embedding"] for job in jobs]

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

        import torch

        os.makedirs(self.out, exist_ok=True)
        kind = "embedding" if self.config.mode == "head" else "fbank"
        train_windows, val_windows = self._windows(self.train_set, kind), self._windows(self.val_set, kind)
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
        device = _training_device(self.options.device)
        model.to(device)
        trainable = list(model.classifier.parameters()) if kind == "embedding" else list(model.parameters())
        optimizer = torch.optim.AdamW(trainable, lr=self.config.lr, weight_decay=self.config.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(x) / self.config.batch_size / self.config.accumulate))
        schedule = _warmup_cosine(optimizer, steps_per_epoch, self.config)
        state = _TrainState()
        if resume:
            state = _load_state(self.out, model, optimizer, schedule)
        log_path = os.path.join(self.out, "train_log.jsonl")
        rng = np.random.default_rng(self.config.seed + state.epoch)
        started = time.monotonic()
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
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps(record) + "\n")
                if self.on_epoch is not None:
                    self.on_epoch(record)
                if kind == "fbank":
                    _save_state(self.out, model, optimizer, schedule, state)
                if epoch - state.best_epoch >= self.config.patience:
                    break
        except KeyboardInterrupt:
            if kind == "fbank":  # Ctrl-C keeps the work: --resume continues from here
                _save_state(self.out, model, optimizer, schedule, state)
            raise
        if state.best_weights is not None:
            model.load_state_dict(state.best_weights)
        self.save(model, features)
        epochs_run = max(1, state.epoch)
        result = TrainResult(self.out, self.labels, self.multi_label, state.epoch, state.best_epoch,
                             state.best_metrics, round((time.monotonic() - started) / epochs_run, 4))
        with open(os.path.join(self.out, "metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(_jsonable(asdict(result)), handle, indent=2)
        return result

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
        save_checkpoint(self.out, model, features, self.checkpoint.source, self.multi_label)


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
    with atomic_write(os.path.join(out, SAFETENSORS_NAME), "wb") as handle:
        handle.write(save(state, metadata={"format": "pt"}))
    for name, data in ((CONFIG_NAME, raw), (PREPROCESSOR_NAME, preprocessor)):
        with atomic_write(os.path.join(out, name)) as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")


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
    """The last epoch's weights and optimizer state, for ``--resume`` (plain tensors: loadable with
    ``weights_only=True``)."""
    import torch

    directory = _state_dir(out)
    os.makedirs(directory, exist_ok=True)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
               "epoch": state.epoch, "best_epoch": state.best_epoch, "best_loss": state.best_loss,
               "best_metrics": json.dumps(_jsonable(state.best_metrics))}
    torch.save(payload, os.path.join(directory, "trainer_state.pt.part"))
    os.replace(os.path.join(directory, "trainer_state.pt.part"), os.path.join(directory, "trainer_state.pt"))


def _load_state(out, model, optimizer, schedule) -> _TrainState:
    import torch

    path = os.path.join(_state_dir(out), "trainer_state.pt")
    if not os.path.isfile(path):
        raise UsageError(f"nothing to resume in {out} (no checkpoint/trainer_state.pt)", option="resume")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    schedule.load_state_dict(payload["schedule"])
    state = _TrainState(payload["epoch"], payload["best_epoch"], payload["best_loss"],
                        json.loads(payload["best_metrics"]))
    state.best_weights = {k: v.clone() for k, v in model.state_dict().items()}
    return state


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

def evaluate(tagger, dataset: Dataset, threshold: float = 0.5) -> dict:
    """Metrics of ``tagger`` on ``dataset``; its labels are matched by name (every data label must be one)."""
    from .tagger import LabelSelection

    activation = "sigmoid" if dataset.multi_label else "softmax"
    index = {name: i for i, name in enumerate(tagger.labels)}
    missing = sorted(set(dataset.labels) - set(index))
    if missing:
        raise UsageError(f"the model has no label {missing[0]!r} (and {len(missing) - 1} more)" if len(missing) > 1
                         else f"the model has no label {missing[0]!r}", option="data")
    aggregate = "max" if dataset.multi_label else "mean"
    scores = np.zeros((len(dataset.examples), len(tagger.labels)))
    failed = []
    for row, result in enumerate(tagger.classify([e.path for e in dataset.examples], selection=LabelSelection(top=None),
                                                 activation=activation, aggregate=aggregate)):
        if result.error:
            failed.append({"path": result.path, "error": result.error})
            continue
        for label in result.labels:
            scores[row, label.index] = label.score
    keep = [i for i, e in enumerate(dataset.examples) if e.path not in {f["path"] for f in failed}]
    columns = [index[name] for name in dataset.labels]
    report = metrics(scores[keep][:, columns], dataset.subset(keep).targets(), dataset.labels, dataset.multi_label,
                     threshold)
    report["failed"] = failed
    return _jsonable(report)
