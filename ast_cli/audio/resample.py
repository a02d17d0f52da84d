"""Band-limited resampling, the same math as ``torchaudio.functional.resample`` with its default arguments.

torchaudio is not imported (its last release fails to import next to current PyTorch); this is the same
polyphase windowed-sinc filter, computed in the same order and dtype, so the output matches it to float32
rounding. ``tests/golden/`` pins it to torchaudio 2.11's output.

With both rates divided by their gcd (``orig`` in, ``new`` out), output sample ``y[j]`` is a windowed sinc
interpolation of the input at time ``j / new``::

    y[j] = sum_i x[i] * h(i / orig - j / new)
    h(d) = s * sinc(pi * b * d) * cos(pi * b * d / (2 * W)) ** 2,   |b * d| <= W, else 0

with ``b = min(orig, new) * rolloff`` (rolloff 0.99: the cut-off sits just below the lower Nyquist frequency),
``W = lowpass_filter_width = 6`` zero crossings on each side, a Hann window (``sinc_interp_hann``) and
``s = b / orig``. Since ``y[j + new]`` uses the filter of ``y[j]`` shifted by ``orig`` input samples, the ``new``
distinct filters (each ``2 * width + orig`` taps, ``width = ceil(W * orig / b)``) are applied as one strided
``conv1d`` over the input zero-padded by ``width`` on the left and ``width + orig`` on the right. The output
has ``ceil(new * n / orig)`` samples for ``n`` input samples.

That kernel holds ``new * (2 * width + orig)`` taps: 76,000 for 44100 -> 16000, but 178 million (713 MB, and
gigabytes while it is built) for 11127 Hz, whose gcd with 16000 is 1. Past ``MAX_KERNEL_TAPS`` the same filter
``h`` is evaluated directly instead (``_resample_direct``): each output sample's taps are computed from the exact
offset ``(i * new - j * orig) / (orig * new)`` (integers, then float64), once per phase when that table is small
(16,000 x 18 taps for 22051 Hz), else on the fly, in blocks of outputs; only the ``~2 * W * orig / b`` input
samples where ``h`` is non-zero are read. Its memory is a few MB whatever the rates (the table at most 8 MB),
its work per output sample grows with the ratio of the rates only, and its output
differs from an exact float64 evaluation of the same filter by float32 rounding (``tests/test_features.py``).
The standard rates keep torchaudio's kernel and its bit-for-bit output.

``StreamingResampler`` gives the same samples block by block, so long files never sit in memory whole.
"""

from __future__ import annotations

import functools
import math

import numpy as np

LOWPASS_FILTER_WIDTH = 6  # zero crossings of the sinc kept on each side (torchaudio's default)
ROLLOFF = 0.99  # cut-off as a fraction of the lower Nyquist frequency (torchaudio's default)
# Kernels up to 2M taps (8 MB; 11025 Hz, the largest standard rate's, has 291,200) are built as torchaudio
# builds them; larger ones are evaluated on the fly. The cache below holds at most 16 of them (128 MB).
MAX_KERNEL_TAPS = 1 << 21
DIRECT_BLOCK_TAPS = 1 << 19  # taps evaluated at once by the direct path: a few arrays of 4 MB
MIN_RATE, MAX_RATE = 1, 768_000  # Hz: every rate in between is resampled in bounded memory


def reduced_rates(orig_freq: int, new_freq: int) -> tuple[int, int]:
    """Both rates divided by their gcd: 44100 -> 16000 is 441 -> 160."""
    gcd = math.gcd(int(orig_freq), int(new_freq))
    return int(orig_freq) // gcd, int(new_freq) // gcd


def filter_width(orig: int, new: int) -> int:
    """Input samples the filter reaches on each side of an output sample's span (``orig``, ``new`` reduced)."""
    return math.ceil(LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * ROLLOFF))


@functools.lru_cache(maxsize=16)
def sinc_kernel(orig: int, new: int):
    """(new, 1, 2 * width + orig) float32 filters, one per output phase, for the reduced rates.

    Computed in float32 step by step as torchaudio computes it for a float32 waveform, so the taps are the same.
    """
    import torch

    base = min(orig, new) * ROLLOFF
    width = filter_width(orig, new)
    idx = torch.arange(-width, width + orig, dtype=torch.float32)[None, None] / orig  # input times, (1, 1, taps)
    t = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new + idx  # i/orig - j/new, (new, 1, taps)
    t *= base
    t = t.clamp_(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)  # b * d, limited to W zero crossings
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2  # Hann window over [-W, W]
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)  # sinc
    kernels *= window * (base / orig)
    return kernels


