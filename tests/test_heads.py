"""Many heads, one pass (#28): heads trained with ``ast train --mode head`` on one base run next to its own head
on the same backbone pass, each scoring as it does alone; a head from another base is refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from ast_cli.cli import app
from conftest import make_reference

RATE = 16000
runner = CliRunner()
# A head scores the base's pooled embedding standardized by its training statistics; alone, its checkpoint has
# that map folded into the final LayerNorm. The two differ by float32 rounding of one affine map (~1e-7 of the
# logits here); 1e-5 is the bound on scores.
JOINT = 1e-5


def sound(kind: str, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(rng.uniform(0.6, 1.4) * RATE)) / RATE
    if kind == "high":
        x = np.sin(2 * np.pi * rng.uniform(2500, 5000) * t)
    elif kind == "low":
        x = np.sin(2 * np.pi * rng.uniform(120, 350) * t)
    else:
        x = rng.standard_normal(len(t)) * 0.5
    return (x * rng.uniform(0.1, 0.6)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base, another base, and three heads: ``pitch`` (single-label) and ``mix`` (multi-label) on the base,
    ``foreign`` on the other base; ``clips``: audio to classify."""
    root = tmp_path_factory.mktemp("heads")
    base = make_reference(root, "tiny")[0]
    other = make_reference(root, "tiny-other", seed=1)[0]
    rng = np.random.default_rng(5)
    rows = ["path,labels"]
    for kind in ("high", "low", "noise"):
        (root / "pitch-data" / kind).mkdir(parents=True)
        for i in range(4):
            clip = sound(kind, rng)
            sf.write(str(root / "pitch-data" / kind / f"{i}.wav"), clip, RATE)
            sf.write(str(root / f"mix{kind}{i}.wav"), clip, RATE)
            rows.append(f"mix{kind}{i}.wav,{kind};{'tonal' if kind != 'noise' else 'broad'}")
    (root / "mix.csv").write_text("\n".join(rows) + "\n")
    for name, data, model in (("pitch", root / "pitch-data", base), ("mix", root / "mix.csv", base),
                              ("foreign", root / "pitch-data", other)):
        result = runner.invoke(app, ["train", str(data), "--out", str(root / name), "--model", str(model),
                                     "--val-split", "0.34", "--epochs", "3", "--quiet"])
        assert result.exit_code == 0, result.stderr
    clips = [root / "pitch-data" / kind / "0.wav" for kind in ("high", "low", "noise")]
    long = root / "long.wav"  # several windows: aggregation and segments per head
    sf.write(str(long), np.concatenate([sound("high", rng), sound("low", rng), sound("noise", rng)]), RATE)
    return {"root": root, "base": base, "other": other, "clips": [*map(str, clips), str(long)]}


