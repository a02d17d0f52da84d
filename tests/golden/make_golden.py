"""Make ``reference.npz``: torchaudio's and ASTFeatureExtractor's outputs on the fixed signals of signals.py.

Run once in a scratch venv where torchaudio works (torchaudio 2.11 is built for torch 2.11 - 2.14 and fails to
import next to later releases); the project never imports torchaudio, and its tests compare against this file::

    python3 -m venv /tmp/ta && . /tmp/ta/bin/activate
    pip install torch==2.14.1 torchaudio==2.11.0 transformers soundfile
    python tests/golden/make_golden.py        # writes tests/golden/reference.npz and reference.json

Contents (all float32):
- ``resample/<rate>``: ``torchaudio.functional.resample(resample_input(rate), rate, 16000)``, default arguments.
- ``mel_banks/<bins>``: ``torchaudio.compliance.kaldi.get_mel_banks(bins, 512, 16000, 20, 0, 100, -500, 1)[0]``.
- ``fbank/<n>``: ``torchaudio.compliance.kaldi.fbank`` exactly as ASTFeatureExtractor calls it, on
  ``signal(n, 16000)``; under 400 samples (25 ms) kaldi refuses the input, so the signal is zero-padded to 400
  samples first, which is what ast-cli does with such clips.
- ``extractor/audioset/<n>`` and ``extractor/speech_commands/16000``: ``ASTFeatureExtractor(...)(x)`` on its
  torchaudio path, default AudioSet settings and the speech-commands settings (max_length 128).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from signals import EXTRACTOR_LENGTHS, FBANK_LENGTHS, RESAMPLE_RATES, checksum, resample_input, signal  # noqa: E402

SPEECH_COMMANDS = dict(max_length=128, mean=-6.845978, std=5.5654526)


def main() -> None:
    import torchaudio
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as AF
    import transformers
    from transformers import ASTFeatureExtractor
    from transformers.utils import is_speech_available

    assert is_speech_available(), "ASTFeatureExtractor would take its numpy path: torchaudio must import"
    out: dict[str, np.ndarray] = {}
    sums: dict[str, float] = {}

    for rate in RESAMPLE_RATES:
        x = resample_input(rate)
        out[f"resample/{rate}"] = AF.resample(torch.from_numpy(x), rate, 16000).numpy()
        sums[f"resample/{rate}"] = checksum(x)

    for bins in (128, 64, 23):
        banks, _ = kaldi.get_mel_banks(bins, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
        out[f"mel_banks/{bins}"] = banks.numpy()

    for n in FBANK_LENGTHS:
        x = signal(n, 16000, seed=n % 89)
        sums[f"fbank/{n}"] = checksum(x)
        x = np.pad(x, (0, max(0, 400 - n)))
        fbank = kaldi.fbank(torch.from_numpy(x)[None], sample_frequency=16000, window_type="hanning", num_mel_bins=128)
        out[f"fbank/{n}"] = fbank.numpy()

    audioset = ASTFeatureExtractor()
    for n in EXTRACTOR_LENGTHS:
        x = signal(n, 16000, seed=n % 83)
        sums[f"extractor/audioset/{n}"] = checksum(x)
        out[f"extractor/audioset/{n}"] = audioset(x, sampling_rate=16000, return_tensors="np")["input_values"][0]
    speech = ASTFeatureExtractor(**SPEECH_COMMANDS)
    x = signal(16000, 16000, seed=5)
    sums["extractor/speech_commands/16000"] = checksum(x)
    out["extractor/speech_commands/16000"] = speech(x, sampling_rate=16000, return_tensors="np")["input_values"][0]

    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    np.savez_compressed(HERE / "reference.npz", **out)
    meta = {
        "made_with": {"torch": torch.__version__, "torchaudio": torchaudio.__version__,
                      "transformers": transformers.__version__, "numpy": np.__version__},
        "input_checksums": sums,
        "speech_commands": SPEECH_COMMANDS,
    }
    (HERE / "reference.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(out)} arrays to {HERE / 'reference.npz'} ({(HERE / 'reference.npz').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
