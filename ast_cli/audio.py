"""Audio decoding: any file -> 16 kHz mono float32 blocks, read and resampled piece by piece.

Decoding is soundfile (libsndfile: wav, flac, ogg/vorbis, opus, mp3, aiff, ...) first, then the ``ffmpeg``
executable for what libsndfile cannot read (m4a, aac, mp4, mkv, webm, wma, ...). Channels are averaged and
the result resampled to 16 kHz with the same band-limited sinc filter as ``torchaudio.functional.resample``
with its default arguments, which is what the transformers pipeline does, so scores line up with it
(``resample.py``; torchaudio itself is never imported).

Long files never sit in memory whole: ``StreamingResampler`` gives exactly the samples one
``resample`` call on the whole signal would give, one block at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import AudioDecodeError
from .resample import StreamingResampler

SAMPLE_RATE = 16000  # Hz, what every AST checkpoint expects
BLOCK_SECONDS = 30.0  # audio read per block; bounds memory for long files

# Extensions taken when walking directories (lower case, without the dot).
AUDIO_EXTENSIONS = frozenset(
    "wav wave flac ogg oga opus mp3 aif aiff aifc au snd caf w64 rf64 sd2 voc wv "
    "m4a m4b aac mp4 mkv mka webm wma wmv avi mov 3gp amr ac3".split()
)


@dataclass
class AudioInfo:
    """What is known about a file before decoding it."""

    sample_rate: int  # Hz, as stored
    channels: int
    frames: int | None  # samples per channel, if the container says
    decoder: str  # "soundfile" or "ffmpeg"
    truncated: str | None = None  # why the container looks cut short, if it does


def _soundfile_info(path: Path) -> AudioInfo | None:
    """Info from libsndfile, or None when it does not know the format."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except sf.LibsndfileError:
        return None
    except RuntimeError:  # older soundfile raises RuntimeError
        return None
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames), "soundfile",
                     truncated=_truncation(info.extra_info or ""))


