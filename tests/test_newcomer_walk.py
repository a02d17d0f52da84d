"""A newcomer's second walk through the README (#24): what surprised a user of whisper, the hf CLI and
BirdNET-Analyzer. Each test names the item of issue #24 it covers (items 1, 2, 3, 7, 10, 11 and 12 here)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import write_audio

runner = CliRunner()


def ast(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("walk") / "clip.wav", 1.0, 16000, 1, seed=1)


# -- 1. the progress bar and the tables share a terminal -----------------------------------------------------

def run_in_tmux(tmp_path: Path, command: list[str], width: int = 150, height: int = 60) -> list[str]:
    """``command`` in a real terminal (a tmux pane of its own server), the screen's lines once it has ended."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): the terminal test needs a real terminal")
    socket = f"ast-test-{os.getpid()}-{time.monotonic_ns()}"
    done = tmp_path / "done"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "TERM": "xterm-256color", "COLUMNS": str(width)}
    script = " ".join(shlex.quote(a) for a in command) + f"; echo $? > {shlex.quote(str(done))}; sleep 60"
    start = ["tmux", "-L", socket, "-f", "/dev/null", "new-session", "-d", "-x", str(width), "-y", str(height),
             "env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash", "--norc", "-c", script]
    subprocess.run(start, check=True)
    try:
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done.exists(), "the command did not end in 120 s"
        time.sleep(0.3)  # the last screen update
        screen = subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-J"], check=True,
                                capture_output=True, text=True).stdout
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
    assert done.read_text().strip() == "0", screen
    return screen.splitlines()


@pytest.mark.slow  # a whole process in a terminal
def test_24_1_the_progress_bar_never_glues_itself_to_a_table(tiny_checkpoint, tmp_path):
    clips = [write_audio(tmp_path / f"clip{i}.wav", 1.0 + i / 2, seed=i) for i in range(4)]
    lines = run_in_tmux(tmp_path, [sys.executable, "-m", "ast_cli", "classify", *map(str, clips), "--model",
                                   str(tiny_checkpoint[0]), "--top", "2", "--segments", "--hop", "0.5"])
    titles = [line for line in lines if "clip" in line]
    assert titles == [f"{clip} ({1.0 + i / 2:.2f} s)" for i, clip in enumerate(clips)], "\n".join(lines)
    assert not any("tagging" in line or "files" in line for line in lines), "\n".join(lines)
    assert sum(line.startswith("rank") for line in lines) == 4
    assert sum(line.strip() == "timeline" for line in lines) == 4


# -- 11. messages and help -----------------------------------------------------------------------------------

def test_24_11_a_missing_dot_slash_model_is_named_once(clip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ast("classify", clip, "--model", "./nodir")
    assert result.exit_code == 1 and "././" not in result.stderr and "./nodir" in result.stderr, result.stderr


def test_24_11_rays_own_flag_advice_never_reaches_users(monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[test]')")
    from ast_cli.cli import describe_error
    from ast_cli.tasks.distributed import RaySettings, connect
    from ast_cli.errors import UsageError

    def no_cluster(**kwargs):  # what ray.init(address="auto") raises where no Ray runs (ray/_private/services.py)
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(UsageError) as caught:
        connect(RaySettings(address="auto", engine="ray"))
    message, hint, code = describe_error(caught.value)
    assert message == "--ray-address: cannot join the Ray cluster at auto: Could not find any running Ray instance"
    assert "--address`" not in message + hint and code == 2


def test_24_11_one_file_is_not_one_files_and_the_confusion_title_stays_on_one_line(capsys):
    from ast_cli.cli._render import print_evaluation

    report = {"files": 1, "accuracy": 1.0, "macro_f1": 1.0, "labels": ["a", "b"], "confusion": [[1, 0], [0, 0]]}
    print_evaluation(report, multi_label=False)  # stdout is not a terminal here: as when piped
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1 file: accuracy")
    assert "confusion (rows: true label, columns: predicted)" in lines


def test_24_11_listen_help_tells_its_own_hop_and_no_batch_options():
    result = ast("listen", "--help", terminal_width=200)
    assert result.exit_code == 0
    assert "default 1 s" in result.stdout and "the window length" not in result.stdout
    assert "--batch-size" not in result.stdout and "--workers" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--top", "-1"], "Error: --top: input should be greater than or equal to 0"),
    (["--bogus"], "Error: no such option: --bogus"),
])
def test_24_11_typers_usage_errors_read_like_ours(clip, args, message):
    result = ast("classify", clip, *args)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [message, "Hint: `ast classify --help` lists the options"], result.stderr


