"""Timing ``classify`` on real files for ``ast benchmark --end-to-end``: one sequential pass split by stage
(decode, resample, features, model) and one pipelined pass through ``Tagger.classify`` (parallel decode,
batched windows), which is what ``ast classify`` does."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .benchmark import Mode


@dataclass(frozen=True)
class EndToEndRow:
    """``classify`` on real files: sequential seconds per stage, and the pipelined wall time."""

    attn: str
    dtype: str
    quantize: str | None
    device: str
    batch_size: int
    workers: int
    files: int
    failed: int
    audio_seconds: float
    windows: int
    decode_s: float  # reading and downmixing (soundfile or ffmpeg)
    resample_s: float  # to 16 kHz
    features_s: float  # log-mel frames and windows
    model_s: float  # forward passes, batch_size windows at a time
    pipelined_s: float  # Tagger.classify wall time: workers decode while the model runs
    files_per_s: float  # from the pipelined pass
    x_realtime: float  # audio seconds per pipelined second


def _stage_pass(tagger, paths: Sequence[str], batch_size: int) -> dict:
    """One file after another, each stage timed on its own: decoding (``AudioReader.raw_blocks``, with its
    truncation checks), downmix + resampling (``ToModelRate``, with its NaN check), features (``FrameStream``)
    and the model, batch_size windows at a time."""
    import torch

    from ..audio.decode import AudioReader, ToModelRate
    from ..errors import AstError
    from ..audio.features import FrameStream

    totals = {"decode_s": 0.0, "resample_s": 0.0, "features_s": 0.0, "model_s": 0.0}
    pending: list[torch.Tensor] = []
    windows = failed = 0
    audio_seconds = 0.0

    def timed(stage: str, call, *args):
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            totals[stage] += time.perf_counter() - start

    def run_model() -> None:
        timed("model_s", tagger.logits, torch.stack(pending))  # returns on the CPU: synchronised
        pending.clear()

    for path in paths:
        try:
            reader = timed("decode_s", AudioReader, path)
            convert, stream = ToModelRate(reader.info.sample_rate), FrameStream(tagger.features)
            blocks = reader.raw_blocks()
            while True:
                block = timed("decode_s", next, blocks, None)
                if block is None:
                    audio = timed("resample_s", convert.finish)
                else:
                    audio = timed("resample_s", convert.push, block)
                ready = timed("features_s", stream.push, torch.from_numpy(audio)) if audio.shape[0] else []
                if block is None:
                    ready += timed("features_s", stream.finish)
                for window in ready:
                    pending.append(window.features)
                    windows += 1
                    if len(pending) >= batch_size:
                        run_model()
                if block is None:
                    break
            audio_seconds += reader.duration
        except AstError:
            failed += 1
    if pending:
        run_model()
    return dict(totals, windows=windows, failed=failed, audio_seconds=audio_seconds)


def benchmark_end_to_end(
    tagger,
    paths: Sequence[str],
    *,
    attn: str,
    mode: Mode,
    batch_size: int = 4,
    workers: int = 2,
) -> EndToEndRow:
    """Time ``tagger`` on ``paths`` (files): stage by stage, then pipelined through ``Tagger.classify``."""
    import torch

    from ..run.engine import Engine
    from ..run.tagger import LabelSelection, Tagger

    tagger = Tagger(tagger.backend.with_attn(attn), tagger.labels, name=tagger.name, options=tagger.options)
    shape = (1, tagger.features.max_length, tagger.features.num_mel_bins)
    tagger.logits(torch.zeros(shape))  # warm-up: first-call allocations and lazy kernels are not the files' fault
    stages = _stage_pass(tagger, paths, batch_size)
    engine = Engine(tagger.features, tagger.backend, batch_size=batch_size, workers=workers)
    start = time.perf_counter()
    results = list(tagger.classify(paths, selection=LabelSelection(top=1), engine=engine))
    pipelined = time.perf_counter() - start
    audio = sum(r.duration or 0.0 for r in results if r.error is None)
    return EndToEndRow(
        attn=attn, dtype=mode.dtype, quantize=mode.quantize, device=tagger.device, batch_size=batch_size,
        workers=workers, files=len(results), failed=sum(r.error is not None for r in results),
        audio_seconds=round(audio, 3), windows=stages["windows"],
        decode_s=round(stages["decode_s"], 4), resample_s=round(stages["resample_s"], 4),
        features_s=round(stages["features_s"], 4), model_s=round(stages["model_s"], 4),
        pipelined_s=round(pipelined, 4), files_per_s=round(len(results) / pipelined, 4),
        x_realtime=round(audio / pipelined, 3),
    )