def classify(*args: str) -> list[dict]:
    result = runner.invoke(app, ["classify", *args, "-f", "json", "--top", "0", "--quiet"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def by_label(labels: list[dict], head: str | None) -> dict:
    return {x["label"]: x["score"] for x in labels if x.get("head") == head}


def test_28_head_mode_saves_a_head_bound_to_its_base_and_still_a_checkpoint_transformers_loads(setup):
    from transformers import ASTForAudioClassification

    from ast_cli.checkpoint.weights import backbone_fingerprint, build_model, load_checkpoint

    pitch = setup["root"] / "pitch"
    head = json.loads((pitch / "head.json").read_text())
    assert head["labels"] == ["high", "low", "noise"] and head["problem_type"] == "single_label_classification"
    assert head["base"]["backbone_sha256"] == backbone_fingerprint(build_model(load_checkpoint(setup["base"])))
    assert head["base"]["model"] == str(setup["base"].resolve())
    assert head["base"]["backbone_sha256"] != json.loads((setup["root"] / "foreign" / "head.json").read_text()
                                                         )["base"]["backbone_sha256"]
    assert json.loads((setup["root"] / "mix" / "head.json").read_text())["problem_type"] == "multi_label_classification"
    ASTForAudioClassification.from_pretrained(pitch)  # the standalone checkpoint is still one


def test_28_joint_scores_equal_each_head_classified_alone(setup):
    root, clips = setup["root"], setup["clips"]
    joint = classify(*clips, "--model", str(setup["base"]), "--head", str(root / "pitch"), "--head", str(root / "mix"),
                     "--segments")
    alone = {name: classify(*clips, "--model", str(model), "--segments")
             for name, model in (("tiny", setup["base"]), ("pitch", root / "pitch"), ("mix", root / "mix"))}
    for i, record in enumerate(joint):
        assert [x["head"] for x in record["labels"]] == ["tiny"] * 527 + ["pitch"] * 3 + ["mix"] * 5
        for name, records in alone.items():
            mine, theirs = by_label(record["labels"], name), by_label(records[i]["labels"], None)
            assert mine.keys() == theirs.keys()
            np.testing.assert_allclose([mine[k] for k in theirs], list(theirs.values()), atol=JOINT, rtol=0)
            for segment, single in zip(record["segments"], records[i]["segments"]):
                got, want = by_label(segment["labels"], name), by_label(single["labels"], None)
                np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=JOINT, rtol=0)
    # a single-label head keeps its softmax next to the multi-label base: one window's scores sum to 1
    assert sum(by_label(joint[0]["segments"][0]["labels"], "pitch").values()) == pytest.approx(1.0, abs=1e-6)


def test_28_the_python_api_runs_heads_and_can_leave_the_base_head_out(setup):
    from ast_cli import Tagger
    from ast_cli.run.tagger import LabelSelection

    root = setup["root"]
    tagger = Tagger.load(str(setup["base"]), heads=[str(root / "pitch")], base_head=False)
    result = next(tagger.classify(setup["clips"][:1], selection=LabelSelection(top=2)))
    assert [(x.head, x.index) for x in result.labels][:1] and {x.head for x in result.labels} == {"pitch"}
    assert len(result.labels) == 2
    alone = next(Tagger.load(str(root / "pitch")).classify(setup["clips"][:1], selection=LabelSelection(top=2)))
    assert [x.label for x in alone.labels] == [x.label for x in result.labels]


def test_28_a_head_from_another_base_is_refused_with_exit_2_before_any_output(setup, tmp_path, monkeypatch):
    import ast_cli.audio.sources as sources

    def no_audio(*args, **kwargs):
        raise AssertionError("audio was read")

    monkeypatch.setattr(sources.FileSource, "blocks", no_audio)
    for out in (tmp_path / "tags.jsonl", tmp_path / "tags.csv"):
        result = runner.invoke(app, ["classify", *setup["clips"], "--model", str(setup["base"]), "--head",
                                     str(setup["root"] / "pitch"), "--head", str(setup["root"] / "foreign"),
                                     "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert "was trained on another base model" in result.stderr and "Hint: classify with --model" in result.stderr
        assert not out.exists()
    result = runner.invoke(app, ["classify", *setup["clips"], "--model", str(setup["base"]), "--head",
                                 str(setup["root"] / "foreign"), "--output-dir", str(tmp_path / "per-file")])
    assert result.exit_code == 2 and not (tmp_path / "per-file").exists()


def test_28_a_missing_folder_or_a_non_head_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch):
    from ast_cli.run.tagger import Tagger

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Tagger, "load", no_model)
    for head, why in ((tmp_path / "nowhere", "no such head folder"), (setup["base"], "is not a head")):
        result = runner.invoke(app, ["classify", *setup["clips"], "--model", str(setup["base"]), "--head", str(head),
                                     "-o", str(tmp_path / "tags.jsonl")])
        assert result.exit_code == 2 and why in result.stderr, result.output
        assert not (tmp_path / "tags.jsonl").exists()
    result = runner.invoke(app, ["classify", *setup["clips"], "--model", str(setup["base"]), "--no-base-head"])
    assert result.exit_code == 2 and "--no-base-head" in result.stderr
    (tmp_path / "twin").mkdir()
    for name in ("head.json", "head.safetensors"):
        (tmp_path / "twin" / name).write_bytes((setup["root"] / "pitch" / name).read_bytes())
    twin = json.loads((tmp_path / "twin" / "head.json").read_text()) | {"name": "pitch"}
    (tmp_path / "twin" / "head.json").write_text(json.dumps(twin))
    result = runner.invoke(app, ["classify", *setup["clips"], "--model", str(setup["base"]), "--head",
                                 str(setup["root"] / "pitch"), "--head", str(tmp_path / "twin")])
    assert result.exit_code == 2 and "two heads are named 'pitch'" in result.stderr


def test_28_top_threshold_and_include_apply_per_head(setup):
    root, clip = setup["root"], setup["clips"][0]
    args = ["--model", str(setup["base"]), "--head", str(root / "pitch"), "--head", str(root / "mix")]
    top = runner.invoke(app, ["classify", clip, *args, "-f", "json", "--top", "1", "--quiet"])
    assert [x["head"] for x in json.loads(top.stdout)[0]["labels"]] == ["tiny", "pitch", "mix"]
    only = runner.invoke(app, ["classify", clip, *args, "-f", "json", "--include", "pitch:high", "--include", "Speech",
                               "--quiet"])
    assert [(x["head"], x["label"]) for x in json.loads(only.stdout)[0]["labels"]] == [("tiny", "Speech"),
                                                                                       ("pitch", "high")]
    both = runner.invoke(app, ["classify", clip, *args, "-f", "json", "--include", "high", "--quiet"])
    assert [(x["head"], x["label"]) for x in json.loads(both.stdout)[0]["labels"]] == [("pitch", "high"), ("mix", "high")]
    unknown = runner.invoke(app, ["classify", clip, *args, "--include", "pitch:hihg"])
    assert unknown.exit_code == 2 and "did you mean 'pitch:high'" in unknown.stderr


def test_28_every_output_format_names_the_head(setup, tmp_path):
    root, clip = setup["root"], setup["clips"][0]
    args = [clip, "--model", str(setup["base"]), "--head", str(root / "pitch"), "--top", "1", "--quiet"]
    csv = runner.invoke(app, ["classify", *args, "-f", "csv"]).stdout.splitlines()
    assert csv[0] == "path,duration,rank,head,label,index,score,error"
    assert [row.split(",")[3] for row in csv[1:]] == ["tiny", "pitch"] and all(r.split(",")[2] == "1" for r in csv[1:])
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    import csv as csvlib

    header, row = csvlib.reader(runner.invoke(app, ["classify", str(broken), *args[1:], "-f", "csv"]).stdout.splitlines())
    assert len(row) == len(header) and row[2:-1] == [""] * 5 and "not audio" in row[-1]  # the error in its column
    tsv = runner.invoke(app, ["classify", *args, "-f", "tsv"]).stdout.splitlines()
    assert tsv[0].split("\t")[3] == "head"
    table = runner.invoke(app, ["classify", *args, "-f", "table"]).stdout
    assert table.index("\ntiny ") < table.index("\npitch ") and table.count("rank") == 2
    for fmt, suffix in (("audacity", ".txt"), ("raven", ".selections.txt")):
        out = tmp_path / fmt
        assert runner.invoke(app, ["classify", *args, "-f", fmt, "--output-dir", str(out)]).exit_code == 0
        text = next(p for p in out.rglob("*") if p.is_file()).read_text()
        assert "\tpitch:" in text and "\ttiny:" in text, text
    lines = runner.invoke(app, ["classify", *args, "-f", "jsonl"]).stdout.splitlines()
    record = json.loads(lines[0])
    assert [x["head"] for x in record["labels"]] == ["tiny", "pitch"] and record["settings"]["heads"] == ["tiny", "pitch"]


def test_28_resume_refuses_records_made_with_other_heads(setup, tmp_path):
    root, out = setup["root"], tmp_path / "tags.jsonl"
    first = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "-o", str(out), "--quiet"])
    assert first.exit_code == 0
    before = out.read_bytes()
    again = runner.invoke(app, ["classify", *setup["clips"], "--model", str(setup["base"]), "--head",
                                str(root / "pitch"), "-o", str(out), "--resume", "--quiet"])
    assert again.exit_code != 0 and "heads" in again.stderr and out.read_bytes() == before