def test_24_11_benchmark_json_says_quantize_none(tiny_checkpoint):
    result = ast("benchmark", "--model", tiny_checkpoint[0], "--device", "cpu", "--iters", "1", "--warmup", "0",
                 "--batch-sizes", "1", "--attn", "sdpa", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [row["quantize"] for row in json.loads(result.stdout)["rows"]] == ["none"]


# -- 7. a --hop longer than the window leaves gaps: say how much -----------------------------------------------

def test_24_7_a_hop_longer_than_the_window_says_how_much_goes_unscored(tiny_checkpoint, tmp_path):
    long = write_audio(tmp_path / "long.wav", 3.0)
    model = tiny_checkpoint[0]  # 64 frames: a 0.64 s window
    sparse = ast("classify", long, "--model", model, "--hop", "1", "-f", "json")
    assert sparse.exit_code == 0
    assert ("warning: --hop 1 s is longer than the model's 0.64 s window: 0.36 s after every window (36% of the "
            "audio) is never scored") in sparse.stderr
    fbank = ast("extract-features", long, "--out", tmp_path / "fbank", "--kind", "fbank", "--model", model,
                "--hop", "2", "--quiet")
    assert fbank.exit_code == 0 and "1.36 s after every window (68% of the audio)" in fbank.stderr
    dense = ast("classify", long, "--model", model, "--hop", "0.64", "-f", "json")
    assert dense.exit_code == 0 and "warning" not in dense.stderr


# -- 2. `cat clip.wav | ast listen -`: audio faster than real time is no reason to drop ------------------------

def test_24_2_a_pipe_faster_than_real_time_scores_every_window(tiny_checkpoint):
    import threading

    import numpy as np

    from ast_cli.tasks.listen import Listener
    from ast_cli.run.options import RunOptions
    from ast_cli.audio.sources import StreamSource
    from ast_cli.run.tagger import Tagger
    from conftest import tone
    from test_listen import SlowBackend
    from test_sources import wav_header

    tagger = Tagger.load(str(tiny_checkpoint[0]), RunOptions(device="cpu"))
    pcm = (tone(6.0, 16000, seed=5)[:, 0] * 32767).astype("<i2")
    read_fd, write_fd = os.pipe()

    def cat():  # 6 s of audio into the pipe at once, as `cat clip.wav |` does
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(wav_header(16000, 1) + pcm.tobytes())

    writer = threading.Thread(target=cat)
    writer.start()
    # 50 ms a window: 20x faster than the 1 s hop, but slower than the pipe delivers 6 windows
    listener = Listener(SlowBackend(tagger.backend, 0.05), tagger.labels, hop_seconds=1.0)  # drop: a live source
    with os.fdopen(read_fd, "rb") as stream:
        windows = list(listener.windows(StreamSource(stream, "-")))
    writer.join()
    assert [w.end for w in windows] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) and listener.dropped == 0
    assert listener.stream_seconds == pytest.approx(6.0) and listener.stream_wall_seconds < 3.0
    assert np.isfinite(np.stack([w.scores for w in windows])).all()


@pytest.mark.slow  # a whole process, fed by a pipe
def test_24_2_cat_clip_into_listen_scores_all_and_says_why(tiny_checkpoint, tmp_path):
    from test_sources import wav_header
    from conftest import tone

    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_header(16000, 1) + (tone(6.0, 16000, seed=6)[:, 0] * 32767).astype("<i2").tobytes())
    result = subprocess.run(f"cat {shlex.quote(str(clip))} | {shlex.quote(sys.executable)} -m ast_cli listen - "
                            f"--top 2 --model {shlex.quote(str(tiny_checkpoint[0]))} -f jsonl", shell=True,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["end"] for line in result.stdout.splitlines()] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert "dropped 0" not in result.stderr and "windows: the model" not in result.stderr
    assert "the audio came faster than real time (6.0 s of audio in" in result.stderr
    assert "none dropped" in result.stderr


