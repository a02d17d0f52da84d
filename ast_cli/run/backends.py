"""Backends: what runs the model on a batch of windows. The engine calls ``backend(inputs)`` and nothing else.

A ``Backend`` takes (B, max_length, num_mel_bins) float32 model inputs (on the CPU) and returns (B, ...) float32
rows as a numpy array: logits, embeddings, or the inputs themselves. ``features`` is the input format it
expects, which the engine uses to cut windows.

- ``LocalBackend``: a model in this process, on any device, in fp32/fp16/bf16 or with int8 Linear layers.
- ``HeadsBackend``: a ``LocalBackend``'s embedding through several classifiers (its own and trained heads).
- ``InputsBackend``: returns the model inputs (``extract-features --kind fbank``); needs no weights.

A distributed backend plugs in here: same call, the batch computed elsewhere.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np

from ..audio.features import FeatureConfig
from .options import Attn, DType, Quantize, RunOptions, torch_dtype

Output = Literal["logits", "embedding"]


@runtime_checkable
class Backend(Protocol):
    features: FeatureConfig

    def __call__(self, inputs) -> np.ndarray:
        """(B, T, F) float32 tensor -> (B, ...) float32 array."""
        ...


class InputsBackend:
    """The model inputs themselves: (B, max_length, num_mel_bins)."""

    def __init__(self, features: FeatureConfig):
        self.features = features

    def __call__(self, inputs) -> np.ndarray:
        return inputs.numpy()


def pick_device(device: str = "auto") -> str:
    """``auto`` -> cuda, then mps, then cpu. Asking for an absent device is a UsageError."""
    import torch

    from ..errors import UsageError

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("CUDA was asked for, but no CUDA device is available", option="device",
                             suggest={"device": "cpu"})
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(f"no CUDA device {device!r} ({torch.cuda.device_count()} present)", option="device")
        return device
    if device == "mps":
        if not mps:
            raise UsageError("MPS was asked for, but it is not available", option="device", suggest={"device": "cpu"})
        return device
    if device != "cpu":
        raise UsageError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N or mps)", option="device")
    return device


def resolve_dtype(dtype: DType | str, device: str):
    """``auto`` -> float16 on CUDA, float32 elsewhere; fp16 on the CPU is refused (slow and inexact there)."""
    from ..errors import UsageError

    dtype = DType(dtype)
    if dtype is DType.auto:
        return torch_dtype("fp16" if device.startswith("cuda") else "fp32")
    if dtype is DType.fp16 and device == "cpu":
        raise UsageError("fp16 is slow and inexact on CPUs", option="dtype", suggest={"dtype": "bf16"})
    return torch_dtype(dtype.value)


def check_quantize(quantize: Quantize | str, device: str, dtype) -> None:
    """int8 needs the CPU and float32 around its int8 layers; a UsageError otherwise."""
    import torch

    from ..errors import UsageError

    if Quantize(quantize) is Quantize.none:
        return
    if device != "cpu":
        raise UsageError("int8 runs on the CPU only", option="quantize", suggest={"device": "cpu"})
    if dtype != torch.float32:
        raise UsageError("int8 computes in float32 around its int8 layers", option="quantize",
                         suggest={"dtype": None})


class LocalBackend:
    """A model in this process. ``output``: ``logits`` (B, num_labels) or ``embedding`` (B, hidden_size).

    On the CPU a batch goes through in cache-sized pieces (one 10 s window at a time for AudioSet models):
    the same results, 5-10% less time per window than whole batches. ``attn`` overrides the model's own
    attention implementation for this backend only (the model is never changed).
    """

    def __init__(self, model, features: FeatureConfig, *, device: str = "cpu", dtype=None,
                 output: Output = "logits", attn: Attn | str | None = None):
        import torch

        if output not in ("logits", "embedding"):
            raise ValueError(f"output must be 'logits' or 'embedding', not {output!r}")
        self.features = features
        self.device = device
        self.dtype = dtype or torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()  # int8 buffers keep their dtype
        self.output = output
        self.attn = Attn(attn).value if attn is not None else None
        self.windows_per_call = None
        self.fast_choice = None  # a FastChoice when built with RunOptions(fast=True)
        if device == "cpu":
            from ..checkpoint.speed import cpu_windows_per_call

            self.windows_per_call = cpu_windows_per_call(model.config.num_tokens)

    @classmethod
    def build(cls, model, features: FeatureConfig, options: RunOptions, output: Output = "logits",
              heads=(), embeddings: bool = False) -> "LocalBackend":
        """Place a float32 CPU model as ``options`` say (already valid: checked when built): device, dtype, int8,
        threads, attention. ``heads`` (``checkpoint.heads.Head``) that will run on its embeddings: ``--fast``
        keeps their probabilities within its bound too; ``embeddings`` (or ``output`` "embedding"): the run
        reports the pooled embeddings, which ``--fast`` then keeps within its bound."""
        from ..checkpoint.speed import place_bf16_cpu, quantize_dynamic, set_threads

        device = pick_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        check_quantize(options.quantize, device, dtype)
        set_threads(options.threads)
        if options.fast:
            embeddings = embeddings or output == "embedding"
            return cls._fast(model, features, device, output, options.attn, heads, embeddings)
        if options.quantize is Quantize.int8:
            model = quantize_dynamic(model, options.quantize.value)
        if device == "cpu" and dtype == torch_dtype("bf16"):
            model = place_bf16_cpu(model)
        return cls(model, features, device=device, dtype=dtype, output=output, attn=options.attn)

    @classmethod
    def _fast(cls, model, features: FeatureConfig, device: str, output: Output, attn, heads=(),
              embeddings: bool = False) -> "LocalBackend":
        """The mode ``fast.choose`` calibrated (or cached) for this model on this machine; ``fast_choice`` says which."""
        from .fast import choose, place

        choice = choose(model, device, Attn(attn).value, heads, embeddings)
        model, dtype = place(model, choice.mode, device)
        backend = cls(model, features, device=device, dtype=dtype, output=output, attn=attn)
        backend.fast_choice = choice
        return backend

    def with_output(self, output: Output) -> "LocalBackend":
        """The same model (shared, not copied) giving ``output`` instead."""
        twin = object.__new__(LocalBackend)
        twin.__dict__.update(self.__dict__, output=output)
        return twin

    def with_attn(self, attn: Attn | str) -> "LocalBackend":
        """The same model (shared, not copied) computing attention with ``attn``."""
        twin = object.__new__(LocalBackend)
        twin.__dict__.update(self.__dict__, attn=Attn(attn).value)
        return twin

    def tensor(self, inputs):
        """(B, T, F) -> (B, ...) float32 tensor on the CPU."""
        import torch

        forward = self.model.forward_features if self.output == "embedding" else self.model
        with torch.inference_mode():
            inputs = inputs.to(self.device, self.dtype)
            if self.windows_per_call is None or inputs.shape[0] <= self.windows_per_call:
                return forward(inputs, attn=self.attn).float().cpu()
            return torch.cat([forward(part, attn=self.attn).float()
                              for part in inputs.split(self.windows_per_call)])

    def forward_head(self, pooled):
        """(B, hidden_size) float32 pooled embeddings -> (B, num_labels) float32 CPU logits: the classifier alone,
        in the model's dtype (an embedding is a float32 copy of it: casting back is exact)."""
        import torch

        with torch.inference_mode():
            return self.model.forward_head(pooled.to(self.device, self.dtype)).float().cpu()

    def __call__(self, inputs) -> np.ndarray:
        return self.tensor(inputs).numpy()


class HeadsBackend:
    """One backbone pass, several heads: ``backend``'s pooled embedding of each window through the model's own
    classifier (unless ``base_head`` is False) and each of ``heads`` (``checkpoint.heads.Head``, in float32 on
    the CPU): (B, total labels) logits, side by side in that order."""

    def __init__(self, backend: LocalBackend, heads, base_head: bool = True):
        self.embedder = backend.with_output("embedding")
        self.features = backend.features
        self.heads, self.base_head = tuple(heads), base_head

    def __call__(self, inputs) -> np.ndarray:
        import torch

        pooled = self.embedder.tensor(inputs)  # (B, D) float32 on the CPU
        with torch.inference_mode():
            parts = [self.embedder.forward_head(pooled)] if self.base_head else []
            parts += [head(pooled) for head in self.heads]
        return torch.cat(parts, dim=1).numpy()
