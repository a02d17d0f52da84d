"""What README's "Fast modes" and "Benchmarks and speed" say, held to what the tools do (issue 26, a newcomer's walk):
the `--fast candidates` table's wording, and `benchmarks/compare_transformers.py`'s `--threads`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import make_reference

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_26_5_benchmark_calls_a_single_label_models_softmax_scores_not_sigmoid(tmp_path):
    directory, _, _ = make_reference(tmp_path, "tiny", num_labels=3, problem_type="single_label_classification")
    result = runner.invoke(app, ["benchmark", "--model", str(directory), "--device", "cpu", "--iters", "1",
                                 "--warmup", "0", "--batch-sizes", "1", "--attn", "sdpa"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "--fast candidates" in result.stdout and "scores within 0.02 of fp32" in result.stdout
    assert "sigmoid" not in result.stdout  # --fast compares this model's softmax probabilities


def _compare_transformers():
    spec = importlib.util.spec_from_file_location("compare_transformers",
                                                  ROOT / "benchmarks" / "compare_transformers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_26_5_compare_transformers_threads_reach_every_whole_process():
    commands = _compare_transformers().process_commands("model", ["a.wav"], ["fp32", "fast"], 4, threads=1)
    assert set(commands) == {"transformers fp32", "transformers bf16", "ast fp32", "ast fast"}
    for name, command in commands.items():
        assert command[0] == sys.executable
        assert "--threads" in command and command[command.index("--threads") + 1] == "1", name
    assert "--threads" not in sum(_compare_transformers().process_commands("m", ["a.wav"], ["fp32"], 4).values(), [])


def _help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], terminal_width=100)
    assert result.exit_code == 0
    return " ".join(result.stdout.split())


def test_26_5_fast_help_names_the_cuda_candidates_and_benchmark_help_its_table():
    for command in ("classify", "extract-features", "listen", "index", "train", "evaluate"):
        assert "(fp32, bf16 or int8; fp16 or bf16 on CUDA)" in _help(command), command
    assert "every --fast candidate" in _help("benchmark") and '"fast"' in _help("benchmark")


def test_26_5_search_on_an_index_made_with_fast_says_what_runs(tmp_path):
    import numpy as np
    import soundfile as sf

    directory, _, _ = make_reference(tmp_path, "tiny")
    rng = np.random.default_rng(0)
    for name in ("a.wav", "query.wav"):
        sf.write(tmp_path / name, (0.1 * rng.standard_normal(16000)).astype("float32"), 16000)
    db = str(tmp_path / "db")
    for fast in ([], ["--fast"]):
        made = runner.invoke(app, ["index", str(tmp_path / "a.wav"), "--db", db + "".join(fast), "--model",
                                   str(directory), "-q", *fast])
        assert made.exit_code == 0, made.output
        found = runner.invoke(app, ["search", db + "".join(fast), str(tmp_path / "query.wav"), "--top", "1"])
        assert found.exit_code == 0, found.output
        assert ("fast: " in found.stderr) == bool(fast), found.stderr  # one line, as every --fast run gives