def test_28_listen_runs_heads_on_the_same_windows(setup):
    clip = setup["clips"][0]
    data = open(clip, "rb").read()
    args = ["listen", "-", "--model", str(setup["base"]), "-f", "jsonl", "--hop", "0.32", "--quiet"]
    joint = runner.invoke(app, [*args, "--head", str(setup["root"] / "pitch"), "--top", "0"], input=data)
    alone = runner.invoke(app, ["listen", "-", "--model", str(setup["root"] / "pitch"), "-f", "jsonl", "--hop", "0.32",
                                "--quiet", "--top", "0"], input=data)
    assert joint.exit_code == 0 and alone.exit_code == 0, joint.stderr + alone.stderr
    for mine, theirs in zip(map(json.loads, joint.stdout.splitlines()), map(json.loads, alone.stdout.splitlines())):
        got, want = by_label(mine["labels"], "pitch"), by_label(theirs["labels"], None)
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=JOINT, rtol=0)
        assert by_label(mine["labels"], "tiny")
    events = runner.invoke(app, [*args, "--head", str(setup["root"] / "pitch"), "--no-base-head", "--events",
                                 "--threshold", "0.3"], input=data)
    lines = events.stdout.splitlines()  # softmax over 3 labels: one is always >= 1/3
    assert events.exit_code == 0 and lines and all(json.loads(x)["label"].startswith("pitch:") for x in lines)


