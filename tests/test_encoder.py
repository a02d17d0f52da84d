"""A review of issue 26's bare encoders (a checkpoint without classifier or labels) and of the precisions a model
runs in, command by command: a bare encoder where it cannot be used alone is one clear usage error before the model
loads, never a traceback, a misleading message or an empty answer; every command works in every precision."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import write_audio

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Labelled data: a folder per label, two clips each."""
    root = tmp_path_factory.mktemp("encoder_data")
    for label, seed in (("cat", 1), ("dog", 2)):
        for i in range(2):
            write_audio(root / label / f"{label}{i}.wav", 0.8, seed=seed * 10 + i)
    return root


@pytest.fixture
def never_loaded(monkeypatch):
    from ast_cli.checkpoint import weights

    monkeypatch.setattr(weights, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("fast", [False, True])
def test_26_4_evaluate_refuses_a_bare_encoder_before_it_loads(encoder, data, never_loaded, fast, tmp_path,
                                                             monkeypatch):
    """Before, evaluate loaded the encoder (with --fast: calibrated it and wrote the cache) and then said 'the model
    has no label 'cat' (and 1 more)', as if the data were wrong."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    result = runner.invoke(app, ["evaluate", str(encoder), str(data)] + (["--fast"] if fast else []))
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"Error: {encoder} has no labels of its own (a bare encoder): nothing to measure",
        "Hint: evaluate a head trained on it: head-mode training writes a folder with the labels"]
    assert "Traceback" not in result.stderr and not (tmp_path / "xdg").exists()


def test_26_4_evaluate_refuses_labels_the_model_lacks_before_it_loads(tiny_checkpoint, data, never_loaded):
    result = runner.invoke(app, ["evaluate", str(tiny_checkpoint[0]), str(data)])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines()[0] == "Error: DATA: the model has no label 'cat' (and 1 more)"


def test_26_4_labels_of_a_bare_encoder_is_an_error_not_an_empty_list(encoder):
    """Before: no output and exit 0, which reads as a model that recognises nothing."""
    result = runner.invoke(app, ["labels", "--model", str(encoder)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"Error: --model: {encoder} has no labels of its own (a bare encoder)",
                                          "Hint: a head trained on it has labels: ast labels --model HEAD_DIR"]


def test_26_4_the_library_refuses_to_classify_with_a_bare_encoder_in_its_own_words(encoder, tmp_path):
    """Tagger.load(encoder).classify: a UsageError with fields, not command-line flags (before, its message said
    'give --head ... or embed with ast extract-features', which means nothing to a Python caller)."""
    from ast_cli import Tagger
    from ast_cli.errors import UsageError

    clip = write_audio(tmp_path / "a.wav", 0.8)
    tagger = Tagger.load(str(encoder))
    assert tagger.embed(tagger_inputs(tagger)).shape == (1, tagger.model.config.hidden_size)  # embeddings work
    with pytest.raises(UsageError) as refused:
        list(tagger.classify([str(clip)]))
    assert refused.value.option == "model" and refused.value.suggest == {"heads": "HEAD_DIR"}
    assert "--" not in str(refused.value) and "ast " not in str(refused.value)
    assert "has no labels of its own (a bare encoder)" in str(refused.value)


def tagger_inputs(tagger):
    import torch

    return torch.zeros(1, tagger.features.max_length, tagger.features.num_mel_bins)


@pytest.mark.parametrize("precision", [["--quantize", "int8"], ["--dtype", "bf16"]])
def test_26_4_label_search_of_an_index_made_in_int8_or_bf16(tiny_checkpoint, data, precision, tmp_path):
    """Before: 'unexpected error: AttributeError: 'Int8LinearFbgemm' object has no attribute 'weight'' (and
    PackedLinearBF16's): the classifier direction was read from the model as placed, which has no plain weights."""
    from ast_cli.tasks.index import Index

    model, db, exact = str(tiny_checkpoint[0]), tmp_path / "db", tmp_path / "exact"
    for where, how in ((db, precision), (exact, [])):
        made = runner.invoke(app, ["index", str(data), "--db", str(where), "--model", model, "--device", "cpu", "-q",
                                   *how])
        assert made.exit_code == 0, made.stderr
    result = runner.invoke(app, ["search", str(db), "--label", "Speech", "-f", "jsonl", "--top", "3"])
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    with Index.open(str(db)) as placed, Index.open(str(exact)) as fp32:
        assert (placed.label_vector("speech") == fp32.label_vector("speech")).all()  # the checkpoint's float32


def test_26_4_label_search_of_a_bare_encoders_index_without_heads(encoder, data, tmp_path):
    db = tmp_path / "db"
    assert runner.invoke(app, ["index", str(data), "--db", str(db), "--model", str(encoder), "-q"]).exit_code == 0
    result = runner.invoke(app, ["search", str(db), "--label", "cat"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "Error: --label: 'cat' is not a label of any head the index holds scores of, and its model has no labels of "
        "its own (a bare encoder)", "Hint: index it again with a head trained on this model"]
