"""Issue #28, part 2: calibrated thresholds. ``ast evaluate --calibrate`` chooses a threshold per label on labeled
data and writes ``thresholds.json``; ``--threshold calibrated`` applies it. Data: tones whose pitch ranges overlap,
in noise, so that a head trained on them is good but not perfect (a threshold has something to do)."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from ast_cli.cli import app
from ast_cli.run.thresholds import read_thresholds, write_thresholds
from ast_cli.tasks.calibrate import Target, calibrate
from ast_cli.tasks.metrics import Scored
from test_train import base  # noqa: F401 - the fixture: a small random AST whose embeddings depend on the input

RATE = 16000
PITCH = {"low": (200, 500), "mid": (420, 950), "high": (800, 1800)}  # Hz; neighbours overlap
runner = CliRunner()


def clip(kind: str, rng: np.random.Generator) -> np.ndarray:
    """0.6 s (one window of the base) of a tone of ``kind``'s pitch range, random gain, in noise."""
    t = np.arange(int(0.6 * RATE)) / RATE
    tone = np.sin(2 * np.pi * rng.uniform(*PITCH[kind]) * t) * rng.uniform(0.1, 0.5)
    return (tone + rng.uniform(0.05, 0.3) * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Three single-label folders of the same classes: train, calib (to choose thresholds on), test (held out)."""
    root = tmp_path_factory.mktemp("pitch")
    rng = np.random.default_rng(28)
    for split, count in (("train", 30), ("calib", 60), ("test", 60)):
        for kind in PITCH:
            (root / split / kind).mkdir(parents=True)
            for i in range(count):
                sf.write(str(root / split / kind / f"{i:02d}.wav"), clip(kind, rng), RATE)
    return root


@pytest.fixture(scope="module")
def head(base, splits, tmp_path_factory):  # noqa: F811 - ``base`` is the imported fixture
    out = tmp_path_factory.mktemp("head") / "pitch-ast"
    result = runner.invoke(app, ["train", str(splits / "train"), "--out", str(out), "--model", str(base[0]),
                                 "--quiet"])
    assert result.exit_code == 0, result.stderr
    return out


def scores_of(model, folder, *extra) -> dict[str, list]:
    """``ast classify`` of every clip in ``folder``: path -> its record."""
    result = runner.invoke(app, ["classify", str(folder), "--model", str(model), "-f", "json", "--quiet", *extra])
    assert result.exit_code == 0, result.stderr
    return {record["path"]: record for record in json.loads(result.stdout)}


def test_28_2_thresholds_on_hand_counts():
    scored = Scored(np.array([[0.9], [0.8], [0.7], [0.6], [0.5]]), np.array([[1], [1], [0], [1], [0]]), ("a",),
                    ["1", "2", "3", "4", "5"], True, [])
    # kept top n: precision 1, 1, 2/3, 3/4, 3/5; recall 1/3, 2/3, 2/3, 1, 1
    by = {text: calibrate(scored, Target.parse(text), min_positives=1)[0]
          for text in ("precision=0.75", "precision=1", "recall=0.6", "f1")}
    assert by["precision=0.75"].threshold == pytest.approx(0.55) and by["precision=0.75"].recall == 1.0
    assert by["precision=1"].threshold == pytest.approx(0.75) and by["precision=1"].precision == 1.0
    assert by["recall=0.6"].threshold == pytest.approx(0.75)  # the highest threshold with recall >= 0.6
    assert by["f1"].threshold == pytest.approx(0.55) and by["f1"].f1 == pytest.approx(6 / 7)
    tied = Scored(np.array([[0.9], [0.9], [0.1]]), np.array([[1], [0], [1]]), ("a",), ["1", "2", "3"], True, [])
    unreachable = calibrate(tied, Target.parse("precision=1"), min_positives=1)[0]
    assert unreachable.status == "unreachable" and unreachable.best == pytest.approx(2 / 3)  # no cut between ties
    assert calibrate(tied, Target.parse("f1"), min_positives=3)[0].status == "too few positives"
    none = Scored(np.array([[0.9], [0.1]]), np.zeros((2, 1)), ("a",), ["1", "2"], True, [])
    assert calibrate(none, Target.parse("f1"))[0].status == "no positives"
    absent = calibrate(tied, Target.parse("f1"), min_positives=1, every_label=("b", "a"))  # b: the model's only
    assert [(r.label, r.status) for r in absent] == [("a", "calibrated"), ("b", "no positives")]


def test_28_2_calibration_report_lines_are_not_wrapped_when_piped(capsys):
    """#28 walk: ``ast evaluate AUDIOSET_MODEL DATA --calibrate f1 > report.txt`` split its "no positive file" line
    (and a long thresholds path) in two at column 160: one message is one line whatever its length."""
    from ast_cli.cli._render import print_calibration

    absent = ["Speech", "Male speech, man speaking", "Female speech, woman speaking", "Child speech, kid speaking",
              "Conversation", *(f"label {i}" for i in range(519))]  # an AudioSet model calibrated for a few labels
    labels = [{"label": "Dog", "status": "calibrated", "positives": 12, "threshold": 0.5, "precision": 1.0,
               "recall": 0.5, "f1": 0.6667, "best": None}]
    labels += [{"label": name, "status": "no positives", "positives": 0, "threshold": None, "precision": None,
                "recall": None, "f1": None, "best": None} for name in absent]
    where = "/data/" + "a-long-folder-name/" * 10 + "thresholds.json"
    print_calibration({"target": "f1", "min_positives": 10, "thresholds_file": where, "labels": labels})
    lines = capsys.readouterr().out.splitlines()
    assert f"no positive file in DATA, so no threshold: {', '.join(absent[:5])} and 519 more" in lines
    assert f"1 of 525 labels calibrated: {where}" in lines


def test_28_2_calibration_to_precision_holds_on_a_held_out_split(head, splits):
    result = runner.invoke(app, ["evaluate", str(head), str(splits / "calib"), "--calibrate", "precision=0.9",
                                 "-f", "json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["calibration"]
    saved = json.loads((head / "thresholds.json").read_text())
    assert report["thresholds_file"] == str(head / "thresholds.json") and saved["target"] == "precision=0.9"
    assert saved["data"]["files"] == 180 and saved["data"]["paths"] == [os.path.realpath(splits / "calib")]
    assert saved["activation"] == "softmax" and saved["aggregate"] == "mean"
    calibrated = [r for r in report["labels"] if r["status"] == "calibrated"]
    assert set(saved["thresholds"]) == {r["label"] for r in calibrated} and len(calibrated) >= 2, report
    for row in report["labels"]:  # a label that cannot reach 0.9 is named, with the best it can do, and left out
        assert row["status"] == "calibrated" or (row["status"] == "unreachable" and row["best"] < 0.9), row
    kept_calib = sum(round(r["recall"] * r["positives"] / r["precision"]) for r in calibrated)
    # Held out: clips each label's threshold keeps, and how many of them are that label.
    records = scores_of(head, splits / "test", "--top", "0")
    kept = correct = 0
    for path, record in records.items():
        truth = os.path.basename(os.path.dirname(path))
        for x in record["labels"]:
            if x["label"] in saved["thresholds"] and x["score"] >= saved["thresholds"][x["label"]]:
                kept, correct = kept + 1, correct + (x["label"] == truth)
    # Noise: the calibration split's precision at the chosen thresholds and the held-out one are each a binomial
    # proportion over the clips kept (kept_calib, kept): 3 standard errors of their difference, at p = 0.9.
    allowance = 3 * math.sqrt(0.9 * 0.1 * (1 / kept_calib + 1 / kept))
    assert kept >= 20, kept  # enough kept clips for the bound to mean something
    assert correct / kept >= 0.9 - allowance, (correct, kept, allowance)
    # the thresholds did the work: the best label of each clip, for the same labels, is less precise
    best = [r["labels"][0]["label"] == os.path.basename(os.path.dirname(p)) for p, r in records.items()
            if r["labels"][0]["label"] in saved["thresholds"]]
    assert np.mean(best) < correct / kept, (np.mean(best), correct / kept)


def test_28_2_threshold_calibrated_applies_the_written_thresholds(tiny_checkpoint, tmp_path):
    clip_path = tmp_path / "a.wav"
    sf.write(str(clip_path), clip("mid", np.random.default_rng(1)), RATE)
    model = tiny_checkpoint[0]
    ranked = scores_of(model, clip_path, "--top", "0")[str(clip_path)]["labels"]
    first, last = ranked[0], ranked[-1]
    thresholds = tmp_path / "t.json"
    write_thresholds(str(thresholds), {"thresholds": {first["label"]: min(1.0, first["score"] + 1e-6),
                                                     last["label"]: max(0.0, last["score"] - 1e-6)},
                                       "activation": "sigmoid", "aggregate": "max"})
    got = scores_of(model, clip_path, "--threshold", "calibrated", "--thresholds", str(thresholds), "--top", "2")
    labels = [x["label"] for x in got[str(clip_path)]["labels"]]
    # the best label is under its own threshold: gone; the worst reaches its own: there, whatever --top says;
    # the rest are uncalibrated and go by --top 2
    assert first["label"] not in labels and last["label"] in labels
    assert labels[:2] == [ranked[1]["label"], ranked[2]["label"]] and len(labels) == 3
    numeric = scores_of(model, clip_path, "--threshold", f"calibrated:{ranked[1]['score']}", "--thresholds",
                        str(thresholds))
    assert [x["label"] for x in numeric[str(clip_path)]["labels"]] == [ranked[1]["label"], last["label"]]


def test_28_2_thresholds_of_another_model_are_refused_for_their_labels_not_their_activation(tiny_checkpoint,
                                                                                             tmp_path):
    """#28 walk: ``--thresholds birds.json`` of another model (other labels, other activation) said "use
    --activation sigmoid", and doing so only led to "names label 'Bird', which the model does not have"."""
    clip_path = tmp_path / "clip.wav"
    sf.write(str(clip_path), np.zeros(16000, np.float32), 16000)
    thresholds = tmp_path / "frogs.json"
    write_thresholds(str(thresholds), {"thresholds": {"croak": 0.5, "trill": 0.4}, "activation": "softmax",
                                       "aggregate": "max"})
    result = runner.invoke(app, ["classify", str(clip_path), "--model", str(tiny_checkpoint[0]), "--threshold",
                                 "calibrated", "--thresholds", str(thresholds), "--quiet"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"Error: --thresholds: the calibrated thresholds in {thresholds} name "
                                          "label 'croak', which the model does not have (and 1 more)"]


def test_28_2_a_single_label_clip_under_its_threshold_is_none_of_these(head, splits, tmp_path):
    folder = splits / "test" / "mid"
    strict, loose = tmp_path / "strict.json", tmp_path / "loose.json"
    for path, value in ((strict, 1.0), (loose, 0.0)):
        write_thresholds(str(path), {"thresholds": dict.fromkeys(PITCH, value), "activation": "softmax",
                                     "aggregate": "mean"})
    none = scores_of(head, folder, "--threshold", "calibrated", "--thresholds", str(strict))
    assert all(r["labels"] == [] and r["none_of"] is True for r in none.values())
    some = scores_of(head, folder, "--threshold", "calibrated", "--thresholds", str(loose))
    assert all(r["labels"] and "none_of" not in r for r in some.values())
    table = runner.invoke(app, ["classify", str(folder / "00.wav"), "--model", str(head), "-f", "csv", "--quiet",
                                "--threshold", "calibrated", "--thresholds", str(strict)])
    assert table.stdout.splitlines()[1].split(",")[3] == "(none of these)", table.stdout


def test_28_2_refusals_exit_2_and_write_nothing(head, splits, tmp_path, monkeypatch):
    import ast_cli.cli.train as cli_train
    import ast_cli.cli.classify as cli_classify

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(cli_train, "load_tagger", no_model)
    monkeypatch.setattr(cli_classify, "load_tagger", no_model)
    model = tmp_path / "model"
    shutil.copytree(head, model)
    (model / "thresholds.json").unlink(missing_ok=True)
    calib = str(splits / "calib")
    hub_cache = os.path.join(os.environ["HF_HOME"], "hub")
    os.makedirs(hub_cache, exist_ok=True)
    evaluate_cases = [
        (["MIT/ast-finetuned-audioset-10-10-0.4593", calib, "--calibrate", "f1"], "--thresholds-out: "),
        ([str(model), calib, "--calibrate", "precision=2"], "--calibrate: the precision must be"),
        ([str(model), calib, "--calibrate", "accuracy"], "--calibrate: 'accuracy' is not a target"),
        ([str(model), calib, "--thresholds-out", str(tmp_path / "t.json")], "--thresholds-out is where"),
        ([str(model), calib, "--calibrate", "f1", "--thresholds-out", os.path.join(hub_cache, "t.json")],
         "is in the hub cache"),
        ([str(model), calib, "--calibrate", "f1", "--thresholds-out", str(tmp_path / "no" / "t.json")],
         "does not exist"),
    ]
    for args, message in evaluate_cases:
        result = runner.invoke(app, ["evaluate", *args])
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
    bad_json, not_ours, other_labels = tmp_path / "bad.json", tmp_path / "x.json", tmp_path / "other.json"
    bad_json.write_text("{")
    not_ours.write_text('{"thresholds": {}}')
    write_thresholds(str(other_labels), {"thresholds": {"Speech": 0.5}, "activation": "softmax",
                                         "aggregate": "mean"})
    out = tmp_path / "tags.json"
    clip_path = str(splits / "test" / "low" / "00.wav")
    classify_cases = [
        ([], "--threshold: " + f"{model} has no thresholds.json"),
        (["--thresholds", str(bad_json)], "is not JSON"),
        (["--thresholds", str(not_ours)], "is not a thresholds file of this tool"),
        (["--thresholds", str(tmp_path / "missing.json")], "cannot read"),
        (["--thresholds", str(other_labels)], "which the model does not have"),
        (["--thresholds", str(other_labels), "--activation", "sigmoid"], "--activation: the thresholds in"),
        (["--thresholds", str(other_labels), "--aggregate", "max"], "--aggregate: the thresholds in"),
    ]
    for extra, message in classify_cases:
        result = runner.invoke(app, ["classify", clip_path, "--model", str(model), "--threshold", "calibrated",
                                     "-o", str(out), *extra])
        assert result.exit_code == 2 and message in result.stderr, (extra, result.stderr)
    for extra, message in ((["--threshold", "calibratd"], "--threshold: must be a score P, calibrated"),
                           (["--thresholds", str(other_labels)], "--thresholds is read by --threshold calibrated")):
        result = runner.invoke(app, ["classify", clip_path, "--model", str(model), "-o", str(out), *extra])
        assert result.exit_code == 2 and message in result.stderr, (extra, result.stderr)
    assert not out.exists() and sorted(p.name for p in model.iterdir()) == sorted(p.name for p in head.iterdir()
                                                                                    if p.name != "thresholds.json")
    assert os.listdir(hub_cache) == [] and not (tmp_path / "t.json").exists()


def test_28_2_a_model_folder_that_cannot_be_written_needs_thresholds_out(head, splits, tmp_path, monkeypatch):
    import ast_cli.run.files as files

    model = tmp_path / "model"
    shutil.copytree(head, model)
    (model / "thresholds.json").unlink(missing_ok=True)
    mkstemp = files.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # as a read-only folder answers (chmod does not stop root)
        if os.path.realpath(dir) == os.path.realpath(model):
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    result = runner.invoke(app, ["evaluate", str(model), str(splits / "calib"), "--calibrate", "f1"])
    assert result.exit_code == 2 and "Hint: use --thresholds-out FILE" in result.stderr, result.stderr
    out = tmp_path / "t.json"
    written = runner.invoke(app, ["evaluate", str(model), str(splits / "calib"), "--calibrate", "f1",
                                  "--thresholds-out", str(out), "-f", "json"])
    assert written.exit_code == 0, written.stderr
    assert read_thresholds(str(out)).thresholds and not (model / "thresholds.json").exists()
    tagged = runner.invoke(app, ["classify", str(splits / "test" / "low"), "--model", str(model), "-f", "json",
                                 "--threshold", "calibrated", "--thresholds", str(out), "--quiet"])
    assert tagged.exit_code == 0, tagged.stderr


def test_28_2_a_failed_or_interrupted_evaluate_leaves_the_earlier_thresholds_byte_for_byte(head, splits, tmp_path,
                                                                                            monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(head, model)
    earlier = b'{"format": "ast-cli thresholds", "version": 1, "thresholds": {}, "activation": "softmax"}\n'
    (model / "thresholds.json").write_bytes(earlier)
    files_before = sorted(os.listdir(model))
    unreadable = tmp_path / "unreadable"
    for kind in PITCH:
        (unreadable / kind).mkdir(parents=True)
        (unreadable / kind / "x.wav").write_text("not audio")
    failed = runner.invoke(app, ["evaluate", str(model), str(unreadable), "--calibrate", "f1"])
    assert failed.exit_code == 1 and "could be read" in failed.stderr, failed.stderr
    assert (model / "thresholds.json").read_bytes() == earlier
    import ast_cli.run.files as files

    replace = files.os.replace

    def interrupt(source, target):  # the new file is written in full, then Ctrl-C before it replaces the old one
        if str(target).endswith("thresholds.json"):
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", interrupt)
    interrupted = runner.invoke(app, ["evaluate", str(model), str(splits / "calib"), "--calibrate", "f1"])
    assert interrupted.exit_code == 130 and "Interrupted." in interrupted.stderr, interrupted.stderr
    assert (model / "thresholds.json").read_bytes() == earlier
    assert sorted(os.listdir(model)) == files_before  # no temporary file left
    monkeypatch.undo()
    done = runner.invoke(app, ["evaluate", str(model), str(splits / "calib"), "--calibrate", "f1"])
    assert done.exit_code == 0 and read_thresholds(str(model / "thresholds.json")).thresholds, done.stderr


def test_28_2_listen_events_turn_on_at_each_labels_calibrated_threshold(tiny_checkpoint, tmp_path):
    import io

    buffer = io.BytesIO()
    sf.write(buffer, np.concatenate([clip("low", np.random.default_rng(3))] * 4), RATE, format="WAV")
    thresholds = tmp_path / "t.json"
    write_thresholds(str(thresholds), {"thresholds": {"Speech": 0.0, "Music": 1.0}, "activation": "sigmoid",
                                       "aggregate": "max"})
    # Speech is on from the first window (0 is reached by any score), Music never (its threshold); every other
    # label goes by calibrated:P, a P no score of the tiny model reaches
    result = runner.invoke(app, ["listen", "-", "--model", str(tiny_checkpoint[0]), "--events", "--threshold",
                                 "calibrated:0.999", "--thresholds", str(thresholds), "--quiet"],
                           input=buffer.getvalue())
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["event"], e["label"]) for e in events] == [("onset", "Speech"), ("offset", "Speech")], events


def test_28_2_ray_workers_get_the_calibrated_thresholds_and_none_of_comes_back(head, splits, monkeypatch):
    # The actor and the records it sends back, run in this process: what --engine ray adds is the job's journey.
    import ast_cli.tasks.distributed as distributed
    from ast_cli import RunOptions
    from ast_cli.audio.sources import FileSource
    from ast_cli.run.options import Aggregate
    from ast_cli.run.tagger import LabelSelection

    def in_process(rows, actor, args, settings, per_task):
        batch = {key: [row[key] for row in rows] for key in ("index", "path", "error")}
        yield from (json.loads(record) for record in actor(*args)(batch)["record"])

    monkeypatch.setattr(distributed, "_ray_map", in_process)
    labels = tuple(PITCH)  # the head's labels, sorted as train sorts them
    paths = sorted(str(p) for p in (splits / "test" / "mid").iterdir())[:3]
    for value, none_of in ((1.0, True), (0.0, False)):
        selection = LabelSelection().calibrated(tuple(sorted(labels)), dict.fromkeys(labels, value))
        records = list(distributed.run_ray([FileSource(p) for p in paths], str(head), RunOptions(),
                                           distributed.RaySettings(engine="ray"), selection=selection,
                                           activation=None, aggregate=Aggregate.mean, segments=False))
        results = [distributed.record_to_result(r) for r in records]
        assert [r.none_of for r in results] == [none_of] * 3 and all(bool(r.labels) != none_of for r in results)



def test_28_2_resume_refuses_records_of_another_aggregate(tiny_checkpoint, tmp_path):
    # --threshold calibrated takes the thresholds' aggregate (mean here): appended to records of max scores, one
    # output would have held two kinds of score with nothing to tell them apart
    clips = []
    for i in range(2):
        clips.append(str(tmp_path / f"{i}.wav"))
        sf.write(clips[-1], clip("mid", np.random.default_rng(i)), RATE)
    thresholds, out = tmp_path / "t.json", tmp_path / "tags.jsonl"
    write_thresholds(str(thresholds), {"thresholds": {"Speech": 0.5}, "activation": "sigmoid", "aggregate": "mean"})
    model = ["--model", str(tiny_checkpoint[0]), "-o", str(out), "--quiet"]
    assert runner.invoke(app, ["classify", clips[0], *model]).exit_code == 0
    before = out.read_bytes()
    for extra in (["--threshold", "calibrated", "--thresholds", str(thresholds)], ["--aggregate", "mean"]):
        result = runner.invoke(app, ["classify", *clips, *model, "--resume", *extra])
        assert result.exit_code == 2 and "aggregate max, not mean" in result.stderr, result.stderr
        assert out.read_bytes() == before
    same = runner.invoke(app, ["classify", *clips, *model, "--resume", "--aggregate", "max"])
    assert same.exit_code == 0 and len(out.read_text().splitlines()) == 2, same.stderr


def test_28_2_a_calibration_that_calibrates_no_label_leaves_the_earlier_thresholds_and_exits_1(head, splits, tmp_path):
    # every label short of --min-positives: an empty thresholds.json replaced the earlier one, with exit 0
    model = tmp_path / "model"
    shutil.copytree(head, model)
    earlier = b'{"format": "ast-cli thresholds", "version": 1, "thresholds": {"low": 0.5}}\n'
    (model / "thresholds.json").write_bytes(earlier)
    result = runner.invoke(app, ["evaluate", str(model), str(splits / "calib"), "--calibrate", "f1", "--min-positives",
                                 "1000", "-f", "json"])
    assert result.exit_code == 1 and "no label could be calibrated to f1" in result.stderr, result.stderr
    assert json.loads(result.stdout)["calibration"]["thresholds_file"] is None
    assert (model / "thresholds.json").read_bytes() == earlier


def test_28_2_thresholds_out_never_replaces_a_file_that_is_not_thresholds(head, splits, tmp_path, monkeypatch):
    # --thresholds-out MODEL/head.json (a slip of the tab key) replaced the head with JSON thresholds, exit 0
    import ast_cli.cli.train as cli_train

    model = tmp_path / "model"
    shutil.copytree(head, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    monkeypatch.setattr(cli_train, "load_tagger", lambda *a, **k: pytest.fail("the model was loaded"))
    for name in ("head.json", "model.safetensors"):
        result = runner.invoke(app, ["evaluate", str(model), str(splits / "calib"), "--calibrate", "f1",
                                     "--thresholds-out", str(model / name)])
        assert result.exit_code == 2 and "is not a thresholds file: refusing to replace it" in result.stderr, \
            result.stderr
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_28_2_the_evaluate_and_calibration_tables_show_labels_as_they_are(capsys):
    # a label is a training folder's name: "[/]" crashed the tables with a MarkupError, ":x:" became an emoji
    from ast_cli.cli._render import print_calibration, print_evaluation

    row = {"status": "calibrated", "threshold": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0, "positives": 1,
           "best": None}
    print_evaluation({"files": 2, "accuracy": 0.5, "macro_f1": 0.5, "labels": ["[/]", ":x:"],
                      "confusion": [[1, 0], [0, 1]]}, False)
    print_calibration({"target": "f1", "min_positives": 1, "thresholds_file": "t.json",
                       "labels": [{"label": "[/]", **row}, {"label": ":x:", **row}]})
    shown = capsys.readouterr().out
    assert shown.count("[/]") == 3 and shown.count(":x:") == 3, shown
