"""The batch engine: files -> windows -> batched model calls -> per-file outputs, in input order.

Worker threads decode, resample and compute features (``AudioReader`` -> ``FrameStream``) and put
finished windows on a bounded queue; the calling thread takes windows from several files at once,
batches them and runs the model. The bounded queue keeps memory flat whatever the file lengths, and
a long file occupies one worker while the others go on. A file that fails at any point yields an
output with ``error`` set; nothing else is affected.
"""

from __future__ import annotations

import queue
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import AstError
from .features import FeatureConfig, FrameStream
from .inputs import InputFile

Forward = Callable[["torch.Tensor"], "torch.Tensor"]  # (B, T, F) features -> (B, ...) outputs  # noqa: F821


@dataclass
class FileOutput:
    """What the engine produced for one file. ``outputs`` rows follow ``windows``."""

    item: InputFile
    duration: float | None = None  # seconds of the original recording
    windows: list[tuple[float, float]] = field(default_factory=list)  # (start, end) seconds
    outputs: np.ndarray | None = None  # (windows, ...): forward's rows, e.g. (windows, K) logits
    error: str | None = None
    size: int | None = None  # bytes, for resume
    mtime: float | None = None


@dataclass
class _FileState:
    output: FileOutput
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    expected: int | None = None  # windows, once decoding has finished
    finished: bool = False


_WINDOW, _DONE, _ERROR = "window", "done", "error"


class Engine:
    """Runs ``forward`` over every window of every file.

    ``batch_size`` windows go through the model at once (from any files); ``workers`` threads decode.
    ``hop_frames`` is the window hop in 10 ms frames (default: the window length, no overlap).
    ``on_progress(output)`` is called as each file is finished, in completion order.
    """

    def __init__(
        self,
        features: FeatureConfig,
        forward: Forward,
        *,
        batch_size: int = 4,
        workers: int = 2,
        hop_frames: int | None = None,
        debug: bool = False,
        block_seconds: float | None = None,
    ):
        self.features = features
        self.forward = forward
        self.batch_size = max(1, batch_size)
        self.workers = max(1, workers)
        self.hop_frames = hop_frames
        self.debug = debug
        self.block_seconds = block_seconds
        self._stop = threading.Event()
        # A few batches of windows in flight: enough to keep the model busy, little memory (2 MB/window).
        self._queue: queue.Queue = queue.Queue(maxsize=self.batch_size * 2 + self.workers)

    def stop(self) -> None:
        self._stop.set()

    # -- worker side ---------------------------------------------------------------------------

    def _put(self, message: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _decode(self, file_id: int, item: InputFile) -> None:
        import torch

        from .audio import BLOCK_SECONDS, AudioReader

        try:
            if item.error:
                raise AstError(item.error)
            reader = AudioReader(item.path, block_seconds=self.block_seconds or BLOCK_SECONDS)
            stream = FrameStream(self.features, self.hop_frames)
            count = 0
            for block in reader.blocks():
                for window in stream.push(torch.from_numpy(block)):
                    if not self._put((_WINDOW, file_id, window)):
                        return
                    count += 1
                if self._stop.is_set():
                    return
            for window in stream.finish():
                if not self._put((_WINDOW, file_id, window)):
                    return
                count += 1
            self._put((_DONE, file_id, (count, reader.duration)))
        except AstError as exc:
            self._put((_ERROR, file_id, str(exc)))
        except MemoryError:
            self._put((_ERROR, file_id, "out of memory while decoding"))
        except Exception as exc:  # a bug or an odd file: keep the batch going, say what happened
            detail = traceback.format_exc() if self.debug else f"{type(exc).__name__}: {exc}"
            self._put((_ERROR, file_id, "unexpected error: " + " ".join(detail.split())))

    # -- consumer side -------------------------------------------------------------------------

    def run(self, items: Iterable[InputFile], on_progress: Callable[[FileOutput], None] | None = None
            ) -> Iterator[FileOutput]:
        """Yield one ``FileOutput`` per item, in the order given, each as soon as it and all before it are done."""
        import os

        import torch

        items = list(items)
        states: dict[int, _FileState] = {}
        next_submit = 0
        next_emit = 0
        running = 0  # files being decoded
        batch: list[tuple[int, object]] = []
        max_running = self.workers + 1  # one queued ahead, so a worker never waits for work

        def finish(file_id: int) -> None:
            state = states[file_id]
            out = state.output
            if out.error is None:
                rows = [state.rows[i] for i in range(state.expected or 0)]
                out.outputs = np.stack(rows) if rows else np.empty((0, 0), np.float32)
            else:
                out.windows, out.outputs = [], None
            state.finished = True
            if on_progress is not None:
                on_progress(out)

        def check_complete(file_id: int) -> None:
            state = states[file_id]
            if state.finished or state.expected is None:
                return  # still decoding: more windows may come
            if state.output.error is not None or len(state.rows) == state.expected:
                finish(file_id)

        def run_batch() -> None:
            live = [(fid, w) for fid, w in batch if states[fid].output.error is None]
            batch.clear()
            if not live:
                return
            inputs = torch.stack([w.features for _, w in live])  # (B, T, F)
            try:
                outputs = self.forward(inputs).float().cpu().numpy()
            except Exception as exc:
                if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
                    message = "out of memory on the device (try a smaller --batch-size)"
                else:
                    message = f"model failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
                for fid, _ in live:
                    states[fid].output.error = message
                    check_complete(fid)
                return
            for (fid, window), row in zip(live, outputs):
                states[fid].rows[window.index] = row
                check_complete(fid)

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ast-decode") as pool:
            try:
                while next_emit < len(items):
                    while running < max_running and next_submit < len(items):
                        item = items[next_submit]
                        output = FileOutput(item)
                        try:
                            stat = os.stat(item.path)
                            output.size, output.mtime = stat.st_size, stat.st_mtime
                        except OSError:
                            pass
                        states[next_submit] = _FileState(output)
                        pool.submit(self._decode, next_submit, item)
                        next_submit += 1
                        running += 1
                    # Emit finished files in order.
                    while next_emit < len(items) and states.get(next_emit) and states[next_emit].finished:
                        yield states.pop(next_emit).output
                        next_emit += 1
                    if next_emit >= len(items):
                        break
                    try:
                        kind, fid, payload = self._queue.get(timeout=0.05 if batch else 0.5)
                    except queue.Empty:
                        if batch:
                            run_batch()  # nothing else is coming right now: do not sit on a partial batch
                        continue
                    state = states[fid]
                    if kind == _WINDOW:
                        state.output.windows.append((payload.start, payload.end))
                        batch.append((fid, payload))
                        if len(batch) >= self.batch_size:
                            run_batch()
                    elif kind == _DONE:
                        running -= 1
                        state.expected, state.output.duration = payload
                        state.output.windows.sort()
                        if batch and any(f == fid for f, _ in batch) and self._queue.empty():
                            run_batch()
                        check_complete(fid)
                    else:
                        running -= 1
                        state.output.error = payload
                        state.expected = 0
                        check_complete(fid)
            finally:
                self._stop.set()
                pool.shutdown(wait=False, cancel_futures=True)
