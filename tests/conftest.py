"""Shared fixtures: random AST checkpoints saved by transformers itself (the reference), and generated audio."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

# Small shapes that keep every code path (two layers, several heads, strides that leave a remainder).
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_length=64,
    num_mel_bins=128,
    frequency_stride=10,
    time_stride=10,
)


def make_reference(tmp_path: Path, name: str = "tiny", num_labels: int = 527, seed: int = 0,
                   mean=-4.2677393, std=4.5689974, **overrides):
    """Save a random ``ASTForAudioClassification`` (+ feature extractor) with ``save_pretrained``.

    Returns (directory, model, feature_extractor). Weights are random but non-trivial: LayerNorm
    affine parameters and biases are perturbed so that a wrong mapping cannot pass by accident.
    """
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    from ast_cli.checkpoint.weights import load_labels

    labels = load_labels("audioset") if num_labels == 527 else tuple(f"class {i}" for i in range(num_labels))
    params = dict(TINY if name.startswith("tiny") else {}, **overrides)
    config = ASTConfig(
        **params,
        num_labels=num_labels,
        id2label={i: label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = ASTForAudioClassification(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layernorm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if pname.endswith(("cls_token", "distillation_token", "position_embeddings")):
                p.copy_(torch.randn_like(p) * 0.5)
    extractor = ASTFeatureExtractor(max_length=config.max_length, num_mel_bins=config.num_mel_bins, mean=mean, std=std)
    directory = tmp_path / name
    model.save_pretrained(directory)
    extractor.save_pretrained(directory)
    return directory, model, extractor


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(directory, transformers model, feature extractor) of a tiny AudioSet-labelled checkpoint."""
    return make_reference(tmp_path_factory.mktemp("ckpt"), "tiny")


@pytest.fixture(scope="session")
def encoder(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint without its classifier: a bare encoder (no labels)."""
    import json

    from safetensors.torch import load_file, save_file

    source, folder = tiny_checkpoint[0], tmp_path_factory.mktemp("encoder") / "encoder"
    folder.mkdir()
    state = {k: v for k, v in load_file(source / "model.safetensors").items() if not k.startswith("classifier.")}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    for key in ("id2label", "label2id"):
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_bytes((source / "preprocessor_config.json").read_bytes())
    return folder


def tone(seconds: float, sample_rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A reproducible test signal: two tones plus noise, (frames, channels) float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    out = []
    for c in range(channels):
        x = 0.3 * np.sin(2 * np.pi * (440 + 110 * c) * t) + 0.2 * np.sin(2 * np.pi * 3000 * t + c)
        x += 0.05 * rng.standard_normal(n)
        out.append(x * (0.5 + 0.5 * np.sin(2 * np.pi * 0.5 * t + c)))
    return np.stack(out, axis=1).astype(np.float32)


def write_audio(path: Path, seconds: float, sample_rate: int = 16000, channels: int = 1, seed: int = 0,
                **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, sample_rate, channels, seed), sample_rate, **kwargs)
    return path


def reference_waveform(path: Path) -> np.ndarray:
    """The transformers pipeline's path to the extractor: soundfile -> mean downmix -> one-shot resample to 16 kHz.

    The resampler is ``ast_cli.audio.resample.resample`` called once on the whole signal: torchaudio's algorithm,
    pinned to torchaudio's own output by tests/golden (torchaudio itself does not import next to current torch).
    """
    from ast_cli.audio.resample import resample

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1).astype(np.float32)
    if sr != 16000:
        mono = resample(torch.from_numpy(mono), sr, 16000).numpy()
    return mono


def sigint_default() -> None:
    """``preexec_fn`` for a child a test will Ctrl-C. A job a shell starts in the background (``pytest &``, nohup,
    some CI runners) has SIGINT ignored, the child inherits that, and Python then rightly keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def trickle_fifo(path: Path, limit_seconds: float = 120.0, opened: threading.Event | None = None) -> Path:
    """A named pipe that a thread feeds with a live WAV stream, 0.1 s of audio every 0.1 s, until its reader goes
    away or ``limit_seconds`` pass. As the last input of a run it keeps the run busy however fast the processor is,
    so that a test's signal always lands mid-run. ``opened`` is set once the run has opened the pipe."""
    from test_sources import wav_header

    os.mkfifo(path)
    chunk = (tone(0.1)[:, 0] * 32767).astype("<i2").tobytes()

    def feed() -> None:
        try:
            with open(path, "wb") as pipe:  # blocks until the run opens it
                if opened is not None:
                    opened.set()
                pipe.write(wav_header(16000, 1))
                deadline = time.monotonic() + limit_seconds
                while time.monotonic() < deadline:
                    pipe.write(chunk)
                    pipe.flush()
                    time.sleep(0.1)
        except OSError:  # the reader went away: BrokenPipeError
            pass

    threading.Thread(target=feed, daemon=True).start()
    return path


def extractor_uses_torchaudio() -> bool:
    """Whether transformers' ASTFeatureExtractor takes its torchaudio (kaldi) path here."""
    from transformers.utils import is_speech_available

    return is_speech_available()


def reference_features(extractor, waveform: np.ndarray) -> torch.Tensor:
    """(1, max_length, num_mel_bins) model input for ``waveform`` (16 kHz mono) with ``extractor``'s settings.

    With a working torchaudio, transformers' extractor itself. Without one it would take its numpy path, which
    differs from the torchaudio path by ~5e-5, so both models are fed the kaldi features of ``ast_cli.audio.features``
    instead: those equal the torchaudio path within 1e-5 (tests/test_features.py, against tests/golden).
    """
    if extractor_uses_torchaudio():
        return extractor(waveform, sampling_rate=16000, return_tensors="pt")["input_values"]
    from ast_cli.audio.features import FeatureConfig, extract

    cfg = FeatureConfig(num_mel_bins=extractor.num_mel_bins, max_length=extractor.max_length,
                        mean=extractor.mean, std=extractor.std, do_normalize=extractor.do_normalize)
    return extract(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), cfg)[None]


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path_factory):
    """Tests never touch the real hub or the user's cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("AST_TEST_HF_OFFLINE", "1"))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_ASSETS_CACHE", raising=False)  # the embedding cache lives there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))  # --fast's choices
    monkeypatch.delenv("AST_DEBUG", raising=False)
    # --fast takes a calibration made on a busy machine again when the machine is quiet: the suite's own load comes
    # and goes, so that the tests that count calibrations are not at its mercy, the machine is never busy here
    # (tests/test_fast.py tests that rule with a machine_busy of their own)
    monkeypatch.setattr("ast_cli.run.fast.machine_busy", lambda: False)
