"""Run options shared by every front end, as one typed object, and the choice types behind them.

``RunOptions`` says how the model runs and how audio is cut (device, dtype, attention, int8, threads, batch
size, decoding workers, window hop, hub cache and offline mode, and ``fast``: a mode calibrated on this machine). Every command takes the same bundle; library
callers build one directly. Every value is checked when the object is built (a ``UsageError`` names the field),
so a ``RunOptions`` that exists is valid: nothing downstream checks it again, and a bad value fails before any
model loads or output is opened.

This module imports no torch: the CLI uses the enums for option parsing and completion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from ..checkpoint.names import int8_kernel_override
from ..constants import FRAME_SECONDS
from ..errors import UsageError


def _choices(name: str, values: str, doc: str) -> type[Enum]:
    """A str-valued Enum (what Typer turns into a checked, completable choice): ``_choices("X", "a b", ...)``."""
    kind = Enum(name, [(v, v) for v in values.split()], type=str, module=__name__)
    kind.__doc__ = doc
    return kind


# The choices. Attn: sdpa (torch's fused kernel) or eager (the reference's matmul-softmax). DType: auto is fp16
# on CUDA, fp32 elsewhere. Quantize int8: dynamic int8 Linear layers on the CPU. Activation: sigmoid for
# multi-label checkpoints (AudioSet), softmax for single-label ones, none for raw logits. Aggregate: window
# scores -> one file score, max (an event anywhere counts) or mean (typical content).
Attn = _choices("Attn", "sdpa eager", "Attention implementation.")
DType = _choices("DType", "auto fp32 fp16 bf16", "Compute dtype.")
Quantize = _choices("Quantize", "none int8", "Integer quantization of the Linear layers.")
Activation = _choices("Activation", "sigmoid softmax none", "Logits -> scores.")
Aggregate = _choices("Aggregate", "max mean", "Window scores -> one file score.")
OutputFormat = _choices("OutputFormat", "table json jsonl csv tsv audacity raven", "How classify writes results.")
ListFormat = _choices("ListFormat", "table json", "How a listing or report is printed.")
FeatureKind = _choices("FeatureKind", "embedding fbank", "What extract-features writes.")
FeatureFormat = _choices("FeatureFormat", "safetensors npy", "The file format of extracted features.")


def torch_dtype(name: str):
    """``fp32``/``fp16``/``bf16`` -> the torch dtype (the one such map in the package)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[DType(name).value]


def dtype_name(dtype) -> str:
    """A torch float dtype -> ``fp32``/``fp16``/``bf16``."""
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


MAX_WORKERS = 64  # decoding threads: more only costs memory (each holds a decode block)
MAX_BATCH_SIZE = 1 << 16  # windows per model call: 64k full-size windows are 34 GB of input already


@dataclass(frozen=True)
class RunOptions:
    """How a run computes. Strings are accepted for the enum fields (``RunOptions(dtype="bf16")``)."""

    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: DType = DType.auto
    attn: Attn = Attn.sdpa
    quantize: Quantize = Quantize.none
    threads: int | None = None  # CPU threads for the model; None: torch's default
    batch_size: int = 4  # windows per model call
    workers: int = 2  # decoding / feature threads
    hop_seconds: float | None = None  # between window starts; None: the window length (no overlap)
    offline: bool | None = None  # None: HF_HUB_OFFLINE decides
    cache_dir: str | None = None  # hub cache; None: HF_HUB_CACHE or HF_HOME/hub
    fast: bool = False  # the fastest mode within 0.02 of fp32's scores, calibrated on this machine (fast.py)

    def __post_init__(self) -> None:
        for name, kind in (("dtype", DType), ("attn", Attn), ("quantize", Quantize)):
            value = getattr(self, name)
            if value is None and kind is Quantize:
                value = Quantize.none
            try:
                object.__setattr__(self, name, kind(value.value if isinstance(value, Enum) else value))
            except ValueError:
                choices = ", ".join(k.value for k in kind)
                raise UsageError(f"must be one of {choices}, not {value!r}", option=name) from None
        self.validate()

    def validate(self) -> "RunOptions":
        """Check every value that can be checked before loading anything; returns self. Done once, when the
        object is built (``__post_init__``); kept public for callers that used it."""
        for name, low, high in (("batch_size", 1, MAX_BATCH_SIZE), ("workers", 1, MAX_WORKERS), ("threads", 1, 4096)):
            value = getattr(self, name)
            if value is None and name == "threads":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise UsageError(f"must be a whole number from {low} to {high}, not {value!r}", option=name)
        hop_frames(self.hop_seconds)
        if self.quantize is Quantize.int8 and self.dtype not in (DType.auto, DType.fp32):
            raise UsageError("int8 computes in float32 around its int8 layers", option="quantize",
                             suggest={"dtype": None})
        if self.quantize is Quantize.int8:
            int8_kernel_override()
        if self.fast and (self.dtype is not DType.auto or self.quantize is not Quantize.none):
            raise UsageError("the fast mode picks the dtype and int8 itself", option="fast",
                             suggest={"dtype" if self.dtype is not DType.auto else "quantize": None})
        return self

    @property
    def hop_frames(self) -> int | None:
        return hop_frames(self.hop_seconds)


def unscored_seconds(hop_seconds: float | None, window_frames: int) -> float:
    """Seconds after each window that no window covers when the hop is longer than the window (else 0)."""
    frames = hop_frames(hop_seconds)
    return max(0, frames - window_frames) * FRAME_SECONDS if frames is not None else 0.0


def hop_frames(hop_seconds: float | None) -> int | None:
    """Window hop in seconds -> 10 ms frames (None: windows do not overlap). Out of range is a UsageError."""
    if hop_seconds is None:
        return None
    if not isinstance(hop_seconds, (int, float)) or isinstance(hop_seconds, bool) or not math.isfinite(hop_seconds):
        raise UsageError(f"must be a finite number of seconds, not {hop_seconds!r}", option="hop_seconds")
    if hop_seconds > 24 * 3600:
        raise UsageError(f"{hop_seconds} s is longer than a day", option="hop_seconds")
    frames = round(hop_seconds / FRAME_SECONDS)
    if frames < 1:
        raise UsageError(f"{hop_seconds} s is shorter than one frame (0.01 s)", option="hop_seconds")
    return frames
