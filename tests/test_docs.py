"""Every command is documented (README and --help with examples), and CI runs what the README says."""

from __future__ import annotations

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
    setup = README.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert setup == ['pip install -e ".[test]"', "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in setup:
        assert command in ci, f".ci/run does not run `{command}`"


def test_changelog_has_an_unreleased_section():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and "### Added" in changelog
