"""The tagging API: a loaded model plus the engine -> typed results per file.

    >>> tagger = Tagger.load("MIT/ast-finetuned-audioset-10-10-0.4593")
    >>> for result in tagger.classify(expand_inputs(["song.wav"])):
    ...     print(result.labels[0].label, result.labels[0].score)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

import numpy as np

from . import DEFAULT_MODEL
from .engine import Engine, FileOutput
from .errors import UsageError
from .features import HOP_LENGTH, SAMPLE_RATE, FeatureConfig
from .inputs import InputFile
from .model import AST, AttnImplementation

Activation = Literal["sigmoid", "softmax", "none"]
Aggregate = Literal["max", "mean"]


@dataclass(frozen=True)
class LabelScore:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float
    labels: list[LabelScore]


@dataclass
class FileResult:
    """One input file's tags (``labels`` sorted by score, descending) or its ``error``."""

    path: str
    duration: float | None
    labels: list[LabelScore] = field(default_factory=list)
    error: str | None = None
    segments: list[Segment] | None = None
    size: int | None = None
    mtime: float | None = None


@dataclass(frozen=True)
class LabelSelection:
    """Which labels to report: the ``top`` best (None = all) with score >= ``threshold``,
    restricted to ``include`` and without ``exclude`` (label names, case-insensitive)."""

    top: int | None = 5
    threshold: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def mask(self, labels: tuple[str, ...]) -> np.ndarray:
        """Boolean (num_labels,) of labels allowed by include/exclude; unknown names are a UsageError."""
        lowered = [name.lower() for name in labels]
        index = {name: i for i, name in enumerate(lowered)}

        def find(name: str) -> int:
            key = name.strip().lower()
            if key not in index:
                close = difflib.get_close_matches(key, lowered, n=1)
                hint = f" (did you mean {labels[lowered.index(close[0])]!r}?)" if close else ""
                raise UsageError(f"unknown label {name!r}{hint}", hint="`ast labels` lists this model's labels")
            return index[key]

        allowed = np.ones(len(labels), dtype=bool)
        if self.include:
            allowed[:] = False
            allowed[[find(n) for n in self.include]] = True
        for name in self.exclude:
            allowed[find(name)] = False
        return allowed

    def select(self, scores: np.ndarray, labels: tuple[str, ...], allowed: np.ndarray) -> list[LabelScore]:
        order = np.argsort(-scores, kind="stable")
        picked = []
        for i in order:
            if not allowed[i]:
                continue
            if self.threshold is not None and scores[i] < self.threshold:
                break
            picked.append(LabelScore(labels[i], int(i), float(scores[i])))
            if self.top is not None and len(picked) >= self.top:
                break
        return picked


def activate(logits: np.ndarray, activation: Activation) -> np.ndarray:
    """(..., num_labels) raw logits -> scores. AudioSet is multi-label, so sigmoid is the default."""
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    if activation == "softmax":
        shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=-1, keepdims=True)
    if activation == "none":
        return logits.astype(np.float64)
    raise UsageError(f"unknown activation {activation!r}")


