"""Make ``reference.npz`` and ``reference64.npz``: torchaudio's and ASTFeatureExtractor's outputs on the fixed
signals of signals.py, in float32 as they run (``reference.npz``) and evaluated in float64 (``reference64.npz``).

Run once in a scratch venv where torchaudio works (torchaudio 2.11 is built for torch 2.11 - 2.14 and fails to
import next to later releases); the project never imports torchaudio, and its tests compare against this file::

    python3 -m venv /tmp/ta && . /tmp/ta/bin/activate
    pip install torch==2.14.1 torchaudio==2.11.0 transformers soundfile
    python tests/golden/make_golden.py        # writes reference.npz, reference64.npz and reference.json
    python tests/golden/make_golden.py --float64-only   # only reference64.npz (keeps reference.npz's processor)

Why two files: a float32 output records the rounding of the processor it ran on (libm's logf, the SIMD path of
the FFT and of the matmuls), so ``reference.npz`` (made on an AMD Zen 3) differs from the same torchaudio run on an
Intel Sapphire Rapids by up to 1e-5 in the mel banks. The float64 evaluation of the same code is the same on
every processor to ~1e-15, far below float32's rounding, so the tests compare against ``reference64.npz`` with
tolerances derived from float32's error (tests/tolerances.py), and check that ``reference.npz``, one real
processor's float32 output, lies within them too.

Contents of ``reference.npz`` (all float32):
- ``resample/<rate>``: ``torchaudio.functional.resample(resample_input(rate), rate, 16000)``, default arguments.
- ``mel_banks/<bins>``: ``torchaudio.compliance.kaldi.get_mel_banks(bins, 512, 16000, 20, 0, 100, -500, 1)[0]``.
- ``fbank/<n>``: ``torchaudio.compliance.kaldi.fbank`` exactly as ASTFeatureExtractor calls it, on
  ``signal(n, 16000)``; under 400 samples (25 ms) kaldi refuses the input, so the signal is zero-padded to 400
  samples first, which is what ast-cli does with such clips.
- ``extractor/audioset/<n>`` and ``extractor/speech_commands/16000``: ``ASTFeatureExtractor(...)(x)`` on its
  torchaudio path, default AudioSet settings and the speech-commands settings (max_length 128).

``reference64.npz`` holds the same keys in float64: torchaudio's own functions run with
``torch.set_default_dtype(torch.float64)`` on the float64 signals (kaldi's log floor stays float32's eps, as
torchaudio's ``EPSILON`` is), and for the extractor keys transformers' padding and normalization applied to that
fbank in float64: zero frames appended or the first ``max_length`` kept, then ``(x - mean) / (2 * std)``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from signals import EXTRACTOR_LENGTHS, FBANK_LENGTHS, RESAMPLE_RATES, checksum, resample_input, signal  # noqa: E402

SPEECH_COMMANDS = dict(max_length=128, mean=-6.845978, std=5.5654526)


def main(float64_only: bool = False) -> None:
    import torchaudio
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as AF
    import transformers
    from transformers import ASTFeatureExtractor
    from transformers.utils import is_speech_available

    made_with = {"torch": torch.__version__, "torchaudio": torchaudio.__version__,
                 "transformers": transformers.__version__, "numpy": np.__version__, "cpu": _cpu()}
    if float64_only:  # keep reference.npz as the record of the processor it was made on
        meta = json.loads((HERE / "reference.json").read_text())
    else:
        assert is_speech_available(), "ASTFeatureExtractor would take its numpy path: torchaudio must import"
        out, sums = float32_references(kaldi, AF, ASTFeatureExtractor)
        np.savez_compressed(HERE / "reference.npz", **out)
        meta = {"made_with": made_with, "input_checksums": sums, "speech_commands": SPEECH_COMMANDS}
    out64 = float64_references(kaldi, AF)
    assert out64.keys() == set(meta["input_checksums"]) | {f"mel_banks/{b}" for b in (128, 64, 23)}
    np.savez_compressed(HERE / "reference64.npz", **out64)
    meta["made_with_float64"] = made_with
    (HERE / "reference.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for name in ("reference.npz", "reference64.npz"):
        print(f"{HERE / name}: {(HERE / name).stat().st_size} bytes")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def float32_references(kaldi, AF, ASTFeatureExtractor) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """torchaudio and ASTFeatureExtractor as they run, in float32 (see the module docstring)."""
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

    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}, sums


def float64_references(kaldi, AF) -> dict[str, np.ndarray]:
    """The same outputs with torchaudio's code evaluated in float64 (see the module docstring)."""
    torch.set_default_dtype(torch.float64)  # get_mel_banks builds its tensors in the default dtype
    try:
        out: dict[str, np.ndarray] = {}
        for rate in RESAMPLE_RATES:
            x = torch.from_numpy(resample_input(rate).astype(np.float64))
            out[f"resample/{rate}"] = AF.resample(x, rate, 16000).numpy()
        for bins in (128, 64, 23):
            out[f"mel_banks/{bins}"] = kaldi.get_mel_banks(bins, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)[0].numpy()

        def fbank(x: np.ndarray, bins: int = 128) -> np.ndarray:
            x = torch.from_numpy(np.pad(x.astype(np.float64), (0, max(0, 400 - x.shape[0]))))[None]
            got = kaldi.fbank(x, sample_frequency=16000, window_type="hanning", num_mel_bins=bins)
            assert got.dtype == torch.float64
            return got.numpy()

        def extractor(x: np.ndarray, max_length: int, mean: float, std: float) -> np.ndarray:
            frames = fbank(x)[:max_length]  # transformers: truncate, or pad with zero frames, then normalize
            frames = np.pad(frames, ((0, max_length - frames.shape[0]), (0, 0)))
            return (frames - mean) / (std * 2)

        for n in FBANK_LENGTHS:
            out[f"fbank/{n}"] = fbank(signal(n, 16000, seed=n % 89))
        audioset = dict(max_length=1024, mean=-4.2677393, std=4.5689974)  # ASTFeatureExtractor's defaults
        for n in EXTRACTOR_LENGTHS:
            out[f"extractor/audioset/{n}"] = extractor(signal(n, 16000, seed=n % 83), **audioset)
        out["extractor/speech_commands/16000"] = extractor(signal(16000, 16000, seed=5), **SPEECH_COMMANDS)
        return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}
    finally:
        torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main(float64_only="--float64-only" in sys.argv[1:])
