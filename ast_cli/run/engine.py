"""The batch engine: sources -> windows -> batched backend calls -> per-source outputs, in input order.

Worker threads read each source (``blocks()``) and cut its audio into model windows (``FrameStream``), putting
finished windows on a bounded queue; the calling thread takes windows from several sources at once, batches
them (``Batcher``) and runs the backend. Outputs leave in input order (``OrderedEmitter``) as soon as a source
and all before it are done. The bounded queue keeps memory flat whatever the lengths, and a long source
occupies one worker while the others go on. A source that fails at any point gives an output with ``error``
set (and the exception in ``exception``); nothing else is affected.

Each ``run()`` has its own queue and stop event: ``stop()`` ends the current run promptly (workers and the
consumer), and the same engine can run again.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Iterable, Iterator, TypeVar

import numpy as np

from ..errors import AstError, is_out_of_memory
from ..audio.features import FeatureConfig, FrameStream, Window
from ..audio.sources import AudioSource, as_sources

T = TypeVar("T")


@dataclass
class FileOutput:
    """What the engine produced for one source. ``outputs`` rows follow ``windows``."""

    source: AudioSource
    duration: float | None = None  # seconds of the original recording
    windows: list[tuple[float, float]] = field(default_factory=list)  # (start, end) seconds
    outputs: np.ndarray | None = None  # (windows, ...): the backend's rows, e.g. (windows, K) logits
    error: str | None = None
    exception: BaseException | None = None  # behind ``error``, for a traceback on request
    size: int | None = None  # bytes, for resume (files only)
    mtime: float | None = None

    @property
    def name(self) -> str:
        return self.source.name


# -- the two pieces the consumer loop is made of ----------------------------------------------------------


class OrderedEmitter(Generic[T]):
    """Releases values in submission order: value ``i`` once it and every value before it are finished."""

    def __init__(self) -> None:
        self._next = 0
        self._finished: dict[int, T] = {}

    def finish(self, index: int, value: T) -> None:
        if index < self._next or index in self._finished:
            raise ValueError(f"item {index} finished twice")
        self._finished[index] = value

    def ready(self) -> Iterator[T]:
        """The values that can leave now, in order."""
        while self._next in self._finished:
            yield self._finished.pop(self._next)
            self._next += 1

    @property
    def emitted(self) -> int:
        return self._next


@dataclass(frozen=True)
class BatchResult:
    """One window's row from the backend, or the error that its batch failed with."""

    key: Hashable
    index: int  # the window's index within its source
    row: np.ndarray | None = None
    error: str | None = None
    exception: BaseException | None = None


class Batcher:
    """Collects windows from any sources into batches of ``batch_size`` and runs ``backend`` on each.

    ``add`` returns the results of the batch it completed (else nothing); ``flush`` runs what is pending. A
    backend failure is a result with ``error`` for each window of that batch (out of memory is named so).
    """

    def __init__(self, backend: Callable, batch_size: int):
        self.backend = backend
        self.batch_size = max(1, batch_size)
        self._pending: list[tuple[Hashable, Window]] = []

    def add(self, key: Hashable, window: Window) -> list[BatchResult]:
        self._pending.append((key, window))
        return self.flush() if len(self._pending) >= self.batch_size else []

    def has(self, key: Hashable) -> bool:
        return any(k == key for k, _ in self._pending)

    def drop(self, key: Hashable) -> None:
        """Forget the pending windows of ``key`` (its source failed)."""
        self._pending = [(k, w) for k, w in self._pending if k != key]

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self) -> list[BatchResult]:
        import torch

        batch, self._pending = self._pending, []
        if not batch:
            return []
        inputs = torch.stack([w.features for _, w in batch])  # (B, T, F)
        try:
            rows = np.asarray(self.backend(inputs), dtype=np.float32)
        except Exception as exc:  # the backend's failure is the batch's windows' failure, not the run's
            if is_out_of_memory(exc):
                message = f"out of memory on the device (a batch of {len(batch)} windows)"
            else:
                message = f"model failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
            return [BatchResult(k, w.index, error=message, exception=exc) for k, w in batch]
        if rows.shape[0] != len(batch):
            error = ValueError(f"the backend returned {rows.shape[0]} rows for {len(batch)} windows")
            return [BatchResult(k, w.index, error=f"model failed: {error}", exception=error) for k, w in batch]
        return [BatchResult(k, w.index, row=row) for (k, w), row in zip(batch, rows)]


# -- the engine -------------------------------------------------------------------------------------------


@dataclass
class _State:
    output: FileOutput
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    expected: int | None = None  # windows, once reading has finished


_WINDOW, _DONE, _ERROR = "window", "done", "error"


class Engine:
    """Runs ``backend`` over every window of every source.

    ``batch_size`` windows go through the backend at once (from any sources); ``workers`` threads read.
    ``hop_frames`` is the window hop in 10 ms frames (default: the window length, no overlap).
    """

    def __init__(self, features: FeatureConfig, backend: Callable, *, batch_size: int = 4, workers: int = 2,
                 hop_frames: int | None = None):
        self.features = features
        self.backend = backend
        self.batch_size = max(1, batch_size)
        self.workers = max(1, workers)
        self.hop_frames = hop_frames
        self._lock = threading.Lock()
        self._stops: set[threading.Event] = set()

    def stop(self) -> None:
        """End every run of this engine now: workers stop at their next block, ``run()`` returns."""
        with self._lock:
            for event in self._stops:
                event.set()

    def run(self, sources: Iterable, on_progress: Callable[[FileOutput], None] | None = None
            ) -> Iterator[FileOutput]:
        """Yield one ``FileOutput`` per source (paths are taken as files), in the order given, each as soon as
        it and all before it are done. ``on_progress(output)`` is called as each finishes, in completion order.
        """
        sources = as_sources(sources)
        stop = threading.Event()
        with self._lock:
            self._stops.add(stop)
        try:
            yield from _Run(self, sources, stop, on_progress)
        finally:
            stop.set()
            with self._lock:
                self._stops.discard(stop)


