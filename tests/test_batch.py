"""The batch engine through the CLI: trees, stdin, long audio and segments, formats, filters, failures,
resume after a kill, Ctrl-C, and bounded memory on long files."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import make_reference, sigint_default, tone, trickle_fifo, write_audio
from tolerances import END_TO_END

runner = CliRunner()
HAVE_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


def run(*args, input=None):
    return runner.invoke(app, ["classify", *map(str, args)], input=input, catch_exceptions=False)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_1024(tmp_path_factory):
    """A narrow model with the AudioSet input shape (1024 frames = 10.24 s windows)."""
    return make_reference(tmp_path_factory.mktemp("m1024"), "tiny1024", max_length=1024)[0]


# -- inputs ----------------------------------------------------------------------------------------


def _tree(root):
    write_audio(root / "b" / "two.wav", 0.5)
    write_audio(root / "a" / "one.flac", 0.4)
    write_audio(root / "a" / "z" / "deep.ogg", 0.3, subtype="VORBIS")
    write_audio(root / "dir with space" / "naïve – ü.wav", 0.3)
    write_audio(root / ".hidden" / "skip.wav", 0.3)
    write_audio(root / "a" / ".skip.wav", 0.3)
    (root / "notes.txt").write_text("not audio, and not an audio extension")
    return root


def test_directory_walk_is_sorted_recursive_and_skips_hidden(tiny_checkpoint, tmp_path):
    root = _tree(tmp_path / "tree")
    result = run(root, "--model", tiny_checkpoint[0], "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    paths = [r["path"] for r in jsonl(result.stdout)]
    assert paths == [str(root / p) for p in ("a/one.flac", "a/z/deep.ogg", "b/two.wav", "dir with space/naïve – ü.wav")]


def test_ext_option_restricts_the_walk(tiny_checkpoint, tmp_path):
    root = _tree(tmp_path / "tree")
    result = run(root, "--model", tiny_checkpoint[0], "-f", "jsonl", "--ext", "wav,.OGG")
    assert [os.path.basename(r["path"]) for r in jsonl(result.stdout)] == ["deep.ogg", "two.wav", "naïve – ü.wav"]


def test_stdin_list_and_globs(tiny_checkpoint, tmp_path):
    root = _tree(tmp_path / "tree")
    listing = f"{root / 'b' / 'two.wav'}\n\n{root / 'dir with space' / 'naïve – ü.wav'}\n"
    result = run("-", str(root / "a" / "*.flac"), "--model", tiny_checkpoint[0], "-f", "jsonl", input=listing)
    assert result.exit_code == 0, result.stderr
    assert [os.path.basename(r["path"]) for r in jsonl(result.stdout)] == ["two.wav", "naïve – ü.wav", "one.flac"]


def test_an_empty_input_list_is_not_an_error(tiny_checkpoint, tmp_path):
    """`find ... -mtime -7 | ast classify -` in a week with no new files: exit 0, nothing written, no model.
    (A named folder with no audio is a failure: tests/test_output_run.py, #24.9.)"""
    result = CliRunner().invoke(app, ["classify", "-", "--model", str(tmp_path / "no-such-model")], input="")
    assert result.exit_code == 0 and result.stdout == ""


# -- long audio: windows and segments --------------------------------------------------------------


def test_132_second_file_segments_cover_the_file(model_1024, tmp_path):
    path = write_audio(tmp_path / "long.wav", 132.0, 22050, 2)
    result = run(path, "--model", model_1024, "-f", "json", "--segments", "--top", "3")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)[0]
    segments = record["segments"]
    assert record["duration"] == 132.0
    assert len(segments) == 13  # 13198 frames in windows of 1024
    assert segments[0]["start"] == 0.0 and segments[-1]["end"] == 132.0
    for previous, current in zip(segments, segments[1:]):
        assert current["start"] == pytest.approx(previous["start"] + 10.24)
        assert previous["end"] == pytest.approx(current["start"])  # no gaps, no overlap by default
    assert all(len(s["labels"]) == 3 for s in segments)


