"""Every command is documented (README and --help with examples), and CI runs what the README says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer.main

from ast_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMANDS = typer.main.get_command(app).commands


def test_expected_commands_exist():
    assert {"classify", "extract-features", "benchmark", "download", "models", "labels"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_is_in_readme(name):
    assert re.search(rf"\bast {re.escape(name)}\b", README), f"`ast {name}` is not shown in README.md"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_has_text_and_examples(name):
    command = COMMANDS[name]
    assert command.help and command.help.strip()
    examples = command.help.split("Examples:")
    assert len(examples) == 2, f"{name}: help should end with an Examples: block"
    assert 2 <= examples[1].count(f"ast {name}") <= 3, f"{name}: give 2-3 examples"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help(name):
    for param in COMMANDS[name].params:
        if param.param_type_name == "option":
            assert getattr(param, "help", None), f"ast {name} {param.opts[0]} has no help text"


def test_readme_setup_commands_are_what_ci_runs():
    """The set-up block is CI's own commands, in CI's order (#24.12: a venv first), plus the CPU-only PyTorch line,
    which comes before the install and says it is only for machines without a GPU."""
    block = README.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    setup = [line.split("#", 1)[0].strip() for line in block]
    cpu_only = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert setup == ["python3 -m venv .venv", ". .venv/bin/activate", cpu_only, 'pip install -e ".[test]"',
                     "python -m pytest -q"]
    assert "without a GPU" in block[2]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_commands = [command for command in setup if command != cpu_only]
    assert [line for line in ci if line in ci_commands] == ci_commands, ".ci/run runs other set-up commands"


def test_changelog_has_an_unreleased_section():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and "### Added" in changelog


def _recipes() -> list[str]:
    block = README.split("Recipes (the test suite runs each of them", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow  # a whole process (or several): seconds each
def test_readme_recipes_run_end_to_end(tiny_checkpoint, tmp_path):
    """Every recipe of the README's batch section, as written, on a generated archive with a bad file."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import write_audio

    archive = tmp_path / "archive"
    write_audio(archive / "a.flac", 1.0, 44100, 2, seed=1)
    write_audio(archive / "b.wav", 1.5, 16000, 1, seed=2)
    write_audio(archive / "sub" / "c.flac", 0.8, 22050, 1, seed=3)
    (archive / "bad.mp3").write_bytes(b"not an mp3 at all" * 20)
    env = dict(os.environ, AST_MODEL=str(tiny_checkpoint[0]), HF_HUB_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    outputs = []
    for recipe in _recipes():
        if recipe.startswith("jq ") and shutil.which("jq") is None:
            pytest.skip("jq is not installed (CI installs it)")
        command = recipe.replace("/data/archive", str(archive))
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert "Traceback" not in proc.stderr, (recipe, proc.stderr)
        outputs.append((recipe, proc))
    tag, week, dog, failed, table, per_file = (proc for _, proc in outputs)
    assert tag.returncode == 1  # the bad file
    records = [json.loads(line) for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    assert sorted(os.path.basename(r["path"]) for r in records) == ["a.flac", "b.wav", "bad.mp3", "c.flac"]
    assert week.returncode == 0
    assert len((tmp_path / "week.jsonl").read_text().splitlines()) == 2  # the two flac files
    assert dog.returncode == 0 and len(dog.stdout.splitlines()) == 3  # each good file, with its Dog score
    assert all("\t" in line for line in dog.stdout.splitlines())
    assert failed.stdout.strip().startswith(str(archive / "bad.mp3") + ": ")
    assert table.returncode == 1 and (tmp_path / "tags.csv").read_text().startswith("path,duration,rank,label")
    assert per_file.returncode == 1 and len(list((tmp_path / "labels").rglob("*.labels.txt"))) == 3


def test_24_12_the_python_api_sample_prints_what_the_readme_shows(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """The README's Python API sample, run as written on the files it names, prints its transcript exactly."""
    import sys

    from conftest import write_audio

    section = README.split("## Python API", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    transcript = section.split("```console", 1)[1].split("```", 1)[0].strip().splitlines()
    monkeypatch.chdir(tmp_path)
    write_audio(tmp_path / "in" / "a.wav", 2.0, 16000, 1, seed=1)
    cut = write_audio(tmp_path / "in" / "cut.wav", 2.0, 16000, 1, seed=2)
    cut.write_bytes(cut.read_bytes()[: 44 + 16000])  # the header promises 2 s, the data ends at 0.5 s
    write_audio(tmp_path / "in" / "b.flac", 3.5, 44100, 2, seed=3)
    write_audio(tmp_path / "in" / "long.wav", 36.0, 16000, 1, seed=4)
    monkeypatch.setattr(sys, "argv", ["api_example.py", str(tiny_checkpoint[0])])
    capsys.readouterr()
    exec(compile(code, "api_example.py", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.splitlines() == transcript[1:]  # [0] is the command line
