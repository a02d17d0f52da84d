"""The fixed test signals behind the golden files: plain numpy arithmetic, no random generator.

``make_golden.py`` (run once, with a working torchaudio) and the tests (run anywhere) both call ``signal``, so
only outputs are stored. Integer hashing makes the noise bit-for-bit the same on every platform and numpy
version; ``checksum`` is stored next to each output so that a drift in the signal itself is caught.
"""

from __future__ import annotations

import numpy as np

RESAMPLE_RATES = (8000, 11025, 22050, 32000, 44100, 48000, 96000)  # Hz, each resampled to 16 kHz
FBANK_LENGTHS = (160, 399, 400, 401, 559, 560, 8000, 16077)  # samples at 16 kHz; the first two are under 25 ms
EXTRACTOR_LENGTHS = (160_000, 164_080, 190_000)  # 10 s (998 frames, padded), exactly 1024 frames, truncated


def _noise(n: int, seed: int) -> np.ndarray:
    """Uniform noise in [-0.5, 0.5) from a splitmix64 hash of the sample index (exact integer arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) - 0.5


def signal(n: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """(n,) float32 in [-1, 1]: a tone, a sweep up to 0.45 of the rate (content above 8 kHz for the
    anti-aliasing filter to remove), noise, and a slow amplitude envelope."""
    t = np.arange(n, dtype=np.float64) / sample_rate
    duration = max(n / sample_rate, 1e-3)
    sweep_top = 0.45 * sample_rate
    phase = 2 * np.pi * (100.0 * t + (sweep_top - 100.0) * t * t / (2 * duration))
    x = 0.3 * np.sin(2 * np.pi * 440.0 * t + seed) + 0.2 * np.sin(phase) + 0.2 * _noise(n, seed)
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t + 0.3 * seed)
    return x.astype(np.float32)


def resample_input(sample_rate: int) -> np.ndarray:
    """About 0.37 s, a length that is not a multiple of the reduced rate, so the output length rounds."""
    return signal(int(0.37 * sample_rate) + 3, sample_rate, seed=sample_rate % 97)


def checksum(x: np.ndarray) -> float:
    return float(np.abs(x.astype(np.float64)).sum())
