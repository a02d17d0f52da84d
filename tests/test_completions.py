"""Shell completions are current, and help, version and completion lookups never import torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "completions"))
from generate import SCRIPTS, completion_script  # noqa: E402

HEAVY = ("torch", "torchaudio", "huggingface_hub", "numpy", "safetensors", "soundfile")


@pytest.mark.parametrize("shell", list(SCRIPTS))
def test_committed_completions_are_current(shell):
    committed = (ROOT / "completions" / SCRIPTS[shell]).read_text()
    assert committed == completion_script(shell), "run: python completions/generate.py"


PROBE = """
import atexit, sys
atexit.register(lambda: print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr))
from ast_cli.cli import main
sys.argv[0] = "ast"
main()
"""


def _heavy_modules(args, env=None) -> tuple[list[str], subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))
    line = [x for x in proc.stderr.splitlines() if x.startswith("HEAVY:")][-1]
    return [m for m in line[len("HEAVY:"):].split(",") if m], proc


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["classify", "--help"], ["download", "--help"],
                                  ["extract-features", "--help"], ["benchmark", "--help"], ["models", "--help"]])
def test_help_and_version_import_nothing_heavy(args):
    heavy, proc = _heavy_modules(args)
    assert proc.returncode == 0, proc.stderr
    assert heavy == []


@pytest.mark.parametrize("words,cword,expected", [
    ("ast cl", "1", ["classify"]),
    ("ast classify --fo", "2", ["--format"]),
    ("ast classify x.wav --format ", "4", ["table", "json", "jsonl", "csv", "tsv", "audacity", "raven"]),
    ("ast classify x.wav --dtype ", "4", ["auto", "fp32", "fp16", "bf16"]),
    ("ast classify x.wav --aggregate ", "4", ["max", "mean"]),
    ("ast extract-features x.wav --kind ", "4", ["embedding", "fbank"]),
    ("ast classify x.wav --model speech", "4", ["speech-commands-v2"]),
    ("ast classify x.wav --model acme/", "4", ["acme/fine-tuned-frogs"]),  # a cached model
])
def test_completion_lookup_is_light_and_answers(words, cword, expected, tmp_path):
    (tmp_path / "hub" / "models--acme--fine-tuned-frogs").mkdir(parents=True)
    heavy, proc = _heavy_modules([], env={"_AST_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword,
                                          "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.stdout.split() == expected
    assert heavy == []


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, ast_cli.cli; print(sorted(m for m in %r if m in sys.modules))" % (HEAVY,)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_python_dash_m_version():
    from ast_cli import __version__

    proc = subprocess.run([sys.executable, "-m", "ast_cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ast-cli {__version__}"
