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
from ast_cli.tasks.metrics import average_precision, metrics
from ast_cli.tasks.train_data import load_dataset, split
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
    assert result.stderr == "" and result.stdout.strip() == str(out)  # --quiet: errors only, as classify
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
    import ast_cli.tasks.extract as extract

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
        (["train", str(one), "--out", str(tmp_path / "x")], "needs two labels"),
        (["train", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], "no such data"),
        (["train", str(folder), "--out", str(tmp_path / "x"), "--val-split", "1.5"], "between 0 and 1"),
        (["train", str(folder), "--out", str(tmp_path / "x"), "--resume"],
         "Error: --resume: continues a finetune run; head training takes seconds to run again\n"
         "Hint: drop --resume (and add --overwrite to replace an earlier --out)"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "--model", str(base[0])])
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)


# -- #22 and #23: never lose, never leak; bad clips; checks before the model loads ----------------------------

@pytest.fixture
def small(tmp_path):
    """Two labels of three short clips each (one window of the tiny model's 0.64 s)."""
    rng = np.random.default_rng(2)
    for kind in ("high", "low"):
        (tmp_path / "small" / kind).mkdir(parents=True)
        for i in range(3):
            sf.write(str(tmp_path / "small" / kind / f"{i}.wav"), sound(kind, rng)[:9000], RATE)
    return tmp_path / "small"


def tiny_train(data, out, model, *extra):
    return runner.invoke(app, ["train", str(data), "--out", str(out), "--model", str(model), "--val-split", "0.34",
                               "--epochs", "2", "--quiet", *extra])


def test_22_6_train_refuses_a_folder_it_did_not_make_and_overwrite_replaces_its_own(tiny_checkpoint, small, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.json", "metrics.json", "train_log.jsonl"):
        (mine / name).write_text("the user's own\n")
    for extra in ((), ("--overwrite",)):
        refused = tiny_train(small, mine, tiny_checkpoint[0], *extra)
        assert refused.exit_code == 2 and "is not an ast training output" in refused.stderr, refused.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "metrics.json", "train_log.jsonl"]
    assert all(p.read_text() == "the user's own\n" for p in mine.iterdir())
    out = tmp_path / "out"
    assert tiny_train(small, out, tiny_checkpoint[0]).exit_code == 0
    again = tiny_train(small, out, tiny_checkpoint[0])
    assert again.exit_code == 2 and "already holds a training run" in again.stderr and "--overwrite" in again.stderr
    before = (out / "model.safetensors").stat().st_ino
    replaced = tiny_train(small, out, tiny_checkpoint[0], "--overwrite", "--seed", "3")
    assert replaced.exit_code == 0, replaced.stderr
    assert (out / "model.safetensors").stat().st_ino != before
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2  # replaced, not appended to
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_22_7_a_save_killed_halfway_leaves_no_partial_checkpoint_and_nothing_that_blocks(tiny_checkpoint, small,
                                                                                          tmp_path, monkeypatch):
    import ast_cli.run.files as files

    real = files.atomic_write

    def killed(path, mode="w"):  # as a kill -9 after model.safetensors, before config.json
        if os.path.basename(path) == "config.json":
            raise KeyboardInterrupt
        return real(path, mode)

    monkeypatch.setattr(files, "atomic_write", killed)
    out = tmp_path / "out"
    assert tiny_train(small, out, tiny_checkpoint[0]).exit_code == 130
    assert not (out / "model.safetensors").exists()  # never a model without its config.json
    monkeypatch.setattr(files, "atomic_write", real)
    result = tiny_train(small, out, tiny_checkpoint[0])
    assert result.exit_code == 0, result.stderr
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_22_8_the_embedding_cache_knows_files_that_share_a_name_and_files_replaced(tiny_checkpoint, small, tmp_path):
    other = tmp_path / "other"  # the same relative names, other audio
    rng = np.random.default_rng(9)
    for kind in ("high", "low"):
        (other / kind).mkdir(parents=True)
        for i in range(3):
            sf.write(str(other / kind / f"{i}.wav"), sound("noise", rng)[:9000], RATE)
    cache = tmp_path / "cache"
    args = ["--features-dir", str(cache)]
    assert tiny_train(small, tmp_path / "a", tiny_checkpoint[0], "--val", str(other), *args).exit_code == 0
    assert len(list(cache.rglob("*.safetensors"))) == 12  # 6 + 6: none of other/ was taken for small/
    sf.write(str(small / "high" / "0.wav"), sound("noise", rng)[:9000], RATE)  # replaced in place
    assert tiny_train(small, tmp_path / "b", tiny_checkpoint[0], *args).exit_code == 0
    assert len(list(cache.rglob("*.safetensors"))) == 13  # only the replaced file was embedded again