def test_hop_overlaps_windows(model_1024, tmp_path):
    path = write_audio(tmp_path / "long.wav", 30.0)
    record = json.loads(run(path, "--model", model_1024, "-f", "json", "--segments", "--hop", "5").stdout)[0]
    starts = [s["start"] for s in record["segments"]]
    # 2998 frames: windows start every 500 frames until one reaches the last frame.
    assert starts == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert record["segments"][-1]["end"] == 30.0
    assert record["segments"][0]["end"] == pytest.approx(10.24)


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_aggregate_modes(tiny_checkpoint, tmp_path, aggregate):
    path = write_audio(tmp_path / "clip.wav", 3.0, seed=5)
    record = json.loads(run(path, "--model", tiny_checkpoint[0], "-f", "json", "--segments", "--top", "0",
                            "--aggregate", aggregate).stdout)[0]
    per_window = np.zeros((len(record["segments"]), 527))
    for i, segment in enumerate(record["segments"]):
        per_window[i, [x["index"] for x in segment["labels"]]] = [x["score"] for x in segment["labels"]]
    file_level = np.zeros(527)
    file_level[[x["index"] for x in record["labels"]]] = [x["score"] for x in record["labels"]]
    expected = per_window.max(axis=0) if aggregate == "max" else per_window.mean(axis=0)
    np.testing.assert_allclose(file_level, expected, atol=1e-12)  # the same numbers, aggregated in float64
    assert len(record["segments"]) == 5  # 3.0 s in 0.64 s windows


def test_first_window_equals_reference_truncation(tiny_checkpoint, tmp_path):
    """What the transformers pipeline reports for a long file is our first segment."""
    import torch

    from conftest import reference_features, reference_waveform

    directory, hf_model, extractor = tiny_checkpoint
    path = write_audio(tmp_path / "clip.flac", 2.0, 44100, 2, seed=8)
    record = json.loads(run(path, "--model", directory, "-f", "json", "--segments", "--top", "0").stdout)[0]
    inputs = reference_features(extractor, reference_waveform(path))
    with torch.inference_mode():
        expected = torch.sigmoid(hf_model(inputs).logits)[0].numpy()
    first = record["segments"][0]["labels"]
    got = np.zeros(527)
    got[[x["index"] for x in first]] = [x["score"] for x in first]
    np.testing.assert_allclose(got, expected, atol=END_TO_END)


# -- formats and filters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    return [write_audio(root / "x.wav", 1.0, seed=1), write_audio(root / "y.wav", 0.5, seed=2)]


def test_jsonl_one_record_per_line(tiny_checkpoint, two_clips):
    result = run(*two_clips, "--model", tiny_checkpoint[0], "-f", "jsonl", "--top", "2")
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [set(r) for r in records] == [{"path", "duration", "labels", "error", "size", "mtime", "model",
                                          "settings"}] * 2
    assert records[0]["size"] == os.path.getsize(two_clips[0])


def test_csv_columns_and_rows(tiny_checkpoint, two_clips, tmp_path):
    missing = tmp_path / "missing.wav"
    result = run(*two_clips, missing, "--model", tiny_checkpoint[0], "-f", "csv", "--top", "3")
    assert result.exit_code == 1
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "duration", "rank", "label", "index", "score", "error"]
    assert len(rows) == 1 + 3 + 3 + 1
    assert rows[1][:3] == [str(two_clips[0]), "1.0", "1"] and rows[3][2] == "3"
    assert rows[-1] == [str(missing), "", "", "", "", "", "no such file"]


def test_csv_with_segments_has_start_end(tiny_checkpoint, two_clips):
    result = run(two_clips[1], "--model", tiny_checkpoint[0], "-f", "csv", "--top", "1", "--segments")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["path", "duration", "rank", "label", "index", "score", "start", "end", "error"]
    assert rows[0]["start"] == "" and [(r["start"], r["end"]) for r in rows[1:]] == [("0.0", "0.5")]


