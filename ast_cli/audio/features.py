"""Log-mel features exactly as ``ASTFeatureExtractor`` computes them (its torchaudio path).

Kaldi-compatible filterbank (``torchaudio.compliance.kaldi.fbank`` with ``window_type="hanning"``), written
out here, mel banks included, so torchaudio is never imported and the window and the mel matrix are built
once per process instead of once per call. ``tests/test_features.py`` checks it against golden files made
with torchaudio and ``ASTFeatureExtractor`` (``tests/golden/make_golden.py``).

Every frame depends only on its own 400 samples (snip_edges, no dither, per-frame DC removal), so the
frames of a long recording can be computed block by block and windowed afterwards: see ``FrameStream``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..constants import FRAME_LENGTH, FRAME_SECONDS, HOP_LENGTH, N_FFT, SAMPLE_RATE

PREEMPHASIS = 0.97


from .featureconfig import FeatureConfig  # noqa: F401  (its home before; imported from here too)

LOW_FREQ = 20.0  # Hz, lowest mel filter edge (kaldi's default)


def _mel(freq):
    """Kaldi's mel scale: mel(f) = 1127 ln(1 + f / 700)."""
    return 1127.0 * (1.0 + freq / 700.0).log()


def kaldi_mel_banks(num_mel_bins: int, n_fft: int = N_FFT, sample_rate: float = SAMPLE_RATE,
                    low_freq: float = LOW_FREQ) -> torch.Tensor:
    """(num_mel_bins, n_fft // 2) triangular filters, ``torchaudio.compliance.kaldi.get_mel_banks`` without VTLN.

    The range [low_freq, Nyquist] is cut into ``num_mel_bins + 1`` equal steps ``delta`` on the mel scale;
    filter ``m`` rises linearly in mel from ``left = mel(low) + m * delta`` to 1 at ``left + delta`` and falls
    back to 0 at ``left + 2 * delta``. FFT bin ``k`` sits at ``k * sample_rate / n_fft`` Hz, so the weight is
    ``max(0, min((mel_k - left) / delta, (right - mel_k) / delta))``. Like kaldi, only bins 0 .. n_fft/2 - 1
    are covered (the Nyquist bin gets no weight). Computed in float32 in torchaudio's order.
    """
    if num_mel_bins <= 3:
        raise ValueError("kaldi mel banks need more than 3 bins")
    nyquist = 0.5 * sample_rate
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)  # scalar, float64 as in torchaudio
    mel_high = 1127.0 * math.log(1.0 + nyquist / 700.0)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    m = torch.arange(num_mel_bins).unsqueeze(1)  # (bins, 1)
    left = mel_low + m * delta
    center = mel_low + (m + 1.0) * delta
    right = mel_low + (m + 2.0) * delta
    mel = _mel((sample_rate / n_fft) * torch.arange(n_fft / 2)).unsqueeze(0)  # (1, n_fft // 2), float32
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return torch.max(torch.zeros(1), torch.min(up, down))


@functools.lru_cache(maxsize=8)
def _mel_matrix(num_mel_bins: int) -> torch.Tensor:
    """(N_FFT // 2 + 1, num_mel_bins) kaldi mel filterbank, 20 Hz to Nyquist, last FFT bin unused."""
    banks = torch.nn.functional.pad(kaldi_mel_banks(num_mel_bins), (0, 1))  # (num_mel_bins, 257)
    return banks.T.contiguous()


@functools.lru_cache(maxsize=1)
def _window() -> torch.Tensor:
    return torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float32)  # symmetric, as kaldi "hanning"


