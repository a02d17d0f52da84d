"""``ast train`` and ``ast evaluate``: your own labels on top of AST, and how well a model does on labeled data."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..constants import MIN_POSITIVES
from ..run.options import ListFormat, RunOptions, _choices
from ._app import app
from ._common import (DEFAULT_MODEL, DebugOpt, QuietOpt, _complete_model, announce_fast, fetch_model, load_tagger,
                      model_labels, run_options, stderr_console)
from ._errors import cli_errors, counted, debug_enabled, say
from ._io import native_stderr_silenced

Mode = _choices("Mode", "head finetune", "What ast train trains.")
BaseOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="MODEL", autocompletion=_complete_model, envvar="AST_MODEL",
    help=f"The base: model alias, hub id (ORG/NAME[@REV]), local directory or weights file (default: {DEFAULT_MODEL}; "
         "with --features-db, the model that made the index).")]
DataArg = Annotated[str, typer.Argument(metavar="DATA", help="A folder of label subfolders (single-label), or a CSV/JSONL of path,labels (labels separated by ;, multi-label).")]


@app.command()
@run_options
def train(
    data: DataArg,
    run: RunOptions,
    out: Annotated[str, typer.Option("--out", "-o", metavar="DIR", help="Where the new checkpoint goes (a Hugging Face model folder).")],
    model: BaseOpt = None,
    mode: Annotated[Mode, typer.Option(help="head: a classifier on frozen, cached embeddings (fast); finetune: every weight.")] = Mode.head,
    val: Annotated[Optional[str], typer.Option(metavar="DATA", help="Validation data (default: a stratified --val-split of DATA).")] = None,
    val_split: Annotated[float, typer.Option(metavar="FRACTION", help="Part of DATA held out for validation when --val is not given.")] = 0.2,
    epochs: Annotated[Optional[int], typer.Option(min=1, metavar="N", help="Epochs at most (default: 200 with early stopping for head, 10 for finetune).")] = None,
    lr: Annotated[Optional[float], typer.Option(metavar="RATE", help="Peak learning rate (default: 1e-3 head, 1e-5 finetune).")] = None,
    train_batch: Annotated[int, typer.Option("--train-batch", min=1, metavar="N", help="Training windows per step.")] = 64,
    patience: Annotated[int, typer.Option(min=1, metavar="N", help="Stop after this many epochs without a better validation loss.")] = 15,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the split, the initialisation and the shuffling.")] = 0,
    mixup: Annotated[float, typer.Option(metavar="P", help="finetune: probability of mixing a batch (AST recipe: 0.5).")] = 0.0,
    accumulate: Annotated[int, typer.Option(min=1, metavar="N", help="finetune: steps of gradients summed per update.")] = 1,
    warmup: Annotated[float, typer.Option(metavar="EPOCHS", help="finetune: linear warm-up before the cosine decay.")] = 1.0,
    keep_normalization: Annotated[bool, typer.Option("--keep-normalization", help="finetune: keep the base model's mean/std instead of the data's.")] = False,
    features_dir: Annotated[Optional[str], typer.Option("--features-dir", metavar="DIR", help="head: where window embeddings are cached (default: a cache shared by every run, under HF_HOME/assets); reused by any later run on the same files and model.")] = None,
    features_db: Annotated[Optional[str], typer.Option("--features-db", metavar="DB", help="head: train on the window embeddings stored in this index (ast index; its model is the base), computing none; DATA may be ast search's csv with its label column filled.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="finetune: continue from the last epoch's checkpoint in DIR.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DIR when it holds an earlier ast train output (only once the new one is complete).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop when any clip cannot be read (default: name it and train on the rest).")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train a classifier for your own labels; DIR becomes a checkpoint every command (and transformers) loads.

    --mode head trains the checkpoint's classifier (LayerNorm + Linear) on the frozen model's pooled
    embeddings, computed once per window and cached: seconds to minutes on a CPU. --mode finetune trains
    every weight with SpecAugment, optional mixup, warm-up and cosine learning rate, a checkpoint per epoch
    (--resume; Ctrl-C saves one). Single-label data trains with cross-entropy, multi-label with BCE.

    Examples:

      ast train frogs/ --out frog-ast/

      ast train labels.csv --val val.csv --out ads/ --mode finetune --epochs 5 --mixup 0.5

      ast classify night.wav --model frog-ast/
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        from ..errors import UsageError
        from ..tasks.extract import embedding_cache_dir
        from ..run.files import check_writable_dir
        from ..tasks.train import TrainConfig, Trainer
        from ..tasks.train_data import clips
        from ..tasks.train_state import check_out

        config = TrainConfig(mode=mode.value, epochs=epochs, lr=lr, batch_size=train_batch, patience=patience,
                             seed=seed, mixup=mixup, accumulate=accumulate, warmup_epochs=warmup,
                             keep_normalization=keep_normalization).resolved()
        if run.fast and mode is not Mode.head:
            raise UsageError("the fast mode computes head training's frozen embeddings; finetune trains in fp32",
                             option="fast", suggest={"fast": None})
        if resume and mode.value != "finetune":
            raise UsageError("continues a finetune run; head training takes seconds to run again", option="resume",
                             hint="drop --resume (and add --overwrite to replace an earlier --out)")
        if mode is Mode.head:
            check_writable_dir(features_dir or embedding_cache_dir(), option="features_dir")
        dataset, train_set, val_set = _datasets(data, val, val_split, seed, features_db, stderr)
        labels = tuple(sorted(set(train_set.labels) | set(val_set.labels)))
        base = _as_recorded(model or DEFAULT_MODEL, run) if resume else None  # --resume: the base it continues
        check_out(out, overwrite=overwrite, resume=resume,
                  marker={"mode": mode.value, "labels": list(labels), "multi_label": dataset.multi_label, "base": base})
        # with --features-db the base is the index's model: its name and where it loads from
        model, source = _index_model(features_db, model, mode, run) if features_db else (model or DEFAULT_MODEL,) * 2
        if not quiet:  # --quiet: errors only, as classify and extract-features (metrics.json has the rest)
            unit = _unit(train_set.examples + val_set.examples)
            say(stderr, f"{len(train_set.examples)} training and {counted(len(val_set.examples), 'validation ' + unit)}"
                        f", {counted(len(labels), 'label')} ({'multi' if dataset.multi_label else 'single'}-label), "
                        f"mode {mode.value}")
        base = str(fetch_model(source, run, stderr, quiet))
        progress = _EpochProgress(None if quiet else stderr, config.epochs, enabled=stderr.is_terminal)
        trainer = Trainer(base, train_set, val_set, out, config, run, feature_cache=features_dir,
                          on_epoch=progress.update, model_name=model, strict=strict,
                          on_failure=lambda path, error: say(stderr, f"error: {path}: {error}"),
                          features_db=features_db)
        announced: list = []  # the train and validation embeddings each build the model: say it once
        trainer.on_fast = lambda choice: announced or announced.append(announce_fast(choice, stderr, quiet))
        try:
            with native_stderr_silenced(not debug_enabled(debug)), progress:  # mpg123's notes on a bad clip
                result = trainer.run(resume=resume)
        except KeyboardInterrupt:
            if mode.value == "finetune":
                say(stderr, f"the last finished epoch is kept beside {out}: the same command with --resume continues")
            raise
        best = result.val
        metric = (f"accuracy {best.get('accuracy', 0):.3f}, macro-F1 {best.get('macro_f1', 0):.3f}"
                  if not result.multi_label else f"mAP {best.get('map', 0):.3f}")
        if not quiet:
            say(stderr, f"best epoch {result.best_epoch} of {result.epochs}: validation {metric}; "
                        f"{result.seconds_per_epoch:.2f} s per epoch")
        typer.echo(out)
        if result.failed:
            say(stderr, f"{clips(len(result.failed))} could not be read and left out (listed in metrics.json)")
            raise typer.Exit(1)


def _datasets(data: str, val: str | None, val_split: float, seed: int, features_db: str | None, stderr):
    """(DATA, the training part, the validation part), read and checked before the model loads."""
    from ..errors import UsageError
    from ..tasks.train_data import load_dataset, refuse_windows, split, untrained_labels

    dataset = load_dataset(data)
    train_set, val_set = (dataset, load_dataset(val, option="val")) if val else split(dataset, val_split, seed)
    if val and val_set.multi_label != dataset.multi_label:
        raise UsageError("--val must be labeled like DATA (both folders, or both tables)")
    for named, option, given in ((dataset, "data", data), (val_set, "val", val)):
        if not features_db and given:  # windows of ast search's csv: their embeddings are in the index
            refuse_windows(named, given, option, hint="train on the index they came from: add --features-db DB")
    for name in (*dataset.empty, *(val_set.empty if val else ())):
        say(stderr, f"warning: class folder {name!r} holds no audio file: left out")
    if untrained_labels(train_set, val_set):
        raise UsageError(f"no training file has label(s) {', '.join(untrained_labels(train_set, val_set))}",
                         option="val")
    return dataset, train_set, val_set


def _unit(examples) -> str:
    """What the examples are: files, windows (rows of ``ast search``'s csv, with --features-db) or a mix."""
    windows = sum(example.start is not None for example in examples)
    return "window" if windows == len(examples) else "file" if not windows else "example"


def _index_model(features_db: str, model: str | None, mode, run: RunOptions) -> tuple[str, str]:
    """(the name the index in ``features_db`` records its model by, where that model loads from), once its weights
    are known to be those its embeddings came from, and ``model`` (as given; None: not given) names no other."""
    import os

    from ..errors import UsageError
    from ..tasks.index import Index

    if mode is not Mode.head:
        raise UsageError(f"{features_db} holds embeddings, which train a head only", option="features_db",
                         suggest={"mode": "head"})
    try:
        index = Index.open(features_db)
    except UsageError as exc:  # the index's own refusal names its --db; here it is --features-db
        if exc.option == "db":
            exc.option = "features_db"
        raise
    try:
        name = index.identity["model"]
        if model is not None and _as_recorded(model, run) != name:
            if not os.path.exists(model):
                raise UsageError(f"{model} is not the model {features_db} was made with ({name}), which is the base",
                                 option="model", suggest={"model": None})
            index.use_model(model)  # its folder moved, or a copy: the same weights and input format, or refused
        return name, index.model_source()
    finally:
        index.close()


def _as_recorded(model: str, run: RunOptions) -> str:
    """How records name ``model`` (its resolved path, or ORG/NAME@commit of its cached snapshot), downloading
    nothing; as given when it is not there (then it is not a model that was used before)."""
    from ..checkpoint.hub import resolve_model
    from ..checkpoint.names import model_identity
    from ..errors import ModelNotFoundError

    try:
        return model_identity(model, resolve_model(model, offline=True, cache_dir=run.cache_dir))
    except ModelNotFoundError:
        return model


class _EpochProgress:
    """A bar over epochs with the loss and the validation metric; a line per epoch when not a terminal; nothing
    without a console (--quiet)."""

    def __init__(self, console, epochs: int, enabled: bool):
        self.console, self.epochs, self.enabled = console, epochs, enabled
        self._progress = None

    def __enter__(self):
        if self.enabled and self.console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), console=self.console, transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task("training", total=self.epochs, status="")
        return self

    def update(self, record: dict) -> None:
        metric = next((f"{k} {record[k]:.3f}" for k in ("accuracy", "map") if record.get(k) is not None), "")
        status = f"loss {record['loss']:.4f}, val loss {record['val_loss']:.4f} {metric}"
        if self._progress is not None:
            self._progress.update(self._task, completed=record["epoch"], status=status)
        elif self.console is not None and (record["epoch"] == 1 or record["epoch"] % max(1, self.epochs // 10) == 0):
            # a log, not a flood
            say(self.console, f"epoch {record['epoch']}: {status}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)


@app.command()
@run_options
def evaluate(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Alias, hub id, directory (e.g. what ast train wrote) or weights file.")],
    data: DataArg,
    run: RunOptions,
    threshold: Annotated[float, typer.Option(metavar="P", help="multi-label: the score a label counts as present at (for F1).")] = 0.5,
    calibrate: Annotated[Optional[str], typer.Option(metavar="TARGET", help="Per label, choose the threshold that reaches TARGET on DATA: precision=P (the lowest threshold with that precision), recall=R (the highest with that recall) or f1 (the best F1); written to thresholds.json in MODEL's folder, which --threshold calibrated reads.")] = None,
    thresholds_out: Annotated[Optional[str], typer.Option("--thresholds-out", metavar="FILE", help="--calibrate: write the thresholds here (needed for a hub model or a folder that cannot be written).")] = None,
    min_positives: Annotated[int, typer.Option("--min-positives", min=1, metavar="N", help="--calibrate: labels with fewer positive files in DATA are left uncalibrated.")] = MIN_POSITIVES,
    features_dir: Annotated[Optional[str], typer.Option("--features-dir", metavar="DIR", help="Where window embeddings are cached (default: the cache ast train shares, under HF_HOME/assets).")] = None,
    format: Annotated[ListFormat, typer.Option("--format", "-f", help="table or json.")] = ListFormat.table,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure a model on labeled data: accuracy, macro-F1 and a confusion table (single-label), or mAP and
    per-label AP and F1 (multi-label). --calibrate also chooses a threshold per label.

    Examples:

      ast evaluate frog-ast/ frogs-test/

      ast evaluate ads/ test.csv --format json | jq .map

      ast evaluate frog-ast/ frogs-calib/ --calibrate precision=0.9
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        import json

        from ..errors import AudioDecodeError, UsageError
        from ..run.files import check_writable_dir
        from ..tasks.calibrate import Target, destination
        from ..tasks.metrics import check_labels, report as measured, score_dataset
        from ..tasks.train_data import load_dataset, refuse_windows

        dataset = load_dataset(data)
        refuse_windows(dataset, data, hint="evaluate scores whole files: list them as path,labels rows")
        if features_dir:
            check_writable_dir(features_dir, option="features_dir")
        target = Target.parse(calibrate) if calibrate is not None else None
        if target is None and thresholds_out is not None:
            raise UsageError("--thresholds-out is where --calibrate writes", suggest={"calibrate": "precision=0.9"})
        out = destination(model, thresholds_out, run.cache_dir) if target else None  # before the model loads
        check_labels(model_labels(model, run, stderr, quiet), dataset.labels, model)  # before the model loads too
        # its window embeddings are cached and shared with train's: --fast chooses for them as train does
        tagger = load_tagger(model, run, stderr, quiet, embeddings=True)
        with native_stderr_silenced(not debug_enabled(debug)):  # C libraries' notes on a bad file: our line only
            scored = score_dataset(tagger, dataset, feature_cache=features_dir)
        report = measured(scored, threshold)
        for failure in report["failed"]:
            say(stderr, f"error: {failure['path']}: {failure['error']}")
        if not report["files"]:
            raise AudioDecodeError(f"no file of {data} could be read: nothing to measure")
        if target is not None:
            report["calibration"] = _calibrate(tagger, scored, target, min_positives, data, out, run, stderr)
        if format is ListFormat.json:
            typer.echo(json.dumps(report, indent=2))
        else:
            from ._render import print_calibration, print_evaluation

            print_evaluation(report, dataset.multi_label)
            if target is not None:
                print_calibration(report["calibration"])
        unwritten = target is not None and report["calibration"]["thresholds_file"] is None
        if unwritten:
            say(stderr, f"error: no label could be calibrated to {target} on {data} (the report says why): {out} "
                        "was not written")
        if report["failed"] or unwritten:
            raise typer.Exit(1)


def _calibrate(tagger, scored, target, min_positives: int, data: str, out: str, run: RunOptions, stderr) -> dict:
    """Choose the thresholds, write them to ``out`` (atomically) and return the report's calibration part."""
    from dataclasses import asdict

    from ..checkpoint.names import model_identity
    from ..run.thresholds import write_thresholds
    from ..tasks.calibrate import calibrate, document, file_sha256

    results = calibrate(scored, target, min_positives, every_label=tagger.labels)
    written = any(r.status == "calibrated" for r in results)  # none: an earlier file stays as it was
    if written:
        identity = model_identity(tagger.name, fetch_model(tagger.name, run, stderr, True))
        weights = file_sha256(tagger.source) if tagger.source else None
        write_thresholds(out, document(results, scored, target, data, identity, weights))
    return {"target": str(target), "min_positives": min_positives, "thresholds_file": out if written else None,
            "labels": [asdict(r) for r in results]}
