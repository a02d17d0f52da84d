"""Session 9's newcomer walk: what a new user met following the README (each test fails without its fix)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import write_audio

runner = CliRunner()


def ast(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.mark.parametrize("paths", [["recordngs"], ["recordings/*.flca"], ["nosuch.wav", "recordings/*.flca"]])
def test_a_misspelt_path_is_refused_before_the_model_and_the_output(tiny_checkpoint, tmp_path, paths, monkeypatch):
    """``ast classify recordngs -o tags.json --overwrite`` replaced a good output with one error record, after
    loading the model (a newcomer's default model is a 346 MB download). Every input missing is a typo: exit 1,
    one line, before either; a missing file next to real ones stays an error record of its own."""
    monkeypatch.chdir(tmp_path)
    write_audio(tmp_path / "recordings" / "a.wav", 1.0)
    model = ["--model", tiny_checkpoint[0]]
    assert ast("classify", "recordings", *model, "-o", "tags.json", "-q").exit_code == 0
    before = (tmp_path / "tags.json").read_bytes()
    refused = ast("classify", *paths, "--model", "/no/such/model", "-o", "tags.json", "--overwrite")
    assert refused.exit_code == 1 and refused.stderr.startswith(f"Error: nothing to tag: {paths[0]}: "), refused.stderr
    assert (tmp_path / "tags.json").read_bytes() == before
    for command, extra, verb in (("extract-features", ["--out", "feat"], "extract"), ("index", ["--db", "db"], "index")):
        result = ast(command, *paths, "--model", "/no/such/model", *extra)
        assert result.exit_code == 1 and result.stderr.startswith(f"Error: nothing to {verb}: {paths[0]}: ")
        assert not (tmp_path / extra[1]).exists()
    mixed = ast("classify", "recordings", "nosuch.wav", *model, "-f", "jsonl")
    assert mixed.exit_code == 1 and "error: nosuch.wav: no such file" in mixed.stderr
    assert len(mixed.stdout.splitlines()) == 2


def test_a_broken_link_alone_is_a_path_that_is_not_there(tiny_checkpoint, tmp_path, monkeypatch):
    """A dangling symlink got past the check above: ``--overwrite`` replaced a good output with its error record."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.wav").symlink_to(tmp_path / "nowhere.wav")
    write_audio(tmp_path / "a.wav", 1.0)
    assert ast("classify", "a.wav", "--model", tiny_checkpoint[0], "-o", "tags.json", "-q").exit_code == 0
    before = (tmp_path / "tags.json").read_bytes()
    refused = ast("classify", "broken.wav", "--model", tiny_checkpoint[0], "-o", "tags.json", "--overwrite")
    assert refused.exit_code == 1 and refused.stderr.startswith("Error: nothing to tag: broken.wav: no such file")
    assert (tmp_path / "tags.json").read_bytes() == before
    listen = ast("listen", "broken.wav", "--model", "/no/such/model")
    assert listen.exit_code == 1 and listen.stderr.startswith("Error: broken.wav: no such file")


def test_listen_names_a_missing_file_before_the_model(tmp_path):
    result = ast("listen", tmp_path / "nosuch.wav", "--model", "/no/such/model")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"Error: {tmp_path / 'nosuch.wav'}: no such file"


def test_benchmark_random_weights_takes_no_model_from_the_command_line_only(tiny_checkpoint, monkeypatch):
    """AST_MODEL, which the README recommends, made ``--random-weights`` fail with "drop --model"."""
    from ast_cli.tasks import benchmark as task

    def reached(*args, **kwargs):
        raise SystemExit(7)

    monkeypatch.setattr(task, "run_benchmark", reached)
    monkeypatch.setenv("AST_MODEL", str(tiny_checkpoint[0]))
    args = ["benchmark", "--random-weights", "--batch-sizes", "1", "--iters", "1", "--warmup", "0"]
    assert ast(*args).exit_code == 7
    refused = ast(*args, "--model", tiny_checkpoint[0])
    assert refused.exit_code == 2 and refused.stderr.startswith("Error: --random-weights builds its own model")


def test_an_allocation_failure_of_the_cpu_is_not_called_the_devices():
    """``ast benchmark --batch-sizes 65536`` under a memory limit said "out of memory on the device", with a hint
    naming --batch-size (benchmark's is --batch-sizes) and --device cpu (the run was on the CPU)."""
    from ast_cli.cli._errors import describe_error

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 123 bytes")
    message, hint, code = describe_error(cpu)
    assert (message, code) == ("out of memory", 1) and "--batch-sizes in ast benchmark" in hint
    assert "--device cpu" not in hint
    message, hint, _ = describe_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert message == "out of memory on the device" and hint.endswith("or --device cpu")


