"""``ast listen`` (#16): rolling windows of a live stream, each equal to classify on its excerpt; raw PCM and pipe
WAV headers; dropping windows (never queuing them) when the model is slower than the stream; EOF, Ctrl-C,
stalls and broken sources."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ast_cli.cli import app
from ast_cli.errors import AudioDecodeError
from ast_cli.tasks.listen import EventTracker, Listener, LiveWindow
from ast_cli.run.options import RunOptions
from ast_cli.audio.sources import ArraySource, StreamSource
from ast_cli.run.tagger import LabelSelection, Tagger
from conftest import reference_features, sigint_default, tone
from tolerances import END_TO_END, PCM16_SCORES
from test_sources import wav_header

HOP = 160  # samples per frame


@pytest.fixture(scope="module")
def tagger(tiny_checkpoint):
    return Tagger.load(str(tiny_checkpoint[0]), RunOptions(device="cpu"))


def expected_scores(tiny_checkpoint, wave: np.ndarray, start: float, end_frame: int) -> np.ndarray:
    """classify on the excerpt: the reference model on the reference features of those samples."""
    _, hf_model, extractor = tiny_checkpoint
    first = round(start * 100)
    excerpt = wave[first * HOP : (end_frame - 1) * HOP + 400]
    with torch.inference_mode():
        return torch.sigmoid(hf_model(reference_features(extractor, excerpt)).logits)[0].numpy()


def test_windows_roll_every_hop_and_equal_classify_on_the_excerpt(tagger, tiny_checkpoint):
    wave = tone(3.3, 16000, seed=21)[:, 0]
    listener = Listener(tagger.backend, tagger.labels, hop_seconds=0.25, selection=LabelSelection(top=None),
                        drop=False)  # a recording: every window
    windows = list(listener.windows(ArraySource(wave, 16000, "live")))
    ends = [w.end for w in windows]
    assert ends[:-1] == pytest.approx([0.25 * k for k in range(1, 14)])  # one every hop...
    assert ends[-1] == pytest.approx(3.3)  # ...and the tail at EOF
    assert windows[0].start == 0.0 and windows[1].start == 0.0 and windows[3].start == pytest.approx(0.36)
    for window in windows:
        end_frame = round(window.end * 100) if window is not windows[-1] else 1 + (wave.shape[0] - 400) // HOP
        np.testing.assert_allclose(window.scores, expected_scores(tiny_checkpoint, wave, window.start, end_frame),
                                   atol=END_TO_END, err_msg=f"window {window.index}")
    assert listener.dropped == 0


def test_a_slow_writer_gets_records_before_it_finishes(tagger, tiny_checkpoint):
    wave = tone(6.0, 16000, seed=22)[:, 0]
    pcm = (wave * 32767).astype("<i2")
    read_fd, write_fd = os.pipe()

    def writer():
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(wav_header(16000, 1))  # unknown length, as arecord writes to a pipe
            for i in range(0, pcm.shape[0], 4000):  # 0.25 s of audio every 1/16 s: 4x real time
                pipe.write(pcm[i : i + 4000].tobytes())
                pipe.flush()
                time.sleep(1 / 16)

    thread = threading.Thread(target=writer)
    thread.start()
    listener = Listener(tagger.backend, tagger.labels, hop_seconds=1.0, selection=LabelSelection(top=None))
    arrived = []
    with os.fdopen(read_fd, "rb") as stream:
        for window in listener.windows(StreamSource(stream, "pipe", chunk_seconds=0.05)):
            arrived.append((window, thread.is_alive()))
    thread.join()
    assert arrived[0][1], "the first record came only after the writer had finished"
    windows = [w for w, _ in arrived]
    assert [w.end for w in windows] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    as_read = pcm.astype(np.float32) / 32768
    for window in windows[:-1]:
        np.testing.assert_allclose(window.scores, expected_scores(tiny_checkpoint, as_read, window.start,
                                                                  round(window.end * 100)), atol=END_TO_END)


@pytest.mark.parametrize("sample_format,dtype,scale", [("s16le", "<i2", 32767), ("s32le", "<i4", 2**31 - 1),
                                                       ("f32le", "<f4", 1.0)])
def test_raw_pcm_streams(tagger, sample_format, dtype, scale):
    wave = tone(2.2, 16000, seed=23)[:, 0]
    pcm = (wave * scale).astype(dtype)
    source = StreamSource(io.BytesIO(pcm.tobytes()), raw=True, sample_rate=16000, channels=1,
                          sample_format=sample_format)
    listener = Listener(tagger.backend, tagger.labels, selection=LabelSelection(top=None), drop=False)
    scores = [w.scores for w in listener.windows(source)]
    reference = [w.scores for w in Listener(tagger.backend, tagger.labels, selection=LabelSelection(top=None),
                                            drop=False).windows(ArraySource(wave, 16000))]
    assert len(scores) == len(reference) == 3
    np.testing.assert_allclose(np.stack(scores), np.stack(reference), atol=PCM16_SCORES)  # 16-bit rounding


class SlowBackend:
    def __init__(self, backend, seconds: float):
        self.backend, self.seconds, self.features = backend, seconds, backend.features

    def __call__(self, inputs):
        time.sleep(self.seconds)
        return self.backend(inputs)


class Paced:
    """Audio at the pace it plays (a microphone): 0.05 s blocks, 0.05 s apart."""

    name = "live"

    def __init__(self, wave: np.ndarray):
        self.wave = wave

    def blocks(self):
        for i in range(0, self.wave.shape[0], 800):
            time.sleep(0.05)
            yield self.wave[i : i + 800]


def test_a_model_behind_the_streams_clock_drops_windows_with_flat_memory(tagger):
    wave = tone(2.0, 16000, seed=24)[:, 0]  # 20 windows at a 0.1 s hop, as they play
    listener = Listener(SlowBackend(tagger.backend, 0.25), tagger.labels, hop_seconds=0.1)
    windows = list(listener.windows(Paced(wave)))
    assert listener.dropped >= 5 and len(windows) + listener.dropped == 19 + 1  # every 0.1 s, and the tail
    assert len(windows) > 1
    assert windows[-1].end == pytest.approx(2.0)  # the newest window is always the one scored
    assert all(a.end < b.end for a, b in zip(windows, windows[1:]))


def test_events_are_onsets_and_offsets():
    labels = ("Dog", "Cat", "Bird")
    tracker = EventTracker(labels, 0.5, np.array([True, True, False]))

    def window(end, scores):
        return LiveWindow(0, end - 1, end, [], np.array(scores), wall=end)

    assert tracker.update(window(1.0, [0.2, 0.1, 0.9])) == []  # Bird is not watched
    [onset] = tracker.update(window(2.0, [0.7, 0.1, 0.9]))
    assert (onset.kind, onset.label, onset.time, onset.score) == ("onset", "Dog", 2.0, 0.7)
    assert tracker.update(window(3.0, [0.6, 0.2, 0.1])) == []  # still on: nothing new
    events = tracker.update(window(4.0, [0.3, 0.8, 0.1]))
    assert [(e.kind, e.label) for e in events] == [("offset", "Dog"), ("onset", "Cat")]
    assert [(e.kind, e.label, e.time) for e in tracker.close(4.5, 5.0)] == [("offset", "Cat", 4.5)]


def test_cli_jsonl_events_and_errors(tiny_checkpoint):
    wave = tone(2.5, 22050, 2, seed=25)
    data = wav_header(22050, 2, bits=32, fmt=3) + wave.astype("<f4").tobytes()
    runner = CliRunner()
    result = runner.invoke(app, ["listen", "-", "--model", str(tiny_checkpoint[0]), "-f", "jsonl", "--top", "2"],
                           input=data)
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["end"] for line in lines] == [1.0, 2.0, 2.5] and all(len(x["labels"]) == 2 for x in lines)
    assert set(lines[0]) == {"start", "end", "time", "labels", "latency_s"}
    events = runner.invoke(app, ["listen", "-", "--model", str(tiny_checkpoint[0]), "--events", "--threshold",
                                 "0.6"], input=data)
    kinds = [json.loads(line)["event"] for line in events.stdout.splitlines()]
    assert kinds and set(kinds) <= {"onset", "offset"} and kinds.count("onset") == kinds.count("offset")
    not_wav = runner.invoke(app, ["listen", "-", "--model", str(tiny_checkpoint[0])], input=b"ID3 no wav here" * 9)
    assert not_wav.exit_code == 1 and "not a WAV stream" in not_wav.stderr and "Traceback" not in not_wav.stderr
    raw_no_rate = runner.invoke(app, ["listen", "-", "--raw", "--model", str(tiny_checkpoint[0])], input=b"")
    assert raw_no_rate.exit_code == 2 and "--rate" in raw_no_rate.stderr


@pytest.mark.parametrize("args, option", [
    (["--stall", "inf"], "--stall"),  # OverflowError after the model loaded
    (["--stall", "nan"], "--stall"),  # waited forever
    (["--stall", "0"], "--stall"),
    (["--raw", "--rate", "4294967295"], "--rate"),  # accepted: an 11 TB kernel
    (["--raw", "--rate", "768001"], "--rate"),
])
def test_23_6_stall_and_rate_are_usage_errors_before_the_model_loads(tmp_path, args, option):
    result = CliRunner().invoke(app, ["listen", "-", "--model", str(tmp_path / "no-such-model"), *args], input=b"")
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and option in result.stderr and "no-such-model" not in result.stderr


@pytest.mark.slow  # whole processes
def test_cli_a_stalled_stream_and_ctrl_c(tiny_checkpoint):
    args = [sys.executable, "-m", "ast_cli", "listen", "-", "--model", str(tiny_checkpoint[0]), "-f", "jsonl"]
    stalled = subprocess.Popen(args + ["--stall", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    stalled.stdin.write(wav_header(16000, 1) + (tone(1.5)[:, 0] * 32767).astype("<i2").tobytes())
    stalled.stdin.flush()  # then nothing more, and the pipe stays open
    deadline = time.monotonic() + 60
    while stalled.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stalled.returncode == 1
    err = stalled.stderr.read().decode()
    assert "the stream sent no audio for 1 s" in err and "Traceback" not in err
    assert json.loads(stalled.stdout.readline())["end"] == 1.0  # what came was tagged
    stalled.stdin.close()

    live = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=sigint_default)
    live.stdin.write(wav_header(16000, 1) + (tone(3.0)[:, 0] * 32767).astype("<i2").tobytes())
    live.stdin.flush()
    first = live.stdout.readline()
    live.send_signal(signal.SIGINT)
    rest, err = live.communicate(timeout=60)
    # a live stream drops windows the model had no time for, so under load the first line may be a later one
    assert live.returncode == 130 and json.loads(first)["end"] in (1.0, 2.0, 3.0)
    assert err.decode().strip().splitlines()[-1] == "Interrupted."


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg executable")
def test_cli_through_ffmpeg_and_a_broken_source(tiny_checkpoint, tmp_path):
    import soundfile as sf

    path = tmp_path / "radio.flac"
    sf.write(str(path), tone(2.0, 44100, 2, seed=26), 44100)
    runner = CliRunner()
    result = runner.invoke(app, ["listen", str(path), "--model", str(tiny_checkpoint[0]), "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["end"] for line in result.stdout.splitlines()] == [1.0, 2.0]
    (tmp_path / "nothing.mp3").write_bytes(b"not audio at all")  # a missing file is refused earlier (test_s9_walk)
    broken = runner.invoke(app, ["listen", str(tmp_path / "nothing.mp3"), "--model", str(tiny_checkpoint[0])])
    assert broken.exit_code == 1 and "ffmpeg could not read the source" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg executable")
def test_s8_9_ffmpeg_is_ended_and_reaped_after_a_stall(tiny_checkpoint, monkeypatch):
    from ast_cli.tasks import listen as listen_task

    streams = []
    original = listen_task._FfmpegStream.__init__

    def recorded(self, stream, process):
        streams.append(self)
        original(self, stream, process)

    monkeypatch.setattr(listen_task._FfmpegStream, "__init__", recorded)
    silent = socket.socket()  # accepts ffmpeg's connection, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        result = CliRunner().invoke(app, ["listen", f"http://127.0.0.1:{silent.getsockname()[1]}/s.mp3", "--model",
                                          str(tiny_checkpoint[0]), "-f", "jsonl", "--stall", "1"])
        alive = [s.process for s in streams if s.process.poll() is None]
    finally:
        for process in (s.process for s in streams):
            if process.poll() is None:
                process.kill()
                process.wait()
        silent.close()
    assert result.exit_code == 1 and "the stream sent no audio for 1 s" in result.stderr
    assert len(streams) == 1 and not alive, "ffmpeg still runs after the run ended"


def test_s8_1_a_chatty_ffmpeg_stderr_never_stalls_the_stream():
    """ffmpeg writing much more to stderr than a pipe holds, then audio: read at once, the last line kept."""
    from ast_cli.tasks.listen import _FfmpegStream

    header = wav_header(16000, 1)
    script = ("import sys; sys.stderr.write('Invalid data found\\n' * 20000); sys.stderr.write('the last word\\n');"
              f"sys.stderr.flush(); sys.stdout.buffer.write({header!r} + bytes(32000)); sys.exit(3)")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stream = _FfmpegStream(StreamSource(process.stdout, "chatty"), process)
    outcome = []

    def read() -> None:
        try:
            outcome.append(sum(block.shape[0] for block in stream.blocks()))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():
        process.kill()
        process.wait()
    assert outcome, "the stream stalled on ffmpeg's full stderr pipe"
    assert "ffmpeg stopped: the last word" in str(outcome[0]) and process.returncode == 3


def test_s8_16_a_file_piped_at_a_low_rate_drops_no_window(tagger):
    """5 samples at 1 Hz come at once: before, the clock's zero was taken from the first resampled block, which
    held the whole 5 s, so every window was overdue on arrival and 4 of 5 were dropped."""
    samples = (np.random.default_rng(0).standard_normal(5) * 0.1).astype("<f4")
    data = wav_header(1, 1, bits=32, fmt=3) + samples.tobytes()
    listener = Listener(SlowBackend(tagger.backend, 0.05), tagger.labels, hop_seconds=1.0)
    windows = list(listener.windows(StreamSource(io.BytesIO(data), "sr1")))
    assert (listener.dropped, [w.end for w in windows]) == (0, pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert listener.stream_seconds == pytest.approx(5.0) and listener.stream_wall_seconds < 4.0


class Backlogged(Paced):
    """A live stream whose first ``backlog`` seconds waited in the pipe while the model loaded."""

    def __init__(self, wave: np.ndarray, backlog: float):
        super().__init__(wave)
        self.backlog = int(backlog * 16000)

    def blocks(self):
        for i in range(0, self.wave.shape[0], 800):
            if i >= self.backlog:
                time.sleep(0.05)
            yield self.wave[i : i + 800]


def test_s8_16_a_backlog_at_start_up_is_audio_that_has_played(tagger):
    """The clock's zero was the first block's arrival: a live stream with 2 s buffered at start-up looked 2 s
    ahead of real time ("the audio came faster than real time")."""
    listener = Listener(tagger.backend, tagger.labels, hop_seconds=1.0)
    windows = list(listener.windows(Backlogged(tone(3.0, 16000, seed=27)[:, 0], 2.0)))
    assert [w.end for w in windows] == pytest.approx([1.0, 2.0, 3.0]) and listener.dropped == 0
    assert listener.stream_seconds == pytest.approx(3.0)
    assert listener.stream_wall_seconds == pytest.approx(3.0, abs=0.4)  # it played in real time


def test_s8_19_an_absurd_channel_count_is_a_usage_error_before_the_model_loads(tmp_path):
    """--channels 1000000000 loaded the model, then said the stream ended before any audio."""
    result = CliRunner().invoke(app, ["listen", "-", "--raw", "--rate", "16000", "--channels", "1000000000",
                                      "--model", str(tmp_path / "no-such-model")], input=b"\0" * 64000)
    assert result.exit_code == 2, result.stderr
    assert "--channels" in result.stderr and "no-such-model" not in result.stderr


class PacedThenSilent(Paced):
    """Audio as it plays, then nothing while the connection stays open (until ``release``)."""

    def __init__(self, wave: np.ndarray):
        super().__init__(wave)
        self.release, self.last_block = threading.Event(), 0.0

    def blocks(self):
        for block in super().blocks():
            self.last_block = time.monotonic()
            yield block
        self.release.wait(30)


def test_s8_D1_a_hop_longer_than_the_stall_works_and_a_silent_source_still_fails(tagger):
    """--stall timed the wait for the next window, not for the next audio: --hop 4 --stall 2 on a live stream
    said "the stream sent no audio for 2 s" while audio came every 0.1 s."""
    wave = tone(1.5, 16000, seed=28)[:, 0]
    listener = Listener(tagger.backend, tagger.labels, hop_seconds=0.5, stall_seconds=0.2)
    assert [w.end for w in listener.windows(Paced(wave))] == pytest.approx([0.5, 1.0, 1.5])
    silent = PacedThenSilent(wave[:8800])  # 0.55 s: windows end at 0.25 and 0.5 s, then it goes quiet
    windows = []
    try:
        with pytest.raises(AudioDecodeError, match="the stream sent no audio for 0.2 s"):
            for window in Listener(tagger.backend, tagger.labels, hop_seconds=0.25, stall_seconds=0.2).windows(silent):
                windows.append(window)
        failed_after = time.monotonic() - silent.last_block
    finally:
        silent.release.set()
    assert [w.end for w in windows] == pytest.approx([0.25, 0.5]) and 0.2 <= failed_after < 2.0


def test_s8_D1_a_reader_waiting_for_a_slow_model_is_no_stall(tagger):
    """The stall counts only the wait for the source: a recording (the reader waits for the model) scored by a
    model slower than --stall is not a stream that stopped."""
    listener = Listener(SlowBackend(tagger.backend, 0.3), tagger.labels, hop_seconds=0.25, stall_seconds=0.1,
                        drop=False)
    windows = list(listener.windows(ArraySource(tone(1.0, 16000, seed=29)[:, 0], 16000, "clip")))
    assert [w.end for w in windows] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and listener.dropped == 0


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg executable")
def test_s8_D12_a_local_playlist_is_refused_and_a_url_still_streams(tiny_checkpoint, tmp_path):
    """A local "f.m4a" that is an HLS playlist had ffmpeg decode the file it names (as classify no longer does);
    an http URL is still opened as ffmpeg opens it."""
    import functools
    import http.server
    import soundfile as sf

    segment = tmp_path / "r.ts"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:"
                    "duration=2", "-c:a", "aac", "-f", "mpegts", str(segment)], check=True, timeout=60)
    playlist = tmp_path / "f.m4a"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{segment}\n#EXT-X-ENDLIST\n")
    model = str(tiny_checkpoint[0])
    for source in (str(playlist), playlist.as_uri()):
        result = CliRunner().invoke(app, ["listen", source, "--model", model, "-f", "jsonl", "--quiet"])
        assert (result.exit_code, result.stdout) == (1, ""), source
        assert result.stderr.splitlines() == ["Error: not audio: a playlist (hls), naming other files to read in "
                                              "its place"]
    sf.write(str(tmp_path / "clip.wav"), tone(2.0, 16000, seed=30), 16000)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/clip.wav"
        result = CliRunner().invoke(app, ["listen", url, "--model", model, "-f", "jsonl", "--quiet"])
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["end"] for line in result.stdout.splitlines()] == [1.0, 2.0]


@pytest.mark.parametrize("ending, code, said", [
    (AudioDecodeError("the stream sent no audio for 2 s"), 1, "Error: the stream sent no audio for 2 s"),
    (KeyboardInterrupt(), 130, "Interrupted."),
])
def test_s9_events_still_open_get_their_offsets_however_the_stream_ends(tiny_checkpoint, monkeypatch, ending, code,
                                                                         said):
    """Only EOF closed open events: a stall, a failed source or Ctrl-C left onsets that never got an offset. Every
    ending now closes them at the end of the last window scored, then says its error and exits as before."""
    real = Listener.windows

    def two_then_ending(self, source):
        windows = real(self, source)
        yield next(windows)
        yield next(windows)
        windows.close()
        raise ending

    monkeypatch.setattr(Listener, "windows", two_then_ending)
    data = wav_header(16000, 1) + (tone(3.0)[:, 0] * 32767).astype("<i2").tobytes()
    result = CliRunner().invoke(app, ["listen", "-", "--model", str(tiny_checkpoint[0]), "--events", "--include",
                                      "Speech", "--threshold", "0"], input=data)  # Speech is on from the first window
    assert result.exit_code == code and result.stderr.splitlines()[-1] == said, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["event"], e["label"], e["time"]) for e in events] == [("onset", "Speech", 1.0), ("offset", "Speech", 2.0)]
