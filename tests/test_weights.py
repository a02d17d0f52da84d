"""Checkpoint reading: configs (legacy names, unknown keys), strict key checks, pickle safety, corrupt files."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ast_cli.errors import CheckpointError
from ast_cli.checkpoint.model import AST, ASTConfig  # AST bound here: no_model_built replaces the module's
from ast_cli.checkpoint.weights import build_model, load_checkpoint, read_configs


def test_config_accepts_legacy_names_and_ignores_unknown_keys():
    cfg = ASTConfig.from_dict({"time_dimension": 128, "frequency_dimension": 64, "something_new": 1,
                               "id2label": {"0": "a", "1": "b"}})
    assert (cfg.max_length, cfg.num_mel_bins, cfg.id2label) == (128, 64, ("a", "b"))


def test_preprocessor_config_is_read(tiny_checkpoint, tmp_path):
    directory = tmp_path / "c"
    shutil.copytree(tiny_checkpoint[0], directory)
    pre = json.loads((directory / "preprocessor_config.json").read_text())
    pre.update(mean=-6.845978, std=5.5654526)
    (directory / "preprocessor_config.json").write_text(json.dumps(pre))
    _, features = read_configs(directory)
    assert (features.mean, features.std, features.max_length) == (-6.845978, 5.5654526, 64)
    (directory / "preprocessor_config.json").unlink()  # defaults: AudioSet normalization, model's shape
    _, features = read_configs(directory)
    assert (features.mean, features.max_length) == (-4.2677393, 64)


def test_pytorch_model_bin_is_loaded_with_weights_only(tiny_checkpoint, tmp_path):
    directory = tmp_path / "bin"
    shutil.copytree(tiny_checkpoint[0], directory)
    state = load_checkpoint(directory).state_dict
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    model = build_model(load_checkpoint(directory))
    assert torch.equal(model.classifier.dense.weight, state["classifier.dense.weight"])


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickles_with_code_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.bin"
    with open(path, "wb") as handle:
        pickle.dump({"x": _Evil()}, handle)
    with pytest.raises(CheckpointError, match="not a safe weights file") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) + (info.value.hint or "")  # never advice to run the code
    assert not (tmp_path / "PWNED").exists()


def test_a_json_file_is_not_a_weights_file(tmp_path):
    path = tmp_path / "junk.json"
    path.write_text("{}")
    with pytest.raises(CheckpointError, match="is not a weights file"):
        load_checkpoint(path)


def test_missing_and_unexpected_keys_are_named(tiny_checkpoint, tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint[0], directory)
    state = load_checkpoint(directory).state_dict
    del state["classifier.dense.bias"]
    state["audio_spectrogram_transformer.pooler.weight"] = torch.zeros(3)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        build_model(load_checkpoint(directory))
    message = str(info.value)
    assert "1 missing (e.g. classifier.dense.bias)" in message
    assert "1 unexpected (e.g. audio_spectrogram_transformer.pooler.weight)" in message


def test_wrong_shapes_are_named(tiny_checkpoint, tmp_path):
    directory = tmp_path / "shape"
    shutil.copytree(tiny_checkpoint[0], directory)
    config = json.loads((directory / "config.json").read_text())
    config["max_length"] = 128  # the weights were made for 64 frames
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="position_embeddings"):
        build_model(load_checkpoint(directory))


def test_truncated_safetensors_names_the_file(tiny_checkpoint, tmp_path):
    directory = tmp_path / "trunc"
    shutil.copytree(tiny_checkpoint[0], directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    assert str(weights) in str(info.value) and info.value.corrupt and info.value.path == str(weights)


def test_directory_without_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "audio-spectrogram-transformer"}))
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(CheckpointError, match="not an Audio Spectrogram Transformer"):
        load_checkpoint(tmp_path)


def _edited(tiny_checkpoint, tmp_path, name: str, **changes):
    """A copy of the tiny checkpoint with ``changes`` merged into its config file ``name``."""
    directory = tmp_path / "edited"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(tiny_checkpoint[0], directory)
    path = directory / name
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))
    return directory


@pytest.mark.parametrize("name,changes,field", [
    ("config.json", {"num_labels": 10**10, "id2label": None}, "num_labels"),
    ("config.json", {"num_labels": "527", "id2label": None}, "num_labels"),
    ("config.json", {"id2label": ["a", "b"]}, "id2label"),
    ("config.json", {"num_hidden_layers": 100000}, "num_hidden_layers 100000"),
    ("config.json", {"hidden_size": 1 << 20, "num_attention_heads": 1}, "hidden_size 1048576"),
    ("config.json", {"max_length": 1 << 20}, "max_length x num_mel_bins"),
    ("config.json", {"time_stride": 1000}, "time_stride"),
    ("preprocessor_config.json", {"mean": "abc"}, "mean must be a finite number, not 'abc'"),
    ("preprocessor_config.json", {"std": 0}, "std must be positive"),
    ("preprocessor_config.json", {"std": float("nan")}, "std must be a finite number, not nan"),
    ("preprocessor_config.json", {"do_normalize": "yes"}, "do_normalize"),
])
def test_22_14_config_sizes_are_bounded_and_fields_named(tiny_checkpoint, tmp_path, name, changes, field):
    """Every size in a config is checked before anything is allocated from it (10^10 labels took 11 GB), and
    against the weights file's real size; a bad field is one error naming the file and the field."""
    import time

    directory = _edited(tiny_checkpoint, tmp_path, name, **changes)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=re.escape(field)) as info:
        load_checkpoint(directory)
    assert time.monotonic() - started < 5
    assert str(directory / name) in str(info.value)


