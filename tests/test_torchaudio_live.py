"""Against a live torchaudio, where one imports (torch 2.11 - 2.14 with torchaudio 2.11); skipped elsewhere.

The project never imports torchaudio: its last release raises on import next to later torch. These tests only
add a live comparison on fresh random inputs to the golden-file tests of test_features.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ast_cli.audio import features as F
from ast_cli.audio.resample import resample


def _torchaudio():
    try:
        import torchaudio  # noqa: F401
        import torchaudio.compliance.kaldi as kaldi
        import torchaudio.functional as AF
    except (ImportError, OSError, RuntimeError) as exc:
        pytest.skip(f"no working torchaudio here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    return AF, kaldi


@pytest.mark.parametrize("rate", [8000, 11025, 12345, 22050, 32000, 44100, 48000, 96000])
def test_resample_equals_live_torchaudio(rate):
    AF, _ = _torchaudio()
    x = torch.from_numpy(np.random.default_rng(rate).uniform(-1, 1, size=(2, rate // 3 + 11)).astype(np.float32))
    torch.testing.assert_close(resample(x, rate, 16000), AF.resample(x, rate, 16000), atol=1e-6, rtol=0)
    torch.testing.assert_close(resample(x[0], 16000, rate), AF.resample(x[0], 16000, rate), atol=1e-6, rtol=0)


@pytest.mark.parametrize("samples", [400, 1234, 48_000])
def test_fbank_equals_live_kaldi(samples):
    _, kaldi = _torchaudio()
    x = torch.from_numpy(np.random.default_rng(samples).uniform(-0.5, 0.5, size=samples).astype(np.float32))
    expected = kaldi.fbank(x[None], sample_frequency=16000, window_type="hanning", num_mel_bins=128)
    torch.testing.assert_close(F.log_mel(x), expected, atol=1e-5, rtol=0)
    banks, _ = kaldi.get_mel_banks(80, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
    torch.testing.assert_close(F.kaldi_mel_banks(80), banks, atol=1e-7, rtol=0)
