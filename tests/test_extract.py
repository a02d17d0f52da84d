"""``ast extract-features``: numbers against transformers (ASTFeatureExtractor, ASTModel.pooler_output), output
layout (tree mirroring, collisions), atomic writes, skip/overwrite and the npy format."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from ast_cli import __version__
from ast_cli.tasks import extract
from ast_cli.cli import app
from ast_cli.tasks.extract import plan_outputs, write_features
from ast_cli.audio.inputs import InputFile, expand_inputs
from conftest import make_reference, reference_features, reference_waveform, write_audio
from tolerances import MODEL_VS_TRANSFORMERS, SAME_MACHINE_FEATURES

FBANK_TOLERANCE = SAME_MACHINE_FEATURES  # both sides are ast_cli.audio.features here (tests/tolerances.py)
EMBEDDING_TOLERANCE = MODEL_VS_TRANSFORMERS  # pooled output against transformers' pooler
HOP_SAMPLES = 160  # one 10 ms frame


def run(*args, input=None):
    return CliRunner().invoke(app, ["extract-features", *map(str, args)], input=input)


def read_safetensors(path):
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def reference_windows(audio, extractor, hop_frames: int, count: int) -> np.ndarray:
    """The reference features of each window's stretch of audio: (count, max_length, num_mel_bins)."""
    wave = reference_waveform(audio)
    return np.concatenate([
        reference_features(extractor, wave[w * hop_frames * HOP_SAMPLES:]).numpy() for w in range(count)
    ])


def common_args(directory):
    return ["--model", directory, "--device", "cpu", "--dtype", "fp32", "--workers", "1"]  # not quiet: a summary


# -- numbers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hop", [None, 0.3])
def test_fbank_and_embedding_match_transformers(tiny_checkpoint, tmp_path, hop):
    directory, hf_model, extractor = tiny_checkpoint  # 64-frame windows (0.64 s)
    audio = write_audio(tmp_path / "in" / "clip.wav", 2.0)
    hop_args = [] if hop is None else ["--hop", hop]
    for kind in ("fbank", "embedding"):
        result = run(tmp_path / "in", "--out", tmp_path / kind, "--kind", kind, *hop_args, *common_args(directory))
        assert result.exit_code == 0, result.output

    fbank, meta = read_safetensors(tmp_path / "fbank" / "clip.wav.safetensors")
    hop_frames = 64 if hop is None else 30
    count = 4 if hop is None else 6  # 198 frames: windows until one reaches the last frame
    expected = reference_windows(audio, extractor, hop_frames, count)
    assert list(fbank) == ["fbank"] and fbank["fbank"].shape == (count, 64, 128)
    np.testing.assert_allclose(fbank["fbank"], expected, atol=FBANK_TOLERANCE, rtol=0)
    assert json.loads(meta["window_starts"]) == pytest.approx([w * hop_frames / 100 for w in range(count)])
    assert json.loads(meta["hop_seconds"]) == pytest.approx(hop_frames / 100)

    embedding, meta = read_safetensors(tmp_path / "embedding" / "clip.wav.safetensors")
    with torch.inference_mode():
        pooled = hf_model.audio_spectrogram_transformer(torch.from_numpy(expected)).pooler_output.numpy()
    assert list(embedding) == ["embedding"] and embedding["embedding"].shape == (count, 32)
    np.testing.assert_allclose(embedding["embedding"], pooled, atol=EMBEDDING_TOLERANCE, rtol=0)
    assert meta["kind"] == "embedding"


@pytest.mark.slow
def test_full_size_checkpoint_matches_transformers(tmp_path):
    """A random 768-d, 12-layer checkpoint: one 3 s clip, one 1024-frame window."""
    directory, hf_model, extractor = make_reference(tmp_path, "full")
    audio = write_audio(tmp_path / "clip.flac", 3.0)
    for kind in ("fbank", "embedding"):
        result = run(audio, "--out", tmp_path / kind, "--kind", kind, *common_args(directory))
        assert result.exit_code == 0, result.output
    expected = reference_windows(audio, extractor, 1024, 1)
    fbank, meta = read_safetensors(tmp_path / "fbank" / "clip.flac.safetensors")
    np.testing.assert_allclose(fbank["fbank"], expected, atol=FBANK_TOLERANCE, rtol=0)
    embedding, _ = read_safetensors(tmp_path / "embedding" / "clip.flac.safetensors")
    with torch.inference_mode():
        pooled = hf_model.audio_spectrogram_transformer(torch.from_numpy(expected)).pooler_output.numpy()
    assert embedding["embedding"].shape == (1, 768)
    np.testing.assert_allclose(embedding["embedding"], pooled, atol=EMBEDDING_TOLERANCE, rtol=0)
    assert meta["window_seconds"] == "10.24" and meta["window_starts"] == "[0.0]"