def test_download_with_no_name_takes_ast_model_and_a_local_path_names_the_argument(monkeypatch, tmp_path):
    """``ast download`` ignored AST_MODEL (classify's default, which --help and the README promise), and a local
    path was refused as "--name: ...", an option download does not have."""
    monkeypatch.setenv("AST_MODEL", "speech-commands-v2")
    result = ast("download")  # offline in the tests: the name shows which model it wanted
    assert result.exit_code == 1 and "'MIT/ast-finetuned-speech-commands-v2' is not in" in result.stderr
    local = ast("download", tmp_path)
    assert local.exit_code == 2 and local.stderr.startswith(f"Error: MODEL: {tmp_path} is a local path: nothing ")
    monkeypatch.setenv("AST_MODEL", str(tmp_path))  # a local default: nothing to do, said once
    default = ast("download")
    assert default.exit_code == 0 and default.stderr == f"nothing to download: AST_MODEL names a local model ({tmp_path})\n"


def test_the_resume_refusal_says_to_replace_resume_with_overwrite(tiny_checkpoint, tmp_path):
    """"drop --resume, or add --overwrite": dropping --resume alone is refused too (the output exists)."""
    clip = write_audio(tmp_path / "a.wav", 1.0)
    tags = tmp_path / "t.jsonl"
    assert ast("classify", clip, "--model", tiny_checkpoint[0], "-o", tags, "-q").exit_code == 0
    refused = ast("classify", clip, "--model", tiny_checkpoint[0], "--hop", "0.32", "-o", tags, "--resume")
    assert refused.exit_code == 2 and refused.stderr.splitlines()[-1] == "Hint: drop --resume and add --overwrite"


def test_a_missing_dot_slash_model_path_is_one_line_not_a_hint_that_repeats_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nosuchdir").mkdir()  # a folder of that name one level down: the error is still about ./x/y
    clip = write_audio(tmp_path / "a.wav", 1.0)
    result = ast("classify", clip, "-m", "./nosuchdir/model")
    assert result.exit_code == 1 and "does not exist either" not in result.stderr, result.stderr


def test_a_damaged_cached_model_is_called_damaged_not_missing(tiny_checkpoint, tmp_path, monkeypatch):
    """A cached snapshot whose weights blob was deleted was "not in the Hugging Face cache ... (it is not in the
    cache yet)", while ``ast models --cached`` called it damaged. Offline, it is named damaged, with the repair."""
    from test_newcomer import fake_cache

    cache = tmp_path / "cache"
    snapshot = fake_cache(cache, "acme/tiny-ast", tiny_checkpoint[0])
    (snapshot / "model.safetensors").resolve().unlink()  # the blob goes; the link stays, broken
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = write_audio(tmp_path / "a.wav", 1.0)
    result = ast("classify", clip, "--model", "acme/tiny-ast", "--cache-dir", cache)
    assert result.exit_code == 1 and "not in the cache yet" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        f"Error: the cached snapshot of acme/tiny-ast is damaged: {snapshot} is gone or lacks its config.json or "
        "weights file", "Hint: download it again: `ast download acme/tiny-ast --force`"]
    ref = cache / "models--acme--tiny-ast" / "refs" / "main"
    ref.write_text("d" * 40)  # a ref to a snapshot that is not there
    gone = ast("classify", clip, "--model", "acme/tiny-ast", "--cache-dir", cache)
    assert gone.exit_code == 1 and "is damaged" in gone.stderr and "not in the cache yet" not in gone.stderr
    other = ast("classify", clip, "--model", "acme/tiny-ast@v9", "--cache-dir", cache)  # never cached at all
    assert other.exit_code == 1 and "not in the Hugging Face cache" in other.stderr


def test_an_option_without_its_value_gets_the_hint_every_usage_error_has():
    result = ast("classify", "x.wav", "--top")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["Error: option '--top' requires an argument",
                                          "Hint: `ast classify --help` lists the options"]
    assert "141 the reader of stdout went away" in " ".join(ast("--help").stdout.split())


