"""The ffmpeg/ffprobe decode path and pipes under hostile input (session 8, #1, #2, #8, #13, #17, #19): a file or
pipe that floods, stalls or points elsewhere gives one error record for itself, quickly, and the batch goes on."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

import ast_cli.audio.decode as decode
from ast_cli.cli import app
from ast_cli.errors import AudioDecodeError
from conftest import trickle_fifo, write_audio

runner = CliRunner()
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="needs the ffmpeg and ffprobe executables")
# A run as `ast`, with ``decode.STALL_SECONDS`` set from the first argument, so a stall test takes seconds.
WITH_STALL = ("import sys, ast_cli.audio.decode as d; d.STALL_SECONDS = float(sys.argv.pop(1)); "
              "from ast_cli.cli import main_process; main_process()")


def records(text: str) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, filter(str.strip, text.splitlines()))}


def ast_run(*args, stall: float | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """``ast classify ARGS`` as its own process, with ``stall`` as its ``STALL_SECONDS``; a hang fails the test at
    ``timeout`` instead of hanging it."""
    command = ["-m", "ast_cli"] if stall is None else ["-c", WITH_STALL, str(stall)]
    return subprocess.run([sys.executable, *command, "classify", *map(str, args), "-f", "jsonl", "--quiet"],
                          capture_output=True, text=True, timeout=timeout)


def ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *map(str, args)], check=True)


def fake_executable(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


# -- 1. ffmpeg's stderr is drained as it comes; ffmpeg making no progress is stopped ----------------------------------

def flooding_aac(path, copies: int = 2000):
    """ADTS AAC whose frames all fail to decode: ffmpeg prints ~116 bytes of errors a frame, far past a pipe's 64 KB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=1", "-c:a", "aac", "-f", "adts",
           path.with_suffix(".src"))
    data, frames, i = path.with_suffix(".src").read_bytes(), [], 0
    while i + 7 < len(data):
        length = ((data[i + 3] & 3) << 11) | (data[i + 4] << 3) | (data[i + 5] >> 5)
        frames.append(data[i:i + length])
        i += length
    bad = bytearray(max(frames[4:], key=len))
    for k in range(9, len(bad), 3):
        bad[k] ^= 0x5A
    path.write_bytes(b"".join(frames[:4]) + bytes(bad) * copies)
    return path


@pytest.mark.slow  # a whole process: a hang must fail at the timeout, not hang the suite
@needs_ffmpeg
def test_s8_1_a_decoder_flooding_stderr_never_hangs_the_batch(tiny_checkpoint, tmp_path):
    flood = flooding_aac(tmp_path / "dead" / "corrupt.aac")
    write_audio(tmp_path / "dead" / "z.wav", 1.0)
    proc = ast_run(tmp_path / "dead", "--model", tiny_checkpoint[0], timeout=60)
    got = records(proc.stdout)
    assert proc.returncode == 1, proc.stderr
    assert got[str(flood)]["error"].startswith("decode failed (ffmpeg: ")
    assert got[str(tmp_path / "dead" / "z.wav")]["error"] is None
    assert proc.stderr.splitlines() == [f"error: {flood}: {got[str(flood)]['error']}"]


