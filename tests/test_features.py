"""Features against ASTFeatureExtractor, and our decode + resample against the transformers pipeline's path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio.functional as AF
from transformers import ASTFeatureExtractor

from ast_cli import features as F
from ast_cli.audio import AudioReader, StreamingResampler, load_audio
from conftest import reference_waveform, tone, write_audio

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def extractor():
    return ASTFeatureExtractor()


def _reference(extractor, waveform: np.ndarray) -> torch.Tensor:
    return extractor(waveform, sampling_rate=16000, return_tensors="pt")["input_values"][0]


@pytest.mark.parametrize(
    "samples",
    [400, 401, 8000, 160_000, 163_840, 164_080, 164_240, 250_000],
    ids=["one-frame", "401", "0.5s", "10s-998-frames", "1022-frames", "exactly-1024-frames", "1025-frames", "15.6s"],
)
def test_features_match_extractor(extractor, samples):
    waveform = tone(samples / 16000, seed=samples)[:, 0]
    assert waveform.shape[0] == samples
    expected = _reference(extractor, waveform)
    got = F.extract(torch.from_numpy(waveform), F.FeatureConfig())
    assert got.shape == expected.shape == (1024, 128)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_padding_and_floor_values(extractor):
    silence = np.zeros(16000, dtype=np.float32)
    got = F.extract(torch.from_numpy(silence), F.FeatureConfig())
    torch.testing.assert_close(got, _reference(extractor, silence), atol=TOLERANCE, rtol=0)
    assert got[-1, 0].item() == pytest.approx(0.46703, abs=1e-5)  # a padded frame
    assert got[0, 0].item() == pytest.approx(-1.27759, abs=1e-5)  # a floored bin


def test_speech_commands_shape_and_normalization():
    extractor = ASTFeatureExtractor(max_length=128, mean=-6.845978, std=5.5654526)
    cfg = F.FeatureConfig(max_length=128, mean=-6.845978, std=5.5654526)
    waveform = tone(1.0, seed=3)[:, 0]
    torch.testing.assert_close(F.extract(torch.from_numpy(waveform), cfg), _reference(extractor, waveform),
                               atol=TOLERANCE, rtol=0)


def test_shorter_than_one_frame_is_padded_to_400_samples(extractor):
    waveform = tone(0.01, seed=4)[:, 0]  # 160 samples
    padded = np.pad(waveform, (0, 400 - waveform.shape[0]))
    got = F.extract(torch.from_numpy(waveform), F.FeatureConfig())
    torch.testing.assert_close(got, _reference(extractor, padded), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("fmt,subtype", [("wav", "PCM_16"), ("flac", "PCM_24"), ("ogg", "VORBIS"), ("wav", "FLOAT")])
@pytest.mark.parametrize("sample_rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_decode_and_resample_match_pipeline_path(tmp_path, extractor, fmt, subtype, sample_rate, channels):
    path = write_audio(tmp_path / f"clip.{fmt}", 3.3, sample_rate, channels, seed=sample_rate + channels,
                       subtype=subtype)
    expected_wave = reference_waveform(path)
    waveform, duration = load_audio(path)
    assert duration == pytest.approx(3.3, abs=1e-3)
    assert waveform.shape == expected_wave.shape
    np.testing.assert_allclose(waveform, expected_wave, atol=1e-6, rtol=0)
    got = F.extract(torch.from_numpy(waveform), F.FeatureConfig())
    torch.testing.assert_close(got, _reference(extractor, expected_wave), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("orig", [8000, 11025, 22050, 32000, 44100, 48000, 96000])
def test_streaming_resampler_equals_one_call(orig):
    x = tone(7.3, orig, seed=orig)[:, 0]
    expected = AF.resample(torch.from_numpy(x), orig, 16000).numpy()
    resampler = StreamingResampler(orig)
    block = 12_345  # deliberately not a multiple of anything
    parts = [resampler.push(x[i : i + block]) for i in range(0, x.shape[0], block)] + [resampler.finish()]
    got = np.concatenate(parts)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_reader_blocks_do_not_change_samples(tmp_path):
    path = write_audio(tmp_path / "long.wav", 20.0, 44100, 2)
    whole = reference_waveform(path)
    reader = AudioReader(path, block_seconds=1.7)
    got = np.concatenate(list(reader.blocks()))
    np.testing.assert_allclose(got, whole, atol=1e-6, rtol=0)
    assert reader.duration == pytest.approx(20.0)


@pytest.mark.parametrize("hop_frames", [None, 512, 300])
def test_frame_stream_windows_equal_extractor_on_each_window(extractor, hop_frames):
    """Window w of a long recording is exactly the reference extractor applied to that stretch of audio."""
    seconds = 31.7
    waveform = tone(seconds, seed=7)[:, 0]
    stream = F.FrameStream(F.FeatureConfig(), hop_frames)
    windows = []
    for i in range(0, waveform.shape[0], 50_000):
        windows += stream.push(torch.from_numpy(waveform[i : i + 50_000]))
    windows += stream.finish()
    hop = hop_frames or 1024
    n_frames = F.num_frames(waveform.shape[0])
    expected_count = 1 + -(-(n_frames - 1024) // hop)
    assert len(windows) == expected_count
    for w in windows:
        start = w.index * hop * F.HOP_LENGTH
        segment = waveform[start : start + F.FRAME_LENGTH + (1024 - 1) * F.HOP_LENGTH]
        torch.testing.assert_close(w.features, _reference(extractor, segment), atol=TOLERANCE, rtol=0)
        assert w.start == pytest.approx(w.index * hop / 100)
    assert windows[-1].end == pytest.approx(seconds)
    assert all(a.start < b.start for a, b in zip(windows, windows[1:]))


def test_frame_stream_short_clip_gives_one_window(extractor):
    stream = F.FrameStream(F.FeatureConfig())
    waveform = tone(0.005, seed=9)[:, 0]  # 80 samples
    windows = stream.push(torch.from_numpy(waveform)) + stream.finish()
    assert len(windows) == 1 and windows[0].start == 0.0 and windows[0].end == pytest.approx(0.005)
    torch.testing.assert_close(windows[0].features, _reference(extractor, np.pad(waveform, (0, 320))),
                               atol=TOLERANCE, rtol=0)
