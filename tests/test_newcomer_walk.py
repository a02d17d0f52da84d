"""A newcomer's second walk through the README (#24): what surprised a user of whisper, the hf CLI and
BirdNET-Analyzer. Each test names the item of issue #24 it covers (items 1, 2, 3, 7, 10, 11 and 12 here)."""

from __future__ import annotations

import json

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


# -- 11. messages and help -----------------------------------------------------------------------------------

def test_24_11_a_missing_dot_slash_model_is_named_once(clip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ast("classify", clip, "--model", "./nodir")
    assert result.exit_code == 1 and "././" not in result.stderr and "./nodir" in result.stderr, result.stderr


def test_24_11_rays_own_flag_advice_never_reaches_users(monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[test]')")
    from ast_cli.cli import describe_error
    from ast_cli.distributed import RaySettings, connect
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