def num_frames(num_samples: int) -> int:
    """Frames kaldi makes from ``num_samples`` samples (snip_edges): 998 for 10.00 s."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // HOP_LENGTH


def log_mel(waveform: torch.Tensor, num_mel_bins: int = 128) -> torch.Tensor:
    """(samples,) float32 16 kHz mono in [-1, 1] -> (frames, num_mel_bins) natural-log mel energies."""
    waveform = waveform.to(torch.float32).contiguous()
    frames = num_frames(waveform.shape[0])
    if frames == 0:
        return torch.empty(0, num_mel_bins)
    strided = waveform.as_strided((frames, FRAME_LENGTH), (HOP_LENGTH, 1))  # (m, 400)
    strided = strided - strided.mean(dim=1, keepdim=True)  # per-frame DC removal
    previous = torch.cat([strided[:, :1], strided[:, :-1]], dim=1)  # kaldi replicates the first sample
    strided = (strided - PREEMPHASIS * previous) * _window()
    spectrum = torch.fft.rfft(strided, n=N_FFT).abs().pow(2.0)  # (m, 257) power
    energies = spectrum @ _mel_matrix(num_mel_bins)  # (m, num_mel_bins)
    return energies.clamp_min(torch.finfo(torch.float32).eps).log()


def pad_or_truncate(frames: torch.Tensor, max_length: int) -> torch.Tensor:
    """Zero frames appended, or the first ``max_length`` kept: (n, F) -> (max_length, F)."""
    n = frames.shape[0]
    if n < max_length:
        return torch.nn.functional.pad(frames, (0, 0, 0, max_length - n))
    return frames[:max_length]


def normalize(frames: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    if not cfg.do_normalize:
        return frames
    return (frames - cfg.mean) / (cfg.std * 2)


def extract(waveform: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """One clip -> model input (max_length, num_mel_bins), as ``ASTFeatureExtractor`` would give it.

    Clips shorter than one frame (400 samples) are zero-padded to one frame first.
    """
    if waveform.shape[0] < FRAME_LENGTH:
        waveform = torch.nn.functional.pad(waveform, (0, FRAME_LENGTH - waveform.shape[0]))
    return normalize(pad_or_truncate(log_mel(waveform, cfg.num_mel_bins), cfg.max_length), cfg)


@dataclass(frozen=True)
class Window:
    """One model input cut from a recording: ``features`` (max_length, F), times in seconds."""

    index: int
    start: float
    end: float
    features: torch.Tensor


class FrameStream:
    """Turns 16 kHz audio pushed in blocks into fixed-length, normalized model windows.

    Window ``w`` covers frames ``[w * hop_frames, w * hop_frames + max_length)`` of the whole recording,
    which equals the reference extractor applied to that stretch of audio. The last window is zero-padded
    like the reference pads. Memory stays bounded: only frames not yet consumed by a window are kept.
    """

    def __init__(self, cfg: FeatureConfig, hop_frames: int | None = None):
        self.cfg = cfg
        self.hop_frames = hop_frames or cfg.max_length
        if self.hop_frames < 1:
            raise ValueError("hop must be at least one frame (10 ms)")
        self._samples = torch.empty(0)  # not yet framed; starts at frame self._frames_done
        self._frames = torch.empty(0, cfg.num_mel_bins)  # computed, starting at frame self._first_frame
        self._first_frame = 0
        self._frames_done = 0
        self._total_samples = 0
        self._next_window = 0

    def push(self, block: torch.Tensor) -> list[Window]:
        """Add (samples,) audio; return the windows that became complete."""
        self._total_samples += block.shape[0]
        self._samples = torch.cat([self._samples, block.to(torch.float32)])
        new = log_mel(self._samples, self.cfg.num_mel_bins)
        if new.shape[0]:
            self._samples = self._samples[new.shape[0] * HOP_LENGTH :]
            self._frames = torch.cat([self._frames, new])
            self._frames_done += new.shape[0]
        return self._ready(final=False)

    def finish(self) -> list[Window]:
        """Flush: the remaining windows, the last one padded. A recording gives at least one window."""
        if self._frames_done == 0 and self._samples.shape[0] < FRAME_LENGTH:
            # Shorter than one frame: the reference needs 400 samples, so pad to exactly one frame.
            padded = torch.nn.functional.pad(self._samples, (0, FRAME_LENGTH - self._samples.shape[0]))
            self._frames = log_mel(padded, self.cfg.num_mel_bins)
            self._frames_done = 1
        return self._ready(final=True)

    @property
    def duration(self) -> float:
        return self._total_samples / SAMPLE_RATE

    def _window(self, index: int, start: int, final: bool) -> Window:
        end = start + self.cfg.max_length
        local = self._frames[start - self._first_frame : end - self._first_frame]
        features = normalize(pad_or_truncate(local, self.cfg.max_length), self.cfg)
        t1 = min(end * FRAME_SECONDS, self.duration) if final else end * FRAME_SECONDS
        return Window(index, start * FRAME_SECONDS, t1, features)

    def _ready(self, final: bool) -> list[Window]:
        out = []
        max_length, hop = self.cfg.max_length, self.hop_frames
        last_end = None
        while True:
            start = self._next_window * hop
            end = start + max_length
            if not final and end > self._frames_done:
                break
            if final and self._next_window > 0 and start >= self._frames_done:
                break
            out.append(self._window(self._next_window, start, final))
            self._next_window += 1
            last_end = end
            if final and end >= self._frames_done:
                break
        if final and self._next_window > 0 and (last_end or (self._next_window - 1) * hop + max_length) < self._frames_done:
            # A hop longer than the window leaves the end of the recording between windows: score it too,
            # with one more window that ends at the last frame.
            out.append(self._window(self._next_window, self._frames_done - max_length, final))
            self._next_window += 1
        self._trim()
        return out

    def _trim(self) -> None:
        """Drop frames no later window needs: before the next window's start, keeping the last window's worth
        (for the closing window of a hop longer than the window)."""
        keep_from = min(self._next_window * self.hop_frames, max(0, self._frames_done - self.cfg.max_length))
        drop = min(keep_from - self._first_frame, self._frames.shape[0])
        if drop > 0:
            self._frames = self._frames[drop:]
            self._first_frame += drop
