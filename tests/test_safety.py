"""Never lose a result (#12): what existed before a run survives a failed, refused or interrupted run; hostile
names and inputs are tagged or refused with one line; the run's data never depends on stderr.

Each test names the item of issue #12 it covers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from ast_cli.cli import app
from ast_cli.run.files import OutputLock
from conftest import reference_features, sigint_default, trickle_fifo, write_audio
from tolerances import END_TO_END

runner = CliRunner()


def classify(*args, input=None):
    return runner.invoke(app, ["classify", *map(str, args)], input=input)


def ast_process(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ast_cli", "classify", *map(str, args)], text=True,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "preexec_fn": sigint_default,
                               **kwargs})


def records(text: str) -> list[dict]:
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


def snapshot(path) -> tuple[bytes, int]:
    return path.read_bytes(), stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return [write_audio(root / f"f{i:02d}.wav", 1.0 + 0.1 * i, 16000, 1, seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Enough work that a run can be interrupted in the middle."""
    root = tmp_path_factory.mktemp("many")
    for i in range(30):
        write_audio(root / f"c{i:02d}.wav", 3.0, 16000, 1, seed=100 + i)
    return root


def model_args(tiny_checkpoint):
    return ["--model", tiny_checkpoint[0]]


# -- 1. --resume refuses what is not our JSONL, and touches nothing ----------------------------------------

@pytest.mark.parametrize("content", [
    b'[\n  {"path": "a.wav", "labels": [], "error": null}\n]\n',  # an earlier json output
    b'{"path": "a.wav", "error": null}\ngarbage{\n{"path": "b.wav", "error": null}\n',  # garbage in the middle
    b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80>\x00\x00\x00}\x00\x00\x02\x00\x10\x00data",
])
def test_resume_refuses_anything_but_a_jsonl_output_and_changes_nothing(tiny_checkpoint, clips, tmp_path, content):
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    result = classify(*clips, *model_args(tiny_checkpoint), "-o", out, "--resume")
    assert result.exit_code == 2 and "refusing to resume" in result.stderr
    assert out.read_bytes() == content


def test_resume_into_a_json_file_is_a_usage_error_before_anything(tiny_checkpoint, clips, tmp_path):
    out = tmp_path / "t.json"
    out.write_text('[{"path": "x"}]')
    result = classify(*clips, *model_args(tiny_checkpoint), "-o", out, "--resume")
    assert result.exit_code == 2 and "--resume" in result.stderr and out.read_text() == '[{"path": "x"}]'


def test_a_torn_last_line_is_repaired_only_when_the_run_starts(tiny_checkpoint, clips, tmp_path):
    out = tmp_path / "out.jsonl"
    done = classify(clips[0], *model_args(tiny_checkpoint), "-o", out)
    assert done.exit_code == 0
    torn = out.read_bytes() + b'{"path": "half'
    out.write_bytes(torn)
    bad = classify(*clips, "--model", tmp_path / "no-model", "-o", out, "--resume")  # fails: no model
    assert bad.exit_code == 1 and out.read_bytes() == torn  # a run that cannot start repairs nothing
    good = classify(*clips, *model_args(tiny_checkpoint), "-o", out, "--resume")
    assert good.exit_code == 0
    assert [r["path"] for r in records(out.read_text())] == [str(c) for c in clips]


# -- 2, 13. symlinks and devices are written through ---------------------------------------------------------

@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_json_and_csv_write_through_a_symlink(tiny_checkpoint, clips, tmp_path, fmt):
    target = tmp_path / f"real.{fmt}"
    target.write_text("old")
    link = tmp_path / f"link.{fmt}"
    link.symlink_to(target)
    result = classify(clips[0], *model_args(tiny_checkpoint), "-o", link, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert str(clips[0]) in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([link.name, target.name])  # no temp, no lock


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_a_fifo_output_stays_a_fifo(tiny_checkpoint, clips, tmp_path, fmt):
    """What `-o >(gzip > x.gz)` and `-o /dev/stdout` are: written directly, never replaced or fsynced."""
    fifo = tmp_path / f"pipe.{fmt}"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()))
    reader.start()
    result = classify(*clips, *model_args(tiny_checkpoint), "-o", fifo, "-f", fmt)
    reader.join(30)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert all(str(c).encode() in received[0] for c in clips)


