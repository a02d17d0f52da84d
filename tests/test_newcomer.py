"""A newcomer's walk through the README (#13): wrong results with no warning, what similar tools have, polish.

Each test names the item of issue #13 it covers. (Item 2, the README recipes run end to end, is in
test_docs.py; item 7's completions in test_completions.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import write_audio

runner = CliRunner()


def ast(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return [write_audio(root / "a.wav", 1.0, 16000, 1, seed=1), write_audio(root / "b.flac", 1.4, 44100, 2, seed=2)]


def fake_cache(cache: Path, repo_id: str, source_dir: Path, commit: str = "a" * 40) -> Path:
    """``source_dir``'s files as a cached hub snapshot (huggingface_hub's layout: blobs, links, refs/main)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in source_dir.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# -- 1. extract-features does not skip outputs made with other settings --------------------------------------

@pytest.mark.parametrize("changed", [["--kind", "fbank"], ["--hop", "0.3"], ["--quantize", "int8"]])
def test_extract_refuses_outputs_made_with_other_settings(tiny_checkpoint, clips, tmp_path, changed):
    out = tmp_path / "feat"
    base = ["extract-features", *clips, "--out", out, "--model", tiny_checkpoint[0]]  # not quiet: a summary
    assert ast(*base).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*.safetensors")}
    again = ast(*base)
    assert again.exit_code == 0 and "0 written, 2 skipped" in again.stderr  # same settings: done
    other = ast(*base, *changed)
    assert other.exit_code == 2 and "made with other settings" in other.stderr
    assert {p: p.read_bytes() for p in out.rglob("*.safetensors")} == before
    replaced = ast(*base, *changed, "--overwrite")
    assert replaced.exit_code == 0 and "2 written" in replaced.stderr


def test_extract_refuses_another_models_outputs(tiny_checkpoint, clips, tmp_path):
    import shutil

    twin = tmp_path / "other-model"
    shutil.copytree(tiny_checkpoint[0], twin)
    out = tmp_path / "feat"
    assert ast("extract-features", *clips, "--out", out, "--model", tiny_checkpoint[0], "--quiet").exit_code == 0
    result = ast("extract-features", *clips, "--out", out, "--model", twin, "--quiet")
    assert result.exit_code == 2 and "model" in result.stderr and "other settings" in result.stderr


# -- 3, 4. the output format follows the file name; an existing output is not replaced silently --------------

@pytest.mark.parametrize("name, check", [
    ("x.csv", lambda text: text.startswith("path,duration,rank,label,index,score,error\n")),
    ("x.tsv", lambda text: text.startswith("path\tduration\trank\tlabel\tindex\tscore\terror\n")),
    ("x.json", lambda text: isinstance(json.loads(text), list)),
    ("x.ndjson", lambda text: all(json.loads(line)["path"] for line in text.splitlines())),
])
def test_the_format_follows_the_output_extension(tiny_checkpoint, clips, tmp_path, name, check):
    result = ast("classify", *clips, "--model", tiny_checkpoint[0], "-o", tmp_path / name)
    assert result.exit_code == 0, result.stderr
    assert check((tmp_path / name).read_text())


def test_a_format_that_contradicts_the_extension_is_a_usage_error(tiny_checkpoint, clips, tmp_path):
    result = ast("classify", *clips, "--model", tiny_checkpoint[0], "-o", tmp_path / "x.csv", "-f", "jsonl")
    assert result.exit_code == 2 and "looks like csv" in result.stderr and not (tmp_path / "x.csv").exists()


def test_an_existing_jsonl_is_not_replaced_without_resume_or_overwrite(tiny_checkpoint, clips, tmp_path):
    out = tmp_path / "tags.jsonl"
    out.write_text("".join(json.dumps({"path": f"old{i}.wav", "error": None}) + "\n" for i in range(11)))
    before = out.read_bytes()
    result = ast("classify", clips[0], "--model", tiny_checkpoint[0], "-o", out)
    assert result.exit_code == 2 and "--resume" in result.stderr and "--overwrite" in result.stderr
    assert out.read_bytes() == before