_SHORT_CHUNK = re.compile(r"^(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _truncation(extra_info: str) -> str | None:
    """libsndfile's own log says when a file ends before its header says it should."""
    match = _SHORT_CHUNK.search(extra_info)
    if match and int(match.group(2)) > int(match.group(3)):
        return f"truncated: the {match.group(1)} chunk should hold {match.group(2)} bytes, the file has {match.group(3)}"
    if "lacks an end-of-stream bit" in extra_info:
        return "truncated: the Ogg stream ends without its final page"
    return None


def _ffprobe_info(path: Path) -> AudioInfo:
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        raise AudioDecodeError("unsupported format (libsndfile cannot read it, and ffmpeg is not installed)",
                               hint="install ffmpeg to read m4a/aac/mp4/webm/wma and other formats")
    cmd = [ffprobe, "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate,channels",
           "-of", "json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    streams = []
    if proc.returncode == 0:
        try:
            streams = json.loads(proc.stdout or "{}").get("streams", [])
        except json.JSONDecodeError:
            streams = []
    if not streams:
        reason = _last_line(proc.stderr).replace(f"{path}: ", "") or "no audio stream"
        raise AudioDecodeError(f"not audio, or a format neither libsndfile nor ffmpeg can read (ffprobe: {reason})")
    stream = streams[0]
    try:
        return AudioInfo(int(stream["sample_rate"]), int(stream["channels"]), None, "ffmpeg")
    except (KeyError, ValueError):
        raise AudioDecodeError("not a readable audio file (ffprobe reports no sample rate)") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def probe(path: str | os.PathLike) -> AudioInfo:
    """Find how to decode ``path``; raises AudioDecodeError with the reason when it cannot be read."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AudioDecodeError("no such file") from None
    except OSError as exc:
        raise AudioDecodeError(f"cannot open: {exc.strerror or exc}") from None
    if path.is_dir():
        raise AudioDecodeError("is a directory")
    if size == 0:
        raise AudioDecodeError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise AudioDecodeError("permission denied")
    info = _soundfile_info(path)
    if info is None:
        info = _ffprobe_info(path)
    if info.sample_rate <= 0 or info.channels <= 0:
        raise AudioDecodeError("invalid header (no sample rate or channels)")
    return info


def _soundfile_blocks(path: Path, info: AudioInfo, block_frames: int) -> Iterator[np.ndarray]:
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            while True:
                block = f.read(block_frames, dtype="float32", always_2d=True)  # (n, channels)
                if block.shape[0] == 0:
                    return
                yield block
    except sf.LibsndfileError as exc:
        raise AudioDecodeError(f"decode failed: {_sf_reason(exc)}") from None
    except RuntimeError as exc:
        raise AudioDecodeError(f"decode failed: {exc}") from None


def _sf_reason(exc: Exception) -> str:
    text = str(getattr(exc, "error_string", "") or exc).strip().rstrip(".")
    text = re.sub(r"^Error\s*:\s*", "", text)  # libsndfile's "Error : flac decoder lost sync"
    return text or "libsndfile error"


def _ffmpeg_blocks(path: Path, info: AudioInfo, block_frames: int) -> Iterator[np.ndarray]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioDecodeError("unsupported format (libsndfile cannot read it, and ffmpeg is not installed)")
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn",
           "-f", "f32le", "-acodec", "pcm_f32le", "-"]
    frame_bytes = 4 * info.channels
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL) as proc:
        try:
            pending = b""
            while True:
                chunk = proc.stdout.read(block_frames * frame_bytes)
                if not chunk:
                    break
                pending += chunk
                usable = len(pending) - len(pending) % frame_bytes
                if usable:
                    data = np.frombuffer(pending[:usable], dtype="<f4").reshape(-1, info.channels)
                    pending = pending[usable:]
                    yield data
            stderr = proc.stderr.read().decode("utf-8", "replace")
            if proc.wait() != 0:
                raise AudioDecodeError(f"decode failed (ffmpeg: {_last_line(stderr) or 'error'})")
        finally:
            if proc.poll() is None:
                proc.kill()


class AudioReader:
    """Reads one file as 16 kHz mono float32 blocks.

    ``duration`` (seconds of the original file) is exact once ``blocks()`` has been consumed.
    """

    def __init__(self, path: str | os.PathLike, block_seconds: float = BLOCK_SECONDS):
        self.path = Path(path)
        self.info = probe(self.path)
        self.block_frames = max(1, int(block_seconds * self.info.sample_rate))
        self.frames_read = 0

    @property
    def duration(self) -> float:
        return self.frames_read / self.info.sample_rate

    def blocks(self) -> Iterator[np.ndarray]:
        """Yields (samples,) float32 arrays at 16 kHz; raises AudioDecodeError on bad data."""
        source = _soundfile_blocks if self.info.decoder == "soundfile" else _ffmpeg_blocks
        resampler = StreamingResampler(self.info.sample_rate, SAMPLE_RATE)
        for block in source(self.path, self.info, self.block_frames):
            self.frames_read += block.shape[0]
            mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
            if not np.isfinite(mono).all():
                raise AudioDecodeError("audio contains NaN or infinite samples")
            out = resampler.push(np.ascontiguousarray(mono, dtype=np.float32))
            if out.shape[0]:
                yield out
        if self.frames_read == 0:
            raise AudioDecodeError("no audio samples (zero-length audio)")
        if self.info.truncated:
            raise AudioDecodeError(self.info.truncated)
        expected = self.info.frames or 0
        if expected - self.frames_read > max(0.01 * expected, 0.1 * self.info.sample_rate):
            raise AudioDecodeError(
                f"truncated: the header promises {expected / self.info.sample_rate:.2f} s, "
                f"the data ends at {self.duration:.2f} s"
            )
        tail = resampler.finish()
        if tail.shape[0]:
            yield tail


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Whole file -> (16 kHz mono float32 samples, duration of the original in seconds)."""
    reader = AudioReader(path)
    blocks = list(reader.blocks())
    return (np.concatenate(blocks) if blocks else np.empty(0, dtype=np.float32)), reader.duration
