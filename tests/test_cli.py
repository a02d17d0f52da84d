"""`ast classify` through the CLI: JSON shape, scores, options, exit codes, and end-to-end parity with the
transformers path (soundfile -> mean downmix -> resample -> kaldi features -> ASTForAudioClassification ->
sigmoid; see conftest.reference_features for where the features come from)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import make_reference, reference_features, reference_waveform, write_audio
from tolerances import END_TO_END

runner = CliRunner()


def classify(*args: str):
    return runner.invoke(app, ["classify", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return [
        write_audio(root / "a.wav", 2.0, 16000, 1, seed=1),
        write_audio(root / "b.flac", 3.5, 44100, 2, seed=2),
        write_audio(root / "c.ogg", 1.2, 22050, 1, seed=3, subtype="VORBIS"),
    ]


def test_json_output_shape_and_scores(tiny_checkpoint, clips):
    result = classify(*clips, "--model", tiny_checkpoint[0], "--format", "json", "--top", "7")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["path"] for r in records] == [str(c) for c in clips]
    for record, seconds in zip(records, (2.0, 3.5, 1.2)):
        assert record["error"] is None
        assert record["duration"] == pytest.approx(seconds, abs=1e-4)
        assert len(record["labels"]) == 7
        scores = [x["score"] for x in record["labels"]]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert scores == sorted(scores, reverse=True)
        assert set(record["labels"][0]) == {"label", "index", "score"}
        assert {"path", "duration", "labels", "error"} <= set(record)


def test_top_larger_than_label_count_means_all(tiny_checkpoint, clips):
    result = classify(clips[0], "--model", tiny_checkpoint[0], "--format", "json", "--top", "100000")
    labels = json.loads(result.stdout)[0]["labels"]
    assert len(labels) == 527 and sorted(x["index"] for x in labels) == list(range(527))


def test_activation_none_gives_raw_logits(tiny_checkpoint, tmp_path):
    directory, hf_model, extractor = tiny_checkpoint
    clip = write_audio(tmp_path / "short.wav", 0.6, 32000, 2)  # within the tiny model's 0.64 s window
    result = classify(clip, "--model", directory, "--format", "json", "--top", "0", "--activation", "none")
    labels = json.loads(result.stdout)[0]["labels"]
    inputs = reference_features(extractor, reference_waveform(clip))
    with torch.inference_mode():
        logits = hf_model(inputs).logits[0].numpy()
    got = np.zeros(527)
    got[[x["index"] for x in labels]] = [x["score"] for x in labels]
    np.testing.assert_allclose(got, logits, atol=END_TO_END, rtol=0)


def test_softmax_scores_sum_to_one(tiny_checkpoint, clips):
    result = classify(clips[0], "--model", tiny_checkpoint[0], "-f", "json", "--top", "0", "--activation", "softmax",
                      "--aggregate", "mean")  # the mean of per-window distributions is one
    assert sum(x["score"] for x in json.loads(result.stdout)[0]["labels"]) == pytest.approx(1.0)


def test_table_output(tiny_checkpoint, clips):
    result = classify(clips[0], "--model", tiny_checkpoint[0], "--format", "table", "--top", "3")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(clips[0])) and "(2.00 s)" in lines[0]
    assert sum(1 for line in lines if line.strip()[:1] in "123" and line.strip()[1:2] == " ") == 3


def test_missing_file_is_one_line_and_exit_1(tiny_checkpoint, clips, tmp_path):
    result = classify(clips[0], tmp_path / "nope.wav", "--model", tiny_checkpoint[0], "-f", "json", "--quiet")
    assert result.exit_code == 1
    records = json.loads(result.stdout)
    assert records[0]["error"] is None and records[1]["error"] == "no such file"
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.wav'}: no such file"


def test_unreadable_file_does_not_stop_the_batch(tiny_checkpoint, clips, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    result = classify(junk, clips[0], "--model", tiny_checkpoint[0], "-f", "json", "--quiet")
    assert result.exit_code == 1
    records = json.loads(result.stdout)
    assert records[0]["error"] and records[0]["labels"] == [] and records[1]["labels"]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--format", "yaml"], "Error: --format: "),
    (["--attn", "flash"], "Error: --attn: "),
    (["--activation", "relu"], "Error: --activation: "),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--include", "Dgo"], "unknown label 'Dgo' (did you mean 'Dog'?)"),
    (["--resume"], "--resume: needs an output file"),
    (["--hop", "nan"], "--hop: must be a finite number"),
    (["--threshold", "1.5"], "--threshold: must be a score from 0 to 1"),
])
def test_usage_errors_exit_2(tiny_checkpoint, clips, args, needle):
    result = classify(clips[0], "--model", tiny_checkpoint[0], *args)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 4


def test_missing_model_is_a_clean_error(clips, tmp_path):
    result = classify(clips[0], "--model", tmp_path / "no-model")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: no such model file or directory")
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # a whole process (or several): seconds each
def test_python_dash_m_works(tiny_checkpoint, clips):
    proc = subprocess.run([sys.executable, "-m", "ast_cli", "classify", str(clips[0]), "--model",
                           str(tiny_checkpoint[0]), "--top", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)  # stdout is not a terminal: jsonl by default
    assert record["path"] == str(clips[0]) and len(record["labels"]) == 2


# -- end-to-end parity on full-size checkpoints -------------------------------------------------------

FULL = {
    "audioset-10-10": {},
    "audioset-16-16": dict(frequency_stride=16, time_stride=16),
    "speech-commands-shape": dict(max_length=128),
}


def mixed_files(root, seconds: float):
    """Files as users have them: several rates, channel counts and containers, each at most ``seconds``
    long (the reference truncates longer input, so parity is checked within one window)."""
    return [
        write_audio(root / "8k-mono.wav", seconds * 0.6, 8000, 1, seed=11),
        write_audio(root / "22k-stereo.flac", seconds * 0.8, 22050, 2, seed=12),
        write_audio(root / "44k-6ch.ogg", seconds * 0.5, 44100, 6, seed=13, subtype="VORBIS"),
        write_audio(root / "48k-stereo.mp3", seconds, 48000, 2, seed=14),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL))
def test_classify_matches_transformers_end_to_end(name, tmp_path):
    kwargs = dict(FULL[name])
    files = mixed_files(tmp_path / "audio", 10.0 if kwargs.get("max_length", 1024) == 1024 else 1.25)
    if name.startswith("speech"):
        kwargs.update(mean=-6.845978, std=5.5654526)
    directory, hf_model, extractor = make_reference(tmp_path, "full-" + name, seed=5, **kwargs)
    result = classify(*files, "--model", directory, "--format", "json", "--top", "0", "--batch-size", "2")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert len(records) == len(files)
    for path, record in zip(files, records):
        inputs = reference_features(extractor, reference_waveform(path))
        with torch.inference_mode():
            expected = torch.sigmoid(hf_model(inputs).logits)[0].numpy()
        got = np.zeros(527)
        got[[x["index"] for x in record["labels"]]] = [x["score"] for x in record["labels"]]
        np.testing.assert_allclose(got, expected, atol=END_TO_END, rtol=0, err_msg=str(path))