# -- 5, 6, 8. the cache: --cache-dir everywhere, labels offline, listing and removal ------------------------------

def test_cache_dir_is_taken_by_every_command_that_loads_a_model(tiny_checkpoint, clips, tmp_path, monkeypatch):
    cache = tmp_path / "my-cache"
    fake_cache(cache, "acme/tiny-ast", tiny_checkpoint[0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--model", "acme/tiny-ast", "--cache-dir", cache]
    assert ast("classify", clips[0], *common, "-f", "json").exit_code == 0
    assert ast("extract-features", clips[0], "--out", tmp_path / "f", *common, "--quiet").exit_code == 0
    assert ast("labels", *common).stdout.startswith("0\tSpeech\n")
    assert ast("benchmark", *common, "--batch-sizes", "1", "--iters", "1", "--warmup", "0", "-f", "json").exit_code == 0
    missing = ast("classify", clips[0], "--model", "acme/tiny-ast", "-f", "json")  # the default cache has nothing
    assert missing.exit_code == 1 and "not in the Hugging Face cache" in missing.stderr


def test_labels_of_the_published_models_need_no_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    audioset = ast("labels")
    assert audioset.exit_code == 0 and len(audioset.stdout.splitlines()) == 527
    assert audioset.stdout.splitlines()[0] == "0\tSpeech"
    speech = ast("labels", "--model", "speech-commands-v2")
    assert speech.exit_code == 0 and len(speech.stdout.splitlines()) == 35


def test_models_lists_every_cached_ast_and_removes_one(tiny_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    fake_cache(cache, "frog-lab/ast-frogs-12", tiny_checkpoint[0])
    fake_cache(cache, "MIT/ast-finetuned-audioset-16-16-0.442", tiny_checkpoint[0], commit="b" * 40)
    listed = ast("models", "--cached", "--format", "json", "--cache-dir", cache)
    assert listed.exit_code == 0
    rows = json.loads(listed.stdout)
    assert [r["repo_id"] for r in rows] == ["MIT/ast-finetuned-audioset-16-16-0.442", "frog-lab/ast-frogs-12"]
    assert rows[0]["alias"] == "audioset-16-16-0.442" and rows[1]["alias"] is None
    assert all(r["size_on_disk"] > 1000 for r in rows)
    table = ast("models", "--cached", "--cache-dir", cache)
    assert "frog-lab/ast-frogs-12" in table.stdout and " MB" in table.stdout
    removed = ast("models", "--rm", "frog-lab/ast-frogs-12", "--yes", "--cache-dir", cache)
    assert removed.exit_code == 0 and "MB freed" in removed.stderr
    assert not (cache / "models--frog-lab--ast-frogs-12").exists()
    assert [r["repo_id"] for r in json.loads(ast("models", "--cached", "-f", "json", "--cache-dir", cache).stdout)] == [
        "MIT/ast-finetuned-audioset-16-16-0.442"]
    again = ast("models", "--rm", "frog-lab/ast-frogs-12", "--cache-dir", cache)
    assert again.exit_code == 1 and "not in the Hugging Face cache" in again.stderr


# -- 9. per-file outputs, label tracks, selection tables, label lists from a file ---------------------------------

def test_output_dir_mirrors_the_tree_and_resumes(tiny_checkpoint, tmp_path):
    tree = tmp_path / "tree"
    write_audio(tree / "a.wav", 1.0, seed=1)
    write_audio(tree / "sub" / "b.wav", 1.3, seed=2)
    (tree / "bad.wav").write_bytes(b"junk" * 40)
    out = tmp_path / "out"
    first = ast("classify", tree, "--model", tiny_checkpoint[0], "--output-dir", out)
    assert first.exit_code == 1  # the bad file
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["a.wav.json", os.path.join("sub", "b.wav.json")]
    record = json.loads((out / "a.wav.json").read_text())
    assert record["path"] == str(tree / "a.wav") and len(record["labels"]) == 5
    again = ast("classify", tree, "--model", tiny_checkpoint[0], "--output-dir", out)
    assert "2 of 3 files already in" in again.stderr  # only the bad file is tried again


def test_audacity_label_tracks_and_raven_selection_tables(tiny_checkpoint, tmp_path):
    clip = write_audio(tmp_path / "in" / "walk.wav", 2.0, seed=4)
    out = tmp_path / "out"
    assert ast("classify", clip, "--model", tiny_checkpoint[0], "--output-dir", out, "-f", "audacity",
               "--top", "2").exit_code == 0
    lines = (out / "walk.wav.labels.txt").read_text().splitlines()
    assert len(lines) == 4 * 2  # 4 windows of 0.64 s, 2 labels each
    start, end, label = lines[0].split("\t")
    assert (float(start), float(end)) == (0.0, 0.64) and label.endswith(")")
    assert float(lines[-1].split("\t")[1]) == pytest.approx(2.0)
    assert ast("classify", clip, "--model", tiny_checkpoint[0], "--output-dir", out, "-f", "raven",
               "--top", "1").exit_code == 0
    table = (out / "walk.wav.selections.txt").read_text().splitlines()
    assert table[0].split("\t")[:5] == ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)"]
    assert [row.split("\t")[0] for row in table[1:]] == ["1", "2", "3", "4"]
    refused = ast("classify", clip, "--model", tiny_checkpoint[0], "-o", tmp_path / "x.txt", "-f", "audacity")
    assert refused.exit_code == 2 and "--output-dir" in refused.stderr


@pytest.mark.parametrize("fmt", ["audacity", "raven"])
def test_26_13_a_label_track_to_stdout_is_refused_not_written_as_csv(tiny_checkpoint, tmp_path, fmt):
    """Without --output-dir, ``-f audacity`` printed CSV rows to stdout as if nothing were wrong: now a usage
    error before the model loads, as with --output."""
    clip = write_audio(tmp_path / "in" / "walk.wav", 1.0, seed=4)
    refused = ast("classify", clip, "--model", tmp_path / "no-such-model", "-f", fmt)
    assert refused.exit_code == 2 and "--output-dir" in refused.stderr and refused.stdout == ""


def test_include_reads_a_label_list_from_a_file(tiny_checkpoint, clips, tmp_path):
    names = tmp_path / "dogs.txt"
    names.write_text("# what we listen for\nDog\nBark  # loud\n\nHowl\n")
    result = ast("classify", clips[0], "--model", tiny_checkpoint[0], "-f", "json", "--include", f"@{names}")
    assert sorted(x["label"] for x in json.loads(result.stdout)[0]["labels"]) == ["Bark", "Dog", "Howl"]
    missing = ast("classify", clips[0], "--model", tiny_checkpoint[0], "--include", f"@{tmp_path / 'none.txt'}")
    assert missing.exit_code == 2 and "cannot read the label list" in missing.stderr


@pytest.mark.parametrize("content, said", [(b"RIFF\xfe\xff\x00 not text", "is not UTF-8 text"),
                                           (b"Dog\n" * (1 << 20) + b"Bark\n", "is larger than 4 MiB")])
def test_s8_14_a_label_list_that_is_not_one_is_a_usage_error_naming_it(tiny_checkpoint, clips, tmp_path, content,
                                                                       said):
    names = tmp_path / "labels.txt"
    names.write_bytes(content)
    result = ast("classify", clips[0], "--model", tiny_checkpoint[0], "--include", f"@{names}")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith(f"Error: --include/--exclude: the label list {names} {said}")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_s8_14_a_label_list_is_read_with_a_bound():
    from ast_cli.cli._inputs import label_file
    from ast_cli.errors import UsageError

    with pytest.raises(UsageError, match="larger than 4 MiB"):
        label_file("/dev/zero")


# -- 10. bad weights files --------------------------------------------------------------------------------------

def test_bad_weights_files_are_named_safely(tiny_checkpoint, clips, tmp_path):
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"\x80\x04\x95not a tensor pickle")
    result = ast("classify", clips[0], "--model", evil)
    assert result.exit_code == 1 and "not a safe weights file" in result.stderr
    assert "weights_only" not in result.stderr and "Re-running" not in result.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    result = ast("classify", clips[0], "--model", junk)
    assert result.exit_code == 1 and "is not a weights file" in result.stderr
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((Path(tiny_checkpoint[0]) / "config.json").read_text())
    result = ast("classify", clips[0], "--model", empty)
    assert result.exit_code == 1 and "has no model.safetensors" in result.stderr
    assert "ast download" not in result.stderr and "--force" not in result.stderr


# -- 11. a run with nothing to do does not load torch ---------------------------------------------------------

PROBE = """
import atexit, sys
atexit.register(lambda: print("TORCH:" + str("torch" in sys.modules), file=sys.stderr))
from ast_cli.cli import main
sys.argv[0] = "ast"
main()
"""


def test_nothing_to_do_imports_no_torch(tiny_checkpoint, clips, tmp_path):
    out, tags = tmp_path / "feat", tmp_path / "tags.jsonl"
    assert ast("extract-features", *clips, "--out", out, "--model", tiny_checkpoint[0], "--quiet").exit_code == 0
    assert ast("classify", *clips, "--model", tiny_checkpoint[0], "-o", tags).exit_code == 0
    for args in (["extract-features", *clips, "--out", out, "--model", tiny_checkpoint[0]],
                 ["classify", *clips, "--model", tiny_checkpoint[0], "-o", tags, "--resume"]):
        proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "TORCH:False" in proc.stderr, (args, proc.stderr)


@pytest.mark.parametrize("changed", [["--model", "other"], ["--activation", "softmax"], ["--dtype", "bf16"]])
def test_s9_a_resume_with_nothing_left_still_refuses_records_of_another_model(tiny_checkpoint, clips, tmp_path,
                                                                               changed):
    """It said "0 tagged, 2 skipped (already in ...)" and exit 0 over records of another model or settings, so
    the run looked as if it had tagged with them. It is refused as a resume with work left is, still without
    importing torch."""
    from conftest import make_reference

    if changed[0] == "--model":
        changed = ["--model", str(make_reference(tmp_path, "tiny-other", seed=1)[0])]
    tags = tmp_path / "tags.jsonl"
    assert ast("classify", *clips, "--model", tiny_checkpoint[0], "-o", tags, "-q").exit_code == 0
    before = tags.read_bytes()
    args = ["classify", *map(str, clips), "--model", str(tiny_checkpoint[0]), "-o", str(tags), "--resume", *changed]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"Error: --resume: {tags} holds records made with another model or settings")
    assert "TORCH:False" in proc.stderr and tags.read_bytes() == before