def test_metadata(tiny_checkpoint, tmp_path):
    directory, *_ = tiny_checkpoint
    audio = write_audio(tmp_path / "clip.wav", 1.0)
    assert run(audio, "--out", tmp_path / "out", "--kind", "fbank", *common_args(directory)).exit_code == 0
    _, meta = read_safetensors(tmp_path / "out" / "clip.wav.safetensors")
    assert meta == {  # no "weights": fbank outputs are made without them (s9)
        "kind": "fbank",
        "model": os.path.realpath(directory),
        "sample_rate": "16000",
        "window_seconds": "0.64",
        "hop_seconds": "0.64",
        "window_starts": "[0.0, 0.64]",
        "window_ends": "[0.64, 1.0]",
        "source": str(audio),
        "duration": "1.0",
        "compute": "fp32",
        "ast_cli_version": __version__,
    }


def test_fbank_reads_no_weights(tiny_checkpoint, tmp_path, monkeypatch):
    directory, *_ = tiny_checkpoint
    import ast_cli.checkpoint.weights

    def refuse(*args, **kwargs):
        raise AssertionError("fbank extraction read the weights")

    monkeypatch.setattr(ast_cli.checkpoint.weights, "read_state_dict", refuse)
    audio = write_audio(tmp_path / "clip.wav", 0.5)
    result = run(audio, "--out", tmp_path / "out", "--kind", "fbank", *common_args(directory))
    assert result.exit_code == 0, result.output


# -- layout --------------------------------------------------------------------------------------------


def test_tree_is_mirrored_and_a_second_run_writes_nothing(tiny_checkpoint, tmp_path):
    directory, *_ = tiny_checkpoint
    tree = tmp_path / "recordings"
    write_audio(tree / "a" / "x.wav", 0.5, seed=1)
    write_audio(tree / "b" / "x.wav", 0.5, seed=2)  # same name, other folder
    write_audio(tree / "b" / "x.flac", 0.5, seed=3)  # same stem, other extension
    write_audio(tree / "b" / "deep" / "y.wav", 0.5, seed=4)
    single = write_audio(tmp_path / "elsewhere" / "z.wav", 0.5, seed=5)
    out = tmp_path / "features"

    first = run(tree, single, "--out", out, "--kind", "fbank", *common_args(directory))
    assert first.exit_code == 0, first.output
    assert first.stderr.strip().splitlines()[-1].startswith(f"5 written, 0 skipped (already in {out}), 0 failed; ")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["a/x.wav.safetensors", "b/deep/y.wav.safetensors", "b/x.flac.safetensors",
                     "b/x.wav.safetensors", "z.wav.safetensors"]
    a, _ = read_safetensors(out / "a" / "x.wav.safetensors")
    b, meta = read_safetensors(out / "b" / "x.wav.safetensors")
    assert meta["source"] == str(tree / "b" / "x.wav")
    assert not np.allclose(a["fbank"], b["fbank"])  # different audio, no overwriting

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    second = run(tree, single, "--out", out, "--kind", "fbank", *common_args(directory))
    assert second.exit_code == 0, second.output
    assert second.stderr.strip().splitlines()[-1].startswith(f"0 written, 5 skipped (already in {out}), 0 failed; ")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_collision_is_an_error_before_any_work(tmp_path):
    first = write_audio(tmp_path / "a" / "x.wav", 0.5)
    second = write_audio(tmp_path / "b" / "x.wav", 0.5)
    out = tmp_path / "out"
    # No model exists at this path: the collision must be found before the model is looked for.
    result = run(first, second, "--out", out, "--model", tmp_path / "no-model", "--quiet")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == f"Error: {first} and {second} would both be written to {out}/x.wav.safetensors"
    assert not out.exists()
    # The same two folders given separately collide too; their parent does not.
    with pytest.raises(Exception, match="would both be written"):
        plan_outputs(expand_inputs([str(tmp_path / "a"), str(tmp_path / "b")]), str(out))
    jobs = plan_outputs(expand_inputs([str(tmp_path)]), str(out))
    assert [job.output for job in jobs] == [str(out / "a" / "x.wav.safetensors"), str(out / "b" / "x.wav.safetensors")]