def test_output_file_is_written_atomically(tiny_checkpoint, two_clips, tmp_path):
    out = tmp_path / "tags.json"
    out.write_text("previous content")
    refused = run(*two_clips, "--model", tiny_checkpoint[0], "-f", "json", "-o", out)
    assert refused.exit_code == 2 and "exists and is not empty" in refused.stderr
    assert out.read_text() == "previous content"
    result = run(*two_clips, "--model", tiny_checkpoint[0], "-f", "json", "-o", out, "--overwrite")
    assert result.exit_code == 0 and result.stdout == ""
    assert len(json.loads(out.read_text())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["tags.json"]  # no temporary left behind


def test_threshold_include_exclude(tiny_checkpoint, two_clips):
    base = ["--model", tiny_checkpoint[0], "-f", "json"]
    every = json.loads(run(two_clips[0], *base, "--top", "0").stdout)[0]["labels"]
    cut = every[10]["score"]
    kept = json.loads(run(two_clips[0], *base, "--threshold", str(cut)).stdout)[0]["labels"]
    assert kept == [x for x in every if x["score"] >= cut] and len(kept) >= 11
    include = json.loads(run(two_clips[0], *base, "--include", "dog", "--include", "SPEECH").stdout)[0]["labels"]
    assert sorted(x["label"] for x in include) == ["Dog", "Speech"]
    best = every[0]["label"]
    excluded = json.loads(run(two_clips[0], *base, "--exclude", best.upper()).stdout)[0]["labels"]
    assert best not in [x["label"] for x in excluded] and len(excluded) == 5


# -- failures ----------------------------------------------------------------------------------------


def _bad_and_good_tree(root):
    write_audio(root / "good.wav", 1.0)
    write_audio(root / "good.flac", 1.0, 44100, 2)
    (root / "empty.wav").write_bytes(b"")
    sf.write(str(root / "zero-length.wav"), np.zeros((0, 1), np.float32), 16000)
    data = (root / "good.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[: len(data) // 2])
    (root / "not-audio.mp3").write_text("hello, this is text\n" * 50)
    flac = bytearray(write_audio(root / "corrupt.flac", 5.0, seed=3).read_bytes())
    for i in range(4000, len(flac) - 100, 40):
        flac[i] ^= 0xFF
    (root / "corrupt.flac").write_bytes(bytes(flac))
    return {"empty.wav", "zero-length.wav", "truncated.wav", "not-audio.mp3", "corrupt.flac"}


def test_bad_files_get_error_records_and_the_batch_goes_on(tiny_checkpoint, tmp_path):
    bad = _bad_and_good_tree(tmp_path / "mixed")
    result = run(tmp_path / "mixed", "--model", tiny_checkpoint[0], "-f", "jsonl", "--quiet")
    assert result.exit_code == 1
    records = {os.path.basename(r["path"]): r for r in jsonl(result.stdout)}
    assert set(records) == bad | {"good.wav", "good.flac"}
    for name, record in records.items():
        if name in bad:
            assert record["error"] and "\n" not in record["error"] and record["labels"] == [], name
        else:
            assert record["error"] is None and record["labels"], name
    stderr = result.stderr.splitlines()
    assert len(stderr) == len(bad) and all(line.startswith("error: ") for line in stderr)
    assert "truncated" in records["truncated.wav"]["error"]
    assert records["empty.wav"]["error"] == "empty file (0 bytes)"


def test_23_2_a_header_rate_out_of_range_fails_that_file_alone(tiny_checkpoint, tmp_path):
    """A WAV header claiming 2147483647 Hz (the most libsndfile reads) asked for an exabyte-sized kernel;
    767999 Hz (gcd 1 with 16 kHz, within range) for 50 GB."""
    absurd = write_audio(tmp_path / "absurd.wav", 0.5, 44100)
    data = bytearray(absurd.read_bytes())
    data[24:28] = (0x7FFFFFFF).to_bytes(4, "little")
    absurd.write_bytes(bytes(data))
    odd = write_audio(tmp_path / "odd.wav", 0.5, 767999)
    result = run(absurd, odd, "--model", tiny_checkpoint[0], "-f", "jsonl", "--quiet")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert records[0]["error"].startswith("unsupported sample rate 2147483647 Hz") and records[1]["error"] is None
    assert result.stderr.count("\n") == 1 and "absurd.wav" in result.stderr


def test_23_5_an_output_dir_file_that_cannot_be_written_fails_that_input_alone(tiny_checkpoint, tmp_path):
    """A name of 249 bytes is fine for the input, too long (264) for its `.selections.txt`: that input fails with
    one line; before, the batch stopped there and wrote nothing else."""
    tree = tmp_path / "tree"
    write_audio(tree / "a.wav", 0.3)
    write_audio(tree / ("x" * 245 + ".wav"), 0.3)
    write_audio(tree / "z.wav", 0.3)
    out = tmp_path / "out"
    result = run(tree, "--model", tiny_checkpoint[0], "--output-dir", out, "-f", "raven", "--quiet")
    assert result.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.wav.selections.txt", "z.wav.selections.txt"]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "x" * 245 + ".wav: cannot write " in lines[0] and "too long" in lines[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_23_3_fifos_sockets_and_devices_in_a_walked_folder_are_not_read(tiny_checkpoint, tmp_path):
    """A FIFO with no writer in a walked folder hung the batch forever; a FIFO named on its own is still a stream
    (tests/test_safety.py)."""
    import socket

    from ast_cli.audio.inputs import NOT_REGULAR, expand_inputs

    root = tmp_path / "tree"
    write_audio(root / "a.wav", 0.3)
    os.mkfifo(root / "b.wav")
    os.symlink("/dev/zero", root / "c.wav")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "d.wav"))
    write_audio(root / "e.wav", 0.3)
    try:
        items = expand_inputs([str(root)])
        assert [(os.path.basename(i.path), i.error) for i in items] == [
            ("a.wav", None), ("b.wav", NOT_REGULAR), ("c.wav", NOT_REGULAR), ("d.wav", NOT_REGULAR), ("e.wav", None)]
        assert [i.error for i in expand_inputs([str(root / "*.wav")])] == [None, NOT_REGULAR, NOT_REGULAR,
                                                                            NOT_REGULAR, None]
        result = run(root, "--model", tiny_checkpoint[0], "-f", "jsonl", "--quiet")
    finally:
        server.close()
    assert result.exit_code == 1
    assert [r["error"] is None for r in jsonl(result.stdout)] == [True, False, False, False, True]
    assert len(result.stderr.splitlines()) == 3 and "b.wav: not a regular file" in result.stderr