# -- 3. audio on stdin is one input named -; text stays a list of paths ----------------------------------------

@pytest.mark.parametrize("name, write", [
    ("pipe.wav", None),  # as `sox ... -t wav -` and ffmpeg write to a pipe: RIFF, sizes unknown
    ("x.wav", dict(format="WAV")), ("x.rf64", dict(format="RF64")), ("x.flac", dict(format="FLAC")),
    ("x.ogg", dict(format="OGG", subtype="VORBIS")), ("x.aiff", dict(format="AIFF")),
    ("x.mp3", dict(format="MP3")), ("x.au", dict(format="AU")), ("x.caf", dict(format="CAF")),
    ("x.w64", dict(format="W64")),
])
def test_24_3_audio_on_stdin_is_one_input_named_dash(tiny_checkpoint, tmp_path, name, write):
    import numpy as np
    import soundfile as sf

    from conftest import tone
    from test_sources import wav_header

    samples = tone(1.5, 22050, seed=7)
    path = reference_path = tmp_path / name
    if write is None:
        path.write_bytes(wav_header(22050, 1) + (samples[:, 0] * 32767).astype("<i2").tobytes())
        reference_path = tmp_path / "same.wav"  # the same samples as a file (a pipe's header gives no length)
        sf.write(str(reference_path), (samples * 32767).astype("<i2"), 22050)
    else:
        try:
            sf.write(str(path), samples, 22050, **write)
        except (sf.LibsndfileError, ValueError, TypeError) as exc:  # an old libsndfile without mp3
            pytest.skip(f"this libsndfile cannot write {name}: {exc}")
    model = ["--model", tiny_checkpoint[0], "--top", "3", "-f", "json", "--quiet"]
    piped = ast("classify", "-", *model, input=path.read_bytes())
    named = ast("classify", reference_path, *model)
    assert piped.exit_code == 0 and piped.stderr == "", piped.stderr
    [record] = json.loads(piped.stdout)
    [reference] = json.loads(named.stdout)
    assert record["path"] == "-" and record["error"] is None
    assert record["duration"] == pytest.approx(reference["duration"], abs=1e-3)  # mp3: the decoder's own padding
    assert [x["index"] for x in record["labels"]] == [x["index"] for x in reference["labels"]]
    # the same decoder on the same bytes: equal up to float32 summation order in the resampler's blocks
    np.testing.assert_allclose([x["score"] for x in record["labels"]], [x["score"] for x in reference["labels"]],
                               atol=1e-5)


def test_24_3_text_on_stdin_stays_a_list_of_paths(tiny_checkpoint, clip):
    result = ast("classify", "-", "--model", tiny_checkpoint[0], "-f", "json", input=f"{clip}\n".encode())
    assert result.exit_code == 0 and [r["path"] for r in json.loads(result.stdout)] == [str(clip)]


def test_24_3_binary_on_stdin_that_is_not_audio_is_refused_not_read_as_paths(tiny_checkpoint):
    """Read as lines, binary data once held a line "/" (a carriage return counted as a line break) and the run
    walked the whole file system. A NUL in the first bytes means binary: one usage error, nothing walked."""
    import subprocess
    import sys

    junk = b"xx" + bytes(range(256)) * 4 + b"\r/\r\n/\n"
    result = subprocess.run([sys.executable, "-m", "ast_cli", "classify", "-", "--model", str(tiny_checkpoint[0]),
                             "-f", "jsonl"], input=junk, capture_output=True, timeout=60)  # a walk of / never ends
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.decode().startswith("Error: standard input is binary data but no audio format")


