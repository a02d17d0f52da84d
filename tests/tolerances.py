"""Every numeric tolerance of the suite, each with the reason it has its size.

The rule (STYLE.md 15): a number is compared with a tolerance that float32 on *another* processor must meet, never
with the last bits of one machine. Processors differ in libm/SLEEF transcendentals (logf, sinf, cosf: <= 1 ulp each),
in the SIMD path and summation order of FFTs and matmuls (FMA or not, AVX2/AVX-512/AMX, oneDNN's blocking), and in
thread count. References are therefore either computed in float64 (``tests/golden/reference64.npz``: torchaudio's
own code evaluated in double, the same on every processor to ~1e-15) and compared with a bound on float32's error,
or they are our own code run twice on the same machine, where only batch shape and order may change the rounding.

Constants here are absolute unless the name says otherwise. ``EPS32`` is float32's machine epsilon (2**-23).
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7: one ulp at 1.0


def ulp32(x: float) -> float:
    """The spacing of float32 numbers at |x|: 2.44e-4 at 2840 (the mel value of 8 kHz)."""
    return float(np.spacing(np.float32(abs(x))))


# -- resampling ------------------------------------------------------------------------------------------------

# Ours against torchaudio's float32 output made on another processor (tests/golden/reference.npz, AMD Zen 3).
# Both run the same float32 algorithm op for op; + - * / are correctly rounded on every IEEE CPU, so they can
# differ only where sinf/cosf of the kernel (<= 1 ulp each) or conv1d's summation order differ. About 12 taps
# (2 x width 6 / rolloff 0.99) of weights <= 1 on samples <= 1 in magnitude: 12 taps x ~0.5 ulp(1) ~ 7e-7.
# Measured 1.2e-7 between Zen 3 and Sapphire Rapids.
RESAMPLE_SAME_ALGORITHM = 1e-6


def resample_float32_error(orig: int, new: int, peak: float) -> float:
    """Bound on float32 resampling's error against exact float64 evaluation of the same formula.

    The kernel's phase ``t = (j / orig' - i / new') * base`` is rounded to float32 at magnitude <= 1 (error ~
    1.5 ulp(1)) before it is scaled by ``base = 0.99 * min(orig', new')`` (orig', new' the rates divided by their
    gcd), so each tap's weight moves by about ``eps * base`` (|d sinc/dt| <= 1.4, the errors of ~12 taps partly
    cancel); on top of that, the rounding of the 12-term sum itself, 12 ulp. Measured (max over the signal):
    0.29 eps*base*peak at 11025 Hz, 0.11 at 22050 Hz, 0.13 at 44100 Hz; this bound is 1 eps*base*peak.
    """
    g = math.gcd(orig, new)
    base = 0.99 * min(orig // g, new // g)
    return EPS32 * peak * (base + 12)


# The direct path (rates whose torchaudio kernel would be huge, ``resample._resample_direct``) against the same
# filter evaluated exactly in float64: its tap times are exact and its taps computed in float64, then rounded to
# float32 (0.5 ulp each); then float32 products and their float32 sum, 18 terms at 22051 Hz, 584 at 767999 Hz,
# of which only the ~12 near the centre matter (the filter's L1 norm is about 1.5): a few ulp of the result,
# growing at worst with the number of terms. Measured: 1.3 eps * peak at 22051 Hz, 0.6 at 767999 Hz (random
# samples of peak 1). The bound is 16 eps * peak.
def resample_direct_error(peak: float) -> float:
    return 16 * EPS32 * peak


# -- mel banks and log-mel features -------------------------------------------------------------------------------

MEL_HIGH = 1127.0 * math.log(1.0 + 8000.0 / 700.0)  # 2840.0: the mel value of 8 kHz, the largest in the banks
MEL_LOW = 1127.0 * math.log(1.0 + 20.0 / 700.0)


def mel_bank_tolerance(bins: int) -> float:
    """Weight error of float32 kaldi mel banks against float64.

    A weight is ``(mel_k - left) / delta`` with ``delta = (MEL_HIGH - MEL_LOW) / (bins + 1)``. ``mel_k`` and
    ``left`` are float32 numbers up to 2840, each off by up to ~1.5 ulp there (logf's <= 1 ulp + rounding the
    product with 1127, or the sum of the edge), so the weight is off by <= 3 ulp32(MEL_HIGH) / delta: 3.4e-5 for 128
    bins, 1.7e-5 for 64, 6.3e-6 for 23. Measured 1.25-1.4 ulp / delta (Zen 3 and Sapphire Rapids alike).
    """
    delta = (MEL_HIGH - MEL_LOW) / (bins + 1)
    return 3 * ulp32(MEL_HIGH) / delta


# Relative error of one mel energy: a 512-point float32 FFT has 9 butterfly stages of ~1 ulp each, the power
# doubles it, and the mel sum over <= ~30 positive terms adds a few ulp: 32 ulp.
MEL_ENERGY_RELATIVE = 32 * EPS32


def assert_log_mel_close(got, expected, bins: int, what: str = "") -> None:
    """Log mel energies (frames, bins) compared as energies: each within ``MEL_ENERGY_RELATIVE`` of itself plus an
    absolute floor proportional to its frame's total energy.

    Why not the log domain: the log magnifies an absolute error by 1 / energy, so a near-silent bin (energy 1e-6 of
    its frame) turns float32's 1e-7 into 1e-3 although nothing a model sees changed. The floor is the mel banks'
    own weight error (``mel_bank_tolerance``) times the frame's energy (a weight off by w moves a bin by at most
    w x the energy under it) plus the FFT's absolute error, a few ulp of the frame's energy. Kaldi's log floor
    (float32 eps) is 1-Lipschitz in energy, so floored bins are covered by the same bound.
    """
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    e_got, e_expected = np.exp(got), np.exp(expected)
    frame_energy = e_expected.sum(axis=-1, keepdims=True)
    allowed = MEL_ENERGY_RELATIVE * e_expected + (mel_bank_tolerance(bins) + 8 * EPS32) * frame_energy
    excess = np.abs(e_got - e_expected) - allowed
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (
        f"{what} log-mel energy at {tuple(int(i) for i in worst)}: got {e_got[worst]:.6g}, expected "
        f"{e_expected[worst]:.6g} (allowed {allowed[worst]:.3g}, frame energy {frame_energy[worst[:-1]][0]:.6g})")


def assert_features_close(got, expected, mean: float, std: float, what: str = "") -> None:
    """Normalized extractor outputs ``(log_mel - mean) / (2 std)``, compared as the energies behind them."""
    got = np.asarray(got, dtype=np.float64) * (2 * std) + mean
    expected = np.asarray(expected, dtype=np.float64) * (2 * std) + mean
    assert_log_mel_close(got, expected, got.shape[-1], what)


# Our own feature code run twice on one machine with a different batch shape (a window cut from a long
# recording's frames vs. the extractor on that stretch alone, block-wise vs one-shot): the same float32 ops on the
# same processor, but a different number of frames per FFT/matmul call can pick another SIMD tail path. Normalized
# features are log / 9.1, and the worst bin is a near-silent one: 1e-5 there is 9e-5 in the log, 1e-4 relative.
SAME_MACHINE_FEATURES = 1e-5

# Decoding and downmixing: int16/int24 -> float32 is exact, and a channel mean of two float32 values is correctly
# rounded; the sum with the streaming resampler's pieces vs one call is the same ops in the same order. One ulp at
# full scale is 1.2e-7; 1e-6 leaves room for the resampler's 12-tap sums (see RESAMPLE_SAME_ALGORITHM).
WAVEFORM = 1e-6


# -- the model and the whole pipeline ----------------------------------------------------------------------------

# Our AST against transformers' ASTForAudioClassification, same checkpoint, same input, both float32 on this
# processor (logits and pooled embeddings, magnitudes <= 5 with the tests' random weights). Our SDPA path calls the
# same kernels as transformers' default (measured 0); the eager path does matmul + float32 softmax instead of the
# fused kernel, which reorders 1214-term sums in each of 12 layers: measured 1.25e-6 (full size, Sapphire Rapids).
# Another processor's matmul blocking (AVX2 / AVX-512 / AMX-fp32) reorders sums on both sides alike; 1e-5 leaves 8x.
MODEL_VS_TRANSFORMERS = 1e-5

# `ast` end to end (decode, resample, windows cut from a stream, batched model) against transformers fed the
# reference features of that stretch of audio (conftest.reference_features): features equal to SAME_MACHINE_FEATURES,
# model to MODEL_VS_TRANSFORMERS, and sigmoid's slope is at most 1/4. Scores, probabilities or logits.
# Measured <= 2.5e-7 (Sapphire Rapids).
END_TO_END = 1e-5

# The same backend on the same windows, batched differently (windows per call, files per batch, another process):
# oneDNN chooses its kernel by the number of rows, which reorders float32 sums. Measured 0 to 1e-7.
SAME_MACHINE_BATCHING = 1e-5

# A stream read as 16-bit PCM against the float signal it was made from: each sample moves by <= 2**-16 on every
# processor alike (measured 2.8e-6 on the scores); the rest is END_TO_END's float32 noise.
PCM16_SCORES = 1e-5

# The fast modes' promise (README "Fast modes", issue 26): scores within 0.02 of fp32. bf16 keeps 8 mantissa bits
# (relative rounding 2**-9 per activation, a few hundred roundings deep); int8 rounds each weight row and each
# token's activations to 1/127 of their range. Neither depends on the processor's float32 rounding.
FAST_MODE_SCORES = 0.02