def test_28_heads_run_on_a_bare_encoder_of_the_same_base(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    encoder = tmp_path / "encoder"
    encoder.mkdir()
    state = {k: v for k, v in load_file(setup["base"] / "model.safetensors").items() if not k.startswith("classifier.")}
    save_file(state, encoder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((setup["base"] / "config.json").read_text())
    for key in ("id2label", "label2id"):
        config.pop(key)
    (encoder / "config.json").write_text(json.dumps(config))
    (encoder / "preprocessor_config.json").write_bytes((setup["base"] / "preprocessor_config.json").read_bytes())
    joint = classify(setup["clips"][0], "--model", str(encoder), "--head", str(setup["root"] / "pitch"))
    assert {x["head"] for x in joint[0]["labels"]} == {"pitch"}
    alone = classify(setup["clips"][0], "--model", str(setup["root"] / "pitch"))
    np.testing.assert_allclose([by_label(joint[0]["labels"], "pitch")[k] for k in ("high", "low", "noise")],
                               [by_label(alone[0]["labels"], None)[k] for k in ("high", "low", "noise")], atol=JOINT)


def test_28_calibrated_thresholds_apply_per_head(setup, tmp_path):
    """--threshold calibrated with --head: each head's labels take the thresholds in its own folder's
    thresholds.json; the model's own labels (no thresholds file) go by --top. A label set high disappears, one
    set low appears beyond --top (a multi-label head: a single-label one whose best label is under its threshold
    reports none, test below)."""
    import shutil

    from ast_cli.run.thresholds import write_thresholds

    head = tmp_path / "mix"
    shutil.copytree(setup["root"] / "mix", head)
    labels = json.loads((head / "head.json").read_text())["labels"]
    alone = classify(setup["clips"][0], "--model", str(setup["base"]), "--head", str(head), "--aggregate", "mean")
    ranked = [x["label"] for x in alone[0]["labels"] if x["head"] == "mix"]  # best first
    assert len(ranked) == len(labels) >= 2
    high, low = ranked[0], ranked[-1]
    activation = "softmax" if json.loads((head / "head.json").read_text())["problem_type"].startswith("single") \
        else "sigmoid"
    write_thresholds(str(head / "thresholds.json"), {"thresholds": {high: 1.0, low: 0.0}, "activation": activation,
                                                     "aggregate": "mean"})
    result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "--head", str(head),
                                 "--top", "1", "--threshold", "calibrated", "-f", "json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    joint = json.loads(result.stdout)
    picked = {(x["head"], x["label"]) for x in joint[0]["labels"]}
    assert ("mix", low) in picked and ("mix", high) not in picked, picked
    base = [x for x in joint[0]["labels"] if x["head"] != "mix"]
    assert len(base) == 1  # the model's own labels, without thresholds: --top 1
    result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "--head",
                                 str(setup["root"] / "pitch"), "--threshold", "calibrated", "-o",
                                 str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "nor any --head folder has a thresholds.json" in result.stderr, result.output
    assert not (tmp_path / "none.jsonl").exists()


def test_28_heads_calibrated_on_different_aggregates_are_named_in_the_refusal(setup, tmp_path):
    """#28 walk: a calibrated single-label head (mean scores) next to a calibrated multi-label one (max) was refused
    with "the thresholds files were chosen on different aggregates (max and mean)": which files, and what then?"""
    import shutil

    from ast_cli.run.thresholds import write_thresholds

    heads = []
    for name, activation, aggregate in (("pitch", "softmax", "mean"), ("mix", "sigmoid", "max")):
        shutil.copytree(setup["root"] / name, tmp_path / name)
        labels = json.loads((tmp_path / name / "head.json").read_text())["labels"]
        write_thresholds(str(tmp_path / name / "thresholds.json"), {"thresholds": dict.fromkeys(labels, 0.5),
                                                                     "activation": activation, "aggregate": aggregate})
        heads += ["--head", str(tmp_path / name)]
    result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), *heads,
                                 "--threshold", "calibrated", "--quiet"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"Error: --aggregate: the thresholds in {tmp_path / 'pitch' / 'thresholds.json'} were chosen on mean scores "
        f"and those in {tmp_path / 'mix' / 'thresholds.json'} on max: one run scores each file one way",
        "Hint: apply them in separate runs (a head without a thresholds.json, or the model without one, goes by --top)"]