def test_same_file_twice_is_one_job(tmp_path):
    audio = write_audio(tmp_path / "x.wav", 0.5)
    jobs = plan_outputs(expand_inputs([str(audio), str(tmp_path)]), str(tmp_path / "out"))
    assert len(jobs) == 1


def test_bad_files_fail_alone(tiny_checkpoint, tmp_path):
    directory, *_ = tiny_checkpoint
    write_audio(tmp_path / "in" / "good.wav", 0.5)
    (tmp_path / "in" / "bad.wav").write_bytes(b"not audio at all")
    out = tmp_path / "out"
    result = run(tmp_path / "in", tmp_path / "missing.wav", "--out", out, *common_args(directory))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {tmp_path / 'in' / 'bad.wav'}: ")
    assert lines[1] == f"error: {tmp_path / 'missing.wav'}: no such file"
    assert lines[-1].startswith(f"1 written, 0 skipped (already in {out}), 2 failed; ")
    assert sorted(p.name for p in out.rglob("*")) == ["good.wav.safetensors"]


# -- writing -------------------------------------------------------------------------------------------


def test_skip_and_overwrite(tiny_checkpoint, tmp_path):
    directory, *_ = tiny_checkpoint
    audio = write_audio(tmp_path / "x.wav", 0.5)
    target = tmp_path / "out" / "x.wav.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"left by an earlier run")
    result = run(audio, "--out", tmp_path / "out", *common_args(directory))
    assert result.exit_code == 2 and "not written by ast-cli" in result.stderr  # not ours: never skipped as done
    assert target.read_bytes() == b"left by an earlier run"
    result = run(audio, "--out", tmp_path / "out", "--overwrite", *common_args(directory))
    assert result.exit_code == 0 and "1 written, 0 skipped" in result.stderr
    tensors, _ = read_safetensors(target)
    assert tensors["embedding"].shape == (1, 32)
    result = run(audio, "--out", tmp_path / "out", *common_args(directory))
    assert result.exit_code == 0 and "0 written, 1 skipped" in result.stderr  # our own output, same settings


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_interrupted_write_leaves_previous_output_and_no_partial_file(tmp_path, monkeypatch, fmt):
    target = tmp_path / "out" / ("x.wav.safetensors" if fmt == "safetensors" else "x.wav.npy")
    array = np.ones((2, 4), np.float32)
    write_features(str(target), "embedding", array, {"source": "x.wav"}, fmt)
    before = {p.name: p.read_bytes() for p in target.parent.iterdir()}

    def torn(handle, *args):
        handle.write(b"\x00" * 10)  # half a file, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "_serialize", torn)
    with pytest.raises(KeyboardInterrupt):
        write_features(str(target), "embedding", array * 2, {"source": "x.wav"}, fmt)
    after = {p.name: p.read_bytes() for p in target.parent.iterdir()}
    assert sorted(after) == (["x.wav.json", "x.wav.npy"] if fmt == "npy" else ["x.wav.safetensors"])
    assert after == before  # no temporary file left, the previous output (and its sidecar) intact


def test_interrupted_run_exits_130_and_resumes(tiny_checkpoint, tmp_path, monkeypatch):
    directory, *_ = tiny_checkpoint
    for name in ("a", "b", "c"):
        write_audio(tmp_path / "in" / f"{name}.wav", 0.5)
    out = tmp_path / "out"
    real = extract._serialize
    calls = []

    def interrupt_second(handle, *args):
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"\x00" * 10)
            raise KeyboardInterrupt
        real(handle, *args)

    monkeypatch.setattr(extract, "_serialize", interrupt_second)
    result = run(tmp_path / "in", "--out", out, *common_args(directory))
    assert result.exit_code == 130
    assert sorted(p.name for p in out.iterdir()) == ["a.wav.safetensors"]
    monkeypatch.setattr(extract, "_serialize", real)
    result = run(tmp_path / "in", "--out", out, *common_args(directory))
    assert result.exit_code == 0 and "2 written, 1 skipped" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.wav.safetensors", "b.wav.safetensors", "c.wav.safetensors"]