class _Run:
    """One run's queue, states and threads. A file's state lives from its submission until its output is
    finished, so memory stays flat in the number of files."""

    def __init__(self, engine: Engine, sources: list[AudioSource], stop: threading.Event, on_progress):
        self.engine = engine
        self.sources = sources
        self.stop = stop
        self.on_progress = on_progress
        # A few batches of windows in flight: enough to keep the model busy, little memory (0.5 MB/window).
        self.queue: queue.Queue = queue.Queue(maxsize=engine.batch_size * 2 + engine.workers)
        self.states: dict[int, _State] = {}
        self.batcher = Batcher(engine.backend, engine.batch_size)
        self.emitter: OrderedEmitter[FileOutput] = OrderedEmitter()

    # -- worker side --------------------------------------------------------------------------------

    def _put(self, message: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, file_id: int, source: AudioSource) -> None:
        import torch

        try:
            stream = FrameStream(self.engine.features, self.engine.hop_frames)
            count = 0
            for block in source.blocks():
                for window in stream.push(torch.from_numpy(block)):
                    if not self._put((_WINDOW, file_id, window)):
                        return
                    count += 1
                if self.stop.is_set():
                    return
            for window in stream.finish():
                if not self._put((_WINDOW, file_id, window)):
                    return
                count += 1
            self._put((_DONE, file_id, (count, source.duration)))
        except AstError as exc:
            self._put((_ERROR, file_id, (str(exc), exc)))
        except MemoryError as exc:
            self._put((_ERROR, file_id, ("out of memory while decoding", exc)))
        except Exception as exc:  # a bug or an odd file: keep the batch going, say what happened
            self._put((_ERROR, file_id, (f"unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())}",
                                         exc)))

    # -- consumer side ------------------------------------------------------------------------------

    def _fail(self, file_id: int, message: str, exc: BaseException | None) -> None:
        state = self.states[file_id]
        if state.output.error is None:
            state.output.error, state.output.exception = message, exc
        self.batcher.drop(file_id)

    def _apply(self, results: list[BatchResult]) -> None:
        for result in results:
            if result.key not in self.states:
                continue  # its file already failed and left (an earlier window of this failed batch)
            if result.error is not None:
                self._fail(result.key, result.error, result.exception)
            else:
                self.states[result.key].rows[result.index] = result.row
            self._check_complete(result.key)

    def _check_complete(self, file_id: int) -> None:
        state = self.states.get(file_id)
        if state is None or state.expected is None:
            return  # finished already, or still reading: more windows may come
        out = state.output
        if out.error is None and len(state.rows) < state.expected:
            return
        if out.error is None:
            rows = [state.rows[i] for i in range(state.expected)]
            out.outputs = np.stack(rows) if rows else np.empty((0, 0), np.float32)
        else:
            out.windows, out.outputs = [], None
        del self.states[file_id]  # the record leaves with the emitter: nothing of it stays behind per file
        self.emitter.finish(file_id, out)
        if self.on_progress is not None:
            self.on_progress(out)

    def _handle(self, kind: str, file_id: int, payload) -> int:
        """Apply one message from a worker; returns how many sources stopped reading (0 or 1)."""
        state = self.states[file_id]
        if kind == _WINDOW:
            if state.output.error is None:
                state.output.windows.append((payload.start, payload.end))
                self._apply(self.batcher.add(file_id, payload))
            return 0
        if kind == _DONE:
            state.expected, state.output.duration = payload
            state.output.windows.sort()
            if self.batcher.has(file_id) and self.queue.empty():
                self._apply(self.batcher.flush())  # nothing else is coming right now: do not make it wait
        else:
            self._fail(file_id, *payload)
            state.expected = 0
        self._check_complete(file_id)
        return 1

    def __iter__(self) -> Iterator[FileOutput]:
        total = len(self.sources)
        next_submit = 0
        reading = 0
        max_reading = self.engine.workers + 1  # one queued ahead, so a worker never waits for work
        pool = ThreadPoolExecutor(max_workers=self.engine.workers, thread_name_prefix="ast-read")
        try:
            while self.emitter.emitted < total and not self.stop.is_set():
                while reading < max_reading and next_submit < total:
                    source = self.sources[next_submit]
                    size, mtime = source.identity()
                    self.states[next_submit] = _State(FileOutput(source, size=size, mtime=mtime))
                    pool.submit(self._read, next_submit, source)
                    next_submit += 1
                    reading += 1
                yield from self.emitter.ready()
                if self.emitter.emitted >= total:
                    break
                try:
                    message = self.queue.get(timeout=0.02 if len(self.batcher) else 0.1)
                except queue.Empty:
                    if len(self.batcher):
                        self._apply(self.batcher.flush())  # nothing is coming right now: run a partial batch
                    continue
                reading -= self._handle(*message)
        finally:
            self.stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