def test_22_14_deep_or_huge_json_is_one_error(tiny_checkpoint, tmp_path):
    directory = _edited(tiny_checkpoint, tmp_path, "config.json")
    (directory / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deep"):
        load_checkpoint(directory)
    (directory / "config.json").write_text('{"a": "' + "x" * (9 << 20) + '"}')
    with pytest.raises(CheckpointError, match="larger than a config file can be"):
        load_checkpoint(directory)


def test_22_14_a_bad_config_is_one_line_for_the_whole_batch(tiny_checkpoint, tmp_path):  # CLI
    from typer.testing import CliRunner

    from ast_cli.cli import app
    from conftest import write_audio

    directory = _edited(tiny_checkpoint, tmp_path, "preprocessor_config.json", mean="abc")
    clips = [str(write_audio(tmp_path / f"{i}.wav", 1.0, seed=i)) for i in range(3)]
    result = CliRunner().invoke(app, ["classify", *clips, "--model", str(directory), "-f", "jsonl"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[0] == (f"Error: {directory / 'preprocessor_config.json'}: mean must be a "
                                             "finite number, not 'abc'")
    assert len(result.stderr.splitlines()) <= 2 and "Traceback" not in result.stderr


def test_s8_19_an_oversized_config_value_is_called_too_large(tiny_checkpoint, tmp_path):
    """intermediate_size 2**30 was "must be a positive whole number", which it is."""
    directory = _edited(tiny_checkpoint, tmp_path, "config.json", intermediate_size=1 << 30)
    too_large = "intermediate_size is 1073741824: too large (at most 1048576)"
    with pytest.raises(CheckpointError, match=re.escape(too_large)):
        load_checkpoint(directory)
    directory = _edited(tiny_checkpoint, tmp_path, "config.json", intermediate_size=0)
    with pytest.raises(CheckpointError, match="intermediate_size must be a positive whole number, not 0"):
        load_checkpoint(directory)


# -- s9: what a checkpoint can ask for is checked before a model is built ----------------------------------------


@pytest.fixture
def no_model_built(monkeypatch):
    """Building a model fails the test (but for the one-layer template of ``expected_shapes``): every check here
    must come first."""
    from ast_cli.checkpoint import model

    def guarded(config, *args, **kwargs):
        if config.num_hidden_layers > 1:
            pytest.fail(f"a model of {config.num_hidden_layers} layers was built")
        return AST(config, *args, **kwargs)

    monkeypatch.setattr(model, "AST", guarded)


def test_s9_a_config_with_more_layers_than_its_weights_is_refused_before_a_model_is_built(
        tiny_checkpoint, tmp_path, no_model_built):
    """30000 layers of width 1 fit the size check of a 1.2 MB file: 2.1 GB and 51 s of modules were built first."""
    directory = tmp_path / "layers"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "audio-spectrogram-transformer", "hidden_size": 1, "num_hidden_layers": 30000,
        "num_attention_heads": 1, "intermediate_size": 1, "max_length": 16, "num_mel_bins": 16,
        "frequency_stride": 16, "time_stride": 16, "id2label": {"0": "a"}}))
    save_file({"pad": torch.zeros(300000)}, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        build_model(load_checkpoint(directory))
    assert str(info.value) == (f"{directory / 'model.safetensors'} does not fit the AST architecture: its config "
                               "asks for 30000 encoder layers (numbered 0 to 29999), the file holds no encoder layers")
    directory = _edited(tiny_checkpoint, tmp_path, "config.json", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=re.escape("asks for 3 encoder layers (numbered 0 to 2), the file "
                                                        "holds 2 encoder layers numbered 0 to 1")):
        build_model(load_checkpoint(directory))


def test_s9_a_layer_with_keys_missing_is_refused_before_a_model_is_built(tiny_checkpoint, tmp_path, no_model_built):
    """Layers numbered 0 to n - 1 with one small key each passed the layer check, and n layers were built before
    the key check: names and shapes are now checked against the config first."""
    from safetensors.torch import load_file

    directory = _edited(tiny_checkpoint, tmp_path, "config.json", num_hidden_layers=3)
    state = load_file(directory / "model.safetensors")
    state["audio_spectrogram_transformer.encoder.layer.2.attention.attention.query.bias"] = torch.zeros(32)
    save_file(state, str(directory / "model.safetensors"))
    missing = "15 missing (e.g. audio_spectrogram_transformer.encoder.layer.2.attention.attention.query.weight, "
    with pytest.raises(CheckpointError, match=re.escape(missing)):
        build_model(load_checkpoint(directory))


def _bare_weights(tmp_path, name: str = "bare.safetensors", hidden_size: int = 64, num_attention_heads: int = 1,
                  **changes) -> dict:
    """A bare weights file (no config.json beside) of a tiny model in a published input shape (128 x 128,
    strides 10), ``changes`` merged into its tensors; returns them."""
    config = ASTConfig(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=num_attention_heads,
                       intermediate_size=64, max_length=128, id2label=("a", "b"))
    tensors = dict(AST(config).state_dict(), **changes)
    save_file(tensors, str(tmp_path / name))
    return tensors


def test_s9_a_bare_weights_file_needs_layers_numbered_from_0_and_a_sane_config(tmp_path, no_model_built):
    """One stray ``encoder.layer.1000000.*`` key made the loader build a million layers (~70 GB) before the key
    check; the config inferred from the shapes is checked as a config.json's is."""
    _bare_weights(tmp_path)
    assert load_checkpoint(tmp_path / "bare.safetensors").config.num_hidden_layers == 2
    stray = "audio_spectrogram_transformer.encoder.layer.1000000.attention.attention.query.bias"
    _bare_weights(tmp_path, "stray.safetensors", **{stray: torch.zeros(1)})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "stray.safetensors")
    assert str(info.value) == (f"{tmp_path / 'stray.safetensors'} does not fit the AST architecture: the file "
                               "holds 3 encoder layers numbered 0 to 1000000, not 0 to 2")
    wide = "audio_spectrogram_transformer.encoder.layer.0.intermediate.dense.weight"
    _bare_weights(tmp_path, "wide.safetensors", **{wide: torch.zeros(1 << 21, 0)})
    with pytest.raises(CheckpointError, match=re.escape("intermediate_size is 2097152: too large")):
        load_checkpoint(tmp_path / "wide.safetensors")