def resample(waveform, orig_freq: int, new_freq: int):
    """``torchaudio.functional.resample(waveform, orig_freq, new_freq)``: (..., n) float tensor -> (..., m).

    ``m = ceil(new * n / orig)`` with the reduced rates. Equal rates return the input unchanged.
    """
    import torch

    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError("sample rates must be positive")
    if int(orig_freq) != orig_freq or int(new_freq) != new_freq:
        raise ValueError("sample rates must be whole numbers of Hz")
    if orig_freq == new_freq:
        return waveform
    if not waveform.is_floating_point():
        raise TypeError(f"expected a floating-point waveform, got {waveform.dtype}")
    orig, new = reduced_rates(orig_freq, new_freq)
    width = filter_width(orig, new)
    if new * (2 * width + orig) > MAX_KERNEL_TAPS:
        return _resample_direct(waveform, orig, new)
    kernel = sinc_kernel(orig, new).to(device=waveform.device, dtype=waveform.dtype)
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])  # (channels, n)
    length = flat.shape[-1]
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded[:, None], kernel, stride=orig)  # (channels, new, frames)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)  # phases interleaved: (channels, new * frames)
    out = out[..., : math.ceil(new * length / orig)]
    return out.reshape(shape[:-1] + out.shape[-1:])


def _direct_reach(orig: int, new: int) -> int:
    """Input samples on each side of an output's time where ``h`` is not 0: ``|i - j * orig / new| <= reach``."""
    return math.floor(LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * ROLLOFF))


def _direct_taps(remainders: np.ndarray, orig: int, new: int) -> np.ndarray:
    """(J, 2 * reach + 2) float32 taps of the outputs ``j`` with ``j * orig % new`` in ``remainders``, for the
    inputs ``i = j * orig // new - reach + k``. Their offsets ``i * new - j * orig = (k - reach) * new - r`` are
    exact integers; the filter is evaluated on them in float64."""
    base = min(orig, new) * ROLLOFF
    reach = _direct_reach(orig, new)
    offsets = (np.arange(2 * reach + 2, dtype=np.float64) - reach) * new
    t = (offsets - remainders[:, None]) * (base / (orig * new))  # b * (i / orig - j / new)
    h = np.sinc(t) * np.cos(t * (math.pi / LOWPASS_FILTER_WIDTH / 2)) ** 2 * (base / orig)
    h[np.abs(t) >= LOWPASS_FILTER_WIDTH] = 0.0
    return h.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _phase_taps(orig: int, new: int) -> np.ndarray | None:
    """``_direct_taps`` of every remainder (outputs ``j`` and ``j + new`` share their taps), when that table is
    small (``MAX_KERNEL_TAPS``); None otherwise, and the taps are evaluated block by block."""
    if new * (2 * _direct_reach(orig, new) + 2) > MAX_KERNEL_TAPS:
        return None
    return _direct_taps(np.arange(new, dtype=np.int64), orig, new)