def test_records_of_a_fast_run_say_which_mode_it_ran(tiny_checkpoint, tmp_path, monkeypatch):
    """``compute: "fast"`` alone did not say whether bf16, int8 or fp32 made the numbers."""
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    clip = write_audio(tmp_path / "a.wav", 1.0)
    result = ast("classify", clip, "--model", tiny_checkpoint[0], "--fast", "-f", "jsonl", "-q")
    assert result.exit_code == 0, result.stderr
    settings = json.loads(result.stdout)["settings"]
    assert settings["compute"] == "fast" and settings["fast"] in ("fp32", "bf16", "int8-fbgemm", "int8-onednn",
                                                                   "int8-int_mm", "fp16")
    exact = json.loads(ast("classify", clip, "--model", tiny_checkpoint[0], "-f", "jsonl", "-q").stdout)
    assert "fast" not in exact["settings"]


def test_a_resume_with_nothing_left_fetches_no_model(tiny_checkpoint, tmp_path):
    """The check of a no-op resume (s9) downloaded a hub model that was not cached (346 MB for nothing), or failed
    offline; before it, such a run exited 0. A model that is not there is not checked, and nothing is fetched."""
    clip = write_audio(tmp_path / "a.wav", 1.0)
    tags = tmp_path / "t.jsonl"
    assert ast("classify", clip, "--model", tiny_checkpoint[0], "-o", tags, "-q").exit_code == 0
    before = tags.read_bytes()
    again = ast("classify", clip, "--model", "org/not-cached-ast", "-o", tags, "--resume")  # offline in the tests
    assert again.exit_code == 0 and "1 skipped" in again.stderr, again.stderr
    assert tags.read_bytes() == before


def test_a_no_op_resume_on_a_named_device_checks_the_precision(tiny_checkpoint, tmp_path):
    clip = write_audio(tmp_path / "a.wav", 1.0)
    tags = tmp_path / "t.jsonl"
    assert ast("classify", clip, "--model", tiny_checkpoint[0], "-o", tags, "-q").exit_code == 0
    tags.write_text(tags.read_text().replace('"compute": "fp32"', '"compute": "fp16"'))
    refused = ast("classify", clip, "--model", tiny_checkpoint[0], "-o", tags, "--resume", "--device", "cpu")
    assert refused.exit_code == 2 and "computed in fp16, not fp32" in refused.stderr


def test_fbank_outputs_do_not_depend_on_the_weights_file(tiny_checkpoint, tmp_path):
    """``--kind fbank`` (model inputs, made without the weights) was refused after the weights file was touched."""
    import os
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_checkpoint[0], model)
    clip = write_audio(tmp_path / "a.wav", 1.0)
    args = ["extract-features", clip, "--out", tmp_path / "f", "--model", model, "--kind", "fbank"]
    assert ast(*args, "-q").exit_code == 0
    os.utime(model / "model.safetensors", ns=(1, 1))
    again = ast(*args)
    assert again.exit_code == 0 and "0 written, 1 skipped" in again.stderr, again.stderr


def test_a_model_whose_preprocessor_config_changed_is_another_model(tiny_checkpoint, tmp_path):
    """A new mean/std in preprocessor_config.json makes other numbers, but only the weights file was stamped: a
    resume mixed both. An earlier record whose stamp has no configs' part is still taken as this model's."""
    import json
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_checkpoint[0], model)
    clips = [write_audio(tmp_path / f"{n}.wav", 1.0, seed=n) for n in range(2)]
    tags = tmp_path / "t.jsonl"
    assert ast("classify", clips[0], "--model", model, "-o", tags, "-q").exit_code == 0
    record = json.loads(tags.read_text())
    old = dict(record, settings=dict(record["settings"], weights=record["settings"]["weights"].split(" ")[0]))
    tags.write_text(json.dumps(old) + "\n")  # as the previous version wrote it: the weights file's stamp alone
    assert ast("classify", *clips, "--model", model, "-o", tags, "--resume", "-q").exit_code == 0
    config = json.loads((model / "preprocessor_config.json").read_text())
    (model / "preprocessor_config.json").write_text(json.dumps(dict(config, mean=0.0, std=1.0)))
    before = tags.read_bytes()
    clips.append(write_audio(tmp_path / "2.wav", 1.0, seed=2))
    refused = ast("classify", *clips, "--model", model, "-o", tags, "--resume")
    assert refused.exit_code == 2 and "or its configs" in refused.stderr, refused.stderr
    assert tags.read_bytes() == before
