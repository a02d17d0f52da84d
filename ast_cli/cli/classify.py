"""``ast classify``: ranked labels per file, as a table, JSON, JSONL or CSV."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..distributed import take_shard
from ..options import Activation, Aggregate, OutputFormat, RunOptions
from ._app import app
from ._common import (DEFAULT_MODEL, DebugOpt, ExtOpt, ModelOpt, PathsArg, QuietOpt, checked_distributed,
                      distributed_options, label_list, load_tagger, model_labels, path_stdin, report_failure, run_options,
                      stderr_console)
from ._errors import EXIT_FAILED, cli_errors, debug_enabled, say


@app.command()
@distributed_options
@run_options
def classify(
    paths: PathsArg,
    run: RunOptions,
    dist: dict,
    model: ModelOpt = DEFAULT_MODEL,
    top: Annotated[Optional[int], typer.Option(min=0, metavar="N", help="Labels per file (0 = all; default 5, or all with --threshold).")] = None,
    threshold: Annotated[Optional[float], typer.Option(metavar="P", help="Keep labels with score >= P.")] = None,
    include: Annotated[Optional[list[str]], typer.Option(metavar="LABEL", help="Only these labels (repeatable, case-insensitive; @FILE: one label per line).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(metavar="LABEL", help="Never these labels (repeatable, case-insensitive; @FILE: one label per line).")] = None,
    format: Annotated[Optional[OutputFormat], typer.Option("--format", "-f", help="Output format (default: from the --output extension, else table on a terminal and jsonl otherwise).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Write to this file (json/csv atomically, jsonl line by line).")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", metavar="DIR", help="One result file per input, mirroring the input tree (json, csv, tsv, audacity label tracks, raven selection tables); existing ones are skipped unless --overwrite.")] = None,
    resume: Annotated[bool, typer.Option(help="With --output x.jsonl: skip files already recorded there, retry failed ones.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing non-empty --output.")] = False,
    activation: Annotated[Optional[Activation], typer.Option(help="sigmoid (multi-label), softmax (single-label) or none (raw logits); default: what the checkpoint was trained for.")] = None,
    segments: Annotated[bool, typer.Option(help="Add per-window results (start, end, labels).")] = False,
    aggregate: Annotated[Aggregate, typer.Option(help="Window scores -> file score.")] = Aggregate.max,
    ext: ExtOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Tag audio files with ranked labels and scores.

    Long files are cut into windows of the model's input length (10.24 s for AudioSet models) and the
    window scores aggregated; --segments shows each window.

    Examples:

      ast classify song.wav --top 5

      ast classify recordings/ --format jsonl --output tags.jsonl --resume

      find . -name '*.flac' | ast classify - --threshold 0.3 --format csv > tags.csv
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        from ..errors import UsageError
        from ..inputs import expand_inputs, parse_extensions
        from ..output import plan_output, plan_output_dir
        from ..sources import as_sources
        from ..tagger import LabelSelection

        from . import _signals

        run.validate()
        if output is None and _signals.stdout_closed:
            raise UsageError("stdout is closed: there is nowhere to write the results", option="output")
        selection = LabelSelection.from_options(top, threshold, label_list(include), label_list(exclude), activation)
        settings = checked_distributed(dist)
        items = take_shard(expand_inputs(paths, parse_extensions(ext), stdin=path_stdin(paths)), settings.shard)
        if output_dir is not None:
            if output is not None or resume:
                raise UsageError("--output-dir writes one file per input: it goes without --output and --resume")
            target, items_todo = plan_output_dir(output_dir, format, items, overwrite=overwrite)
            segments = segments or target.needs_segments
            if len(items_todo) < len(items) and not quiet:
                say(stderr, f"{len(items) - len(items_todo)} of {len(items)} files already in {output_dir}")
            sources = as_sources(items_todo)
        else:
            target = plan_output(output, format, resume=resume, overwrite=overwrite, inputs=items,
                                 default="table" if sys.stdout.isatty() and output is None else "jsonl")
            sources = as_sources(items)
        if target.journal is not None:
            todo = target.journal.pending(sources)
            if not quiet:
                say(stderr, f"resuming: {len(sources) - len(todo)} of {len(sources)} files already in {output}")
            sources = todo
        if not sources:
            if not items:
                say(stderr, "no audio files found in the given paths")
            if target.journal is None:  # an empty list given on purpose: a valid, empty output and exit 0
                target.open(segments).close()
            return
        if settings.ray:
            from ..distributed import connect, record_to_result, run_ray
            from ._io import stdout_for_data_only

            labels = model_labels(model, run, stderr, quiet)
            selection.mask(labels)  # unknown --include/--exclude names fail before any output is opened
            with stdout_for_data_only():
                connect(settings)  # no cluster at --ray-address: one line, before any output is opened
            with stdout_for_data_only() as data:  # Ray prints its workers' troubles on stdout: keep them off
                target.stream = data
                results = (record_to_result(r) for r in run_ray(sources, model, run, settings, selection=selection,
                                                                  activation=activation, aggregate=aggregate,
                                                                  segments=segments))
                failed = _write(results, None, len(sources), target, segments, stderr, quiet, debug)
        else:
            tagger = load_tagger(model, run, stderr, quiet)
            selection.mask(tagger.labels)  # unknown --include/--exclude names fail before any output is opened
            engine_ = tagger.engine()
            results = tagger.classify(sources, selection=selection, activation=activation, aggregate=aggregate,
                                      segments=segments, engine=engine_)
            failed = _write(results, engine_, len(sources), target, segments, stderr, quiet, debug)
        if failed:
            raise typer.Exit(EXIT_FAILED)


def _write(results, engine, total: int, target, segments, stderr, quiet, debug) -> int:
    """Write ``results`` into ``target``; returns how many failed. Ctrl-C keeps what is done (jsonl) or leaves
    the earlier file as it was (json/csv)."""
    from ..errors import OutputWriteError
    from ._io import native_stderr_silenced
    from ._progress import BatchProgress

    writer = target.open(segments)
    failed = 0
    progress = BatchProgress(stderr, total, enabled=not quiet and stderr.is_terminal)
    try:
        with native_stderr_silenced(not debug_enabled(debug)), progress:
            for result in results:
                progress.advance(result.duration)
                try:
                    writer.write(result)
                except OutputWriteError as exc:
                    if not writer.per_input:
                        raise
                    result.error, result.exception = str(exc), exc  # this input's file only: the rest go on
                if result.error is not None:
                    failed += 1
                    report_failure(stderr, result.path, result.error)
                    if debug_enabled(debug) and result.exception is not None:
                        from ._errors import traceback_text

                        stderr.print(traceback_text(result.exception), markup=False, highlight=False)
    except BaseException:
        if engine is not None:
            engine.stop()
        writer.close(commit=False)
        raise
    writer.close(commit=True)
    return failed