def test_28_records_name_each_heads_activation_when_they_differ(setup, tmp_path):
    root, base = setup["root"], setup["base"]
    heads = ["--head", str(root / "pitch"), "--head", str(root / "mix")]
    [record] = classify(setup["clips"][0], "--model", str(base), *heads)
    assert record["settings"]["activation"] == f"{base.name}:sigmoid,pitch:softmax,mix:sigmoid"
    [record] = classify(setup["clips"][0], "--model", str(base), *heads, "--activation", "sigmoid")
    assert record["settings"]["activation"] == "sigmoid"
    out = tmp_path / "tags.jsonl"
    first = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(base), *heads, "-o", str(out), "--quiet"])
    assert first.exit_code == 0, first.stderr
    other = runner.invoke(app, ["classify", *setup["clips"], "--model", str(base), *heads, "--activation", "sigmoid",
                                "-o", str(out), "--resume", "--quiet"])
    assert other.exit_code == 2 and "activation" in other.stderr


def test_28_a_single_label_head_under_its_best_labels_threshold_reports_none_next_to_other_heads():
    from ast_cli.run.tagger import HeadPart, LabelSelection, Scorer

    parts = (HeadPart("base", ("a", "b"), False, 0), HeadPart("birds", ("robin", "wren", "owl"), True, 2))
    selection = LabelSelection(top=1).calibrated_parts(parts, [None, {"robin": 0.7, "wren": 0.2, "owl": 0.9}])
    scorer = Scorer(parts, selection, None)
    unsure = np.array([0.9, 0.1, 0.5, 0.3, 0.2])  # robin best but under 0.7; wren reaches its own 0.2
    assert [(x.head, x.label) for x in scorer.select(unsure)] == [("base", "a")]  # not forced into wren
    sure = np.array([0.9, 0.1, 0.75, 0.25, 0.0])
    assert [(x.head, x.label) for x in scorer.select(sure)] == [("base", "a"), ("birds", "robin"), ("birds", "wren")]
    alone = Scorer([HeadPart(None, parts[1].labels, True)], LabelSelection(top=1).calibrated(parts[1].labels, {"robin": 0.7, "wren": 0.2}), None)
    assert scorer.select(unsure)[1:] == alone.select(unsure[2:]) == []  # a window of a single-label model alone too


def copy_head(setup, folder, **changes):
    """A copy of the ``pitch`` head in ``folder`` (a path), its head.json changed by ``changes``."""
    folder.mkdir()
    for name in ("head.json", "head.safetensors"):
        (folder / name).write_bytes((setup["root"] / "pitch" / name).read_bytes())
    config = json.loads((folder / "head.json").read_text()) | changes
    (folder / "head.json").write_text(json.dumps(config))
    return folder


def test_28_a_head_named_as_the_models_own_labels_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch):
    # Two heads of one name: the records, --include HEAD:LABEL and the thresholds (the model's labels took the
    # head's thresholds.json) could not tell them apart.
    from ast_cli.run.tagger import Tagger
    from ast_cli.run.thresholds import write_thresholds

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    twin = copy_head(setup, tmp_path / setup["base"].name)
    write_thresholds(str(twin / "thresholds.json"), {"thresholds": {"high": 0.5}, "activation": "softmax",
                                                     "aggregate": "max"})
    monkeypatch.setattr(Tagger, "load", no_model)
    out = tmp_path / "tags.jsonl"
    for extra in ([], ["--threshold", "calibrated"]):
        result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "--head", str(twin),
                                     "-o", str(out), *extra])
        assert result.exit_code == 2 and "as the model's own labels are" in result.stderr, result.output
        assert not out.exists()


