"""Live tagging: a stream of audio (any ``AudioSource``) -> rolling windows scored as the audio arrives.

A reader thread takes the source's 16 kHz blocks, computes log-mel frames as they complete and, every ``hop``
of new audio, cuts the window of the model's length that ends there: frames ``[end - max_length, end)``, or
``[0, end)`` zero-padded while less than one window has arrived (as the reference pads a short clip). Window
``k`` ends at ``k * hop``; at the end of the stream one more window ends with the last frame, so the tail is
scored too. Each window equals ``classify`` on that excerpt of the stream (16 kHz streams: exactly).

The scoring thread (the caller's) always takes the newest window. When the model falls behind the stream's
own clock (a window is still unscored when the stream, counted from its first sample at the pace it plays, has
passed the end of the next one), the older window is dropped and counted, never queued: memory stays flat on
an endless stream, and the output never falls further and further behind. Audio that arrives faster than
real time (a file piped in) is no reason to drop: the reader then waits for the model, and every window is
scored. The clock is set by the first block the source made the reader wait for (the live edge): the stream's
first sample played all the audio received so far before it, a backlog buffered at start-up included. Until
then, nothing is dropped.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..constants import FRAME_LENGTH, FRAME_SECONDS, HOP_LENGTH, SAMPLE_RATE
from ..errors import AstError, AudioDecodeError, UsageError
from ..run.tagger import HeadPart, LabelScore, LabelSelection, Scorer


@dataclass(frozen=True)
class LiveWindow:
    """One scored window: times in seconds from the start of the stream; ``wall`` when it was scored."""

    index: int
    start: float
    end: float
    labels: list[LabelScore]
    scores: np.ndarray = field(repr=False)  # (num_labels,) after the activation
    wall: float = 0.0  # time.time() when its scores were ready
    latency: float = 0.0  # seconds from the window's audio being complete to its scores


@dataclass(frozen=True)
class Event:
    """A label's score crossing the threshold: ``kind`` onset (up) or offset (down), at window ``time``."""

    kind: str
    label: str
    index: int
    time: float
    score: float
    wall: float