def test_24_3_a_line_break_in_a_path_list_is_a_line_feed(tiny_checkpoint, clip, tmp_path):
    """CRLF lists work; a lone carriage return is part of a name, never a line break of its own."""
    result = ast("classify", "-", "--model", tiny_checkpoint[0], "-f", "jsonl", "-q",
                 input=f"{clip}\r\n{tmp_path}\r{tmp_path}\n".encode())
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(clip), f"{tmp_path}\r{tmp_path}"]
    assert records[0]["error"] is None and records[1]["error"] == "no such file"


@pytest.mark.parametrize("data_size", [0xFFFFFFFF, 0x7FFFF000])
def test_24_3_a_pipe_header_saved_to_a_file_is_read_to_its_end(tiny_checkpoint, tmp_path, data_size):
    """`arecord > rec.wav`, `sox in.flac -t wav - > out.wav`: the header's sizes are placeholders (ffmpeg and
    arecord 0xFFFFFFFF, sox 0x7FFFF000), and the data runs to the end of the file; it was "truncated"."""
    import struct

    import soundfile as sf

    from conftest import tone

    path = tmp_path / "rec.wav"
    sf.write(str(path), tone(1.0), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[4:8], data[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFFF), struct.pack("<I", data_size)
    path.write_bytes(bytes(data))
    result = ast("classify", str(path), "--model", tiny_checkpoint[0], "-f", "jsonl", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["duration"] == pytest.approx(1.0)


def test_24_3_piped_audio_is_bounded_in_memory(tmp_path):
    import io

    import soundfile as sf

    from ast_cli.errors import AudioDecodeError
    from ast_cli.audio.sources import PipedAudio
    from conftest import tone

    data = io.BytesIO()
    sf.write(data, tone(2.0), 16000, format="FLAC")
    with pytest.raises(AudioDecodeError, match="save it to a file, or pipe WAV"):
        list(PipedAudio(io.BytesIO(data.getvalue()), max_bytes=1000).blocks())


# -- 10. benchmark warm-up: until two passes agree, and say how many ------------------------------------------

def test_24_10_warm_up_runs_until_two_passes_agree_within_5_percent():
    from ast_cli.checkpoint.timing import MAX_WARMUP, warm_up

    def passes(*seconds):
        taken = iter(seconds)
        return lambda: next(taken)

    # bf16 on AMX: fp32-like passes until the kernels settle (1455 ms -> 308 ms), then steady
    assert warm_up(passes(1.455, 1.2, 0.6, 0.310, 0.308, 0.309)) == 5
    assert warm_up(passes(0.5, 0.51)) == 2  # settled at once: no pass wasted
    assert warm_up(passes(*[1.0, 2.0] * MAX_WARMUP)) == MAX_WARMUP  # a machine too noisy to settle: bounded
    assert warm_up(passes(), 0) == 0 and warm_up(passes(9, 9, 9), 3) == 3  # --warmup N: exactly N


def test_24_10_benchmark_prints_the_warm_up_count(tiny_checkpoint):
    common = ["benchmark", "--model", tiny_checkpoint[0], "--device", "cpu", "--iters", "1", "--batch-sizes", "1",
              "--attn", "sdpa"]
    result = ast(*common, "--format", "json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["rows"]
    assert 2 <= row["warmup"] <= 20
    table = ast(*common, "--warmup", "3", terminal_width=200)
    assert table.exit_code == 0 and "warm-up" in table.stdout
    [line] = [line for line in table.stdout.splitlines() if "fp32" in line and "sdpa" in line and "│" in line]
    assert [cell.strip() for cell in line.split("│")][4] == "3"  # (edge), mode, attn, batch size, warm-up


def test_24_3_audio_on_stdin_is_not_sent_to_ray_workers(tiny_checkpoint, clip, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[test]')")
    out = tmp_path / "tags.jsonl"
    result = ast("classify", "-", "--model", tiny_checkpoint[0], "--engine", "ray", "-o", out,
                 input=clip.read_bytes())
    assert result.exit_code == 2 and "Error: --engine: audio on stdin is read by this process" in result.stderr
    assert not out.exists()
