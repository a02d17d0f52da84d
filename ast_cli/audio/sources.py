"""Sources: audio arriving in blocks, whatever it comes from. The engine knows nothing else about its input.

An ``AudioSource`` has a ``name`` (what its record is called: the path as given, or a label) and ``blocks()``,
which yields 16 kHz mono float32 arrays and raises ``AudioDecodeError`` on bad data. ``duration`` (seconds of
the original audio) is exact once ``blocks()`` is exhausted. ``identity()`` gives (size, mtime) for sources
that are files, so that ``--resume`` can tell whether a file changed.

- ``FileSource``: a file, decoded with soundfile (libsndfile) or the ffmpeg executable (``audio.AudioReader``);
  a pipe or device path (``/dev/stdin``, ``<(...)``) is read once as a WAV stream.
- ``ArraySource``: samples already in memory, at any rate, mono or (frames, channels).
- ``StreamSource``: a byte stream (a pipe, a socket, stdin): WAV, including the unknown-length headers that
  ``arecord`` and ffmpeg write to pipes, or raw PCM (s16le, s32le, f32le) at a given rate and channel count.
- ``PipedAudio``: one audio file of any format libsndfile reads, arriving on a byte stream (``sox ... - |``);
  ``sniff`` tells such a stream from a list of paths by its first bytes.

A source is cheap to create; all work happens in ``blocks()``, on the engine's worker thread.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from typing import BinaryIO, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np

from .decode import BLOCK_SECONDS, MAX_BLOCK_BYTES, AudioReader, ToModelRate, open_pipe
from ..errors import AudioDecodeError

SAMPLE_FORMATS = {"s16le": "<i2", "s32le": "<i4", "f32le": "<f4"}

# How audio files begin: WAV (RIFF, big-endian RIFX, RF64, Sony Wave64 "riff"), FLAC, Ogg, an ID3 tag (mp3), AIFF
# (FORM), Sun/NeXT AU (.snd), Apple CAF (caff); an MPEG frame sync (0xFF, then three more set bits) is checked in
# ``starts_like_audio``. No list of paths begins so.
AUDIO_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"riff", b"fLaC", b"OggS", b"ID3", b"FORM", b".snd", b"caff")
BINARY_PROBE = 512  # bytes of a stream looked at for a NUL, which no list of paths holds
MAX_PIPED_BYTES = 1 << 30  # a non-WAV file on a pipe is held in memory (libsndfile seeks): at most this much


@runtime_checkable
class AudioSource(Protocol):
    name: str

    def blocks(self) -> Iterator[np.ndarray]:
        """(samples,) float32 at 16 kHz, in order; raises AudioDecodeError."""
        ...

    @property
    def duration(self) -> float | None:
        ...

    def identity(self) -> tuple[int | None, float | None]:
        ...


class _InMemory:
    """A source with no file behind it: nothing identifies it across runs, so a resumed run never skips it."""

    def identity(self) -> tuple[int | None, float | None]:
        return None, None


class FileSource:
    """A file on disk. ``error`` marks an argument that is already known to be unusable (no such file)."""

    def __init__(self, path: str | os.PathLike, *, error: str | None = None, block_seconds: float = BLOCK_SECONDS):
        self.path = os.fspath(path)
        self.name = self.path
        self.error = error
        self.block_seconds = block_seconds
        self._reader: AudioReader | StreamSource | None = None
        self._duration: float | None = None

    def blocks(self) -> Iterator[np.ndarray]:
        if self.error:
            raise AudioDecodeError(self.error)
        try:
            if _is_stream(self.path):  # /dev/stdin, <(sox ... -t wav -), a named pipe: read once, as a WAV stream
                with open_pipe(self.path) as pipe:  # no writer, or one gone quiet: an error record, not a hang
                    self._reader = StreamSource(io.BufferedReader(pipe), self.name)
                    yield from self._reader.blocks()
                return
            self._reader = AudioReader(self.path, block_seconds=self.block_seconds)
            yield from self._reader.blocks()
        finally:  # keep the duration, not the reader: a batch of a million sources stays small
            self._duration, self._reader = self.duration, None

    @property
    def duration(self) -> float | None:
        return self._reader.duration if self._reader is not None else self._duration

    def identity(self) -> tuple[int | None, float | None]:
        try:
            stat = os.stat(self.path)
        except (OSError, ValueError):
            return None, None
        return stat.st_size, stat.st_mtime

    def __repr__(self) -> str:
        return f"FileSource({self.path!r})"


class ArraySource(_InMemory):
    """Samples in memory: (n,) mono or (n, channels), any float or int dtype (ints are scaled to [-1, 1])."""

    def __init__(self, samples, sample_rate: int = 16000, name: str = "<array>"):
        samples = np.asarray(samples)
        if samples.ndim not in (1, 2):
            raise ValueError(f"expected (samples,) or (samples, channels), got shape {samples.shape}")
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float32) / float(-np.iinfo(samples.dtype).min)
        self.samples = samples.astype(np.float32, copy=False)
        self.sample_rate = int(sample_rate)
        self.name = name
        self._converter: ToModelRate | None = None

    def blocks(self) -> Iterator[np.ndarray]:
        if self.samples.shape[0] == 0:
            raise AudioDecodeError("no audio samples (zero-length audio)")
        self._converter = convert = ToModelRate(self.sample_rate)
        step = max(1, int(BLOCK_SECONDS * self.sample_rate))
        for start in range(0, self.samples.shape[0], step):
            out = convert.push(self.samples[start : start + step])
            if out.shape[0]:
                yield out
        yield from _tail(convert)

    @property
    def duration(self) -> float | None:
        return self._converter.duration if self._converter is not None else None


class StreamSource(_InMemory):
    """Audio read from a binary stream until EOF: WAV (``raw=False``), or raw PCM with ``sample_rate``,
    ``channels`` and ``sample_format`` (s16le, s32le or f32le).

    WAV headers written to a pipe often give no length (0 or 0xFFFFFFFF in the RIFF and data sizes): the data
    then runs to EOF. ``chunk_seconds`` is how much audio each read asks for, so a live stream is passed on
    as it arrives.
    """

    def __init__(self, stream: BinaryIO, name: str = "<stream>", *, raw: bool = False, sample_rate: int | None = None,
                 channels: int | None = None, sample_format: str = "s16le", chunk_seconds: float = 0.1):
        if raw and (not sample_rate or not channels):
            raise ValueError("raw PCM needs sample_rate and channels")
        if sample_format not in SAMPLE_FORMATS:
            raise ValueError(f"sample_format must be one of {', '.join(SAMPLE_FORMATS)}")
        self.stream = stream
        self.name = name
        self.raw = raw
        self.sample_rate = sample_rate
        self.channels = channels
        self.dtype = np.dtype(SAMPLE_FORMATS[sample_format])
        self.chunk_seconds = chunk_seconds
        self._converter: ToModelRate | None = None

    def blocks(self) -> Iterator[np.ndarray]:
        if self.raw:
            dtype, remaining = self.dtype, None
        else:
            dtype, remaining = self._read_wav_header()
        frame_bytes = dtype.itemsize * self.channels
        want = max(1, int(self.chunk_seconds * self.sample_rate)) * frame_bytes
        want = min(want, MAX_BLOCK_BYTES - MAX_BLOCK_BYTES % frame_bytes)
        self._converter = convert = ToModelRate(self.sample_rate)
        pending = b""
        while remaining is None or remaining > 0:
            chunk = self._read(want if remaining is None else min(want, remaining))
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            pending += chunk
            usable = len(pending) - len(pending) % frame_bytes
            if usable:
                frames = np.frombuffer(pending[:usable], dtype=dtype).reshape(-1, self.channels)
                pending = pending[usable:]
                out = convert.push(_to_float(frames))
                if out.shape[0]:
                    yield out
        if convert.frames_in == 0:
            raise AudioDecodeError("no audio samples (the stream ended before any audio)")
        yield from _tail(convert)

    def _read(self, n: int) -> bytes:
        reader = getattr(self.stream, "read1", None) or self.stream.read
        try:
            return reader(n)
        except OSError as exc:
            raise AudioDecodeError(f"cannot read the stream: {exc.strerror or exc}") from None

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.stream.read(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def _read_wav_header(self) -> tuple[np.dtype, int | None]:
        """Parse RIFF/WAVE chunks up to ``data``; sets rate and channels; returns (sample dtype, data bytes or None)."""
        head = self._read_exact(12)
        if len(head) < 12:
            raise AudioDecodeError("no audio samples (the stream ended before a WAV header)")
        if head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            raise AudioDecodeError("not a WAV stream (for raw PCM, give the rate, channels and sample format)")
        dtype = None
        while True:
            chunk = self._read_exact(8)
            if len(chunk) < 8:
                raise AudioDecodeError("truncated WAV header (no data chunk)")
            kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if kind == b"fmt ":
                body = self._read_exact(size + (size & 1))
                if len(body) < 16:
                    raise AudioDecodeError("truncated WAV header (fmt chunk)")
                tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
                if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the GUID
                    tag = struct.unpack("<H", body[24:26])[0]
                dtype = {(1, 16): "<i2", (1, 32): "<i4", (3, 32): "<f4", (3, 64): "<f8", (1, 8): "u1"}.get((tag, bits))
                if dtype is None:
                    raise AudioDecodeError(f"unsupported WAV sample format (format {tag}, {bits} bits)")
                if channels < 1 or rate < 1:
                    raise AudioDecodeError("invalid WAV header (no channels or sample rate)")
                self.channels, self.sample_rate = channels, rate
            elif kind == b"data":
                if dtype is None:
                    raise AudioDecodeError("invalid WAV header (data before fmt)")
                unknown = size in (0, 0xFFFFFFFF) or head[:4] == b"RF64"
                return np.dtype(dtype), None if unknown else size
            else:
                self._read_exact(size + (size & 1))  # LIST, fact, ...: skipped

    @property
    def duration(self) -> float | None:
        return self._converter.duration if self._converter is not None else None


def starts_like_audio(head: bytes) -> bool:
    """Whether bytes open like an audio file (see ``AUDIO_MAGIC``) rather than like text."""
    return head.startswith(AUDIO_MAGIC) or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)


class _Prefixed(io.RawIOBase):
    """``head`` (bytes already read from ``stream``), then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = (getattr(self.stream, "read1", None) or self.stream.read)(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def sniff(stream: BinaryIO) -> tuple[str, io.BufferedReader]:
    """What ``stream`` holds, ``"audio"`` (it opens like an audio file), ``"binary"`` (a NUL among the bytes
    already there, at most ``BINARY_PROBE``: no text list of paths holds one) or ``"text"``, and a stream that
    still gives every byte, the first ones too. Never waits for more than the first 4 bytes and one read."""
    head = b""
    while len(head) < 4:
        chunk = stream.read(4 - len(head))
        if not chunk:
            break
        head += chunk
    if starts_like_audio(head):
        kind = "audio"
    else:
        if len(head) == 4:
            head += (getattr(stream, "read1", None) or stream.read)(BINARY_PROBE)
        kind = "binary" if b"\x00" in head else "text"
    return kind, io.BufferedReader(_Prefixed(head, stream))


class PipedAudio(_InMemory):
    """One audio file arriving on a byte stream (``sox in.flac -t flac - | ast classify -``). WAV (RIFF, RF64) is
    read as it comes, pipe headers of unknown length included (``StreamSource``); the other formats libsndfile
    reads (FLAC, Ogg, mp3, AIFF, RIFX) need to seek, so they are read into memory first, at most ``max_bytes``."""

    def __init__(self, stream: BinaryIO, name: str = "-", max_bytes: int = MAX_PIPED_BYTES):
        self.stream = stream if hasattr(stream, "peek") else io.BufferedReader(_Prefixed(b"", stream))
        self.name = name
        self.max_bytes = max_bytes
        self._reader = None  # what knows the duration: a StreamSource, or a ToModelRate

    def blocks(self) -> Iterator[np.ndarray]:
        if self.stream.peek(4)[:4] in (b"RIFF", b"RF64"):
            self._reader = StreamSource(self.stream, self.name)
            yield from self._reader.blocks()
            return
        yield from self._decode(self._read_all())

    def _read_all(self) -> bytes:
        data = self.stream.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise AudioDecodeError(f"more than {self.max_bytes >> 20} MiB of non-WAV audio on a pipe: save it to a "
                                   "file, or pipe WAV, which is read as it comes")
        return data

    def _decode(self, data: bytes) -> Iterator[np.ndarray]:
        import soundfile as sf

        from .decode import _sf_reason

        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                self._reader = convert = ToModelRate(f.samplerate)
                frames = max(1, min(int(BLOCK_SECONDS * f.samplerate), MAX_BLOCK_BYTES // (4 * f.channels)))
                while True:
                    block = f.read(frames, dtype="float32", always_2d=True)  # (n, channels)
                    if block.shape[0] == 0:
                        break
                    out = convert.push(block)
                    if out.shape[0]:
                        yield out
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioDecodeError(f"not audio libsndfile can read: {_sf_reason(exc)}") from None
        if convert.frames_in == 0:
            raise AudioDecodeError("no audio samples (zero-length audio)")
        yield from _tail(convert)

    @property
    def duration(self) -> float | None:
        return self._reader.duration if self._reader is not None else None


def _tail(convert: ToModelRate) -> Iterator[np.ndarray]:
    """What the resampler still holds once the input has ended (nothing when it holds nothing)."""
    tail = convert.finish()
    if tail.shape[0]:
        yield tail


def _is_stream(path: str) -> bool:
    """A FIFO or character device (what a shell's ``<(...)`` and ``/dev/stdin`` are): no size, no seeking."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


def _to_float(frames: np.ndarray) -> np.ndarray:
    """PCM frames -> float32 in [-1, 1] (integers divided by their negative full scale, as libsndfile does)."""
    if frames.dtype == np.uint8:
        return (frames.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(frames.dtype, np.integer):
        return frames.astype(np.float32) / float(-np.iinfo(frames.dtype).min)
    return frames.astype(np.float32)


def as_sources(items: Iterable) -> list[AudioSource]:
    """Paths, ``inputs.InputFile``s and sources -> sources (``FileSource`` for paths)."""
    from .inputs import InputFile

    out: list[AudioSource] = []
    for item in items:
        if isinstance(item, InputFile):
            out.append(item.source if item.source is not None else FileSource(item.path, error=item.error))
        elif isinstance(item, (str, os.PathLike)):
            out.append(FileSource(item))
        elif isinstance(item, AudioSource):
            out.append(item)
        else:
            raise TypeError(f"not a path or an audio source: {item!r}")
    return out
