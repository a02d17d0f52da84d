"""The engine on its own: Batcher, OrderedEmitter, a run's lifecycle (stop, reuse), failures and ordering.

Sources are in-memory arrays and the backend a small function, so nothing here needs a model."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from ast_cli.run.engine import Batcher, Engine, OrderedEmitter
from ast_cli.errors import AudioDecodeError
from ast_cli.audio.features import FeatureConfig, Window
from ast_cli.audio.sources import ArraySource
from tolerances import SAME_MACHINE_BATCHING

FEATURES = FeatureConfig(max_length=16, num_mel_bins=128)  # 0.16 s windows: many windows from little audio


def mean_backend(inputs: torch.Tensor) -> np.ndarray:
    """(B, T, F) -> (B, 1): something that depends on each window's content."""
    return inputs.mean(dim=(1, 2)).numpy()[:, None]


def source(seconds: float, seed: int, name: str | None = None) -> ArraySource:
    rng = np.random.default_rng(seed)
    return ArraySource(rng.uniform(-0.5, 0.5, int(seconds * 16000)).astype(np.float32), 16000,
                       name or f"clip-{seed}")


def live_reader_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("ast-read") and t.is_alive())


def wait_for_no_readers(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while live_reader_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert live_reader_threads() == 0


# -- OrderedEmitter ----------------------------------------------------------------------------------------

def test_emitter_releases_in_submission_order():
    emitter = OrderedEmitter()
    emitter.finish(2, "c")
    emitter.finish(1, "b")
    assert list(emitter.ready()) == []  # 0 is not done: nothing may leave
    emitter.finish(0, "a")
    assert list(emitter.ready()) == ["a", "b", "c"] and emitter.emitted == 3
    emitter.finish(4, "e")
    assert list(emitter.ready()) == []
    with pytest.raises(ValueError, match="twice"):
        emitter.finish(1, "b again")


# -- Batcher -----------------------------------------------------------------------------------------------

def window(index: int, value: float) -> Window:
    return Window(index, index * 0.16, (index + 1) * 0.16, torch.full((16, 128), value))


def test_batcher_runs_full_batches_and_flushes_the_rest():
    calls = []

    def backend(inputs):
        calls.append(inputs.shape[0])
        return mean_backend(inputs)

    batcher = Batcher(backend, batch_size=3)
    assert batcher.add("a", window(0, 1.0)) == [] and batcher.add("b", window(0, 2.0)) == []
    done = batcher.add("a", window(1, 3.0))
    assert calls == [3] and [(r.key, r.index, float(r.row[0])) for r in done] == [("a", 0, 1.0), ("b", 0, 2.0),
                                                                                ("a", 1, 3.0)]
    batcher.add("c", window(0, 4.0))
    assert batcher.has("c") and len(batcher) == 1
    assert [float(r.row[0]) for r in batcher.flush()] == [4.0] and calls == [3, 1] and len(batcher) == 0
    assert batcher.flush() == []


def test_batcher_drops_a_failed_source_and_reports_backend_failures():
    batcher = Batcher(lambda inputs: (_ for _ in ()).throw(RuntimeError("CUDA out of memory. Tried...")), 4)
    batcher.add("a", window(0, 1.0))
    batcher.add("b", window(0, 1.0))
    batcher.drop("a")
    results = batcher.flush()
    assert [(r.key, r.row) for r in results] == [("b", None)]
    assert results[0].error == "out of memory on the device (a batch of 1 windows)"
    assert isinstance(results[0].exception, RuntimeError)
    broken = Batcher(lambda inputs: np.zeros((inputs.shape[0] + 1, 1)), 1)
    assert "returned 2 rows for 1 windows" in broken.add("x", window(0, 0.0))[0].error


# -- runs --------------------------------------------------------------------------------------------------

def test_outputs_equal_the_backend_on_each_window_in_input_order():
    sources = [source(0.5, 1), source(0.05, 2), source(1.3, 3)]
    engine = Engine(FEATURES, mean_backend, batch_size=3, workers=2)
    outputs = list(engine.run(sources))
    assert [o.name for o in outputs] == ["clip-1", "clip-2", "clip-3"]
    for src, out in zip(sources, outputs):
        assert out.error is None and out.duration == pytest.approx(src.samples.shape[0] / 16000)
        expected = [mean_backend(w.features[None])[0] for w in _windows(src)]
        assert out.outputs.shape == (len(expected), 1) and len(out.windows) == len(expected)
        np.testing.assert_allclose(out.outputs, np.stack(expected), atol=SAME_MACHINE_BATCHING)


def _windows(src: ArraySource) -> list[Window]:
    from ast_cli.audio.features import FrameStream

    stream = FrameStream(FEATURES)
    return stream.push(torch.from_numpy(src.samples)) + stream.finish()


class SlowSource(ArraySource):
    """Blocks until released: a long file that finishes last."""

    def __init__(self, *args, release: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = release

    def blocks(self):
        if not self.release.wait(10):
            raise AssertionError("never released")
        yield from super().blocks()


def test_a_slow_first_source_holds_back_the_rest_but_not_their_work():
    release = threading.Event()
    slow = SlowSource(np.zeros(8000, np.float32), 16000, "slow", release=release)
    done = []
    engine = Engine(FEATURES, mean_backend, batch_size=2, workers=2)
    outputs = engine.run([slow, source(0.3, 5), source(0.3, 6)], on_progress=lambda out: done.append(out.name))
    results = []
    consumer = threading.Thread(target=lambda: results.extend(outputs))
    consumer.start()
    deadline = time.monotonic() + 5
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == ["clip-5", "clip-6"] and results == []  # processed, but not emitted before "slow"
    release.set()
    consumer.join(10)
    assert [r.name for r in results] == ["slow", "clip-5", "clip-6"] and done[-1] == "slow"


class FailingSource(ArraySource):
    def __init__(self, *args, error: Exception, after_blocks: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.error, self.after_blocks = error, after_blocks

    def blocks(self):
        for i, block in enumerate(super().blocks()):
            if i >= self.after_blocks:
                break
            yield block
        raise self.error


@pytest.mark.parametrize("error, message", [
    (AudioDecodeError("decode failed: lost sync"), "decode failed: lost sync"),
    (ValueError("a bug"), "unexpected error: ValueError: a bug"),
])
def test_a_source_that_raises_fails_alone(error, message):
    bad = FailingSource(np.zeros(16000 * 40, np.float32), 16000, "bad", error=error, after_blocks=1)
    outputs = list(Engine(FEATURES, mean_backend, batch_size=4, workers=2).run([source(0.4, 1), bad, source(0.4, 2)]))
    assert [o.error for o in outputs] == [None, message, None]
    assert outputs[1].outputs is None and outputs[1].windows == [] and outputs[1].exception is error
    assert outputs[2].outputs.shape[0] > 0


def test_a_backend_that_raises_fails_the_windows_of_its_batch_only():
    calls = []

    def flaky(inputs):
        calls.append(inputs.shape[0])
        if len(calls) == 2:
            raise RuntimeError("kernel exploded")
        return mean_backend(inputs)

    outputs = list(Engine(FEATURES, flaky, batch_size=1, workers=1).run(
        [source(0.1, 1), source(0.1, 2), source(0.1, 3)]))
    assert [o.error for o in outputs] == [None, "model failed: RuntimeError: kernel exploded", None]


def test_stop_ends_a_run_promptly_and_the_engine_runs_again():
    long = [source(30.0, seed) for seed in range(4)]  # ~190 windows each
    engine = Engine(FEATURES, lambda x: (time.sleep(0.01), mean_backend(x))[1], batch_size=2, workers=2)
    seen = []
    timer = threading.Timer(0.3, engine.stop)
    timer.start()
    started = time.monotonic()
    seen.extend(engine.run(long))
    assert time.monotonic() - started < 5  # it stopped, it did not finish ~800 windows at 10 ms a batch
    assert len(seen) < len(long)
    wait_for_no_readers()
    again = list(engine.run([source(0.2, 9), source(0.2, 10)]))  # same engine, a fresh run
    assert [o.name for o in again] == ["clip-9", "clip-10"] and all(o.error is None for o in again)


def test_closing_the_output_iterator_stops_the_workers():
    engine = Engine(FEATURES, mean_backend, batch_size=2, workers=2)
    outputs = engine.run([source(0.2, 1)] + [source(30.0, seed) for seed in range(2, 6)])
    assert next(outputs).name == "clip-1"
    outputs.close()
    wait_for_no_readers()


def test_two_runs_of_one_engine_are_independent():
    engine = Engine(FEATURES, mean_backend, batch_size=2, workers=1)
    first, second = engine.run([source(0.3, 1)]), engine.run([source(0.3, 2)])
    assert next(second).name == "clip-2" and next(first).name == "clip-1"


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_23_1_memory_is_flat_in_the_number_of_files(tmp_path):
    """4,000 one-second files (hard links of one clip): RSS after 4,000 minus RSS after 1,000 stays far below what
    keeping each file's state costs (40-60 kB per file with this 527-logit backend before the fix, 0.15 MB with a
    real model; 0.1 kB after it). 15 kB per file (45 MB over 3,000 files) leaves room for allocator noise."""
    import soundfile as sf

    clip = tmp_path / "clip.wav"
    sf.write(clip, np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32), 16000)
    paths = []
    for i in range(4000):
        path = tmp_path / f"{i:05d}.wav"
        os.link(clip, path)
        paths.append(str(path))
    # Rows as the model backend gives them: numpy views of a torch tensor (a file's row kept its batch alive).
    engine = Engine(FeatureConfig(max_length=64), lambda x: torch.zeros(x.shape[0], 527).numpy(), batch_size=4)
    rss = {}
    for done, output in enumerate(engine.run(paths), 1):
        assert output.error is None
        if done in (1000, 4000):
            rss[done] = _rss_mb()
    assert (rss[4000] - rss[1000]) / 3000 * 1000 < 15  # kB per file


def test_a_failed_batch_with_several_windows_of_one_finished_file_fails_it_once():
    def broken(inputs):
        raise RuntimeError("kernel exploded")

    outputs = list(Engine(FEATURES, broken, batch_size=8, workers=1).run([source(0.5, 1), source(0.5, 2)]))
    assert [o.error for o in outputs] == ["model failed: RuntimeError: kernel exploded"] * 2
