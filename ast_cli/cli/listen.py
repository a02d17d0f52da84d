"""``ast listen``: tag a live stream as it plays, one JSON line per window (or onsets/offsets, or a live view)."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from ..run.options import Activation, RunOptions, _choices
from ._app import app
from ._common import (DEFAULT_MODEL, DebugOpt, HeadOpt, ModelOpt, NoBaseHeadOpt, QuietOpt, ThresholdsOpt,
                      apply_calibrations, calibrations_of, label_list, listen_run_options, load_tagger, model_labels,
                      parse_threshold, stderr_console)
from ._errors import cli_errors, debug_enabled, say

LiveFormat = _choices("LiveFormat", "live jsonl", "What listen prints.")
SampleFormat = _choices("SampleFormat", "s16le s32le f32le", "Raw PCM sample format.")


@app.command()
@listen_run_options
def listen(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="- (WAV or, with --raw, PCM on stdin), or anything ffmpeg opens: a file, a URL, a device.")],
    run: RunOptions,
    model: ModelOpt = DEFAULT_MODEL,
    raw: Annotated[bool, typer.Option("--raw", help="stdin is raw PCM (give --rate, --channels, --sample-format).")] = False,
    rate: Annotated[Optional[int], typer.Option(min=1, metavar="HZ", help="Sample rate of raw PCM.")] = None,
    channels: Annotated[int, typer.Option(min=1, max=65535, metavar="N", help="Channels of raw PCM (at most 65535, as in a WAV header).")] = 1,
    sample_format: Annotated[SampleFormat, typer.Option("--sample-format", help="Sample format of raw PCM.")] = SampleFormat.s16le,
    top: Annotated[Optional[int], typer.Option(min=0, metavar="N", help="Labels per window (0 = all; default 5, or all with --threshold P); with --threshold calibrated, of the labels without a calibrated threshold.")] = None,
    threshold: Annotated[Optional[str], typer.Option(metavar="P|calibrated[:P]", help="Keep labels with score >= P (with --events: the on/off threshold, default 0.5). calibrated: each label's own threshold from ast evaluate --calibrate (--thresholds); labels without one go by --top, or with calibrated:P by P.")] = None,
    thresholds: ThresholdsOpt = None,
    include: Annotated[Optional[list[str]], typer.Option(metavar="LABEL", help="Only these labels (repeatable; @FILE: one per line).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(metavar="LABEL", help="Never these labels (repeatable; @FILE: one per line).")] = None,
    events: Annotated[bool, typer.Option("--events", help="Print only onsets and offsets: a label's score crossing --threshold.")] = False,
    activation: Annotated[Optional[Activation], typer.Option(help="sigmoid (multi-label), softmax (single-label) or none; default: what the checkpoint was trained for.")] = None,
    format: Annotated[Optional[LiveFormat], typer.Option("--format", "-f", help="live (a view of the current top labels; default on a terminal) or jsonl.")] = None,
    stall: Annotated[float, typer.Option(metavar="SECONDS", help="Fail when the source sends nothing for this long.")] = 30.0,
    drop: Annotated[Optional[bool], typer.Option("--drop/--no-drop", help="Drop windows the model has no time for (default for stdin, URLs and devices), or wait for it (default for a recording on disk).")] = None,
    head: HeadOpt = None,
    no_base_head: NoBaseHeadOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Tag a live stream as it plays: a window of the model's length every --hop seconds (default 1 s here).

    Each window ends --hop after the previous one; until one window's worth has arrived, windows are the
    audio so far, zero-padded as the reference pads a short clip. One JSON line per window as soon as it is
    scored, flushed: {"start", "end"} in seconds from the start of the stream, "time" (wall clock),
    "labels", "latency_s". When the model falls behind the stream (slower than real time), windows are
    dropped (and counted on stderr), never queued; audio that comes faster than real time (a file piped in)
    and a recording on disk wait for the model instead (--drop/--no-drop). EOF scores the last partial
    window; Ctrl-C flushes and exits 130.

    Examples:

      arecord -f S16_LE -r 16000 -c 1 | ast listen - --events --threshold 0.4

      ffmpeg -i rtsp://camera/stream -f wav - | ast listen - --include Speech --include Dog

      ast listen https://radio.example/stream.mp3 --hop 2 --format jsonl
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        from ..errors import UsageError
        from ..tasks.listen import EventTracker, Listener, check_stall, ffmpeg_source
        from ..audio.resample import check_rate
        from ..audio.sources import StreamSource
        from ..checkpoint.heads import read_heads
        from ..run.tagger import LabelSelection

        check_stall(stall), _refuse_missing(source)
        if rate is not None:
            try:
                check_rate(rate)
            except ValueError as exc:
                raise UsageError(str(exc), option="rate") from None
        threshold, calibrated = parse_threshold(threshold)
        threshold = 0.5 if events and threshold is None else threshold
        selection = LabelSelection.from_options(top, threshold, label_list(include), label_list(exclude), activation,
                                                fast=run.fast)
        if raw and source != "-":
            raise UsageError("--raw reads stdin: give - as the source")
        if raw and rate is None:
            raise UsageError("raw PCM needs its sample rate", hint="add --rate HZ (and --channels, --sample-format)")
        fmt = format or (LiveFormat.live if sys.stdout.isatty() and not events else LiveFormat.jsonl)
        heads = read_heads(head or (), not no_base_head)  # a missing folder or not a head: before the model
        if not heads and not model_labels(model, run, stderr, quiet):  # a bare encoder alone: nothing to score
            from ..run.tagger import no_labels

            raise no_labels(model)
        # a missing or bad file: before any work
        calibrations = calibrations_of(model, thresholds, calibrated, heads, not no_base_head)
        tagger = load_tagger(model, run, stderr, quiet, heads=heads, base_head=not no_base_head)
        recording = source != "-" and os.path.isfile(source)
        if calibrations is not None:
            selection = apply_calibrations(selection, tagger.parts(), calibrations, activation, heads)
        own = activation or (None if heads else tagger.default_activation)  # None: each head's own
        listener = Listener(tagger.scoring_backend, tagger.labels, hop_seconds=run.hop_seconds or 1.0,
                            selection=selection, activation=own, stall_seconds=stall, parts=tagger.parts(),
                            drop=(not recording) if drop is None else drop)
        tracker = EventTracker(listener.labels, _on_off(selection, threshold), listener.allowed) if events else None
        if source == "-":
            # Unbuffered, not sys.stdin.buffer: a reader thread blocked in a buffered stdin would abort
            # CPython's shutdown ("could not acquire lock for <stdin>") when the run ends on an error.
            try:
                stdin = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
            except (OSError, ValueError, AttributeError):  # not a real file (an in-process test runner)
                stdin = sys.stdin.buffer
            stream = StreamSource(stdin, "-", raw=raw, sample_rate=rate, channels=channels,
                                  sample_format=sample_format.value)
        else:
            stream = ffmpeg_source(source)
        from ._io import native_stderr_silenced

        try:
            with native_stderr_silenced(not debug_enabled(debug)):
                _loop(listener, stream, fmt, tracker, stderr, quiet)
        finally:
            getattr(stream, "close", lambda: None)()  # ffmpeg ends with the run, however it ends
            if not quiet:
                _say_pace(listener, stderr)


def _on_off(selection, threshold: float):
    """The --events threshold of each label: its calibrated one, else ``threshold`` (broadcast over the labels)."""
    if selection.thresholds is None:
        return threshold
    import numpy as np

    own = np.asarray(selection.thresholds)
    return np.where(np.isnan(own), threshold, own)


def _say_pace(listener, stderr) -> None:
    """Which of the two happened: the model fell behind the stream (windows dropped), or the audio came faster
    than it plays (a file piped in: every window scored, at the model's pace)."""
    pace = f"{listener.stream_seconds:.1f} s of audio in {listener.stream_wall_seconds:.1f} s"
    if listener.dropped:
        say(stderr, f"dropped {listener.dropped} windows: the model fell behind the stream ({pace}); a larger "
                    "--hop, --quantize int8 or a GPU keeps up")
    elif listener.drop and listener.stream_seconds > 1.1 * listener.stream_wall_seconds + 0.5:
        say(stderr, f"note: the audio came faster than real time ({pace}): every window was scored, as fast "
                    "as the model goes, none dropped")


def _refuse_missing(source: str) -> None:
    """A local file that is not there (a typo): said before the model loads, where ffmpeg would say it after."""
    from ..errors import AstError

    local = source[len("file://"):] if source.startswith("file://") else None if "://" in source else source
    if source != "-" and not source.startswith("pipe:") and local is not None and not os.path.exists(local):
        raise AstError(f"{source}: no such file", hint="name a file, a URL (http://, rtsp://...) or - for stdin")


def _loop(listener, stream, fmt, tracker, stderr, quiet: bool) -> None:
    import time

    from ..run.records import dumps, label_records

    if fmt is LiveFormat.live and tracker is None:
        from ._render import LiveView

        with LiveView() as view:
            for window in listener.windows(stream):
                view.update(window, listener.dropped)
        return
    reported, last_note = 0, 0.0
    last = None
    try:
        for window in listener.windows(stream):
            last = window
            if tracker is not None:
                lines = [_event(e) for e in tracker.update(window)]
            else:
                lines = [dumps({"start": window.start, "end": window.end, "time": _iso(window.wall),
                                "labels": label_records(window.labels),
                                "latency_s": round(window.latency, 4)})]
            for line in lines:
                sys.stdout.write(line + "\n")
            sys.stdout.flush()
            if listener.dropped > reported and time.monotonic() - last_note > 10 and not quiet:
                say(stderr, f"dropped {listener.dropped} windows so far: the model fell behind the stream")
                reported, last_note = listener.dropped, time.monotonic()
    except BaseException:  # a stall, a failed source, Ctrl-C or SIGTERM: its onsets get their offsets too
        _close_events(tracker, last, failing=True)
        raise
    _close_events(tracker, last)


def _close_events(tracker, last, failing: bool = False) -> None:
    """Offsets, at the end of the ``last`` window scored, for the labels still on when the stream ended (however
    it did). ``failing``: the run ends on an error, which is what is said if stdout cannot take them."""
    import time

    if tracker is None or last is None:
        return
    try:
        for event in tracker.close(last.end, time.time()):
            sys.stdout.write(_event(event) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):  # stdout gone (a reader that went away, closed): nothing to write them to
        if not failing:
            raise


def _event(event) -> str:
    from ..run.records import dumps

    score = None if event.score != event.score else event.score  # NaN (no score at the end) -> null
    return dumps({"event": event.kind, "label": event.label, "index": event.index, "time": event.time,
                  "score": score, "wall": _iso(event.wall)})


def _iso(wall: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds")
