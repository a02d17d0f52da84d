"""Shared fixtures: random AST checkpoints saved by transformers itself (the reference), and generated audio."""

from __future__ import annotations

import os
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

    from ast_cli.weights import load_labels

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
    """What the transformers pipeline path feeds the extractor: soundfile -> mean downmix -> torchaudio resample."""
    import torchaudio.functional as AF

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1).astype(np.float32)
    if sr != 16000:
        mono = AF.resample(torch.from_numpy(mono), sr, 16000).numpy()
    return mono


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path_factory):
    """Tests never touch the real hub or the user's cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("AST_TEST_HF_OFFLINE", "1"))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("AST_DEBUG", raising=False)
