"""What a checkpoint's ``preprocessor_config.json`` says about its input (``FeatureConfig``), checked. Importable
without torch, as ``checkpoint.config``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..constants import AUDIOSET_MAX_LENGTH, AUDIOSET_MEAN, AUDIOSET_STD, FRAME_SECONDS, SAMPLE_RATE


@dataclass(frozen=True)
class FeatureConfig:
    """What a checkpoint's ``preprocessor_config.json`` says about its input."""

    sampling_rate: int = SAMPLE_RATE
    num_mel_bins: int = 128
    max_length: int = AUDIOSET_MAX_LENGTH  # frames
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "FeatureConfig":
        raw = dict(raw)
        if "num_mel_bins" not in raw and "feature_size" in raw:
            raw["num_mel_bins"] = raw["feature_size"]
        known = {k: raw[k] for k in ("sampling_rate", "num_mel_bins", "max_length", "mean", "std", "do_normalize") if k in raw}
        cfg = cls(**known)
        cfg.check()
        return cfg

    def check(self) -> None:
        """ValueError naming the field of a preprocessor_config.json that no input can be made with."""
        for name in ("sampling_rate", "num_mel_bins", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, not {value!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value!r}")
        if self.std <= 0:
            raise ValueError(f"std must be positive (features are divided by it), not {self.std!r}")
        if not isinstance(self.do_normalize, bool):
            raise ValueError(f"do_normalize must be true or false, not {self.do_normalize!r}")
        if self.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"only {SAMPLE_RATE} Hz checkpoints are supported, this one wants {self.sampling_rate} Hz")

    @property
    def window_seconds(self) -> float:
        """Audio the model sees at once: 10.24 s for AudioSet checkpoints."""
        return self.max_length * FRAME_SECONDS


__all__ = ["FeatureConfig"]
