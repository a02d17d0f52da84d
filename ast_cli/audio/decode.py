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

import functools
import io
import json
import os
import re
import select
import shutil
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..constants import SAMPLE_RATE
from ..errors import AudioDecodeError
from .resample import StreamingResampler, check_rate

BLOCK_SECONDS = 30.0  # audio read per block; bounds memory for long files
# How long ffprobe may take, and ffmpeg or a pipe may go without giving a byte, before that input is given up (an
# error record; the batch goes on). A healthy local file gives its first bytes within a second even on a busy
# machine; a live writer on a FIFO pauses less than this; ``ast listen --stall`` waits as long by default.
STALL_SECONDS = 30.0
STDERR_TAIL_BYTES = 8192  # what is kept of ffmpeg's stderr for an error's reason (it may print megabytes)

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
        info = sf.info(os.fsencode(path))  # bytes: names that are not valid UTF-8 open too
    except sf.LibsndfileError:
        return None
    except RuntimeError:  # older soundfile raises RuntimeError
        return None
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames), "soundfile",
                     truncated=_truncation(info.extra_info or ""))


_SHORT_CHUNK = re.compile(r"^(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


# Data sizes that a writer to a pipe puts in a WAV header because it cannot know the length (ffmpeg and arecord
# 0xFFFFFFFF, sox 0x7FFFF000): saved to a file, the data runs to its end, as libsndfile reads it.
UNKNOWN_LENGTHS = (0xFFFFFFFF, 0x7FFFF000)


def _truncation(extra_info: str) -> str | None:
    """libsndfile's own log says when a file ends before its header says it should."""
    match = _SHORT_CHUNK.search(extra_info)
    if match and int(match.group(2)) > int(match.group(3)) and int(match.group(2)) not in UNKNOWN_LENGTHS:
        return f"truncated: the {match.group(1)} chunk should hold {match.group(2)} bytes, the file has {match.group(3)}"
    if "lacks an end-of-stream bit" in extra_info:
        return "truncated: the Ogg stream ends without its final page"
    return None


def _ffmpeg_input(path: Path) -> str:
    """How ffmpeg/ffprobe are given a file: ``file:`` + absolute path, so that a name beginning with ``-`` is
    not read as an option and ``a:b.wav`` not as protocol ``a``."""
    return "file:" + os.path.abspath(path)


# Demuxers that make ffmpeg open what a file names: playlists (hls, concat, dash, imf), other files (image2
# patterns, vobsub's .sub), streams (sdp, rtp, rtsp, sap), scripts (avisynth, vapoursynth). A 100-byte "audio"
# file could otherwise have another local file decoded in its place, or block on a FIFO it points at.
REFUSED_DEMUXERS = frozenset(
    "hls applehttp concat dash imf image2 vobsub sdp rtp rtsp sap avisynth vapoursynth".split())
_REFUSED = re.compile(rb"\[([\w,]+) @ [^\]]*\] Format not on whitelist")


@functools.lru_cache(maxsize=None)
def _input_options(executable: str) -> tuple[str, ...]:
    """Options that keep ``executable`` (ffmpeg or ffprobe) to the local file it is given: the ``file`` protocol
    only, and every demuxer it has but ``REFUSED_DEMUXERS`` (ffmpeg has an allow list, not a deny list)."""
    try:
        listing = subprocess.run([executable, "-hide_banner", "-demuxers"], capture_output=True,
                                 stdin=subprocess.DEVNULL, timeout=STALL_SECONDS).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AudioDecodeError(f"cannot run {os.path.basename(executable)}: {exc}") from None
    names = set()
    for line in listing.decode("ascii", "replace").split("--", 1)[-1].splitlines():
        words = [word for word in line.split() if word.strip("DEd.")]  # " D  name", " DE name", " D d name"
        names.update(words[0].split(",") if words else ())
    if not names:
        raise AudioDecodeError(f"{os.path.basename(executable)} -demuxers lists no demuxers")
    return "-protocol_whitelist", "file", "-format_whitelist", ",".join(sorted(names - REFUSED_DEMUXERS))


def local_input(executable: str, path: str | os.PathLike) -> list[str]:
    """The arguments that give ``executable`` (ffmpeg) the local file ``path`` as its input and keep it to that
    file (``_input_options``): a playlist in it is refused, not followed to the files it names."""
    return [*_input_options(executable), "-i", _ffmpeg_input(Path(path))]


def refused_playlist(stderr: bytes) -> str | None:
    """Why ffmpeg or ffprobe refused its input, when it was for a demuxer in ``REFUSED_DEMUXERS``; else None."""
    refused = _REFUSED.search(stderr)
    if refused is None:
        return None
    return f"not audio: a playlist ({refused.group(1).decode()}), naming other files to read in its place"


def _executable(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise AudioDecodeError("unsupported format (libsndfile cannot read it, and ffmpeg is not installed)",
                               hint="install ffmpeg to read m4a/aac/mp4/webm/wma and other formats")
    return found


def _ffprobe_info(path: Path) -> AudioInfo:
    ffprobe = _executable("ffprobe")
    cmd = [ffprobe, "-v", "error", *_input_options(ffprobe), "-select_streams", "a:0",
           "-show_entries", "stream=sample_rate,channels", "-of", "json", _ffmpeg_input(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=STALL_SECONDS)
    except subprocess.TimeoutExpired:
        raise AudioDecodeError(f"ffprobe gave no answer in {STALL_SECONDS:g} s") from None
    streams = []
    if proc.returncode == 0:
        try:
            streams = json.loads(proc.stdout or b"{}").get("streams", [])
        except (json.JSONDecodeError, UnicodeDecodeError):
            streams = []
    if not streams:
        refused = refused_playlist(proc.stderr)
        if refused:
            raise AudioDecodeError(refused)
        reason = _reason(proc.stderr, path) or "no audio stream"
        raise AudioDecodeError(f"not audio, or a format neither libsndfile nor ffmpeg can read (ffprobe: {reason})")
    stream = streams[0]
    try:
        return AudioInfo(int(stream["sample_rate"]), int(stream["channels"]), None, "ffmpeg")
    except (KeyError, ValueError):
        raise AudioDecodeError("not a readable audio file (ffprobe reports no sample rate)") from None


def _reason(stderr: bytes, path: Path) -> str:
    """ffmpeg's last message, without the file's name. Bytes: a name need not be UTF-8, and may hold a newline."""
    for name in (_ffmpeg_input(path), str(path)):
        stderr = stderr.replace(os.fsencode(name) + b": ", b"")
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def probe(path: str | os.PathLike) -> AudioInfo:
    """Find how to decode ``path``; raises AudioDecodeError with the reason when it cannot be read."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AudioDecodeError("no such file") from None
    except OSError as exc:
        raise AudioDecodeError(f"cannot open: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise AudioDecodeError("is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise AudioDecodeError("not a regular file")  # sources.FileSource reads pipes and devices as streams
    if info.st_size == 0:
        raise AudioDecodeError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise AudioDecodeError("permission denied")
    info = _soundfile_info(path)
    if info is None:
        info = _ffprobe_info(path)
    if info.sample_rate <= 0 or info.channels <= 0:
        raise AudioDecodeError("invalid header (no sample rate or channels)")
    return info


def _soundfile_blocks(path: Path, block_frames: int) -> Iterator[np.ndarray]:
    import soundfile as sf

    try:
        with sf.SoundFile(os.fsencode(path)) as f:
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


class TimedPipe(io.RawIOBase):
    """A pipe or device read with a progress limit: each read waits at most ``STALL_SECONDS`` for a byte, then
    raises AudioDecodeError(``stalled``). A plain read would wait for ever on a FIFO nobody writes to, or on a
    stuck ffmpeg, and with it the whole batch. ``fd``: a descriptor, blocking or not, closed with the pipe when
    ``closefd``."""

    def __init__(self, fd: int, stalled: str, closefd: bool = True):
        self.fd, self.stalled, self.closefd = fd, stalled, closefd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)  # a writer gone (POLLHUP) wakes it too: the read then gives EOF

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def readinto(self, buffer) -> int:
        while True:
            if not self._poll.poll(STALL_SECONDS * 1000):
                raise AudioDecodeError(self.stalled)
            try:
                return os.readv(self.fd, [buffer])
            except BlockingIOError:  # a non-blocking descriptor had nothing after all
                continue

    def close(self) -> None:
        if not self.closed and self.closefd:
            os.close(self.fd)
        super().close()


def open_pipe(path: str) -> TimedPipe:
    """A FIFO or device, opened without waiting for a writer (a FIFO nobody opens is then a stall, not a hang)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise AudioDecodeError(f"cannot open: {exc.strerror or exc}") from None
    return TimedPipe(fd, f"no data came for {STALL_SECONDS:g} s (a pipe with no writer?)")


# What ffmpeg says, at -v error and with exit code 0, when a file ends before its own index or headers do: the mov
# demuxer (m4a, mp4, mov) "stream 0, offset 0x12794: partial file", matroska/webm "File ended prematurely".
_TRUNCATED = re.compile(rb"partial file|File ended prematurely")


class _StderrTail(threading.Thread):
    """Reads a child's stderr as it comes (a child with a lot to say blocks once the pipe is full: ffmpeg printing
    150 KB of "Invalid data" did), keeping its last ``STDERR_TAIL_BYTES`` and the first sign of a truncated file."""

    def __init__(self, stream):
        super().__init__(name="ast-ffmpeg-stderr", daemon=True)
        self.stream, self.tail, self.truncated = stream, b"", None
        self.start()

    def run(self) -> None:
        try:
            while chunk := self.stream.read(1 << 16):
                found = self.truncated is None and _TRUNCATED.search(self.tail[-64:] + chunk)
                if found:
                    self.truncated = found.group(0).decode()
                self.tail = (self.tail + chunk)[-STDERR_TAIL_BYTES:]
        except (OSError, ValueError):  # the pipe closed under it (Ctrl-C while joining): no traceback from a thread
            pass


def _ffmpeg_blocks(path: Path, channels: int, block_frames: int) -> Iterator[np.ndarray]:
    ffmpeg = _executable("ffmpeg")
    cmd = [ffmpeg, "-nostdin", "-v", "error", *local_input(ffmpeg, path), "-map", "0:a:0", "-vn", "-f", "f32le",
           "-acodec", "pcm_f32le", "-"]
    frame_bytes = 4 * channels
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          bufsize=0) as proc:
        stderr = _StderrTail(proc.stderr)
        try:
            stalled = f"ffmpeg gave no audio for {STALL_SECONDS:g} s"
            audio = io.BufferedReader(TimedPipe(proc.stdout.fileno(), stalled, closefd=False))
            while chunk := audio.read(block_frames * frame_bytes):  # whole frames, but at a truncated file's end
                usable = len(chunk) - len(chunk) % frame_bytes
                if usable:
                    yield np.frombuffer(chunk[:usable], dtype="<f4").reshape(-1, channels)
            returncode = proc.wait(STALL_SECONDS)
        except subprocess.TimeoutExpired:
            raise AudioDecodeError(f"ffmpeg did not exit {STALL_SECONDS:g} s after its last audio") from None
        finally:
            if proc.poll() is None:
                proc.kill()
            stderr.join()  # ffmpeg is gone, so its stderr ends
        if stderr.truncated:
            raise AudioDecodeError(f"truncated: the file ends before its audio does (ffmpeg: {stderr.truncated})")
        if returncode != 0:
            raise AudioDecodeError(f"decode failed (ffmpeg: {_reason(stderr.tail, path) or 'error'})")


MAX_BLOCK_BYTES = 32 << 20  # decoded float32 bytes per block, whatever the channel count (64 channels: 2.6 s)


class ToModelRate:
    """Decoded (frames, channels) float32 blocks -> 16 kHz mono blocks: channels averaged (as the transformers
    pipeline downmixes), non-finite samples refused, resampled block by block with the exact one-shot result."""

    def __init__(self, sample_rate: int):
        try:  # a header claiming 4294967295 Hz is refused here, before anything is read or allocated for it
            self.sample_rate = check_rate(sample_rate)
        except ValueError as exc:
            raise AudioDecodeError(str(exc)) from None
        self.resampler = StreamingResampler(self.sample_rate, SAMPLE_RATE)
        self.frames_in = 0  # frames of the original rate pushed so far

    def push(self, block: np.ndarray) -> np.ndarray:
        """(n, channels) or (n,) float32 at the original rate -> (m,) float32 at 16 kHz (m may be 0)."""
        self.frames_in += block.shape[0]
        mono = block if block.ndim == 1 else (block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1
                                              else block[:, 0])
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        if not np.isfinite(mono).all():
            raise AudioDecodeError("audio contains NaN or infinite samples")
        return self.resampler.push(mono)

    def finish(self) -> np.ndarray:
        """The last samples, once the input has ended."""
        return self.resampler.finish()

    @property
    def duration(self) -> float:
        """Seconds of audio pushed, at the original rate."""
        return self.frames_in / self.sample_rate


class AudioReader:
    """Reads one file as 16 kHz mono float32 blocks.

    ``duration`` (seconds of the original file) is exact once ``blocks()`` has been consumed. Blocks hold at
    most ``block_seconds`` of audio and at most ``MAX_BLOCK_BYTES`` of decoded samples.
    """

    def __init__(self, path: str | os.PathLike, block_seconds: float = BLOCK_SECONDS):
        self.path = Path(path)
        self.info = probe(self.path)
        by_bytes = MAX_BLOCK_BYTES // (4 * self.info.channels)
        self.block_frames = max(1, min(int(block_seconds * self.info.sample_rate), by_bytes))
        self.frames_read = 0

    @property
    def duration(self) -> float:
        return self.frames_read / self.info.sample_rate

    def raw_blocks(self) -> Iterator[np.ndarray]:
        """Yields decoded (frames, channels) float32 blocks at the file's own rate; raises AudioDecodeError on
        bad data, including a file that ends before its header says it should (after its last block)."""
        if self.info.decoder == "soundfile":
            decoded = _soundfile_blocks(self.path, self.block_frames)
        else:
            decoded = _ffmpeg_blocks(self.path, self.info.channels, self.block_frames)
        for block in decoded:
            self.frames_read += block.shape[0]
            yield block
        if self.info.truncated:  # first: a truncated Ogg file may hold no whole page, yet is not zero-length
            raise AudioDecodeError(self.info.truncated)
        if self.frames_read == 0:
            raise AudioDecodeError("no audio samples (zero-length audio)")
        expected = self.info.frames or 0
        if expected - self.frames_read > max(0.01 * expected, 0.1 * self.info.sample_rate):
            raise AudioDecodeError(
                f"truncated: the header promises {expected / self.info.sample_rate:.2f} s, "
                f"the data ends at {self.duration:.2f} s"
            )

    def blocks(self) -> Iterator[np.ndarray]:
        """Yields (samples,) float32 arrays at 16 kHz; raises AudioDecodeError on bad data."""
        convert = ToModelRate(self.info.sample_rate)
        for block in self.raw_blocks():
            out = convert.push(block)
            if out.shape[0]:
                yield out
        tail = convert.finish()
        if tail.shape[0]:
            yield tail


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Whole file -> (16 kHz mono float32 samples, duration of the original in seconds)."""
    reader = AudioReader(path)
    blocks = list(reader.blocks())
    return (np.concatenate(blocks) if blocks else np.empty(0, dtype=np.float32)), reader.duration


def read_span(path: str | os.PathLike, begin: int, end: int) -> np.ndarray:
    """Samples ``begin`` to ``end`` (16 kHz mono) of an audio file, read block by block: memory stays bounded
    however long the file."""
    pieces, offset = [], 0
    try:
        for block in AudioReader(path).blocks():
            if offset + block.shape[0] > begin:
                pieces.append(block[max(0, begin - offset) : end - offset])
            offset += block.shape[0]
            if offset >= end:
                break
    except AudioDecodeError as exc:  # the reason alone would not say which file
        raise AudioDecodeError(f"{path}: {exc}", needs_ffmpeg=exc.needs_ffmpeg) from None
    return np.concatenate(pieces) if pieces else np.empty(0, np.float32)
