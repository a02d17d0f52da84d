"""Opt-in: the published checkpoint on the HF test clip gives the published logits.

Skipped unless both are on disk:
    AST_REAL_CHECKPOINT=/path/to/snapshot/of/MIT/ast-finetuned-audioset-10-10-0.4593 (or another AudioSet one)
    AST_TEST_CLIP=/path/to/sample_audio.flac   (dataset nielsr/audio-spectogram-transformer-checkpoint)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ast_cli.audio.decode import load_audio
from ast_cli.audio.features import extract
from ast_cli.checkpoint.weights import build_model, load_checkpoint

# From the transformers integration tests (AST_REFERENCE.md): logits[0, :3] on sample_audio.flac.
EXPECTED = {
    "audioset-10-10-0.4593": [-0.8760, -7.0042, -8.6602],
    "audioset-10-10-0.450": [-1.1986, -7.0903, -8.2718],
    "audioset-10-10-0.448-v2": [-1.5080, -7.4534, -8.8917],
    "audioset-10-10-0.448": [-2.6128, -8.0080, -9.4344],
    "audioset-12-12-0.447": [-0.5050, -6.5833, -8.0843],
    "audioset-14-14-0.443": [-0.3826, -7.0336, -8.2413],
    "audioset-16-16-0.442": [-1.2113, -6.9101, -8.3470],
}

CHECKPOINT = os.environ.get("AST_REAL_CHECKPOINT", "")
CLIP = os.environ.get("AST_TEST_CLIP", "")

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(not (CHECKPOINT and Path(CHECKPOINT).exists() and CLIP and Path(CLIP).is_file()),
                       reason="set AST_REAL_CHECKPOINT and AST_TEST_CLIP to run against the published weights"),
]


def _expected_for(path: str) -> list[float]:
    for name in sorted(EXPECTED, key=len, reverse=True):  # "-0.448-v2" before "-0.448"
        if name in path:
            return EXPECTED[name]
    return EXPECTED["audioset-10-10-0.4593"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_published_logits(attn):
    checkpoint = load_checkpoint(CHECKPOINT)
    model = build_model(checkpoint, attn=attn)
    waveform, _ = load_audio(CLIP)
    inputs = extract(torch.from_numpy(waveform), checkpoint.features)[None]
    with torch.inference_mode():
        logits = model(inputs)
    assert logits.shape == (1, 527)
    np.testing.assert_allclose(logits[0, :3].numpy(), _expected_for(CHECKPOINT), atol=1e-4)