def pick_device(device: str = "auto") -> str:
    """``auto`` -> cuda, then mps, then cpu. Asking for an absent device is a UsageError."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available", hint="use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps asked for, but MPS is not available", hint="use --device cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N or mps)")
    return device


DTYPES = ("auto", "fp32", "fp16", "bf16")


def pick_dtype(dtype: str, device: str):
    """``auto`` -> float16 on CUDA, float32 elsewhere."""
    import torch

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise UsageError(f"unknown dtype {dtype!r} (auto, fp32, fp16, bf16)")
    if dtype == "fp16" and device == "cpu":
        raise UsageError("fp16 is slow and inexact on CPUs", hint="use --dtype bf16 or --quantize int8 on CPU")
    return names[dtype]


def hop_to_frames(hop_seconds: float | None) -> int | None:
    """``--hop`` seconds -> window hop in 10 ms frames (None: windows do not overlap)."""
    if hop_seconds is None:
        return None
    frames = round(hop_seconds * SAMPLE_RATE / HOP_LENGTH)
    if frames < 1:
        raise UsageError(f"--hop {hop_seconds} is shorter than one frame (0.01 s)")
    return frames


def check_quantize(quantize: str | None, device: str, torch_dtype) -> None:
    """``--quantize int8`` needs the CPU and float32 around its int8 layers; a UsageError otherwise."""
    import torch

    if quantize is None:
        return
    if quantize != "int8":
        raise UsageError(f"unknown quantization {quantize!r} (int8)")
    if device != "cpu":
        raise UsageError("--quantize int8 runs on the CPU only", hint="add --device cpu")
    if torch_dtype != torch.float32:
        raise UsageError("--quantize int8 computes in float32 around its int8 layers", hint="drop --dtype")


class Tagger:
    """A model ready for inference, with the input format and labels it was trained with."""

    def __init__(self, model: AST, features: FeatureConfig, *, device: str = "cpu", dtype=None, name: str = ""):
        import torch

        self.name = name
        self.features = features
        self.labels = model.config.id2label
        self.device = device
        self.dtype = dtype or torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        # On the CPU a batch goes through in cache-sized pieces (one 10 s window at a time for AudioSet models):
        # same results, 5-10% less time per window than whole batches.
        self.windows_per_call = None
        if device == "cpu":
            from .speed import cpu_windows_per_call

            self.windows_per_call = cpu_windows_per_call(model.config.num_tokens)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        attn: AttnImplementation = "sdpa",
        dtype: str = "auto",
        quantize: str | None = None,
        offline: bool | None = None,
        cache_dir: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> "Tagger":
        """Resolve ``model`` (alias, hub id, directory or file), load it strictly and place it on ``device``."""
        from .hub import resolve_model
        from .weights import build_model, load_checkpoint

        device = pick_device(device)
        torch_dtype = pick_dtype(dtype, device)
        check_quantize(quantize, device, torch_dtype)
        path = resolve_model(model, offline=offline, cache_dir=cache_dir)
        checkpoint = load_checkpoint(path)
        net = build_model(checkpoint, attn=attn)
        if quantize is not None:
            from .speed import quantize_dynamic

            net = quantize_dynamic(net, quantize)
        return cls(net, checkpoint.features, device=device, dtype=torch_dtype, name=model)

    # -- model calls -----------------------------------------------------------------------------

    def logits(self, inputs) -> "torch.Tensor":  # noqa: F821
        """(B, T, F) features -> (B, num_labels) float32 raw logits on the CPU."""
        return self._run(self.model, inputs)

    def embed(self, inputs) -> "torch.Tensor":  # noqa: F821
        """(B, T, F) features -> (B, hidden_size) float32 pooled embeddings on the CPU."""
        return self._run(self.model.forward_features, inputs)

    def _run(self, forward, inputs) -> "torch.Tensor":  # noqa: F821
        import torch

        with torch.inference_mode():
            inputs = inputs.to(self.device, self.dtype)
            if self.windows_per_call is None or inputs.shape[0] <= self.windows_per_call:
                return forward(inputs).float().cpu()
            return torch.cat([forward(part).float() for part in inputs.split(self.windows_per_call)])

    def hop_frames(self, hop_seconds: float | None) -> int | None:
        return hop_to_frames(hop_seconds)

    def engine(self, forward, *, hop_seconds=None, batch_size=4, workers=2, debug=False) -> Engine:
        return Engine(self.features, forward, batch_size=batch_size, workers=workers,
                      hop_frames=self.hop_frames(hop_seconds), debug=debug)

    # -- tagging -------------------------------------------------------------------------------

    def classify(
        self,
        items: Iterable[InputFile],
        *,
        selection: LabelSelection = LabelSelection(),
        activation: Activation = "sigmoid",
        aggregate: Aggregate = "max",
        segments: bool = False,
        hop_seconds: float | None = None,
        batch_size: int = 4,
        workers: int = 2,
        debug: bool = False,
        on_progress: Callable[[FileOutput], None] | None = None,
    ) -> Iterator[FileResult]:
        """Tag files; one ``FileResult`` per item, in order. Long files are cut into windows whose scores
        are aggregated (``max``: an event anywhere in the file counts; ``mean``: typical content)."""
        if aggregate not in ("max", "mean"):
            raise UsageError(f"unknown aggregate {aggregate!r} (max or mean)")
        activate(np.zeros((1, 1)), activation)  # validate before any work
        allowed = selection.mask(self.labels)
        engine = self.engine(self.logits, hop_seconds=hop_seconds, batch_size=batch_size, workers=workers,
                             debug=debug)
        for out in engine.run(items, on_progress=on_progress):
            yield self._result(out, selection, allowed, activation, aggregate, segments)

    def _result(self, out: FileOutput, selection, allowed, activation, aggregate, segments) -> FileResult:
        result = FileResult(out.item.path, out.duration, error=out.error, size=out.size, mtime=out.mtime)
        if out.error is not None or out.outputs is None or len(out.outputs) == 0:
            if result.error is None:
                result.error = "no audio windows"
            return result
        scores = activate(out.outputs, activation)  # (W, L)
        pooled = scores.max(axis=0) if aggregate == "max" else scores.mean(axis=0)
        result.labels = selection.select(pooled, self.labels, allowed)
        if segments:
            result.segments = []
            for (start, end), row in zip(out.windows, scores):
                # The last window ends with the file (16 kHz rounding aside), never after it.
                end = out.duration if out.duration is not None and end >= out.duration - 1e-3 else end
                labels = selection.select(row, self.labels, allowed)
                result.segments.append(Segment(round(start, 6), round(end, 6), labels))
        return result