@pytest.mark.slow  # a whole process (or several): seconds each
def test_native_library_noise_stays_off_stderr(tiny_checkpoint, tmp_path):
    """mpg123 prints 'Note: ...' on fd 2 for a broken mp3; a real process must show only our lines."""
    path = write_audio(tmp_path / "cut.mp3", 5.0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    proc = subprocess.run([sys.executable, "-m", "ast_cli", "classify", str(path), "--model",
                           str(tiny_checkpoint[0]), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: {path}: truncated: the header promises 5.00 s, the data ends at "
                                        + proc.stderr.split("the data ends at ")[1].strip()]


@pytest.mark.skipif(not HAVE_FFMPEG, reason="ffmpeg is not installed")
@pytest.mark.parametrize("ext", ["m4a", "webm", "wma", "mka"])
def test_ffmpeg_fallback_formats(tiny_checkpoint, tmp_path, ext):
    source = write_audio(tmp_path / "src.wav", 1.0, 44100, 2)
    target = tmp_path / f"clip.{ext}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), str(target)], check=True)
    record = jsonl(run(target, "--model", tiny_checkpoint[0], "-f", "jsonl").stdout)[0]
    assert record["error"] is None and record["labels"]
    assert record["duration"] == pytest.approx(1.0, abs=0.06)


def test_without_ffmpeg_the_error_says_so(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    path = tmp_path / "clip.m4a"
    path.write_bytes(b"\x00\x00\x00\x18ftypM4A " + b"\x00" * 100)
    record = jsonl(run(path, "--model", tiny_checkpoint[0], "-f", "jsonl").stdout)[0]
    assert "ffmpeg is not installed" in record["error"]


# -- resume and interruption -------------------------------------------------------------------------


def _clips(root, n, seconds=0.5):
    return [write_audio(root / f"clip{i:02d}.wav", seconds, seed=i) for i in range(n)]


def test_resume_after_a_torn_last_line(tiny_checkpoint, tmp_path):
    clips = _clips(tmp_path / "in", 6)
    out = tmp_path / "out.jsonl"
    full = run(tmp_path / "in", "--model", tiny_checkpoint[0], "-f", "jsonl", "-o", out)
    assert full.exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    # A run killed while writing its fourth record.
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    result = run(tmp_path / "in", "--model", tiny_checkpoint[0], "-f", "jsonl", "-o", out, "--resume")
    assert result.exit_code == 0, result.stderr
    records = jsonl(out.read_text())
    assert sorted(r["path"] for r in records) == sorted(str(c) for c in clips)
    for before, after in zip([json.loads(line) for line in lines], sorted(records, key=lambda r: r["path"])):
        # Same answers (batches are composed differently on resume: float noise only).
        assert [x["index"] for x in before["labels"]] == [x["index"] for x in after["labels"]]
        assert [x["score"] for x in before["labels"]] == pytest.approx([x["score"] for x in after["labels"]])
    # Nothing left to do: a second resume writes nothing.
    again = run(tmp_path / "in", "--model", tiny_checkpoint[0], "-f", "jsonl", "-o", out, "--resume")
    assert again.exit_code == 0 and len(jsonl(out.read_text())) == 6


def test_resume_redoes_changed_files(tiny_checkpoint, tmp_path):
    clips = _clips(tmp_path / "in", 2)
    out = tmp_path / "out.jsonl"
    run(tmp_path / "in", "--model", tiny_checkpoint[0], "-f", "jsonl", "-o", out)
    write_audio(clips[1], 0.7, seed=99)  # changed since: size and mtime differ
    run(tmp_path / "in", "--model", tiny_checkpoint[0], "-f", "jsonl", "-o", out, "--resume")
    records = jsonl(out.read_text())
    assert [r["path"] for r in records] == [str(clips[0]), str(clips[1]), str(clips[1])]
    assert records[-1]["duration"] == pytest.approx(0.7)


def _start(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "ast_cli", "classify", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default,
                            **kwargs)


def _wait_for_lines(path, count, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= count:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.slow  # a whole process (or several): seconds each
def test_kill_9_then_resume_gives_every_file_exactly_once(tiny_checkpoint, tmp_path):
    clips = _clips(tmp_path / "in", 24, seconds=3.0)
    out = tmp_path / "out.jsonl"
    args = [tmp_path / "in", "--model", tiny_checkpoint[0], "-f", "jsonl", "-o", out, "--batch-size", "1",
            "--workers", "1"]
    proc = _start(args)
    assert _wait_for_lines(out, 3, proc), "the run never wrote 3 records"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(out, "a") as handle:  # as if killed in the middle of a write
        handle.write('{"path": "torn')
    finished = subprocess.run([sys.executable, "-m", "ast_cli", "classify", *map(str, args), "--resume"],
                              capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    paths = [r["path"] for r in jsonl(out.read_text())]
    assert sorted(paths) == sorted(str(c) for c in clips) and len(paths) == len(set(paths))
    assert "resuming: " in finished.stderr and "resuming: 0 " not in finished.stderr  # the killed run's work kept


@pytest.mark.slow  # a whole process (or several): seconds each
def test_ctrl_c_stops_cleanly_with_130(tiny_checkpoint, tmp_path):
    _clips(tmp_path / "in", 24, seconds=3.0)
    out = tmp_path / "out.jsonl"
    live = trickle_fifo(tmp_path / "live.wav")  # however fast the processor, the run is still going at the signal
    proc = _start([tmp_path / "in", live, "--model", tiny_checkpoint[0], "-f", "jsonl", "-o", out, "--batch-size",
                   "1", "--workers", "1"])
    assert _wait_for_lines(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "Interrupted."
    records = jsonl(out.read_text())  # every line is whole
    assert 2 <= len(records) <= 24 and str(live) not in {r["path"] for r in records}


# -- bounded memory ------------------------------------------------------------------------------------

RSS_SCRIPT = """
import resource, sys
from ast_cli.cli import app
from ast_cli.cli._signals import keep_freed_memory
keep_freed_memory()  # as the ast executable does (main_process): freed memory is kept for reuse
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _peak_rss_mb(args) -> float:
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "classify", *map(str, args)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.split("PEAK_RSS_KB")[1].split()[0]) / 1024


@pytest.mark.slow
def test_long_file_memory_stays_bounded(model_1024, tmp_path):
    """Ten minutes of 48 kHz stereo (110 MB as PCM, 220 MB as float32) must not be held in memory whole."""
    long_path = tmp_path / "long.wav"
    with sf.SoundFile(str(long_path), "w", 48000, 2, "PCM_16") as handle:
        block = tone(60.0, 48000, 2)
        for _ in range(10):
            handle.write(block)
    short_path = write_audio(tmp_path / "short.wav", 5.0, 48000, 2)
    common = ["--model", model_1024, "-f", "jsonl", "--quiet"]
    baseline = _peak_rss_mb([short_path, *common])
    peak = _peak_rss_mb([long_path, *common])
    assert peak - baseline < 120, (baseline, peak)


@pytest.mark.skipif(not HAVE_FFMPEG, reason="ffmpeg is not installed")
def test_twelve_formats_and_bad_files(tiny_checkpoint, tmp_path):
    """The acceptance tree: good files in 12 formats next to every kind of bad file."""
    root = tmp_path / "tree"
    good = []
    for ext, kwargs in [("wav", {}), ("flac", {}), ("ogg", {"subtype": "VORBIS"}), ("opus", {"format": "OGG", "subtype": "OPUS"}),
                        ("mp3", {}), ("aiff", {}), ("au", {}), ("caf", {}), ("w64", {})]:
        good.append(write_audio(root / "sf" / f"clip.{ext}", 1.0, 48000, 2, **kwargs))
    source = write_audio(tmp_path / "src.wav", 1.0, 44100, 2)
    for ext in ("m4a", "webm", "wma"):
        target = root / "ff" / f"clip.{ext}"
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), str(target)], check=True)
        good.append(target)
    bad = _bad_and_good_tree(root / "bad")
    result = run(root, "--model", tiny_checkpoint[0], "-f", "jsonl", "--quiet")  # errors only, no summary
    assert result.exit_code == 1
    records = {r["path"]: r for r in jsonl(result.stdout)}
    assert len(records) == len(good) + len(bad) + 2
    for path in good:
        assert records[str(path)]["error"] is None and records[str(path)]["labels"], path
    failures = [r for r in records.values() if r["error"]]
    assert sorted(os.path.basename(r["path"]) for r in failures) == sorted(bad)
    assert len(result.stderr.splitlines()) == len(bad)


@pytest.mark.parametrize("fmt, delimiter", [("csv", ","), ("tsv", "\t")])
def test_s8_10_a_file_with_no_label_over_the_threshold_has_one_row(tiny_checkpoint, two_clips, tmp_path, fmt,
                                                                   delimiter):
    args = [*two_clips, "--model", tiny_checkpoint[0], "--threshold", "1", "-f", fmt]
    rows = list(csv.reader(io.StringIO(run(*args).stdout), delimiter=delimiter))
    assert rows[1:] == [[str(two_clips[0]), "1.0", "", "", "", "", ""], [str(two_clips[1]), "0.5", "", "", "", "", ""]]
    assert run(*args, "--output-dir", tmp_path / "per-file").exit_code == 0
    per_file = (tmp_path / "per-file" / f"x.wav.{fmt}").read_text().splitlines()
    assert per_file[1].split(delimiter) == [str(two_clips[0]), "1.0", "", "", "", "", ""]


def test_s8_11_linked_folders_are_walked_each_real_folder_once(tmp_path):
    """A linked sub-folder was skipped in silence. Now it is walked; a loop, or a second link to a folder already
    walked, is not entered again, so every file comes once and the walk ends."""
    from ast_cli.audio.inputs import expand_inputs

    root, elsewhere = tmp_path / "arch", tmp_path / "elsewhere"
    write_audio(root / "a.wav", 0.1)
    write_audio(elsewhere / "deep" / "b.wav", 0.1)
    (root / "linked").symlink_to("../elsewhere")
    (root / "again").symlink_to("../elsewhere")  # a second way to the same folder
    (root / "self").symlink_to(".")  # a loop
    (elsewhere / "deep" / "up").symlink_to("../..")  # a loop through the link
    found = [os.path.relpath(item.path, root) for item in expand_inputs([str(root)])]
    assert found == ["a.wav", os.path.join("again", "deep", "b.wav")]


def test_s8_D9_a_link_to_a_folder_that_holds_the_archive_is_not_followed(tmp_path):
    """A link to ``/`` in an archive walked the whole file system, /proc included (found by a review); a link
    to ``..`` the archive's neighbours. Neither is entered: they lead around and out of the archive."""
    from ast_cli.audio.inputs import expand_inputs

    root = tmp_path / "arch"
    write_audio(root / "a.wav", 0.1)
    write_audio(tmp_path / "neighbour" / "n.wav", 0.1)
    (root / "root").symlink_to("/")
    (root / "up").symlink_to("..")
    assert [os.path.relpath(item.path, root) for item in expand_inputs([str(root)])] == ["a.wav"]


@pytest.mark.parametrize("settings, why", [
    ({"hop_seconds": [1]}, "settings.hop_seconds is [1], not a number of seconds"),
    ({"hop_seconds": 1.0, "window_seconds": "10"}, 'settings.window_seconds is "10", not a number of seconds'),
    ([1], "its model or settings are not what ast writes"),
])
def test_s8_19_resume_into_a_malformed_record_says_it_is_malformed(tiny_checkpoint, tmp_path, settings, why):
    """It said "hop [1] s, not None s", as if the record were of other settings."""
    clip = write_audio(tmp_path / "x.wav", 0.5)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "y.wav", "model": str(tiny_checkpoint[0]), "settings": settings}) + "\n")
    before = out.read_bytes()
    result = run(clip, "--model", tiny_checkpoint[0], "-f", "jsonl", "-o", out, "--resume")
    assert result.exit_code == 2 and f"holds a malformed record (y.wav: {why})" in result.stderr, result.stderr
    assert out.read_bytes() == before