def test_npy_format(tiny_checkpoint, tmp_path):
    directory, *_ = tiny_checkpoint
    audio = write_audio(tmp_path / "in" / "sub" / "x.wav", 1.0)
    for fmt in ("npy", "safetensors"):
        result = run(tmp_path / "in", "--out", tmp_path / fmt, "--format", fmt, *common_args(directory))
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "npy" / "sub").iterdir()) == ["x.wav.json", "x.wav.npy"]
    array = np.load(tmp_path / "npy" / "sub" / "x.wav.npy", allow_pickle=False)
    meta = json.loads((tmp_path / "npy" / "sub" / "x.wav.json").read_text())
    tensors, header = read_safetensors(tmp_path / "safetensors" / "sub" / "x.wav.safetensors")
    assert array.dtype == np.float32 and array.shape == (2, 32)
    np.testing.assert_array_equal(array, tensors["embedding"])
    assert meta["window_starts"] == [0.0, 0.64] and meta["sample_rate"] == 16000 and meta["source"] == str(audio)
    assert {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()} == header

    # A .npy without its sidecar (a run killed between the two) is not done: it is written again.
    (tmp_path / "npy" / "sub" / "x.wav.json").unlink()
    result = run(tmp_path / "in", "--out", tmp_path / "npy", "--format", "npy", *common_args(directory))
    assert "1 written, 0 skipped" in result.stderr
    assert (tmp_path / "npy" / "sub" / "x.wav.json").is_file()


def test_output_path_stays_under_out(tmp_path):
    item = InputFile(os.path.join("..", "x.wav"))  # named directly: basename
    assert plan_outputs([item], str(tmp_path))[0].output == str(tmp_path / "x.wav.safetensors")


def test_usage_errors(tmp_path):
    audio = write_audio(tmp_path / "x.wav", 0.5)
    for args, message in [
        (["--kind", "mfcc"], "Error: --kind: "),
        (["--format", "pt"], "Error: --format: "),
        (["--hop", "0.001"], "--hop: 0.001 s is shorter than one frame"),
    ]:
        result = run(audio, "--out", tmp_path / "out", *args)
        assert result.exit_code == 2 and message in result.stderr, result.output
    (tmp_path / "file").write_text("")
    result = run(audio, "--out", tmp_path / "file")
    assert result.exit_code == 2 and "--out: " in result.stderr and "is not a directory" in result.stderr


def test_s8_5_audio_piped_on_stdin_is_never_already_extracted(tiny_checkpoint, tmp_path):
    short, long = (write_audio(tmp_path / f"{n}.wav", seconds, seed=n) for n, seconds in ((1, 1.0), (2, 3.0)))
    out = tmp_path / "xfs"
    assert run("-", "--out", out, *common_args(tiny_checkpoint[0]), input=short.read_bytes()).exit_code == 0
    again = run("-", "--out", out, "--model", tiny_checkpoint[0], input=long.read_bytes())
    assert again.exit_code == 0 and "1 written, 0 skipped" in again.stderr, again.stderr
    assert json.loads(read_safetensors(out / "-.safetensors")[1]["duration"]) == pytest.approx(3.0)


@pytest.mark.parametrize("how", ["empty stdin", "empty shard"])
def test_s8_12_nothing_to_extract_exits_0_and_writes_nothing(tiny_checkpoint, tmp_path, how):
    out = tmp_path / "out"
    if how == "empty stdin":
        result = run("-", "--out", out, "--model", tiny_checkpoint[0], input="")
        said = "nothing to extract: standard input listed no files"
    else:
        from ast_cli.tasks.distributed import shard_of

        clip = write_audio(tmp_path / "in" / "a.wav", 1.0)
        other = 1 + shard_of(str(clip), 3) % 3  # a shard the one file is not in (a file's shard: its path's hash)
        result = run(clip.parent, "--out", out, "--model", tiny_checkpoint[0], "--shard", f"{other}/3")
        said = f"nothing to extract: shard {other}/3 holds none of the 1 input"
    assert result.exit_code == 0 and result.stderr.splitlines() == [said] and not out.exists()
    assert run("-", "--out", out, "--model", tiny_checkpoint[0], "-q", input="").stderr == ""


def test_s8_19_quiet_extract_features_prints_no_summary_as_classify(tiny_checkpoint, tmp_path):
    clip = write_audio(tmp_path / "a.wav", 1.0)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"junk" * 50)
    result = run(clip, bad, "--out", tmp_path / "out", "--model", tiny_checkpoint[0], "-q")
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), lines