def test_28_a_head_name_with_a_colon_or_a_control_character_and_a_nan_eps_are_refused(setup, tmp_path):
    # head:label must read one way in Audacity, Raven and --include; NaN eps scored every file NaN (blamed on audio)
    cases = [(copy_head(setup, tmp_path / "birds:v2"), "the folder's name 'birds:v2' cannot name a head"),
             (copy_head(setup, tmp_path / "a\tb"), "cannot name a head"),
             (copy_head(setup, tmp_path / "named", name="birds:v2"), "name must be printable"),
             (copy_head(setup, tmp_path / "eps", layer_norm_eps=float("nan")),
              "layer_norm_eps must be a number above 0")]
    for head, message in cases:
        result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "--head", str(head),
                                     "-o", str(tmp_path / "tags.jsonl")])
        assert result.exit_code == 2 and message in result.stderr, (head, result.output)
        assert not (tmp_path / "tags.jsonl").exists()
    renamed = copy_head(setup, tmp_path / "birds:v3", name="birds-v3")  # the fix the message names
    assert {x["head"] for x in classify(setup["clips"][0], "--model", str(setup["base"]), "--head", str(renamed),
                                        "--no-base-head")[0]["labels"]} == {"birds-v3"}


def test_28_tagger_load_takes_one_head_given_as_a_path_not_its_characters(setup):
    from ast_cli import Tagger

    for head in (str(setup["root"] / "pitch"), setup["root"] / "pitch"):
        assert [h.name for h in Tagger.load(str(setup["base"]), heads=head).heads] == ["pitch"]
    assert Tagger.load(str(setup["base"]), heads=None).heads == ()  # None: no head, as an empty list


def test_28_labels_are_shown_as_they_are_not_as_rich_markup_or_emoji(setup, tmp_path):
    # a head's labels are its training folders' names: "[/]" crashed the table (MarkupError), ":x:" became an emoji
    head = copy_head(setup, tmp_path / "odd", labels=["[/]", "a:x:b", "[red]c"])
    result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "--head", str(head),
                                 "--no-base-head", "-f", "table", "--top", "0", "--segments", "--quiet"])
    assert result.exit_code == 0, result.output
    assert all(label in result.stdout for label in ("[/]", "a:x:b", "[red]c", "odd:[/]")), result.stdout
    broken = tmp_path / "bad:x:.wav"
    broken.write_bytes(b"not audio")
    failed = runner.invoke(app, ["classify", str(broken), "--model", str(setup["base"]), "--quiet", "-f", "jsonl"])
    assert failed.exit_code == 1 and f"error: {broken}:" in failed.stderr, failed.stderr


def test_28_a_head_json_with_twin_or_unprintable_labels_is_refused(setup, tmp_path):
    # thresholds, --include and search find a label by name (twins: the first hid the second); a newline or tab in a
    # label split an Audacity or Raven line
    cases = [(["high", "high", "low"], "labels must be distinct"), (["high", "lo\nw", "noise"], "printable names"),
             (["high", "", "noise"], "printable names")]
    for i, (labels, message) in enumerate(cases):
        head = copy_head(setup, tmp_path / f"h{i}", labels=labels)
        result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "--head", str(head)])
        assert result.exit_code == 2 and message in result.stderr, (labels, result.output)


def test_28_a_single_label_head_alone_that_is_none_of_these_keeps_the_csv_columns(setup, tmp_path):
    # --no-base-head with one single-label head under its thresholds: the none-of row put "(none of these)" in the head
    # column and was one field short of the header
    import csv as csvlib

    from ast_cli.run.thresholds import write_thresholds

    head = copy_head(setup, tmp_path / "strict")
    write_thresholds(str(head / "thresholds.json"), {"thresholds": dict.fromkeys(("high", "low", "noise"), 1.0),
                                                     "activation": "softmax", "aggregate": "mean"})
    for extra in ([], ["--segments"]):
        result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "--head", str(head),
                                     "--no-base-head", "--threshold", "calibrated", "-f", "csv", "--quiet", *extra])
        assert result.exit_code == 0, result.output
        header, *lines = list(csvlib.reader(result.stdout.splitlines()))
        assert lines and all(len(line) == len(header) for line in lines), result.stdout
        assert dict(zip(header, lines[0]))["label"] == "(none of these)", result.stdout


