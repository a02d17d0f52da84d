"""``ast train`` and ``ast evaluate`` (#15) on honest generated data: four kinds of sound with different spectra
(low tones, high tones, white noise, click trains), 24 clips each with random gain, offset and length."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from ast_cli.cli import app
from ast_cli.train import average_precision, load_dataset, metrics, split
from conftest import make_reference, reference_features, reference_waveform
from tolerances import END_TO_END

RATE = 16000
KINDS = ("clicks", "high", "low", "noise")
runner = CliRunner()


def sound(kind: str, rng: np.random.Generator) -> np.ndarray:
    seconds = rng.uniform(1.0, 2.2)  # 2-4 windows of the base model's 0.64 s
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    if kind == "low":
        x = np.sin(2 * np.pi * rng.uniform(120, 350) * t)
    elif kind == "high":
        x = np.sin(2 * np.pi * rng.uniform(2500, 5000) * t)
    elif kind == "noise":
        x = rng.standard_normal(n) * 0.5
    else:
        x = np.zeros(n)
        x[:: int(RATE / rng.uniform(8, 30))] = 1.0
    x = x * rng.uniform(0.05, 0.6) + 0.002 * rng.standard_normal(n)
    offset = np.zeros(int(rng.uniform(0, 0.1) * RATE))  # a bit of silence first
    return np.concatenate([offset, x]).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One subfolder per label (single-label data)."""
    root = tmp_path_factory.mktemp("sounds")
    rng = np.random.default_rng(0)
    for kind in KINDS:
        (root / kind).mkdir()
        for i in range(24):
            sf.write(str(root / kind / f"{kind}{i:02d}.wav"), sound(kind, rng), RATE)
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two sounds mixed per clip (multi-label data), as a CSV with paths relative to it."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    rows = ["path,labels"]
    for i in range(60):
        a, b = rng.choice(len(KINDS), 2, replace=False)
        x, y = sound(KINDS[a], rng), sound(KINDS[b], rng)
        n = max(len(x), len(y))
        clip = np.pad(x, (0, n - len(x))) + np.pad(y, (0, n - len(y)))
        sf.write(str(root / f"mix{i:02d}.wav"), clip, RATE)
        rows.append(f"mix{i:02d}.wav,{KINDS[a]};{KINDS[b]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random AST (384-d, 2 layers of 6 heads, 0.64 s windows) saved by transformers: the base model.

    Its random weights are rescaled so that the input matters to the pooled embedding (at the default init the
    learned-looking CLS and distillation tokens drown it): patch projection x5, position embeddings x2,
    query/key x3, CLS/distillation x0.1. Nothing else is trained: the head learns from random features.
    """
    directory, model, extractor = make_reference(tmp_path_factory.mktemp("base"), "tiny", hidden_size=384,
                                                 intermediate_size=768, num_attention_heads=6)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("projection.weight"):
                param.mul_(5)
            elif name.endswith("position_embeddings"):
                param.mul_(2)
            elif name.endswith(("cls_token", "distillation_token")):
                param.mul_(0.1)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                param.mul_(3)
    model.save_pretrained(directory)
    return directory, model, extractor


def test_datasets_and_a_stratified_seeded_split(folder, mixed):
    data = load_dataset(str(folder))
    assert data.labels == KINDS and not data.multi_label and len(data.examples) == 96
    train, val = split(data, 0.25, seed=3)
    assert len(val.examples) == 24 and all(sum(e.labels == (k,) for e in val.examples) == 6 for k in KINDS)
    assert [e.path for e in split(data, 0.25, seed=3)[1].examples] == [e.path for e in val.examples]
    table = load_dataset(str(mixed))
    assert table.multi_label and table.labels == KINDS and len(table.examples[0].labels) == 2
    assert os.path.isabs(table.examples[0].path)


def test_metrics_against_hand_counts():
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    single = metrics(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([[1, 0], [0, 1], [0, 1]]),
                     ("a", "b"), multi_label=False)
    assert single["accuracy"] == pytest.approx(2 / 3) and single["confusion"] == [[1, 0], [1, 1]]
    assert single["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_head_mode_learns_new_labels_and_saves_a_checkpoint_transformers_loads(base, folder, tmp_path):
    from transformers import ASTFeatureExtractor, ASTForAudioClassification

    out = tmp_path / "sounds-ast"
    result = runner.invoke(app, ["train", str(folder), "--out", str(out), "--model", str(base[0]), "--quiet"])
    assert result.exit_code == 0, result.stderr
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val"]["accuracy"] >= 0.9, saved
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): k for i, k in enumerate(KINDS)}
    assert config["problem_type"] == "single_label_classification"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 1 and log[-1]["loss"] < log[0]["loss"]
    # transformers loads it, and its logits on the classify input path equal ours
    reference = ASTForAudioClassification.from_pretrained(out).eval()
    extractor = ASTFeatureExtractor.from_pretrained(out)
    clip = tmp_path / "short-high.wav"  # one window: the reference truncates longer input
    sf.write(str(clip), sound("high", np.random.default_rng(7))[:9000], RATE)
    classified = runner.invoke(app, ["classify", str(clip), "--model", str(out), "-f", "json", "--top", "0",
                                     "--activation", "none"])
    got = {x["label"]: x["score"] for x in json.loads(classified.stdout)[0]["labels"]}
    with torch.inference_mode():
        logits = reference(reference_features(extractor, reference_waveform(clip))).logits[0].numpy()
    np.testing.assert_allclose([got[k] for k in KINDS], logits, atol=END_TO_END)
    # a single-label checkpoint scores with softmax by default, and evaluate measures it
    default = json.loads(runner.invoke(app, ["classify", str(clip), "--model", str(out), "-f", "json"]).stdout)[0]
    assert sum(x["score"] for x in default["labels"]) == pytest.approx(1.0, abs=1e-6)
    assert default["labels"][0]["label"] == "high"
    report = runner.invoke(app, ["evaluate", str(out), str(folder), "--format", "json"])
    assert report.exit_code == 0, report.stderr
    assert json.loads(report.stdout)["accuracy"] >= 0.9


@pytest.mark.slow  # seconds: trains twice
def test_a_second_head_run_reuses_the_cached_embeddings(base, folder, tmp_path, monkeypatch):
    cache = tmp_path / "embeddings"
    args = ["train", str(folder), "--model", str(base[0]), "--features-dir", str(cache), "--quiet"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "one")]).exit_code == 0
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 96
    import ast_cli.extract as extract

    def refuse(*a, **k):
        raise AssertionError("embeddings were computed again")

    monkeypatch.setattr(extract, "extract_features", refuse)
    again = runner.invoke(app, [*args, "--out", str(tmp_path / "two"), "--lr", "3e-3", "--seed", "5"])
    assert again.exit_code == 0, again.stderr


def test_multi_label_head_beats_chance(base, mixed, tmp_path):
    out = tmp_path / "mixed-ast"
    result = runner.invoke(app, ["train", str(mixed), "--out", str(out), "--model", str(base[0]), "--quiet"])
    assert result.exit_code == 0, result.stderr
    val = json.loads((out / "metrics.json").read_text())["val"]
    assert val["map"] > 0.75  # chance: about 0.5 (each clip holds 2 of 4 labels)
    assert json.loads((out / "config.json").read_text())["problem_type"] == "multi_label_classification"
    report = json.loads(runner.invoke(app, ["evaluate", str(out), str(mixed), "-f", "json"]).stdout)
    assert report["map"] > 0.75 and set(report["per_label"]) == set(KINDS)


@pytest.mark.slow  # seconds: trains twice
def test_finetune_lowers_the_loss_checkpoints_and_resumes(base, folder, tmp_path):
    out = tmp_path / "ft"
    args = ["train", str(folder), "--out", str(out), "--model", str(base[0]), "--mode", "finetune", "--lr", "3e-4",
            "--mixup", "0.5", "--accumulate", "2", "--train-batch", "16", "--quiet"]
    first = runner.invoke(app, [*args, "--epochs", "2"])
    assert first.exit_code == 0, first.stderr
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and (out / "checkpoint" / "trainer_state.pt").is_file()
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["mean"] != pytest.approx(-4.2677393) and pre["std"] > 0  # the data's own normalization
    os.remove(out / "model.safetensors")  # as if interrupted before the end
    resumed = runner.invoke(app, [*args, "--epochs", "4", "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert min(r["loss"] for r in log[1:]) < log[0]["loss"]
    assert (out / "model.safetensors").is_file()


def test_train_usage_errors(base, folder, tmp_path):
    one = tmp_path / "one-label"
    (one / "dog").mkdir(parents=True)
    sf.write(str(one / "dog" / "a.wav"), np.zeros(8000, np.float32), RATE)
    cases = [
        (["train", str(one), "--out", str(tmp_path / "x")], "at least 2"),
        (["train", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], "no such data"),
        (["train", str(folder), "--out", str(tmp_path / "x"), "--val-split", "1.5"], "between 0 and 1"),
        (["train", str(folder), "--out", str(tmp_path / "x"), "--resume"], "--resume continues a finetune run"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "--model", str(base[0])])
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