def test_s8_review_a_folder_named_twice_or_inside_another_is_not_empty(tiny_checkpoint, tmp_path):
    """``extract-features ov ov/sub``: ov/sub's file is found under ov first, so ov/sub was called a folder with
    no audio (exit 1; found by a review). A folder holds audio when any input found lies below it."""
    write_audio(tmp_path / "ov" / "a.wav", 1.0)
    write_audio(tmp_path / "ov" / "sub" / "b.wav", 1.0)
    result = run(tmp_path / "ov", tmp_path / "ov" / "sub", "--out", tmp_path / "out", "--model", tiny_checkpoint[0],
                 "-q")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert (tmp_path / "out" / "sub" / "b.wav.safetensors").exists()


def test_s8_12_a_named_folder_without_audio_fails_as_in_classify(tiny_checkpoint, tmp_path):
    empty, clip = tmp_path / "empty", write_audio(tmp_path / "in" / "a.wav", 1.0)
    empty.mkdir()
    alone = run(empty, "--out", tmp_path / "out", "--model", tiny_checkpoint[0])
    assert alone.exit_code == 1 and alone.stderr.splitlines()[0] == f"Error: no audio or video files in {empty}"
    beside = run(clip, empty, "--out", tmp_path / "out", "--model", tiny_checkpoint[0], "-q")
    assert beside.exit_code == 1 and beside.stderr.splitlines() == [f"error: {empty}: no audio or video files in "
                                                                    "this folder"]
    assert (tmp_path / "out" / "a.wav.safetensors").exists()


# -- s9: outputs are known by the model they were made with, not by its name as typed --------------------------


def test_s9_extract_refuses_outputs_of_a_model_replaced_in_place(tiny_checkpoint, tmp_path, monkeypatch):
    """Outputs named the model ``--model`` as typed: a model replaced in place (same path, other weights) had its
    files mixed with the old one's ("1 written, 1 skipped", exit 0), and ``./m`` for ``m/`` was refused. They now
    record the resolved model and its weights' size:mtime, as ``classify --resume`` does."""
    import shutil

    from conftest import make_reference

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_checkpoint[0], "m")
    a, b = write_audio(tmp_path / "in" / "a.wav", 0.5, seed=1), write_audio(tmp_path / "in" / "b.wav", 0.5, seed=2)
    assert run(a, "--out", "emb", *common_args("m/"), "-q").exit_code == 0
    again = run(a, b, "--out", "emb", *common_args("./m"))  # the same model, spelt otherwise: its output is done
    assert again.exit_code == 0 and "1 written, 1 skipped" in again.stderr, again.stderr
    before = {p: p.read_bytes() for p in (tmp_path / "emb").iterdir()}
    shutil.rmtree("m")
    shutil.copytree(make_reference(tmp_path / "other", "tiny", seed=5)[0], "m")  # other weights, same path
    replaced = run(a, b, write_audio(tmp_path / "in" / "c.wav", 0.5, seed=3), "--out", "emb", *common_args("m/"))
    assert replaced.exit_code == 2 and "weights changed" in replaced.stderr, replaced.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "emb").iterdir()} == before


def test_s9_extract_still_skips_an_earlier_versions_outputs_of_the_name_typed(tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    """Outputs of the previous version name the model as typed and carry no weights: the same name finds them
    done (an upgrade must not refuse every earlier output); another spelling cannot tell them apart, so refuses."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_checkpoint[0], "m")
    clip = write_audio(tmp_path / "a.wav", 0.5)
    assert run(clip, "--out", "emb", "-f", "npy", *common_args("m/"), "-q").exit_code == 0
    sidecar = tmp_path / "emb" / "a.wav.json"
    metadata = json.loads(sidecar.read_text())
    metadata.pop("weights", None)
    sidecar.write_text(json.dumps({**metadata, "model": "m/"}))  # as the previous version wrote it
    same = run(clip, "--out", "emb", "-f", "npy", *common_args("m/"))
    assert same.exit_code == 0 and "0 written, 1 skipped" in same.stderr, same.stderr
    other = run(clip, "--out", "emb", "-f", "npy", *common_args("./m"))
    assert other.exit_code == 2 and "model 'm/', not " in other.stderr, other.stderr