class _Latest:
    """A one-slot mailbox between the reader and the scorer: a newer window waits for the scorer to take the
    one in the slot (until ``stop`` is set), or, with ``drop``, replaces it once the wall clock has reached the
    newer window's ``due`` time (the model fell behind the stream)."""

    def __init__(self, drop: bool = True, stop: threading.Event | None = None):
        self._cond = threading.Condition()
        self._item = None
        self._drop = drop
        self._stop = stop or threading.Event()
        self.dropped = 0
        self.closed = False
        self.error: BaseException | None = None

    def put(self, item, due: float = 0.0) -> None:
        """``due``: the ``time.monotonic()`` at which a stream played in real time would have reached the end of
        ``item``; before then the model is not behind, whatever the slot holds."""
        with self._cond:
            while self._item is not None and not self._stop.is_set():
                wait = due - time.monotonic() if self._drop else 0.1
                if wait <= 0:
                    break
                self._cond.wait(min(wait, 0.1))
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.closed, self.error = True, error
            self._cond.notify()

    def get(self, timeout: float):
        """The newest window, or None at the end of the stream; raises TimeoutError if nothing arrives."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._item is not None or self.closed, timeout):
                raise TimeoutError
            item, self._item = self._item, None
            self._cond.notify_all()
            return item


class _Waiting:
    """Since when (``time.monotonic()``) the reader has been waiting for the source's next block; None while it
    is busy with the last one (framing it, or handing a window to a model that has not taken the previous one).
    A stall is the source sending nothing for that long, whatever the hop and however slow the model."""

    since: float | None = None

    def seconds(self) -> float:
        since = self.since  # one read: the reader may set it meanwhile
        return 0.0 if since is None else time.monotonic() - since


def _timed(blocks: Iterator[np.ndarray], waiting: _Waiting) -> Iterator[tuple[np.ndarray, bool]]:
    """Each block, and whether the source made us wait for it (at least half its length): it came as it played.

    Until a block comes so, the stream's clock is unknown: what comes at once is a backlog (audio buffered while
    the model loaded) or a file piped in, and neither tells when the first sample played. ``waiting`` says when
    the wait for the next block began."""
    blocks = iter(blocks)
    while True:
        waiting.since = asked = time.monotonic()
        try:
            block = next(blocks, None)
        finally:
            waiting.since = None
        if block is None:
            return
        yield block, time.monotonic() - asked >= 0.5 * block.shape[0] / SAMPLE_RATE


def check_stall(seconds: float) -> float:
    """``seconds`` if it is a positive, finite wait a thread can make (``threading.TIMEOUT_MAX``); else UsageError
    (inf overflowed the wait, nan waited forever)."""
    if not 0 < seconds <= threading.TIMEOUT_MAX:  # nan: False
        raise UsageError(f"must be a positive number of seconds up to {threading.TIMEOUT_MAX:.0f}, not {seconds}",
                         option="stall")
    return seconds


class Listener:
    """Scores rolling windows of a live ``source`` with ``backend`` (a ``LocalBackend`` giving logits).

    ``hop_seconds``: how often a window ends (default 1 s); ``stall_seconds``: how long the source may send
    nothing before the run fails (a stream that stopped without closing). ``drop``: a live source, where a
    window the model had no time for is dropped; False for a recording, where the reader waits for the model
    instead (every window is scored, as fast as the model goes).
    """

    def __init__(self, backend, labels: tuple[str, ...], *, hop_seconds: float = 1.0,
                 selection: LabelSelection = LabelSelection(), activation="sigmoid", stall_seconds: float = 30.0,
                 drop: bool = True, parts: tuple[HeadPart, ...] | None = None):
        from ..run.options import hop_frames

        self.backend = backend
        self.features = backend.features
        # parts: the heads in a row of ``backend``'s logits (``Tagger.parts``), else one: ``labels``
        self.scorer = Scorer(parts or (HeadPart(None, labels, False),), selection, activation)
        self.labels = self.scorer.names  # ``head:label`` with heads
        self.hop_frames = hop_frames(hop_seconds)
        check_stall(stall_seconds)
        self.selection = selection
        self.allowed = self.scorer.allowed
        self.activation = activation
        self.stall_seconds = stall_seconds
        self.drop = drop
        self.dropped = 0
        self.stream_seconds = 0.0  # audio received so far ...
        self.stream_wall_seconds = 0.0  # ... in this much wall time: from the stream clock's zero, while unknown
        # from the first read, to the latest block
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    # -- the reader: blocks -> frames -> windows -----------------------------------------------------------

    def _read(self, source, mailbox: _Latest, waiting: _Waiting) -> None:
        import torch

        from ..audio.features import log_mel, normalize, pad_or_truncate

        cfg = self.features
        pending = torch.empty(0)  # samples not yet framed
        frames = torch.empty(0, cfg.num_mel_bins)  # the newest frames, at most one window's worth
        done = 0  # frames so far
        samples = 0
        next_end = self.hop_frames
        index = 0
        started = time.monotonic()
        first_sample = None  # time.monotonic() when the stream's first sample was played: its clock's zero

        def cut(end: int, end_seconds: float) -> None:
            nonlocal index
            local = frames[max(0, frames.shape[0] - (done - end) - cfg.max_length) : frames.shape[0] - (done - end)]
            window = normalize(pad_or_truncate(local, cfg.max_length), cfg)
            start = max(0, end - cfg.max_length)
            due = math.inf if first_sample is None else first_sample + end_seconds  # unknown: never behind
            mailbox.put((index, start * FRAME_SECONDS, end_seconds, window, time.monotonic()), due=due)
            index += 1

        try:
            for block, waited in _timed(source.blocks(), waiting):
                if self._stop.is_set():
                    break
                samples += block.shape[0]
                if first_sample is None and waited:  # the live edge: all that came so far has played by now
                    first_sample = time.monotonic() - samples / SAMPLE_RATE
                self.stream_seconds = samples / SAMPLE_RATE
                self.stream_wall_seconds = time.monotonic() - (started if first_sample is None else first_sample)
                pending = torch.cat([pending, torch.from_numpy(block)])
                new = log_mel(pending, cfg.num_mel_bins)
                if new.shape[0] == 0:
                    continue
                pending = pending[new.shape[0] * HOP_LENGTH :]
                frames = torch.cat([frames, new])
                done += new.shape[0]
                while next_end <= done:
                    cut(next_end, next_end * FRAME_SECONDS)
                    next_end += self.hop_frames
                frames = frames[-(cfg.max_length + self.hop_frames) :]  # memory stays flat
            else:
                last_end = next_end - self.hop_frames
                if done == 0 and samples:  # shorter than one frame: padded to one, as classify does
                    frames = log_mel(torch.nn.functional.pad(pending, (0, FRAME_LENGTH - pending.shape[0])),
                                     cfg.num_mel_bins)
                    done = 1
                if done > last_end:  # the tail after the last full hop is scored too
                    cut(done, samples / SAMPLE_RATE)
            mailbox.close()
        except BaseException as exc:  # the scorer reports it
            mailbox.close(exc)

    # -- the scorer -------------------------------------------------------------------------------------

    def windows(self, source) -> Iterator[LiveWindow]:
        """Yield scored windows as they come, until the source ends (or ``stop()``)."""
        mailbox, waiting = _Latest(self.drop, self._stop), _Waiting()
        reader = threading.Thread(target=self._read, args=(source, mailbox, waiting), name="ast-listen", daemon=True)
        reader.start()
        try:
            while not self._stop.is_set():
                item = self._next(mailbox, waiting)
                self.dropped = mailbox.dropped
                if item is None:
                    if mailbox.error is not None:
                        if isinstance(mailbox.error, AstError):
                            raise mailbox.error
                        raise AudioDecodeError(f"the stream failed: {type(mailbox.error).__name__}: "
                                               f"{mailbox.error}") from mailbox.error
                    return
                index, start, end, window, ready = item
                logits = self.backend(window[None])[0]
                scores = self.scorer.scores(logits[None])[0]
                labels = self.scorer.select(scores)
                yield LiveWindow(index, round(start, 6), round(end, 6), labels, scores, wall=time.time(),
                                 latency=time.monotonic() - ready)
        finally:
            self._stop.set()
            self.dropped = mailbox.dropped

    def _next(self, mailbox: _Latest, waiting: _Waiting):
        """The next window (None at the end); AudioDecodeError once the reader has waited ``stall_seconds`` for
        the source. Not the time between windows: a hop may be longer than the stall, and a reader busy with the
        audio it has (or waiting for the model) is no stalled source."""
        while True:
            try:  # the earliest the stall can be reached: a wait that began already, else one beginning now
                return mailbox.get(max(self.stall_seconds - waiting.seconds(), 0.001))
            except TimeoutError:
                if waiting.seconds() >= self.stall_seconds:
                    raise AudioDecodeError(f"the stream sent no audio for {self.stall_seconds:g} s") from None


class EventTracker:
    """Onsets and offsets: a label is "on" while its window score is at or above ``threshold`` (one for every
    label, or a (num_labels,) array: calibrated thresholds)."""

    def __init__(self, labels: tuple[str, ...], threshold: float | np.ndarray, allowed: np.ndarray):
        self.labels, self.threshold, self.allowed = labels, threshold, allowed
        self.on = np.zeros(len(labels), dtype=bool)

    def update(self, window: LiveWindow) -> list[Event]:
        now = (window.scores >= self.threshold) & self.allowed
        events = [Event("onset" if now[i] else "offset", self.labels[i], int(i), window.end,
                        float(window.scores[i]), window.wall)
                  for i in np.flatnonzero(now != self.on)]
        self.on = now
        return events

    def close(self, at: float, wall: float) -> list[Event]:
        """Offsets for every label still on when the stream ends."""
        events = [Event("offset", self.labels[i], int(i), at, float("nan"), wall) for i in np.flatnonzero(self.on)]
        self.on[:] = False
        return events


_FFMPEG_TAIL_LINES = 20  # of ffmpeg's stderr, kept for the reason a stream failed
_FFMPEG_LINE_BYTES = 4096  # longer lines are kept in pieces


def ffmpeg_source(url: str, name: str | None = None):
    """A ``StreamSource`` over anything the ffmpeg executable can open (a URL, a device, a growing file):
    ffmpeg decodes it to WAV on a pipe, at its own rate and channels (our resampler does the rest). Call its
    ``close()`` when done with it: that ends ffmpeg.

    A local file (a path, ``/dev/...`` or a ``file://`` URL) is read as ``classify`` reads one: a playlist in it
    is refused, not followed to the files it names. A stream (http, rtsp, ``pipe:``) is opened as ffmpeg opens it."""
    import shutil
    import subprocess

    from ..audio.decode import local_input
    from ..audio.sources import StreamSource

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise UsageError("reading anything but a WAV or raw stream on stdin needs the ffmpeg executable",
                         hint="install ffmpeg, or pipe WAV into `ast listen -`")
    if url.startswith("file://"):  # ffmpeg's file protocol reads the rest as the path
        url_input = local_input(ffmpeg, url[len("file:"):])
    elif "://" in url or url.startswith("pipe:"):
        url_input = ["-i", url]
    else:
        url_input = local_input(ffmpeg, url)
    process = subprocess.Popen([ffmpeg, "-nostdin", "-v", "error", *url_input,
                                "-map", "0:a:0", "-vn", "-f", "wav", "-acodec", "pcm_f32le", "-"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return _FfmpegStream(StreamSource(process.stdout, name or url), process)


class _FfmpegStream:
    """A StreamSource whose bytes come from an ffmpeg process; ffmpeg's own error is the stream's error.

    ffmpeg's stderr is read as it comes (a full pipe would stop ffmpeg mid-stream), keeping its last lines for
    the reason. ``close`` kills and reaps ffmpeg: its owner calls it on every way out (a stall, an error, Ctrl-C),
    since a reader blocked on ffmpeg's output never gets to its own clean-up."""

    def __init__(self, stream, process):
        import collections

        self.stream, self.process, self.name = stream, process, stream.name
        self._tail: collections.deque[bytes] = collections.deque(maxlen=_FFMPEG_TAIL_LINES)
        self._drain = threading.Thread(target=self._read_stderr, name="ast-ffmpeg-stderr", daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        for line in iter(lambda: self.process.stderr.readline(_FFMPEG_LINE_BYTES), b""):
            if line.strip():
                self._tail.append(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._drain.join(1.0)

    def blocks(self):
        try:
            yield from self.stream.blocks()
        except AudioDecodeError:
            if self.process.wait() != 0:
                raise AudioDecodeError(self._refused() or f"ffmpeg could not read the source: {self._ffmpeg_error()}"
                                       ) from None
            raise
        finally:
            self.close()
        if self.process.returncode not in (0, -9):
            raise AudioDecodeError(f"ffmpeg stopped: {self._ffmpeg_error()}")

    def _refused(self) -> str | None:
        """Why ffmpeg refused a local file that is a playlist (its message is the whole allow list), else None."""
        from ..audio.decode import refused_playlist

        self._drain.join(1.0)
        return refused_playlist(b"".join(self._tail))

    def _ffmpeg_error(self) -> str:
        self._drain.join(1.0)  # ffmpeg has exited: the rest of its stderr is a moment away
        lines = [line.decode("utf-8", "replace").strip() for line in list(self._tail)]
        return lines[-1] if lines else f"exit code {self.process.returncode}"

    @property
    def duration(self):
        return self.stream.duration

    def identity(self):
        return None, None