def test_28_a_head_of_another_width_than_the_model_is_refused_before_any_output(setup, tmp_path):
    # its head.json names this base (the fingerprint matches) but its tensors take 16-wide embeddings: every file
    # failed with a RuntimeError about tensor sizes, listen with an unexpected error
    from safetensors.torch import load_file, save_file

    head = copy_head(setup, tmp_path / "narrow", hidden_size=16)
    tensors = load_file(head / "head.safetensors")
    save_file({k: v if k == "classifier.dense.bias" else v[..., :16].contiguous() for k, v in tensors.items()},
              head / "head.safetensors", metadata={"format": "pt"})
    out = tmp_path / "tags.jsonl"
    result = runner.invoke(app, ["classify", *setup["clips"], "--model", str(setup["base"]), "--head", str(head),
                                 "-o", str(out)])
    assert result.exit_code == 2 and "takes 16-wide embeddings" in result.stderr, result.output
    assert not out.exists()


def test_28_a_heads_thresholds_of_labels_it_lacks_name_the_head_and_the_file(setup, tmp_path):
    # it said "which the model does not have" under --thresholds, though the file was the head's own thresholds.json
    from ast_cli.run.thresholds import write_thresholds

    head = copy_head(setup, tmp_path / "birds")
    write_thresholds(str(head / "thresholds.json"), {"thresholds": {"high": 0.5, "Speech": 0.5},
                                                     "activation": "softmax", "aggregate": "max"})
    result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "--head", str(head),
                                 "--threshold", "calibrated", "-o", str(tmp_path / "tags.jsonl")])
    assert result.exit_code == 2 and result.stderr.startswith(
        f"Error: --head: the calibrated thresholds in {head / 'thresholds.json'} name label 'Speech', which head "
        "birds does not have"), result.stderr
    assert not (tmp_path / "tags.jsonl").exists()


def test_28_no_base_head_with_calibrated_thresholds_needs_a_heads_own(setup, tmp_path):
    # the model's thresholds.json was read and applied to nothing: the heads went by --top, exit 0, as if calibrated
    from ast_cli.run.thresholds import write_thresholds

    model = tmp_path / "base"
    model.mkdir()
    for path in setup["base"].iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    write_thresholds(str(model / "thresholds.json"), {"thresholds": {"Speech": 0.5}, "activation": "sigmoid",
                                                      "aggregate": "max"})
    args = ["classify", setup["clips"][0], "--model", str(model), "--head", str(setup["root"] / "pitch"),
            "--no-base-head", "--threshold", "calibrated", "-o", str(tmp_path / "tags.jsonl")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "no --head folder has a thresholds.json" in result.stderr, result.output
    result = runner.invoke(app, [*args, "--thresholds", str(model / "thresholds.json")])
    assert result.exit_code == 2 and "--no-base-head leaves out" in result.stderr, result.output
    assert not (tmp_path / "tags.jsonl").exists()


def test_s8_13_a_head_json_base_not_an_object_names_the_file_and_an_int_eps_is_a_number(setup, tmp_path):
    """s8 #13: ``"base": "x"`` gave "unexpected error: AttributeError" (exit 1); ``"layer_norm_eps": 1`` was
    refused as "must be a number above 0"."""
    for i, (changes, message) in enumerate([({"base": "x"}, "base must name its model and backbone_sha256"),
                                            ({"layer_norm_eps": 10 ** 400}, "layer_norm_eps must be a number above 0"),
                                            ({"layer_norm_eps": True}, "layer_norm_eps must be a number above 0")]):
        head = copy_head(setup, tmp_path / f"h{i}", **changes)
        result = runner.invoke(app, ["classify", setup["clips"][0], "--model", str(setup["base"]), "--head", str(head)])
        assert result.exit_code == 2 and result.stderr.splitlines()[0] == f"Error: {head / 'head.json'}: {message}"
    heads = [copy_head(setup, tmp_path / name, layer_norm_eps=eps) for name, eps in (("int", 1), ("float", 1.0))]
    scores = [[(x["label"], x["score"]) for x in classify(setup["clips"][0], "--model", str(setup["base"]), "--head",
                                                          str(head), "--no-base-head")[0]["labels"]] for head in heads]
    assert scores[0] == scores[1] and len(scores[0]) == 3
