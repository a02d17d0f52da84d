"""Sources: a file, an array and a byte stream (WAV with unknown length, raw PCM) give the same 16 kHz audio;
bad streams are clear errors; the Python API tags any of them."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from ast_cli import RunOptions, Tagger
from ast_cli.errors import AudioDecodeError
from ast_cli.audio.inputs import InputFile
from ast_cli.audio.resample import resample
from ast_cli.audio.sources import ArraySource, FileSource, StreamSource, as_sources
from conftest import reference_waveform, tone, write_audio
from tolerances import WAVEFORM


def collect(source) -> np.ndarray:
    return np.concatenate(list(source.blocks()))


def expected_16k(frames: np.ndarray, rate: int) -> np.ndarray:
    mono = frames.mean(axis=1).astype(np.float32) if frames.ndim == 2 else frames
    return resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, 16000).numpy() if rate != 16000 else mono


def wav_header(rate: int, channels: int, bits: int = 16, fmt: int = 1, data_size: int = 0xFFFFFFFF) -> bytes:
    """A WAV header as arecord and ffmpeg write to a pipe: unknown (max) sizes."""
    block = channels * bits // 8
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, rate * block, block, bits)
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt_chunk
            + b"LIST" + struct.pack("<I", 4) + b"INFO" + b"data" + struct.pack("<I", data_size))


def test_array_source_equals_the_file_path(tmp_path):
    path = write_audio(tmp_path / "x.flac", 2.3, 44100, 2, seed=3, subtype="PCM_24")
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    array = ArraySource(data, rate, name="mine")
    np.testing.assert_allclose(collect(array), reference_waveform(path), atol=WAVEFORM, rtol=0)
    assert array.duration == pytest.approx(2.3) and array.name == "mine" and array.identity() == (None, None)
    file = FileSource(path)
    np.testing.assert_allclose(collect(file), collect(array), atol=WAVEFORM, rtol=0)
    assert file.identity() == (os.path.getsize(path), os.path.getmtime(path))


def test_array_source_scales_integers_and_refuses_empty_or_odd_shapes():
    ints = (tone(0.5)[:, 0] * 32767).astype(np.int16)
    np.testing.assert_allclose(collect(ArraySource(ints)), ints / 32768.0, atol=1e-7)  # float32 of an exact quotient: <= 0.5 ulp(1)
    with pytest.raises(AudioDecodeError, match="zero-length"):
        collect(ArraySource(np.zeros(0, np.float32)))
    with pytest.raises(ValueError):
        ArraySource(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("bits,fmt,dtype,scale", [(16, 1, "<i2", 32767), (32, 1, "<i4", 2**31 - 1),
                                                   (32, 3, "<f4", 1.0)])
def test_wav_stream_with_unknown_length_reads_to_eof(bits, fmt, dtype, scale):
    frames = tone(1.7, 22050, 2, seed=bits)
    pcm = (frames * scale).astype(dtype)
    stream = io.BytesIO(wav_header(22050, 2, bits, fmt) + pcm.tobytes())
    source = StreamSource(stream, "pipe")
    got = collect(source)
    as_float = pcm.astype(np.float64) / (1.0 if fmt == 3 else -np.iinfo(dtype).min)
    np.testing.assert_allclose(got, expected_16k(as_float.astype(np.float32), 22050), atol=WAVEFORM)
    assert (source.sample_rate, source.channels) == (22050, 2) and source.duration == pytest.approx(1.7)


def test_wav_stream_with_a_known_length_stops_there():
    pcm = (tone(1.0, 16000)[:, 0] * 32767).astype("<i2")
    stream = io.BytesIO(wav_header(16000, 1, data_size=pcm.nbytes) + pcm.tobytes() + b"trailing junk")
    assert collect(StreamSource(stream)).shape == (16000,)


@pytest.mark.parametrize("sample_format,dtype,scale", [("s16le", "<i2", 32767), ("s32le", "<i4", 2**31 - 1),
                                                       ("f32le", "<f4", 1.0)])
def test_raw_pcm_stream(sample_format, dtype, scale):
    frames = tone(1.2, 48000, 2, seed=7)
    pcm = (frames * scale).astype(dtype)
    source = StreamSource(io.BytesIO(pcm.tobytes()), raw=True, sample_rate=48000, channels=2,
                          sample_format=sample_format, chunk_seconds=0.013)  # reads not aligned to anything
    as_float = pcm.astype(np.float64) / (1.0 if sample_format == "f32le" else -np.iinfo(dtype).min)
    np.testing.assert_allclose(collect(source), expected_16k(as_float.astype(np.float32), 48000), atol=WAVEFORM)


def test_stream_from_a_real_pipe_arrives_while_the_writer_writes():
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, struct\n"
        f"sys.stdout.buffer.write({wav_header(16000, 1)!r}); sys.stdout.flush()\n"
        "for _ in range(5):\n"
        "    sys.stdout.buffer.write(b'\\x10\\x00' * 8000); sys.stdout.flush(); time.sleep(0.2)\n")],
        stdout=subprocess.PIPE)
    source = StreamSource(writer.stdout, "pipe", chunk_seconds=0.1)
    blocks = source.blocks()
    first = next(blocks)
    assert writer.poll() is None  # the first audio is here before the writer has finished
    rest = list(blocks)
    writer.wait()
    assert first.shape[0] + sum(b.shape[0] for b in rest) == 40000


@pytest.mark.parametrize("data, message", [
    (b"", "ended before a WAV header"),
    (b"OggS" + b"\x00" * 40, "not a WAV stream"),
    (b"RIFF\xff\xff\xff\xffWAVEfmt ", "truncated WAV header"),
    (wav_header(16000, 1, bits=24), "unsupported WAV sample format"),
    (wav_header(16000, 1), "no audio samples"),
])
def test_bad_streams_are_one_clear_error(data, message):
    with pytest.raises(AudioDecodeError, match=message):
        collect(StreamSource(io.BytesIO(data)))


def test_23_2_a_stream_header_with_an_absurd_rate_is_refused_before_any_audio():
    header = bytearray(wav_header(16000, 1))
    header[24:28] = struct.pack("<I", 0xFFFFFFFF)  # the fmt chunk's sample rate: 4294967295 Hz
    with pytest.raises(AudioDecodeError, match="^unsupported sample rate 4294967295 Hz"):
        collect(StreamSource(io.BytesIO(bytes(header) + b"\x00\x01" * 16000)))
    with pytest.raises(AudioDecodeError, match="unsupported sample rate 1000000000 Hz"):
        collect(ArraySource(np.zeros(10, np.float32), 10**9))


def test_as_sources_takes_paths_inputs_and_sources(tmp_path):
    array = ArraySource(np.zeros(100, np.float32))
    got = as_sources(["a.wav", tmp_path / "b.wav", InputFile("c.wav", error="no such file"), array])
    assert [type(s).__name__ for s in got] == ["FileSource", "FileSource", "FileSource", "ArraySource"]
    assert got[2].error == "no such file" and got[3] is array
    with pytest.raises(TypeError):
        as_sources([42])


def test_python_api_tags_a_file_an_array_and_a_stream_alike(tiny_checkpoint, tmp_path):
    path = write_audio(tmp_path / "x.wav", 1.5, 16000, 1, seed=4, subtype="FLOAT")
    data, _ = sf.read(str(path), dtype="float32")
    raw = io.BytesIO(data.astype("<f4").tobytes())
    tagger = Tagger.load(str(tiny_checkpoint[0]), RunOptions(device="cpu", workers=1))
    results = list(tagger.classify([str(path), ArraySource(data, 16000, "array"),
                                    StreamSource(raw, "stream", raw=True, sample_rate=16000, channels=1,
                                                 sample_format="f32le")]))
    assert [r.path for r in results] == [str(path), "array", "stream"]
    scores = [[(x.index, round(x.score, 6)) for x in r.labels] for r in results]
    assert scores[0] == scores[1] == scores[2] and len(scores[0]) == 5