# -- 12. polish -------------------------------------------------------------------------------------------------

def test_help_shows_choices_and_no_python_types(tiny_checkpoint):
    text = ast("classify", "--help").stdout
    assert "<table|json|jsonl|csv|tsv|audacity|raven>" in text and "<auto|fp32|fp16|bf16>" in text
    for noise in ("<int range>", "<str>", "<float>", "{paths}"):
        assert noise not in text, noise


def test_progress_speaks_of_seconds_for_short_audio():
    from ast_cli.cli._progress import audio_amount

    assert audio_amount(12.4) == "12 s of audio"
    assert audio_amount(600) == "10.0 min of audio"
    assert audio_amount(7200) == "2.00 h of audio"


def test_benchmark_says_which_combinations_it_leaves_out(tiny_checkpoint):
    result = ast("benchmark", "--model", tiny_checkpoint[0], "--dtype", "fp32,bf16", "--quantize", "none,int8",
                 "--batch-sizes", "1", "--iters", "1", "--warmup", "0", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert "left out bf16+int8" in result.stderr
    modes = {(row["dtype"], row["quantize"]) for row in json.loads(result.stdout)["rows"]}
    assert modes == {("fp32", "none"), ("bf16", "none"), ("fp32", "int8")}


def test_a_missing_relative_model_path_is_named_as_such(clips, tmp_path, monkeypatch):
    """`--model recordings/mdl` reads as a hub id; when `recordings` is a folder here, say the path is missing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = ast("classify", clips[0], "--model", "models/mine")
    assert result.exit_code == 1 and "as a local path, ./models/mine does not exist either" in result.stderr