def test_s9_a_bare_weights_file_with_a_0_d_classifier_is_refused(tmp_path):
    """A 0-d ``classifier.dense.weight`` made the shape inference fail with an IndexError (a traceback)."""
    _bare_weights(tmp_path, **{"classifier.dense.weight": torch.zeros(())})
    with pytest.raises(CheckpointError, match="not an AST state dict .a tensor with too few dimensions."):
        load_checkpoint(tmp_path / "bare.safetensors")


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_s9_an_integer_bool_or_complex_tensor_is_named(tiny_checkpoint, tmp_path, dtype):
    """An int or bool tensor was "unexpected error: RuntimeError" from torch mid-load; a complex one lost its
    imaginary part silently."""
    directory = tmp_path / "dtype"
    shutil.copytree(tiny_checkpoint[0], directory)
    state = load_checkpoint(directory).state_dict
    name = "audio_spectrogram_transformer.encoder.layer.0.attention.attention.query.bias"
    state[name] = state[name].to(dtype)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    dtype_name = str(dtype).removeprefix("torch.")
    assert str(info.value) == (f"{directory / 'model.safetensors'}: tensor {name} is {dtype_name}, expected a "
                               "floating-point tensor")


def test_s9_a_bare_weights_file_whose_head_count_is_not_certain_asks_for_its_config(tiny_checkpoint, tmp_path):
    """A 4-head 32-wide model's bare weights file loaded with 32 // 64 -> 1 head: other scores, silently."""
    _bare_weights(tmp_path, hidden_size=32, num_attention_heads=4)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bare.safetensors")
    assert str(info.value) == (f"{tmp_path / 'bare.safetensors'}: the number of attention heads of a 32-wide model "
                               "is not stored in its weights")
    assert info.value.hint == "keep the weights file in a folder with its config.json"
    _bare_weights(tmp_path, hidden_size=128, num_attention_heads=4)  # a multiple of 64: 2 heads, as published
    assert load_checkpoint(tmp_path / "bare.safetensors").config.num_attention_heads == 2
