"""The architecture a checkpoint's ``config.json`` describes (``ASTConfig``), checked before anything is allocated
from it. Importable without torch: a run that only reads configs (a ``--resume`` with nothing left to do) loads no
model code."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

AttnImplementation = Literal["sdpa", "eager"]
POOLED_TOKENS = 2  # the CLS and distillation tokens, whose mean is the pooled embedding
# Bounds on what a config.json may ask for, checked before anything is allocated from it (a hostile config can
# ask for 10^10 labels in one line). Generous: the published checkpoints have 527 labels and 1024 x 128 inputs.
MAX_LABELS = 1 << 17
MAX_INPUT_VALUES = 1 << 22  # max_length x num_mel_bins of one window: 32 times the published 1024 x 128
MAX_DIMENSION = 1 << 20  # each size in the config (hidden_size, layers, strides...); the published: 768, 12, 10


@dataclass(frozen=True)
class ASTConfig:
    """Architecture of one checkpoint, as found in its ``config.json``."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024  # frames of model input (10 ms each)
    num_mel_bins: int = 128
    id2label: tuple[str, ...] = ()  # label of class i; empty for a bare encoder
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    problem_type: str | None = None  # "single_label_classification" (softmax) or "multi_label_classification"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ASTConfig":
        """Build from a hub ``config.json`` dict; unknown keys are ignored.

        Accepts the 2022 names ``time_dimension`` / ``frequency_dimension`` for ``max_length`` /
        ``num_mel_bins``.
        """
        raw = dict(raw)
        if "max_length" not in raw and "time_dimension" in raw:
            raw["max_length"] = raw["time_dimension"]
        if "num_mel_bins" not in raw and "frequency_dimension" in raw:
            raw["num_mel_bins"] = raw["frequency_dimension"]
        id2label = raw.get("id2label") or {}
        if not isinstance(id2label, dict):
            raise ValueError(f"id2label must map class indices to names, not a {type(id2label).__name__}")
        num_labels = len(id2label) or raw.get("num_labels") or 0
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or not 0 <= num_labels <= MAX_LABELS:
            raise ValueError(f"num_labels must be a whole number from 0 to {MAX_LABELS}, not {num_labels!r}")
        raw["id2label"] = tuple(
            str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels)
        )
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        cfg.check()
        return cfg

    def check(self) -> None:
        """ValueError for a config no AST can be built from (a broken or hostile config.json)."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                     "frequency_stride", "time_stride", "max_length", "num_mel_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, not {value!r}")
            if value > MAX_DIMENSION:
                raise ValueError(f"{name} is {value}: too large (at most {MAX_DIMENSION})")
        if not isinstance(self.layer_norm_eps, (int, float)) or not 0 < self.layer_norm_eps < 1:
            raise ValueError(f"layer_norm_eps must be a small positive number, not {self.layer_norm_eps!r}")
        if self.max_length < self.patch_size or self.num_mel_bins < self.patch_size:
            raise ValueError(f"max_length and num_mel_bins must be at least the patch size ({self.patch_size})")
        if self.max_length * self.num_mel_bins > MAX_INPUT_VALUES:
            raise ValueError(f"max_length x num_mel_bins ({self.max_length} x {self.num_mel_bins}) is more than "
                             f"{MAX_INPUT_VALUES} input values per window")
        if max(self.frequency_stride, self.time_stride) > self.patch_size:
            raise ValueError(f"frequency_stride and time_stride must be at most the patch size ({self.patch_size})")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias must be true or false, not {self.qkv_bias!r}")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(frequency patches, time patches): 12 x 101 for the default checkpoint."""
        f_dim = (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1
        t_dim = (self.max_length - self.patch_size) // self.time_stride + 1
        return f_dim, t_dim

    @property
    def num_tokens(self) -> int:
        f_dim, t_dim = self.patch_grid
        return f_dim * t_dim + 2  # + CLS + distillation

    @property
    def num_parameters(self) -> int:
        """Parameters of the model this config describes: what its weights file must hold (86,594,063 for the
        default checkpoint)."""
        d, inner, patch, labels = self.hidden_size, self.intermediate_size, self.patch_size, self.num_labels
        embeddings = (2 + self.num_tokens) * d + d * patch * patch + d  # tokens, positions, patch projection
        layer = 3 * (d * d + d * self.qkv_bias) + (d * d + d) + 2 * d * inner + inner + d + 4 * d
        head = 2 * d + d * labels + labels if labels else 0
        return embeddings + self.num_hidden_layers * layer + 2 * d + head


__all__ = ["ASTConfig", "AttnImplementation", "MAX_DIMENSION", "MAX_INPUT_VALUES", "MAX_LABELS", "POOLED_TOKENS"]