def test_24_6_any_rerun_reuses_the_shared_embedding_cache(tiny_checkpoint, small, tmp_path, monkeypatch):
    assert tiny_train(small, tmp_path / "one", tiny_checkpoint[0]).exit_code == 0
    import ast_cli.tasks.extract as extract

    def refuse(*a, **k):
        raise AssertionError("embeddings were computed again")

    monkeypatch.setattr(extract, "extract_features", refuse)
    again = tiny_train(small, tmp_path / "two", tiny_checkpoint[0], "--lr", "3e-3")
    assert again.exit_code == 0, again.stderr
    assert not (tmp_path / "two" / "embeddings").exists()


def test_22_9_after_resume_the_saved_model_is_the_best_epoch(tiny_checkpoint, small, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import ast_cli.tasks.train as train

    losses, weights = iter([0.5, 0.9, 0.8, 0.7]), {}  # the best validation loss is epoch 1's

    def validate(self, model, kind, windows, device):
        weights[len(weights) + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return next(losses), {"accuracy": 0.5}

    monkeypatch.setattr(train.Trainer, "_validate", validate)
    out = tmp_path / "ft"
    args = ["--mode", "finetune", "--lr", "1e-3"]
    assert tiny_train(small, out, tiny_checkpoint[0], *args).exit_code == 0
    resumed = tiny_train(small, out, tiny_checkpoint[0], *args, "--epochs", "4", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 1
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in weights[1].items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)


def test_22_13_a_tampered_trainer_state_is_not_a_safe_file(tiny_checkpoint, small, tmp_path):
    import pickle

    out = tmp_path / "ft"
    args = ["--mode", "finetune", "--epochs", "1"]
    assert tiny_train(small, out, tiny_checkpoint[0], *args).exit_code == 0

    class Code:
        def __reduce__(self):
            return (print, ("ran the file's code",))

    (out / "checkpoint" / "trainer_state.pt").write_bytes(pickle.dumps({"model": Code()}))
    result = tiny_train(small, out, tiny_checkpoint[0], *args, "--epochs", "2", "--resume")
    assert result.exit_code == 1 and "not a safe training state file" in result.stderr, result.stderr
    assert "weights_only" not in result.stderr and "unexpected" not in result.stderr
    assert "ran the file's code" not in result.output


def test_23_train_names_every_bad_clip_and_trains_on_the_rest(tiny_checkpoint, small, tmp_path):
    (small / "high" / "truncated.wav").write_bytes((small / "high" / "0.wav").read_bytes()[:30])
    (small / "low" / "text.wav").write_text("not audio")
    os.symlink(tmp_path / "gone.wav", small / "low" / "dangling.wav")
    out = tmp_path / "out"
    result = tiny_train(small, out, tiny_checkpoint[0])
    assert result.exit_code == 1, result.stderr
    for name in ("truncated.wav", "text.wav", "dangling.wav"):
        assert sum(name in line and line.startswith("error: ") for line in result.stderr.splitlines()) == 1
    assert "3 clips could not be read and left out" in result.stderr
    saved = json.loads((out / "metrics.json").read_text())
    assert sorted(os.path.basename(f["path"]) for f in saved["failed"]) == ["dangling.wav", "text.wav", "truncated.wav"]
    assert (out / "model.safetensors").is_file()
    strict = tiny_train(small, tmp_path / "strict", tiny_checkpoint[0], "--strict")
    assert strict.exit_code == 1 and "Error: 3 clips could not be read" in strict.stderr, strict.stderr
    assert not (tmp_path / "strict").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_23_a_fifo_in_the_training_data_is_a_bad_clip_not_a_hang(tiny_checkpoint, small, tmp_path):
    """A FIFO with no writer among the training files blocked ast train (and evaluate) forever; they are named
    like any bad clip. Whole processes, so that a hang is a timeout, not a stuck suite."""
    import subprocess
    import sys

    os.mkfifo(small / "low" / "pipe.wav")
    table = tmp_path / "data.csv"
    table.write_text(f"path,labels\n{small / 'high' / '0.wav'},high\n{small / 'low' / 'pipe.wav'},low\n")
    out = tmp_path / "out"
    commands = (["train", str(small), "--out", str(out), "--model", str(tiny_checkpoint[0]), "--val-split", "0.34",
                 "--epochs", "1", "--quiet"], ["evaluate", str(out), str(table)])
    for command in commands:
        done = subprocess.run([sys.executable, "-m", "ast_cli", *command], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1, done.stderr
        assert f"error: {small / 'low' / 'pipe.wav'}: not a regular file" in done.stderr


def test_23_checks_that_need_no_model_come_before_it_loads(tiny_checkpoint, small, tmp_path, monkeypatch):
    import ast_cli.cli.train as cli_train

    (small / "empty").mkdir()
    single = tmp_path / "single"
    for kind in ("a", "b"):
        (single / kind).mkdir(parents=True)
        sf.write(str(single / kind / "x.wav"), np.zeros(9000, np.float32), RATE)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffpath,labels\nhigh/0.wav,high\nlow/0.wav,low\n".encode())
    (tmp_path / "high").symlink_to(small / "high")
    (tmp_path / "low").symlink_to(small / "low")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"path": "high/0.wav", "labels": "high"}\n{"path": 5, "labels": [1]}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    resumable = tmp_path / "ft"
    assert tiny_train(small, resumable, tiny_checkpoint[0], "--mode", "finetune", "--epochs", "1").exit_code == 0
    (small / "other").mkdir()
    sf.write(str(small / "other" / "x.wav"), np.zeros(9000, np.float32), RATE)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(cli_train, "fetch_model", no_model)
    cases = [
        (["--lr", "-1"], "--lr: must be a positive number"),
        (["--lr", "nan"], "--lr: must be a positive number"),
        (["--warmup", "nan"], "--warmup: "),
        (["--features-dir", str(a_file)], "--features-dir: "),
        (["--out", str(a_file)], "--out: "),
        (["--mode", "finetune", "--out", str(resumable), "--resume"], "--resume: cannot resume"),
    ]
    for extra, message in cases:
        result = tiny_train(small, tmp_path / "x", tiny_checkpoint[0], *extra)
        assert result.exit_code == 2 and message in result.stderr, (extra, result.stderr)
    assert "warning: class folder 'empty' holds no audio file: left out" in result.stderr  # named, once
    val_only = tiny_train(single, tmp_path / "x", tiny_checkpoint[0], "--val", str(small))
    assert val_only.exit_code == 2 and "--val: no training file has label(s) high, low" in val_only.stderr
    split_case = tiny_train(single, tmp_path / "x", tiny_checkpoint[0], "--val-split", "0.99")
    assert split_case.exit_code == 2 and "no file is left for validation" in split_case.stderr, split_case.stderr
    missing = tiny_train(tmp_path / "nothing", tmp_path / "x", tiny_checkpoint[0])
    assert missing.exit_code == 2 and "DATA: no such data" in missing.stderr and "--data" not in missing.stderr
    bad_jsonl = tiny_train(jsonl, tmp_path / "x", tiny_checkpoint[0])
    assert bad_jsonl.exit_code == 2 and "bad.jsonl line 2: 'path' must be" in bad_jsonl.stderr, bad_jsonl.stderr
    from ast_cli.tasks.train_data import load_dataset

    assert [e.labels for e in load_dataset(str(bom)).examples] == [("high",), ("low",)]


def test_23_evaluate_when_every_file_fails_is_one_line(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    for kind in ("Speech", "Music"):
        (data / kind).mkdir(parents=True)
        (data / kind / "x.wav").write_text("not audio")
    result = runner.invoke(app, ["evaluate", str(tiny_checkpoint[0]), str(data)])
    assert result.exit_code == 1, result.stderr
    assert f"Error: no file of {data} could be read" in result.stderr
    assert "Warning" not in result.stderr and "TypeError" not in result.stderr and "unexpected" not in result.stderr


def test_23_a_full_disk_during_train_names_the_file(tiny_checkpoint, small, tmp_path, monkeypatch):
    import errno

    import ast_cli.run.files as files

    real = files.atomic_write

    def full(path, mode="w"):
        if path.endswith("model.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode)

    monkeypatch.setattr(files, "atomic_write", full)
    result = tiny_train(small, tmp_path / "out", tiny_checkpoint[0])
    assert result.exit_code == 1 and "model.safetensors: No space left on device" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_23_out_of_memory_names_the_batch_that_causes_it_and_is_not_a_bad_clip(tiny_checkpoint, small, tmp_path,
                                                                               monkeypatch):
    import ast_cli.run.backends as backends
    import ast_cli.tasks.train as train

    def epoch(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.Trainer, "_epoch", epoch)
    result = tiny_train(small, tmp_path / "out", tiny_checkpoint[0])
    assert result.exit_code == 1 and "Hint: use a smaller --train-batch" in result.stderr, result.stderr
    assert "--batch-size" not in result.stderr and not (tmp_path / "out").exists()

    def model(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(backends.LocalBackend, "__call__", model)
    result = tiny_train(small, tmp_path / "out", tiny_checkpoint[0], "--features-dir", str(tmp_path / "cache"))
    assert result.exit_code == 1 and "Hint: use a smaller --batch-size" in result.stderr, result.stderr
    assert "error: " not in result.stderr  # not six bad clips


def test_22_7_an_interrupted_finetune_leaves_out_alone_and_resumes(tiny_checkpoint, small, tmp_path, monkeypatch):
    import ast_cli.tasks.train as train

    real, calls = train.Trainer._epoch, []

    def epoch(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(train.Trainer, "_epoch", epoch)
    out = tmp_path / "ft"
    args = ["--mode", "finetune", "--epochs", "3"]
    stopped = tiny_train(small, out, tiny_checkpoint[0], *args)
    assert stopped.exit_code == 130 and "--resume" in stopped.stderr, stopped.stderr
    assert not out.exists()
    resumed = tiny_train(small, out, tiny_checkpoint[0], *args, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert [json.loads(line)["epoch"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_24_6_evaluate_shares_the_cache_and_scores_as_classify(tiny_checkpoint, small, tmp_path, monkeypatch):
    from ast_cli import RunOptions, Tagger
    from ast_cli.tasks.metrics import evaluate

    out = tmp_path / "out"
    assert tiny_train(small, out, tiny_checkpoint[0]).exit_code == 0
    cache = tmp_path / "cache"
    first = runner.invoke(app, ["evaluate", str(out), str(small), "-f", "json", "--features-dir", str(cache)])
    assert first.exit_code == 0, first.stderr
    assert len(list(cache.rglob("*.safetensors"))) == 6  # the trained model's embeddings, one file per clip
    tagger = Tagger.load(str(out), RunOptions())
    tagger.source = None  # no weights file to key a cache by: the whole model on every window, as classify
    whole = evaluate(tagger, load_dataset(str(small)))
    import ast_cli.tasks.extract as extract

    def refuse(*a, **k):
        raise AssertionError("embeddings were computed again")

    monkeypatch.setattr(extract, "extract_features", refuse)
    second = runner.invoke(app, ["evaluate", str(out), str(small), "-f", "json", "--features-dir", str(cache)])
    assert second.exit_code == 0, second.stderr
    assert json.loads(second.stdout) == json.loads(first.stdout)
    assert json.loads(first.stdout)["confusion"] == whole["confusion"]
    assert json.loads(first.stdout)["accuracy"] == pytest.approx(whole["accuracy"])


def test_22_7_a_kill_between_the_log_and_the_state_file_logs_each_epoch_once(tiny_checkpoint, small, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "ft"
    args = ["--mode", "finetune", "--epochs", "2"]
    assert tiny_train(small, out, tiny_checkpoint[0], *args).exit_code == 0
    with open(out / "train_log.jsonl", "a") as log:  # epoch 3 logged, its state never saved
        log.write('{"epoch": 3, "loss": 1.0, "val_loss": 1.0}\n{"epoch": 4, "lo')
    resumed = tiny_train(small, out, tiny_checkpoint[0], "--mode", "finetune", "--epochs", "3", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert [json.loads(line)["epoch"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_28_data_without_two_labels_says_what_makes_a_classifier(tmp_path):
    """#28 walk: ``ast search --format csv > hits.csv`` then ``ast train hits.csv`` before filling the label column
    said "has 0 label(s): a classifier needs at least 2", though one label and negatives make a detector."""
    (tmp_path / "hits.csv").write_text("path,start,end,score,label\na.wav,0.0,0.64,0.9,\nb.wav,0.0,0.64,0.8,-\n")
    one = tmp_path / "one"
    (one / "owl").mkdir(parents=True)
    sf.write(str(one / "owl" / "0.wav"), np.zeros(1600, np.float32), 16000)
    for data, found in ((tmp_path / "hits.csv", "no label (every row's labels are empty or '-': negatives)"),
                        (one, "only one label, owl,")):
        result = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "out"), "--quiet"])
        assert result.exit_code == 2
        assert result.stderr.splitlines() == [
            f"Error: DATA: {data} has {found} and a classifier needs two labels, or one label and negatives",
            "Hint: one subfolder per label; in a CSV/JSONL, the rows' labels (several: a;b), empty or '-' for a "
            "negative"]


def test_28_features_db_refusals_name_features_db_once(tmp_path):
    """#28 walk: ``ast train hits.csv --features-db nodb`` said ``Error: --db: nodb is not an index`` (train has no
    --db), and with ``--mode finetune`` ``Error: --features-db: --features-db holds embeddings``."""
    pytest.importorskip("faiss")
    hits = tmp_path / "hits.csv"
    hits.write_text("path,start,end,score,label\na.wav,0.0,0.64,0.9,door\nb.wav,0.0,0.64,0.8,-\n"
                    "c.wav,0.0,0.64,0.7,door\nd.wav,0.0,0.64,0.6,\n")
    missing = tmp_path / "nodb"
    for extra, lines in (([], [f"Error: --features-db: {missing} is not an index (no index.sqlite in it)"]),
                         (["--mode", "finetune"], [f"Error: --features-db: {missing} holds embeddings, which train a "
                                                   "head only", "Hint: use --mode head"])):
        result = runner.invoke(app, ["train", str(hits), "--features-db", str(missing), "--out",
                                     str(tmp_path / "out"), "--quiet", *extra])
        assert result.exit_code == 2
        assert [x for x in result.stderr.splitlines() if x.startswith(("Error:", "Hint:"))][:len(lines)] == lines
    assert not (tmp_path / "out").exists()


def test_s8_9_a_windowed_csv_is_refused_without_features_db(tiny_checkpoint, small, tmp_path, monkeypatch):
    """s8 #9: without --features-db, ``ast search -f csv`` rows (one window each) were trained and evaluated as
    their whole files, a file under several labels at once. Refused before the model loads; a csv whose start and
    end columns are empty is whole files, as before."""
    import ast_cli.cli.train as cli_train

    files = sorted(small.rglob("*.wav"))
    windows = tmp_path / "hits.csv"
    windows.write_text("path,start,end,score,label\n" + "".join(
        f"{f},{s},{s + 0.64},0.9,{f.parent.name if s else '-'}\n" for f in files for s in (0.0, 0.64)))
    whole = tmp_path / "whole.csv"
    whole.write_text("path,start,end,labels\n" + "".join(f"{f},,,{f.parent.name}\n" for f in files))
    (tmp_path / "mixed.csv").write_text(f"path,labels,start\n{files[0]},high,\n{files[3]},low,0.64\n{files[1]},low,\n")
    monkeypatch.setattr(cli_train, "load_tagger", lambda *a, **k: pytest.fail("the model loaded"))
    for data in (windows, tmp_path / "mixed.csv"):
        count = 1 if data.name == "mixed.csv" else 12
        message = f"{data} lists windows ({count} rows with a start), which would be taken as whole files"
        trained = tiny_train(data, tmp_path / "out", tiny_checkpoint[0])
        assert trained.exit_code == 2 and not (tmp_path / "out").exists()
        assert trained.stderr.splitlines() == [f"Error: DATA: {message}",
                                               "Hint: train on the index they came from: add --features-db DB"]
        evaluated = runner.invoke(app, ["evaluate", str(tiny_checkpoint[0]), str(data)])
        assert evaluated.exit_code == 2 and evaluated.stderr.splitlines()[0] == f"Error: DATA: {message}"
    val = tiny_train(whole, tmp_path / "out", tiny_checkpoint[0], "--val", str(windows))
    assert val.exit_code == 2 and val.stderr.startswith("Error: --val: ")
    monkeypatch.undo()
    assert tiny_train(whole, tmp_path / "out", tiny_checkpoint[0]).exit_code == 0


def test_s8_10_labels_a_head_would_refuse_are_refused_before_the_model_loads(tiny_checkpoint, small, tmp_path,
                                                                            monkeypatch):
    """s8 #10: a class folder or a CSV label with a tab trained (exit 0), then ``--head`` refused the result:
    "labels must be a list of 1 to 100000 printable names". heads.py's rule is now checked on the data."""
    import shutil

    import ast_cli.cli.train as cli_train

    odd = tmp_path / "odd"
    shutil.copytree(small / "low", odd / "lo\tw")
    shutil.copytree(small / "high", odd / "high")
    table = tmp_path / "tab.csv"
    tab = "lo\tw"
    rows = [f'{f},"{tab if f.parent.name == "low" else "high"};x"' for f in sorted(small.rglob("*.wav"))]
    table.write_text("path,labels\n" + "\n".join(rows) + "\n")
    monkeypatch.setattr(cli_train, "fetch_model", lambda *a, **k: pytest.fail("the model loaded"))
    for data, label in ((odd, "'lo\\tw'"), (table, "'lo\\tw'")):
        result = tiny_train(data, tmp_path / "out", tiny_checkpoint[0])
        assert result.exit_code == 2 and not (tmp_path / "out").exists()
        assert result.stderr.splitlines() == [f"Error: DATA: {data}: label {label} cannot name a class: a label is "
                                              "printable (no tab or other control character) and not blank"]


def test_s8_18_resume_refuses_another_base_model_naming_both(tiny_checkpoint, small, tmp_path):
    """s8 #18: ``--resume --model OTHER`` continued the old run's weights under OTHER's name and input format."""
    out = tmp_path / "ft"
    other = make_reference(tmp_path, "tiny-other", seed=1)[0]
    assert tiny_train(small, out, tiny_checkpoint[0], "--mode", "finetune", "--epochs", "1").exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = tiny_train(small, out, other, "--mode", "finetune", "--epochs", "2", "--resume")
    assert refused.exit_code == 2 and refused.stderr.splitlines() == [
        f"Error: --model: cannot resume {out}: it was trained from {tiny_checkpoint[0]}, not {other}",
        f"Hint: use --model {tiny_checkpoint[0]}"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    resumed = tiny_train(small, out, tiny_checkpoint[0], "--mode", "finetune", "--epochs", "2", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2


def test_s9_train_evaluate_and_search_keep_c_library_notes_off_stderr(tiny_checkpoint, small, tmp_path, capfd):
    """mpg123 (in libsndfile) printed "warning: ID3v2: unrealistic small tag lengh 0" and "Note: Illegal
    Audio-MPEG-Header ..." on file descriptor 2 before our own error line in train, evaluate and search; classify,
    extract-features, index and listen keep them off, and so do these now."""
    bad = small / "high" / "bad.mp3"
    bad.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00garbage")
    trained = tiny_train(small, tmp_path / "h", tiny_checkpoint[0])
    evaluated = runner.invoke(app, ["evaluate", str(tmp_path / "h"), str(small)])
    indexed = runner.invoke(app, ["index", str(small / "low"), "--db", str(tmp_path / "db"), "--model",
                                  str(tiny_checkpoint[0]), "-q"])
    searched = runner.invoke(app, ["search", str(tmp_path / "db"), str(bad)])
    assert (trained.exit_code, evaluated.exit_code, indexed.exit_code, searched.exit_code) == (1, 1, 0, 1)
    assert all(f"{bad}: not audio" in r.stderr for r in (trained, evaluated, searched)), searched.stderr
    native = capfd.readouterr().err  # what C libraries wrote on fd 2 (the runner captures Python's sys.stderr)
    assert "mpg123" not in native and "Note:" not in native, native