def _resample_direct(waveform, orig: int, new: int):
    """``resample`` for rates whose kernel is too large to build: the same filter ``h``, evaluated for each
    output sample ``j`` only at the inputs within its reach, a block of outputs at a time. numpy, one thread:
    many small steps that torch's thread pool would only slow down while the model runs beside them."""
    import torch

    reach = _direct_reach(orig, new)
    taps = 2 * reach + 2
    shape = waveform.shape
    flat = waveform.detach().reshape(-1, shape[-1]).cpu().to(torch.float32).numpy()  # (channels, n)
    total = math.ceil(new * flat.shape[-1] / orig)
    padded = np.pad(flat, ((0, 0), (reach, reach + 2)))  # zeros outside the input, as torchaudio pads
    spans = np.lib.stride_tricks.sliding_window_view(padded, taps, axis=-1)  # (channels, n + 1, taps), a view
    table = _phase_taps(orig, new)
    out = np.empty((flat.shape[0], total), dtype=np.float32)
    step = max(1, DIRECT_BLOCK_TAPS // (taps * flat.shape[0]))
    for first in range(0, total, step):
        q, r = np.divmod(np.arange(first, min(total, first + step), dtype=np.int64) * orig, new)  # (J,)
        h = table[r] if table is not None else _direct_taps(r, orig, new)  # (J, taps)
        out[:, first : first + q.shape[0]] = np.einsum("cjt,jt->cj", spans[:, q], h)
    result = torch.from_numpy(out).to(device=waveform.device, dtype=waveform.dtype)
    return result.reshape(shape[:-1] + result.shape[-1:])


def check_rate(sample_rate) -> int:
    """``sample_rate`` as an int if it is a whole number of Hz from ``MIN_RATE`` to ``MAX_RATE``; else ValueError
    (a header or option claiming 4294967295 Hz is refused before anything is allocated for it)."""
    try:
        usable = MIN_RATE <= sample_rate <= MAX_RATE and int(sample_rate) == sample_rate  # NaN: False
    except TypeError:
        usable = False
    if not usable:
        raise ValueError(f"unsupported sample rate {sample_rate} Hz (supported: {MIN_RATE} Hz to "
                         f"{MAX_RATE // 1000} kHz)")
    return int(sample_rate)


class StreamingResampler:
    """``resample(x, orig_freq, new_freq)`` of a whole signal, given block by block, with identical output.

    Output frame ``j`` (``new`` samples, reduced rates) reads input samples ``[j*orig - width, j*orig + orig +
    width)``. Each block is resampled with enough real context on both sides, starting at a multiple of
    ``orig``, and only the frames whose inputs are all real are kept, so the concatenation equals the one-shot
    result.
    """

    def __init__(self, orig_freq: int, new_freq: int):
        self.orig_freq, self.new_freq = int(orig_freq), int(new_freq)
        self.orig, self.new = reduced_rates(self.orig_freq, self.new_freq)
        self.width = filter_width(self.orig, self.new)
        self.context = math.ceil(self.width / self.orig) * self.orig  # >= width, a multiple of orig
        self._buffer = np.empty(0, dtype=np.float32)
        self._buffer_start = 0  # input index of _buffer[0], a multiple of orig
        self._total_in = 0
        self._next_frame = 0
        self._emitted = 0

    @property
    def passthrough(self) -> bool:
        return self.orig_freq == self.new_freq

    def push(self, block: np.ndarray) -> np.ndarray:
        """Add (n,) float32 input; return the output samples that are now final."""
        if self.passthrough:
            return block
        self._buffer = np.concatenate([self._buffer, block])
        self._total_in += block.shape[0]
        # Frames whose whole input span has been read.
        ready = (self._total_in - self.orig - self.width) // self.orig + 1
        return self._emit(ready, final=False)

    def finish(self) -> np.ndarray:
        """The rest of the output, once the input has ended."""
        if self.passthrough:
            return np.empty(0, dtype=np.float32)
        target = math.ceil(self.new * self._total_in / self.orig)
        frames = math.ceil(target / self.new)
        out = self._emit(frames, final=True)
        return out[: max(0, target - self._emitted + out.shape[0])]

    def _emit(self, frame_end: int, final: bool) -> np.ndarray:
        import torch

        if frame_end <= self._next_frame:
            return np.empty(0, dtype=np.float32)
        seg_start = max(0, self._next_frame * self.orig - self.context)  # a multiple of orig
        seg_end = self._total_in if final else frame_end * self.orig + self.width
        segment = self._buffer[seg_start - self._buffer_start : seg_end - self._buffer_start]
        resampled = resample(torch.from_numpy(np.ascontiguousarray(segment)), self.orig_freq, self.new_freq)
        first = (self._next_frame - seg_start // self.orig) * self.new
        last = (frame_end - seg_start // self.orig) * self.new
        out = resampled[first:last].numpy()
        self._next_frame = frame_end
        self._emitted += out.shape[0]
        keep_from = max(0, self._next_frame * self.orig - self.context)
        self._buffer = self._buffer[keep_from - self._buffer_start :]
        self._buffer_start = keep_from
        return out
