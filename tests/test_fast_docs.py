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