def test_s8_1_ffmpeg_giving_no_audio_is_stopped_at_the_progress_limit(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    fake = fake_executable(tmp_path, "ffmpeg", f"echo $$ > {pid_file}; exec sleep 5")
    monkeypatch.setattr(decode.shutil, "which", lambda name: fake)
    monkeypatch.setattr(decode, "_input_options", lambda executable: ())
    monkeypatch.setattr(decode, "STALL_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(AudioDecodeError, match=r"^ffmpeg gave no audio for 0.5 s$"):
        list(decode._ffmpeg_blocks(tmp_path / "x.m4a", 1, 1000))
    assert time.monotonic() - start < 4
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)


def test_s8_1_the_stderr_reader_never_prints_a_traceback(monkeypatch):
    """Ctrl-C while ffmpeg's stderr is joined closes the pipe under its reader thread: no traceback from it."""
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    read_end, write_end = os.pipe()
    stream = open(read_end, "rb", buffering=0)
    reader = decode._StderrTail(stream)
    stream.close()
    with contextlib.suppress(BrokenPipeError):  # the reader may have stopped already
        os.write(write_end, b"[aac @ 0x1] invalid band type\n")
    os.close(write_end)
    reader.join(5)
    assert not reader.is_alive() and escaped == []


# -- 13, 19. reasons: names that are not UTF-8 or hold a newline; a truncated Ogg file ------------------------------

@needs_ffmpeg
@pytest.mark.parametrize("name", [b"bad\xfename.wav", b"two\nlines.wav"])
def test_s8_13_an_odd_name_ffprobe_cannot_read_gets_the_whole_usual_reason(tiny_checkpoint, tmp_path, name):
    path = os.path.join(os.fsencode(tmp_path), name)
    with open(path, "wb") as handle:
        handle.write(b"junk")
    result = runner.invoke(app, ["classify", str(tmp_path), "--model", str(tiny_checkpoint[0]), "-f", "jsonl"])
    assert result.exit_code == 1
    assert list(records(result.stdout).values())[0]["error"] == (
        "not audio, or a format neither libsndfile nor ffmpeg can read (ffprobe: Invalid data found when processing "
        "input)")


def test_s8_19_a_truncated_ogg_file_is_truncated_not_zero_length(tiny_checkpoint, tmp_path):
    path = write_audio(tmp_path / "good.ogg", 1.0, subtype="VORBIS")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = runner.invoke(app, ["classify", str(path), "--model", str(tiny_checkpoint[0]), "-f", "jsonl"])
    assert result.exit_code == 1
    assert records(result.stdout)[str(path)]["error"] == "truncated: the Ogg stream ends without its final page"


# -- 8. playlists are refused before ffmpeg opens what they name; ffprobe has a time limit ---------------------------

@pytest.mark.slow  # a whole process: a hang must fail at the timeout, not hang the suite
@needs_ffmpeg
def test_s8_8_a_playlist_is_one_quick_error_record_and_the_next_file_is_tagged(tiny_checkpoint, tmp_path):
    www, folder = tmp_path / "www", tmp_path / "hls"
    www.mkdir(), folder.mkdir()
    os.mkfifo(www / "fifo.ts")
    ffmpeg("-f", "lavfi", "-i", "sine=f=300:sample_rate=16000:duration=2", "-c:a", "aac", "-f", "mpegts",
           www / "real.ts")
    for name, target in (("f.m4a", www / "fifo.ts"), ("r.m4a", www / "real.ts")):
        (folder / name).write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{target}\n#EXT-X-ENDLIST\n")
    (folder / "c.m4a").write_text(f"ffconcat version 1.0\nfile {www / 'real.ts'}\n")
    write_audio(folder / "g.wav", 1.0)
    start = time.monotonic()
    try:
        proc = ast_run(folder, "--model", tiny_checkpoint[0], timeout=60)
    finally:  # a failing run leaves ffprobe blocked opening the FIFO: let it go
        with contextlib.suppress(OSError):  # ENXIO: nobody is opening it, as it should be
            os.close(os.open(www / "fifo.ts", os.O_WRONLY | os.O_NONBLOCK))
    got = records(proc.stdout)
    assert proc.returncode == 1 and time.monotonic() - start < 30, proc.stderr
    assert got[str(folder / "g.wav")]["error"] is None
    for name, demuxer in (("f.m4a", "hls"), ("r.m4a", "hls"), ("c.m4a", "concat")):
        assert got[str(folder / name)]["error"] == (f"not audio: a playlist ({demuxer}), naming other files to read "
                                                    "in its place")


def test_s8_8_ffprobe_that_never_answers_is_stopped(tmp_path, monkeypatch):
    fake = fake_executable(tmp_path, "ffprobe", "exec sleep 5")
    monkeypatch.setattr(decode.shutil, "which", lambda name: fake)
    monkeypatch.setattr(decode, "_input_options", lambda executable: ())
    monkeypatch.setattr(decode, "STALL_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(AudioDecodeError, match=r"^ffprobe gave no answer in 0.5 s$"):
        decode._ffprobe_info(tmp_path / "x.m4a")
    assert time.monotonic() - start < 4


# -- 2. a cut-off m4a/webm is a truncated file, a whole one still decodes ---------------------------------------------

@needs_ffmpeg
def test_s8_2_cut_m4a_and_webm_are_truncated_and_whole_files_still_decode(tiny_checkpoint, tmp_path):
    source = write_audio(tmp_path / "src.wav", 3.0, 44100, 2)
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    cut.mkdir(), whole.mkdir()
    for ext, options in (("m4a", ["-c:a", "aac", "-movflags", "+faststart"]), ("webm", ["-c:a", "libvorbis"]),
                         ("mka", ["-c:a", "flac"]), ("mp3", []), ("ogg", []), ("opus", ["-c:a", "libopus"])):
        ffmpeg("-i", source, *options, whole / f"clip.{ext}")
        if ext in ("m4a", "webm", "mka"):
            data = (whole / f"clip.{ext}").read_bytes()
            (cut / f"clip.{ext}").write_bytes(data[: len(data) * 6 // 10])
    result = runner.invoke(app, ["classify", str(cut), str(whole), "--model", str(tiny_checkpoint[0]), "-f", "jsonl"])
    got = records(result.stdout)
    assert result.exit_code == 1 and len(got) == 9
    for path, record in got.items():
        if path.startswith(str(cut)):
            assert record["error"].startswith("truncated: the file ends before its audio does (ffmpeg: "), path
        else:
            assert record["error"] is None and record["duration"] == pytest.approx(3.0, abs=0.1), path


# -- 17. a FIFO with no writer is an error record; audio arriving slowly on one still works ---------------------------

@pytest.mark.slow  # a whole process: a hang must fail at the timeout, not hang the suite
def test_s8_17_a_fifo_with_no_writer_is_an_error_record_and_the_batch_goes_on(tiny_checkpoint, tmp_path):
    silent = tmp_path / "silent.wav"
    os.mkfifo(silent)
    clip = write_audio(tmp_path / "c0.wav", 1.0)
    live = trickle_fifo(tmp_path / "live.wav", limit_seconds=2.0)  # 0.1 s of audio every 0.1 s, for 2 s
    proc = ast_run(silent, clip, live, "--model", tiny_checkpoint[0], stall=1.5, timeout=60)
    got = records(proc.stdout)
    assert proc.returncode == 1, proc.stderr
    assert got[str(silent)]["error"] == "no data came for 1.5 s (a pipe with no writer?)"
    assert got[str(clip)]["error"] is None
    assert got[str(live)]["error"] is None and got[str(live)]["duration"] >= 1.0


def test_s8_17_a_pipe_read_waits_for_a_slow_writer_within_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "STALL_SECONDS", 1.5)
    fifo = tmp_path / "slow"
    os.mkfifo(fifo)

    def slow_writer():
        with open(fifo, "wb") as pipe:
            for _ in range(3):
                time.sleep(0.6)  # each pause under the limit, all of them over it
                pipe.write(b"x")
                pipe.flush()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    with decode.open_pipe(str(fifo)) as pipe:
        assert pipe.read(10) + pipe.read(10) + pipe.read(10) + pipe.read(10) == b"xxx"
    writer.join(10)
