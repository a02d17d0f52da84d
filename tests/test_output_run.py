"""How a classify run begins and ends with its output: resume, locks, long names, signals at the very end,
the end-of-run summary, which model made a record, and empty inputs.

Each test names the item it covers: issue #22 items 5, 10, 11, 12 and issue #24 items 4, 5, 9."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import write_audio

runner = CliRunner()


def classify(*args, input=None):
    return runner.invoke(app, ["classify", *map(str, args)], input=input)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return [write_audio(root / f"f{i:02d}.wav", 1.0 + 0.1 * i, 16000, 1, seed=i) for i in range(3)]


@pytest.fixture
def model(tiny_checkpoint):
    return ["--model", tiny_checkpoint[0]]


# -- #22.5: a whole last record without its newline is kept ------------------------------------------------------

def test_22_5_resume_keeps_a_whole_last_record_without_its_newline(clips, model, tmp_path):
    out = tmp_path / "tags.jsonl"
    assert classify(clips[1], clips[0], *model, "-o", out).exit_code == 0
    unterminated = out.read_bytes().rstrip(b"\n")  # clips[0]'s record ends the file, without its newline
    out.write_bytes(unterminated)
    result = classify(clips[1], clips[2], *model, "-o", out, "--resume")  # clips[0] is not among the inputs
    assert result.exit_code == 0, result.stderr
    data = out.read_bytes()
    assert data.startswith(unterminated + b"\n")
    assert [r["path"] for r in records(data.decode())] == [str(clips[1]), str(clips[0]), str(clips[2])]


# -- #22.11: any legal output name works (temporary and lock names are derived to fit) ----------------------------

@pytest.mark.parametrize("length, fmt", [(246, "json"), (250, "csv"), (255, "jsonl"), (255, "json")])
def test_22_11_output_names_up_to_255_characters_work(clips, model, tmp_path, length, fmt):
    out = tmp_path / ("t" * (length - len(fmt) - 1) + "." + fmt)
    assert len(out.name) == length
    result = classify(*clips, *model, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_size > 0 and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    again = classify(*clips, *model, "-o", out, "--overwrite")  # the lock and the temporary file again
    assert again.exit_code == 0, again.stderr


# -- #22.10: the lock comes before the journal is read ----------------------------------------------------------

def test_22_10_resume_reads_the_journal_only_while_holding_the_lock(clips, model, tmp_path, monkeypatch):
    import fcntl

    from ast_cli.run.files import OutputLock
    from ast_cli.run.resume import Journal

    out = tmp_path / "tags.jsonl"
    assert classify(clips[0], *model, "-o", out).exit_code == 0
    before = out.read_bytes()
    other = OutputLock(str(out))
    other.acquire()  # a first run is writing
    try:
        second = classify(*clips, *model, "-o", out, "--resume")
    finally:
        other.release()
    assert second.exit_code == 2 and "another run is writing" in second.stderr
    assert "resuming:" not in second.stderr and out.read_bytes() == before

    held = []
    real_read = Journal.read.__func__

    def read(cls, path):  # is the lock held while the journal is read?
        fd = os.open(OutputLock(path).path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except OSError:
            held.append(True)
        finally:
            os.close(fd)
        return real_read(cls, path)

    monkeypatch.setattr(Journal, "read", classmethod(read))
    result = classify(*clips, *model, "-o", out, "--resume")
    assert result.exit_code == 0 and held == [True]
    assert [r["path"] for r in records(out.read_text())] == [str(c) for c in clips]  # each file once


def test_22_10_no_resuming_message_for_an_output_that_does_not_exist(clips, model, tmp_path):
    out = tmp_path / "new.jsonl"
    result = classify(*clips, *model, "-o", out, "--resume")
    assert result.exit_code == 0 and "resuming:" not in result.stderr
    again = classify(*clips, *model, "-o", out, "--resume")
    assert "resuming: 3 of 3 files already in" in again.stderr


# -- #22.12: a signal at the very end: replaced and success, or not replaced and 130/143 ------------------------

SIGNAL_AT_REPLACE = """
import os, signal, sys
target, when, signum = os.path.realpath(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real_replace = os.replace

def replace(src, dst, *args, **kwargs):  # the signal comes just before or just after the output is replaced
    ours = os.path.realpath(dst) == target
    if ours and when == "before":
        os.kill(os.getpid(), signum)
    real_replace(src, dst, *args, **kwargs)
    if ours and when == "after":
        os.kill(os.getpid(), signum)

os.replace = replace
sys.argv = ["ast", "classify", *sys.argv[4:]]
from ast_cli.cli import main
main()
"""


@pytest.mark.slow  # whole processes
@pytest.mark.parametrize("when, sig", [("before", signal.SIGINT), ("after", signal.SIGINT), ("after", signal.SIGTERM)])
def test_22_12_a_signal_at_the_replace_never_reports_an_interrupt_after_replacing(clips, model, tmp_path, when, sig):
    out = tmp_path / "tags.json"
    out.write_text('["the earlier output"]\n')
    args = [out, when, int(sig), *clips, *model, "-o", out, "--overwrite"]
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_REPLACE, *map(str, args)], capture_output=True,
                          text=True, timeout=120)
    replaced = out.read_text() != '["the earlier output"]\n'
    assert "Traceback" not in proc.stderr
    assert (replaced and proc.returncode in (0, 1)) or (not replaced and proc.returncode in (130, 143)), \
        (replaced, proc.returncode, proc.stderr)
    if replaced:
        assert [r["path"] for r in json.loads(out.read_text())] == [str(c) for c in clips]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tags.json"]  # no temporary file, no lock left


# -- #24.4: an end-of-run summary on stderr, the same as extract-features' ----------------------------------------

def test_24_4_classify_ends_with_a_summary_unless_quiet(clips, model, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"junk" * 50)
    out = tmp_path / "tags.jsonl"
    result = classify(*clips, bad, *model, "-o", out)
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"3 tagged, 1 failed; \d+ s of audio in [\d.]+ s \([\d.]+x real-time\); results in {out}",
                        last), last
    again = classify(*clips, bad, *model, "-o", out, "--resume")
    assert again.stderr.strip().splitlines()[-1].startswith(f"0 tagged, 1 failed, 3 skipped (already in {out}); ")
    quiet = classify(*clips, bad, *model, "-o", out, "--resume", "-q")
    assert quiet.stderr.strip().splitlines() == [f"error: {bad}: {records(out.read_text())[-1]['error']}"]


# -- #24.5: records name the model and settings; --resume refuses others, --overwrite replaces --------------------

def test_24_5_records_name_the_model_and_the_settings_that_change_scores(clips, model, tiny_checkpoint, tmp_path):
    out = tmp_path / "tags.jsonl"
    assert classify(*clips[:2], *model, "-o", out).exit_code == 0
    got = records(out.read_text())
    assert {r["model"] for r in got} == {os.path.realpath(tiny_checkpoint[0])}
    stamp = " ".join(f"{s.st_size}:{s.st_mtime_ns}" for s in (
        (tiny_checkpoint[0] / name).stat() for name in ("model.safetensors", "config.json", "preprocessor_config.json")))
    assert got[0]["settings"] == {"activation": "sigmoid", "hop_seconds": 0.64, "window_seconds": 0.64,
                                  "compute": "fp32", "weights": stamp}


@pytest.mark.parametrize("changed", [["--activation", "softmax"], ["--hop", "0.32"], ["--quantize", "int8"],
                                     ["--model", "other"]])
def test_24_5_resume_refuses_another_model_or_settings_and_overwrite_replaces(clips, model, tmp_path, changed):
    from conftest import make_reference

    if changed[0] == "--model":
        changed = ["--model", make_reference(tmp_path, "tiny-other", seed=1)[0]]
    out = tmp_path / "tags.jsonl"
    assert classify(*clips[:2], *model, "-o", out).exit_code == 0
    before = out.read_bytes()
    refused = classify(*clips, *model, *changed, "-o", out, "--resume")
    assert refused.exit_code == 2 and out.read_bytes() == before
    assert refused.stderr.startswith("Error: --resume: ") and "another model or settings" in refused.stderr
    replaced = classify(*clips, *model, *changed, "-o", out, "--overwrite")
    assert replaced.exit_code == 0 and len(records(out.read_text())) == 3
    assert classify(*clips, *model, *changed, "-o", out, "--resume").exit_code == 0  # the same settings again


def test_24_5_a_hub_model_is_named_by_repo_and_commit(clips, tiny_checkpoint, tmp_path, monkeypatch):
    from test_newcomer import fake_cache

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_cache(tmp_path / "hub", "test/ast-tiny", tiny_checkpoint[0], commit="c" * 40)
    result = classify(clips[0], "--model", "test/ast-tiny", "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert records(result.stdout)[0]["model"] == "test/ast-tiny@" + "c" * 40


def test_24_5_resume_refuses_records_that_name_no_model(clips, model, tmp_path):
    out = tmp_path / "tags.jsonl"
    out.write_text(json.dumps({"path": str(clips[0]), "duration": 1.0, "labels": [], "error": None}) + "\n")
    result = classify(*clips, *model, "-o", out, "--resume")
    assert result.exit_code == 2 and "names no model" in result.stderr


# -- #24.9: nothing on stdin is no output; named folders with no audio are a failure -----------------------------

def test_24_9_nothing_from_stdin_exits_0_and_creates_no_file(model, tmp_path):
    out = tmp_path / "week.jsonl"
    result = classify("-", *model, "-o", out, "--overwrite", input="")
    assert result.exit_code == 0 and not out.exists() and list(tmp_path.iterdir()) == []
    out.write_text("last week's\n")
    assert classify("-", *model, "-o", out, "--overwrite", input="").exit_code == 0
    assert out.read_text() == "last week's\n"


@pytest.mark.parametrize("ext", [["--ext", "xyz"], []])
def test_24_9_a_folder_with_no_audio_fails_saying_what_was_searched(clips, model, tmp_path, ext):
    folder = clips[0].parent if ext else tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    out = tmp_path / "tags.jsonl"
    result = classify(folder, *model, *ext, "-o", out)
    assert result.exit_code == 1 and result.stdout == "" and not out.exists()
    looked_for = "files ending in .xyz" if ext else "audio or video files"
    assert result.stderr.splitlines()[0] == f"Error: no {looked_for} in {folder}"


def test_24_9_a_folder_with_no_audio_next_to_other_inputs_is_an_error_record(clips, model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = classify(clips[0], empty, *model, "-f", "jsonl", "-q")
    assert result.exit_code == 1
    assert [(r["path"], r["error"]) for r in records(result.stdout)] == [
        (str(clips[0]), None), (str(empty), "no audio or video files in this folder")]
    assert result.stderr.splitlines() == [f"error: {empty}: no audio or video files in this folder"]


def test_24_5_records_name_the_precision_the_model_runs_in(monkeypatch):
    import importlib
    from types import SimpleNamespace

    import ast_cli.run.backends
    from ast_cli.run.options import RunOptions

    cli = importlib.import_module("ast_cli.cli.classify")
    monkeypatch.setattr(ast_cli.run.backends, "pick_device", lambda device: "cuda:0")  # auto picks a GPU here
    local, ray_gpu = SimpleNamespace(ray=False), SimpleNamespace(ray=True, gpus_per_worker=1.0)

    def compute(cluster, **options):
        return cli._compute(cli._Job("m", RunOptions(**options), cluster, None, None, None, False, None, None,
                                     True, False))

    assert compute(local) == "fp16" and compute(ray_gpu) == "fp16"  # auto is fp16 on CUDA
    assert compute(SimpleNamespace(ray=True, gpus_per_worker=0.0)) == "fp32"
    assert compute(local, dtype="bf16") == "bf16" and compute(local, quantize="int8") == "int8"


# -- session 8: outputs ------------------------------------------------------------------------------------------

def _result(path):
    from ast_cli.run.tagger import FileResult, LabelScore

    return FileResult(str(path), 1.0, [LabelScore("Speech", 0, 0.9)])


def test_s8_7_an_overwritten_jsonl_stays_as_it_was_until_the_first_record(clips, tmp_path):
    from ast_cli.run.output import plan_output

    out = tmp_path / "week.jsonl"
    out.write_text('{"path": "last week"}\n')
    writer = plan_output(str(out), None, overwrite=True).open()
    assert out.read_text() == '{"path": "last week"}\n'  # opening the writer truncates nothing
    writer.close(commit=False)  # interrupted before any record
    assert out.read_text() == '{"path": "last week"}\n' and sorted(tmp_path.iterdir()) == [out]
    writer = plan_output(str(out), None, overwrite=True).open()
    writer.write(_result(clips[0]))  # the first record replaces the earlier file ...
    assert [r["path"] for r in records(out.read_text())] == [str(clips[0])]
    writer.write(_result(clips[1]))  # ... and the rest is appended, each line as it comes
    assert [r["path"] for r in records(out.read_text())] == [str(clips[0]), str(clips[1])]
    writer.close(commit=False)  # interrupted after two records: they stay, for --resume
    assert [r["path"] for r in records(out.read_text())] == [str(clips[0]), str(clips[1])]
    assert sorted(tmp_path.iterdir()) == [out]


def test_s8_7_an_interrupted_overwrite_run_that_tagged_nothing_keeps_the_jsonl(clips, model, tmp_path, monkeypatch):
    from ast_cli.run.tagger import Tagger

    out = tmp_path / "week.jsonl"
    assert classify(*clips, *model, "-o", out).exit_code == 0
    before = out.read_bytes()

    def interrupted(self, sources, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(Tagger, "classify", interrupted)
    result = classify(clips[0], *model, "-o", out, "--overwrite")
    assert result.exit_code == 130 and out.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [out]


def test_s8_4_a_run_never_removes_another_outputs_or_a_live_runs_temporary_file(clips, model, tmp_path):
    import fcntl

    out = tmp_path / "tags.csv"
    other = tmp_path / ".tags.csv.week2.csv.abcd1234.ast-tmp"  # tags.csv.week2.csv's, being written
    other.write_text("path,duration\n")
    stale = tmp_path / ".tags.csv.k1ll3d00.ast-tmp"  # ours, of a run that was killed
    stale.write_text("half")
    live = tmp_path / ".tags.csv.l1ve0000.ast-tmp"  # ours by name, but a live process holds it
    live.write_text("live")
    with open(live) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = classify(clips[0], *model, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert other.read_text() == "path,duration\n" and live.read_text() == "live" and not stale.exists()


def test_s8_5_audio_piped_on_stdin_is_never_already_in_an_output_dir(model, tmp_path):
    short, long = (write_audio(tmp_path / f"{n}.wav", seconds, seed=n) for n, seconds in ((1, 1.0), (2, 3.0)))
    ods = tmp_path / "ods"
    assert classify("-", *model, "--output-dir", ods, "-q", input=short.read_bytes()).exit_code == 0
    again = classify("-", *model, "--output-dir", ods, input=long.read_bytes())
    assert again.exit_code == 0 and "already in" not in again.stderr, again.stderr
    assert json.loads((ods / "-.json").read_text())["duration"] == pytest.approx(3.0)


@pytest.mark.parametrize("changed", [["--activation", "softmax"], ["--hop", "0.32"], ["--model", "other"]])
def test_s8_6_an_output_dir_refuses_json_results_of_another_model_or_settings(clips, model, tmp_path, changed):
    from conftest import make_reference

    if changed[0] == "--model":
        changed = ["--model", make_reference(tmp_path, "tiny-other", seed=1)[0]]
    ods = tmp_path / "ods"
    assert classify(*clips[:2], *model, "--output-dir", ods, "-q").exit_code == 0
    before = {p: p.read_bytes() for p in ods.iterdir()}
    for inputs in (clips[:2], clips):  # nothing left to do, and one input to add: refused all the same
        refused = classify(*inputs, *model, *changed, "--output-dir", ods)
        assert refused.exit_code == 2, refused.stderr
        assert refused.stderr.startswith(f"Error: --output-dir: {ods} holds results made with another model or "
                                         f"settings ({ods / clips[0].name}.json: ")
        assert {p: p.read_bytes() for p in ods.iterdir()} == before
    replaced = classify(*clips, *model, *changed, "--output-dir", ods, "--overwrite", "-q")
    assert replaced.exit_code == 0 and len(list(ods.iterdir())) == 3


def test_s8_6_an_output_dir_redoes_an_input_that_changed_since_its_json_result(model, tmp_path):
    source = write_audio(tmp_path / "src" / "a.wav", 1.0)
    ods = tmp_path / "ods"
    assert classify(source.parent, *model, "--output-dir", ods, "-q").exit_code == 0
    write_audio(source, 3.0, seed=5)  # replaced: another size and mtime
    again = classify(source.parent, *model, "--output-dir", ods)
    assert again.exit_code == 0 and "already in" not in again.stderr, again.stderr
    assert json.loads((ods / "a.wav.json").read_text())["duration"] == pytest.approx(3.0)
    unchanged = classify(source.parent, *model, "--output-dir", ods)
    assert "1 of 1 file already in" in unchanged.stderr
    (ods / "a.wav.json").write_text("my own notes\n")  # not ours: never replaced without --overwrite
    refused = classify(source.parent, *model, "--output-dir", ods)
    assert refused.exit_code == 2 and "is not a result file of `ast`" in refused.stderr
    assert (ods / "a.wav.json").read_text() == "my own notes\n"


def test_s8_12_an_empty_shard_exits_0_and_names_no_file_it_did_not_write(clips, model, tmp_path):
    from ast_cli.tasks.distributed import shard_of

    empty = min({1, 2, 3, 4} - {shard_of(str(clip), 4) for clip in clips})  # a file's shard: its path's hash
    out = tmp_path / "e.json"
    result = classify(*clips, *model, "--shard", f"{empty}/4", "-o", out)
    assert result.exit_code == 0 and not out.exists() and list(tmp_path.iterdir()) == []
    assert result.stderr.splitlines() == [f"nothing to tag: shard {empty}/4 holds none of the 3 inputs"]


def test_s8_7_a_jsonl_whose_first_record_cannot_replace_the_earlier_file_is_one_line(clips, model, tmp_path,
                                                                                     monkeypatch):
    import ast_cli.run.files as files

    out = tmp_path / "week.jsonl"
    out.write_text('{"path": "last week"}\n')
    real_replace = os.replace

    def full(src, dst):
        if os.path.realpath(dst) == os.path.realpath(out):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    result = classify(clips[0], *model, "-o", out, "--overwrite")
    assert result.exit_code == 1 and result.stderr.splitlines()[-1] == \
        f"Error: cannot write {out}: No space left on device"
    assert out.read_text() == '{"path": "last week"}\n' and sorted(tmp_path.iterdir()) == [out]


def test_s8_D4_records_of_a_model_retrained_in_place_are_not_mixed(clips, tiny_checkpoint, tmp_path):
    """``--resume`` and ``--output-dir`` knew a local model by its path only: after ``ast train --out mine/
    --overwrite`` records of two sets of weights ended up in one output (found by a review). Records now carry the
    weights file's size and time; another one is refused, before the model loads."""
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(tiny_checkpoint[0], mine)
    out, ods = tmp_path / "tags.jsonl", tmp_path / "ods"
    assert classify(clips[0], "--model", mine, "-o", out).exit_code == 0
    assert classify(clips[0], "--model", mine, "--output-dir", ods).exit_code == 0
    assert classify(*clips[:2], "--model", mine, "-o", out, "--resume").exit_code == 0  # the same weights
    before = out.read_bytes()
    weights = mine / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # written again
    resumed = classify(*clips, "--model", mine, "-o", out, "--resume")
    assert resumed.exit_code == 2 and "weights changed since" in resumed.stderr and out.read_bytes() == before
    rerun = classify(*clips, "--model", mine, "--output-dir", ods)
    assert rerun.exit_code == 2 and "weights changed since" in rerun.stderr