def test_jsonl_to_dev_null_exits_0(tiny_checkpoint, clips):
    result = classify(clips[0], *model_args(tiny_checkpoint), "-o", "/dev/null", "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# -- 3. names that are not valid UTF-8 --------------------------------------------------------------------------

@pytest.mark.slow  # a whole process (or several): seconds each
@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_a_latin1_file_name_is_tagged_and_round_trips(tiny_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.wav")
    sf.write(raw, np.zeros(8000, np.float32), 16000)
    write_audio(folder / "ok.wav", 0.5)
    proc = subprocess.run([sys.executable, "-m", "ast_cli", "classify", str(folder), "--model",
                           str(tiny_checkpoint[0]), "-f", "jsonl"], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    proc.stdout.decode("utf-8")  # valid UTF-8 throughout
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(got) == 2 and all(r["error"] is None for r in got)
    assert os.fsencode(got[0]["path"]) == raw  # the record's path gives back the file's bytes
    listed = subprocess.run([sys.executable, "-m", "ast_cli", "classify", "-", "--model", str(tiny_checkpoint[0])],
                            input=raw + b"\n", capture_output=True)  # the same name in a stdin list
    assert listed.returncode == 0, listed.stderr
    assert os.fsencode(json.loads(listed.stdout)["path"]) == raw


# -- 4, 21. interrupted runs leave the earlier file, and no temporary files ------------------------------------

@pytest.mark.slow  # a whole process (or several): seconds each
@pytest.mark.parametrize("sig, code, last", [(signal.SIGINT, 130, "Interrupted."), (signal.SIGTERM, 143, "Terminated.")])
def test_interrupting_a_json_run_keeps_the_earlier_file(tiny_checkpoint, many, tmp_path, tmp_path_factory, sig, code,
                                                         last):
    out = tmp_path / "tags.json"
    out.write_text('["the earlier, complete output"]\n')
    before = snapshot(out)
    live = trickle_fifo(tmp_path_factory.mktemp("live") / "live.wav")  # the run cannot end before the signal
    proc = ast_process(many, live, *model_args(tiny_checkpoint), "-o", out, "--overwrite", "--batch-size", "1",
                       "--workers", "1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            p.stat().st_size > 100 for p in tmp_path.glob(".tags.json.*.ast-tmp")):
        time.sleep(0.02)  # the run has written records to its temporary file
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == last and "Traceback" not in stderr
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tags.json"]


@pytest.mark.slow  # a whole process: seconds
def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tiny_checkpoint, tmp_path):
    """nohup and a shell's background jobs start a program with SIGINT ignored; such a run is not ended by one
    (SIGTERM still ends it, 143)."""
    opened = threading.Event()
    live = trickle_fifo(tmp_path / "live.wav", opened=opened)
    proc = ast_process(live, *model_args(tiny_checkpoint), "-f", "jsonl",
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert opened.wait(60)  # the run is reading: its signal handlers are in place
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.strip().splitlines()[-1] == "Terminated."


def test_stale_temporary_files_of_killed_runs_are_removed(tiny_checkpoint, clips, tmp_path):
    out = tmp_path / "tags.json"
    stale = tmp_path / ".tags.json.k1ll3d00.ast-tmp"  # as mkstemp names them: 8 characters
    stale.write_text("[\n  {half a record")
    other = tmp_path / ".someone-else.tmp"
    other.write_text("not ours")
    result = classify(*clips, *model_args(tiny_checkpoint), "-o", out)
    assert result.exit_code == 0 and not stale.exists() and other.exists()


# -- 5. an output that is also an input ------------------------------------------------------------------------

def test_an_output_that_is_an_input_is_refused(tiny_checkpoint, clips, tmp_path):
    copies = [shutil.copy(c, tmp_path / c.name) for c in clips]
    before = [snapshot(tmp_path / c.name) for c in clips]
    glob_slip = classify(*copies, *model_args(tiny_checkpoint), "-o", copies[0])  # `-o *.wav`
    same = classify(copies[1], *model_args(tiny_checkpoint), "-o", copies[1], "--overwrite")
    for result in (glob_slip, same):
        assert result.exit_code == 2 and "is also one of the inputs" in result.stderr
    assert [snapshot(tmp_path / c.name) for c in clips] == before


# -- 6, 22. every option is checked before the output is opened -------------------------------------------------

@pytest.mark.parametrize("args", [["--hop", "0"], ["--hop", "-1"], ["--hop", "0.001"], ["--hop", "nan"],
                                  ["--hop", "inf"], ["--hop", "1e308"], ["--threshold", "-0.5"],
                                  ["--threshold", "2"], ["--workers", "0"], ["--batch-size", "0"],
                                  ["--include", "Dgo"]])
def test_usage_errors_leave_an_existing_output_alone(tiny_checkpoint, clips, tmp_path, args):
    out = tmp_path / "tags.jsonl"
    out.write_text('{"path": "earlier.wav", "error": null}\n')
    before = snapshot(out)
    result = classify(*clips, *model_args(tiny_checkpoint), "-o", out, "--overwrite", *args)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    assert snapshot(out) == before


# -- 7. a hop longer than the window ------------------------------------------------------------------------

def test_a_hop_longer_than_the_window_scores_the_right_audio_and_the_end(tiny_checkpoint, tmp_path):
    import torch

    from conftest import reference_waveform

    directory, hf_model, extractor = tiny_checkpoint  # 0.64 s windows
    path = write_audio(tmp_path / "long.wav", 32.0, 16000, 1, seed=12)
    result = classify(path, "--model", directory, "-f", "json", "--segments", "--hop", "5", "--top", "0")
    assert result.exit_code == 0, result.stderr
    segments = json.loads(result.stdout)[0]["segments"]
    assert [s["start"] for s in segments[:-1]] == [5.0 * k for k in range(7)]  # 0, 5, ..., 30 s
    assert segments[-1]["end"] == pytest.approx(32.0, abs=0.02)  # the end of the file is scored
    wave = reference_waveform(path)
    for segment in segments:
        start = round(segment["start"] * 16000)
        with torch.inference_mode():
            expected = torch.sigmoid(hf_model(reference_features(extractor, wave[start : start + 10640])).logits)[0]
        got = np.zeros(527)
        got[[x["index"] for x in segment["labels"]]] = [x["score"] for x in segment["labels"]]
        np.testing.assert_allclose(got, expected.numpy(), atol=END_TO_END, err_msg=str(segment["start"]))


# -- 8. folders that cannot be read ------------------------------------------------------------------------------

def test_an_unreadable_subdirectory_is_an_error_record(tiny_checkpoint, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    write_audio(root / "a.wav", 0.5)
    (root / "locked").mkdir()
    write_audio(root / "locked" / "hidden.wav", 0.5)
    real_scandir = os.scandir

    def scandir(path="."):  # root ignores permissions, so refuse the listing the way the kernel would
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = classify(root, *model_args(tiny_checkpoint), "-f", "jsonl")
    assert result.exit_code == 1
    got = records(result.stdout)
    assert [os.path.basename(r["path"]) for r in got] == ["a.wav", "locked"]
    assert got[1]["error"] == "cannot read this directory: Permission denied"
    assert f"error: {root / 'locked'}: cannot read this directory" in result.stderr


# -- 9. two runs on one output -----------------------------------------------------------------------------------

def test_a_second_run_on_the_same_output_stops_with_one_line(tiny_checkpoint, clips, tmp_path):
    out = tmp_path / "tags.jsonl"
    lock = OutputLock(str(out))
    lock.acquire()  # another run holds it
    try:
        result = classify(*clips, *model_args(tiny_checkpoint), "-o", out)
        assert result.exit_code == 2 and "another run is writing" in result.stderr
        assert not out.exists()
    finally:
        lock.release()
    assert classify(*clips, *model_args(tiny_checkpoint), "-o", out).exit_code == 0


# -- 10, 19. stderr and stdout going away ------------------------------------------------------------------------

@pytest.mark.slow  # a whole process (or several): seconds each
@pytest.mark.parametrize("how", ["dev-full", "closed"])
def test_losing_stderr_never_loses_data(tiny_checkpoint, clips, tmp_path, how):
    out = tmp_path / "tags.jsonl"
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"junk" * 50)  # a failure line must be written to the missing stderr
    if how == "dev-full":
        kwargs = {"stderr": open("/dev/full", "w")}
    else:
        kwargs = {"stderr": subprocess.DEVNULL, "preexec_fn": lambda: os.close(2)}
    proc = ast_process(*clips, bad, *model_args(tiny_checkpoint), "-o", out, **kwargs)
    proc.communicate(timeout=120)
    assert proc.returncode == 1  # one file failed; the run itself went through
    assert [r["path"] for r in records(out.read_text())] == [str(c) for c in clips] + [str(bad)]


@pytest.mark.slow  # a whole process: seconds
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_26_13_a_full_stdout_is_one_clear_line(tiny_checkpoint, clips):
    """``ast classify ... -f csv > /dev/full`` said "unexpected error: OSError" and asked for --debug."""
    with open("/dev/full", "w") as full:
        proc = ast_process(*clips, *model_args(tiny_checkpoint), "-f", "csv", stdout=full)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert stderr.splitlines()[-2:] == ["Error: writing failed: No space left on device",
                                        "Hint: make room where the output goes, then run again"]


@pytest.mark.slow  # a whole process (or several): seconds each
def test_a_closed_stdout_pipe_ends_quietly(tiny_checkpoint, many):
    proc = ast_process(many, *model_args(tiny_checkpoint), "-f", "jsonl", "--batch-size", "1")
    first = proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    assert json.loads(first)["error"] is None
    assert proc.returncode == 141 and "Traceback" not in stderr and "unexpected error" not in stderr


def test_a_reader_going_away_mid_table_is_noticed():
    """A table larger than a pipe's buffer, its reader gone after one line (`ast search -f table | head -1`):
    CPython dropped the rest of the one large write without an error, and the run exited 0."""
    script = ("import sys\nfrom ast_cli.run.files import console\ntry:\n"
              "    console(soft_wrap=False).print('\\n'.join(['x' * 100] * 3000))\n"
              "except BrokenPipeError:\n    sys.exit(141)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == b"x" * 10
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141, proc.stderr.read()


def test_stdout_closed_without_output_is_one_line(tiny_checkpoint, clips):
    proc = subprocess.run([sys.executable, "-m", "ast_cli", "classify", str(clips[0]), *map(str, model_args(tiny_checkpoint))],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2 and "stdout is closed" in proc.stderr and "Traceback" not in proc.stderr


# -- 11. huge samples --------------------------------------------------------------------------------------------

def test_huge_finite_samples_are_an_error_record_not_nan(tiny_checkpoint, clips, tmp_path):
    huge = tmp_path / "huge.wav"
    sf.write(str(huge), np.where(np.arange(8000) % 2, 3e19, -3e19).astype(np.float32), 16000, subtype="FLOAT")
    result = classify(huge, clips[0], *model_args(tiny_checkpoint), "-f", "jsonl")
    got = records(result.stdout)  # strict: NaN or Infinity would not parse
    assert result.exit_code == 1 and got[0]["error"] and got[0]["labels"] == [] and got[1]["error"] is None


# -- 12. names that look like options or protocols, through ffmpeg -------------------------------------------------

@pytest.mark.slow  # a whole process (or several): seconds each
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg executable")
@pytest.mark.parametrize("name", ["-dash.m4a", "proto:col.m4a"])
def test_ffmpeg_reads_names_that_look_like_options_or_protocols(tiny_checkpoint, tmp_path, name):
    wav = write_audio(tmp_path / "src.wav", 1.0)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "aac", str(tmp_path / "x.m4a")], check=True)
    os.rename(tmp_path / "x.m4a", tmp_path / name)
    proc = subprocess.run([sys.executable, "-m", "ast_cli", "classify", "--model", str(tiny_checkpoint[0]), "--", name],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["duration"] == pytest.approx(1.0, abs=0.05)


# -- 14. a full disk ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["json", "csv", "jsonl"])
def test_a_full_disk_is_one_line_without_a_traceback(tiny_checkpoint, clips, fmt):
    result = classify(*clips, *model_args(tiny_checkpoint), "-o", "/dev/full", "-f", fmt)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["Error: cannot write /dev/full: No space left on device"]
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


# -- 15, 16. resume retries failures, survives odd records, and compares resolved paths -----------------------------

def test_resume_retries_a_failed_file(tiny_checkpoint, clips, tmp_path, monkeypatch):
    import ast_cli.audio.decode as audio

    out = tmp_path / "tags.jsonl"
    real_probe = audio.probe

    def flaky(path):
        if str(path) == str(clips[1]):
            raise audio.AudioDecodeError("decode failed: device busy")
        return real_probe(path)

    monkeypatch.setattr(audio, "probe", flaky)
    first = classify(*clips, *model_args(tiny_checkpoint), "-o", out)
    assert first.exit_code == 1
    monkeypatch.setattr(audio, "probe", real_probe)  # the cause went away; the file itself did not change
    again = classify(*clips, *model_args(tiny_checkpoint), "-o", out, "--resume")
    assert again.exit_code == 0 and "resuming: 2 of 3" in again.stderr
    got = records(out.read_text())
    assert [r["path"] for r in got] == [str(c) for c in clips] + [str(clips[1])]
    latest = {r["path"]: r for r in got}  # the latest record of a path wins
    assert all(r["error"] is None for r in latest.values())


def test_resume_survives_wrongly_typed_fields_and_relative_paths(tiny_checkpoint, clips, tmp_path, monkeypatch):
    out = tmp_path / "tags.jsonl"
    assert classify(*clips, *model_args(tiny_checkpoint), "-o", out).exit_code == 0
    lines = out.read_text().splitlines()
    odd = json.loads(lines[0])
    odd.update(size="big", mtime=[1])
    out.write_text("\n".join([json.dumps(odd)] + lines[1:]) + "\n")
    monkeypatch.chdir(clips[0].parent)
    relative = [c.name for c in clips]
    result = classify(*relative, *model_args(tiny_checkpoint), "-o", out, "--resume")
    assert result.exit_code == 0, result.stderr
    appended = records(out.read_text())[3:]
    assert [r["path"] for r in appended] == [relative[0]]  # only the record it could not trust


# -- 17. file modes --------------------------------------------------------------------------------------------

def test_outputs_respect_the_umask_and_keep_an_existing_mode(tiny_checkpoint, clips, tmp_path):
    old = os.umask(0o022)
    try:
        for fmt in ("json", "csv", "jsonl"):
            assert classify(clips[0], *model_args(tiny_checkpoint), "-o", tmp_path / f"new.{fmt}").exit_code == 0
            assert stat.S_IMODE(os.stat(tmp_path / f"new.{fmt}").st_mode) == 0o644, fmt
        kept = tmp_path / "kept.json"
        kept.write_text("x")
        kept.chmod(0o640)
        assert classify(clips[0], *model_args(tiny_checkpoint), "-o", kept, "--overwrite").exit_code == 0
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
        features = runner.invoke(app, ["extract-features", str(clips[0]), "--out", str(tmp_path / "f"), "--model",
                                       str(tiny_checkpoint[0]), "--quiet"])
        assert features.exit_code == 0, features.stderr
        [written] = (tmp_path / "f").iterdir()
        assert stat.S_IMODE(written.stat().st_mode) == 0o644
    finally:
        os.umask(old)


# -- 18. memory bounds ---------------------------------------------------------------------------------------

def test_blocks_are_bounded_in_bytes_and_workers_are_capped(tiny_checkpoint, tmp_path):
    from ast_cli.audio.decode import MAX_BLOCK_BYTES, AudioReader

    wide = tmp_path / "64ch.wav"
    sf.write(str(wide), np.zeros((48000 * 3, 64), np.float32), 48000, subtype="FLOAT")
    reader = AudioReader(wide)
    assert reader.block_frames * 64 * 4 <= MAX_BLOCK_BYTES < 30 * 48000 * 64 * 4
    assert max(b.shape[0] for b in reader.raw_blocks()) == reader.block_frames
    result = classify(wide, *model_args(tiny_checkpoint), "--workers", "1000")
    assert result.exit_code == 2 and "--workers" in result.stderr


# -- 20. output problems found before the work ------------------------------------------------------------

def test_output_problems_are_found_before_any_work(tiny_checkpoint, clips, tmp_path):
    no_model = ["--model", str(tmp_path / "no-such-model")]  # loading it would fail with exit 1
    into_dir = classify(*clips, *no_model, "-f", "json", "-o", tmp_path)
    assert into_dir.exit_code == 2 and "is a directory" in into_dir.stderr
    read_only = runner.invoke(app, ["extract-features", *map(str, clips), "--out", "/proc/ast-out", *no_model])
    assert read_only.exit_code == 2 and "cannot write in /proc/ast-out" in read_only.stderr


# -- 23. the smaller ones -----------------------------------------------------------------------------------

def test_a_newline_in_a_failing_name_stays_on_one_line(tiny_checkpoint, tmp_path):
    bad = tmp_path / "two\nlines.wav"
    bad.write_bytes(b"junk" * 50)
    result = classify(bad, *model_args(tiny_checkpoint), "-f", "jsonl", "--quiet")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "two\\nlines.wav" in result.stderr and records(result.stdout)[0]["path"] == str(bad)


def test_audio_through_a_pipe_path_is_read(tiny_checkpoint, tmp_path):
    """`ast classify <(sox ... -t wav -)` and `... | ast classify /dev/stdin`: a FIFO path."""
    wav = write_audio(tmp_path / "x.wav", 1.2, 22050, 2)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: open(fifo, "wb").write(wav.read_bytes()))
    writer.start()
    result = classify(fifo, *model_args(tiny_checkpoint), "-f", "jsonl")
    writer.join(10)
    assert result.exit_code == 0, result.stderr
    assert records(result.stdout)[0]["duration"] == pytest.approx(1.2, abs=1e-3)
    direct = classify(wav, *model_args(tiny_checkpoint), "-f", "jsonl")
    for a, b in zip(records(direct.stdout)[0]["labels"], records(result.stdout)[0]["labels"]):
        assert a["index"] == b["index"] and a["score"] == pytest.approx(b["score"], abs=1e-6)


@pytest.mark.parametrize("change", [{"num_attention_heads": 0}, {"hidden_size": -64}, {"max_length": "1024"}])
def test_a_hostile_config_is_a_checkpoint_error(tiny_checkpoint, clips, tmp_path, change):
    directory = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint[0], directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    result = classify(clips[0], "--model", directory)
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {directory / 'config.json'}: ")
    assert "unexpected" not in result.stderr


def test_a_tampered_pickle_warns_nothing_in_a_real_process(tmp_path):
    """torch's weights_only unpickler warns (a UserWarning on stderr) about a file's pickle protocol before it
    refuses the file: a user sees only the one Error/Hint, as in any process (not only under pytest's capture)."""
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"\x80\x04\x95not a tensor pickle")
    clip = write_audio(tmp_path / "x.wav", 0.5)
    done = subprocess.run([sys.executable, "-m", "ast_cli", "classify", str(clip), "--model", str(evil)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0].startswith("Error: not a safe weights file"), done.stderr
    assert len(done.stderr.splitlines()) == 2 and "UserWarning" not in done.stderr, done.stderr
