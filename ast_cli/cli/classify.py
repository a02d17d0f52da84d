"""``ast classify``: ranked labels per file, as a table, JSON, JSONL or CSV."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer

from ..run.options import Activation, Aggregate, OutputFormat, RunOptions
from ._app import app
from ._common import (DEFAULT_MODEL, DebugOpt, ExtOpt, HeadOpt, ModelOpt, NoBaseHeadOpt, PathsArg, QuietOpt,
                      ThresholdOpt, ThresholdsOpt, apply_calibrations, calibrations_of, checked_distributed,
                      compute_name, distributed_options, fetch_model, label_list, load_tagger, model_config,
                      parse_threshold, refuse_piped_audio_on_ray, report_failure, run_options,
                      stderr_console)
from ._errors import EXIT_FAILED, cli_errors, counted, debug_enabled, say
from ._inputs import run_inputs


@app.command()
@distributed_options
@run_options
def classify(
    paths: PathsArg,
    run: RunOptions,
    dist: dict,
    model: ModelOpt = DEFAULT_MODEL,
    top: Annotated[Optional[int], typer.Option(min=0, metavar="N", help="Labels per file (0 = all; default 5, or all with --threshold P); with --threshold calibrated, of the labels without a calibrated threshold.")] = None,
    threshold: ThresholdOpt = None,
    thresholds: ThresholdsOpt = None,
    include: Annotated[Optional[list[str]], typer.Option(metavar="LABEL", help="Only these labels (repeatable, case-insensitive; @FILE: one label per line).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(metavar="LABEL", help="Never these labels (repeatable, case-insensitive; @FILE: one label per line).")] = None,
    format: Annotated[Optional[OutputFormat], typer.Option("--format", "-f", help="Output format (default: from the --output extension, else table on a terminal and jsonl otherwise).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Write to this file (json/csv atomically, jsonl line by line).")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", metavar="DIR", help="One result file per input, mirroring the input tree (json, csv, tsv, audacity label tracks, raven selection tables); existing ones are skipped unless --overwrite.")] = None,
    resume: Annotated[bool, typer.Option(help="With --output x.jsonl: skip files already recorded there, retry failed ones.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing non-empty --output.")] = False,
    activation: Annotated[Optional[Activation], typer.Option(help="sigmoid (multi-label), softmax (single-label) or none (raw logits); default: what the checkpoint was trained for.")] = None,
    segments: Annotated[bool, typer.Option(help="Add per-window results (start, end, labels).")] = False,
    aggregate: Annotated[Optional[Aggregate], typer.Option(help="Window scores -> file score (default: max; with --threshold calibrated, what the thresholds were chosen on).")] = None,
    ext: ExtOpt = None,
    head: HeadOpt = None,
    no_base_head: NoBaseHeadOpt = False,
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
        from ..checkpoint.heads import read_heads
        from ..run.tagger import LabelSelection

        from . import _signals

        if output is None and _signals.stdout_closed:
            raise UsageError("stdout is closed: there is nowhere to write the results", option="output")
        if output_dir is not None and (output is not None or resume):
            raise UsageError("--output-dir writes one file per input: it goes without --output and --resume")
        threshold_value, calibrated = parse_threshold(threshold)
        selection = LabelSelection.from_options(top, threshold_value, label_list(include), label_list(exclude),
                                                activation, fast=run.fast)
        heads = read_heads(head or (), not no_base_head)  # a missing folder or not a head: before anything else
        # a missing or bad file: before any work
        calibrations = calibrations_of(model, thresholds, calibrated, heads, not no_base_head)
        for calibration in (calibrations or {}).values():
            calibration.check(activation.value if activation else None, aggregate.value if aggregate else None)
            aggregate = aggregate or Aggregate(calibration.aggregate)
        cluster = checked_distributed(dist, run)
        if heads and cluster.ray:
            raise UsageError("heads run in this process, not on a Ray cluster", option="heads")
        items = run_inputs(paths, ext, cluster.shard, stderr, quiet, "tag")
        if not items:
            return  # an empty list on stdin, an empty shard: nothing written, exit 0
        refuse_piped_audio_on_ray(items, cluster)
        job = _Job(model, run, cluster, selection, activation, aggregate or Aggregate.max, segments,
                   output_dir or output, stderr, quiet, debug, calibrations, tuple(heads), not no_base_head)
        target, sources, note = _plan(items, job, format, output, output_dir, resume, overwrite)
        try:
            failed = _run(target, sources, len(items) - len(sources), note, job)
        finally:
            target.release()
        if failed:
            raise typer.Exit(EXIT_FAILED)


@dataclass
class _Job:
    """One classify run as the command line asked for it (``destination``: the --output or --output-dir)."""

    model: str
    run: RunOptions
    cluster: Any
    selection: Any
    activation: Optional[Activation]
    aggregate: Aggregate
    segments: bool
    destination: Optional[str]
    stderr: Any
    quiet: bool
    debug: bool
    calibrations: Any = None  # --threshold calibrated: each head's Calibration (None: the model's own; calibrations_of)
    heads: tuple = ()  # checkpoint.heads.Head, read and checked
    base_head: bool = True


def _plan(items, job: _Job, format, output, output_dir, resume, overwrite):
    """The checked output, the sources still to tag (an earlier run's done files left out), and what to say of
    those (None: nothing)."""
    from ..run.output import plan_output, plan_output_dir
    from ..audio.sources import as_sources

    if output_dir is not None:
        target, todo = plan_output_dir(output_dir, format, items, overwrite=overwrite)
        job.segments = job.segments or target.needs_segments
        done = len(items) - len(todo)
        note = f"{done} of {counted(len(items), 'file')} already in {output_dir}" if done else None
        return target, as_sources(todo), note
    target = plan_output(output, format, resume=resume, overwrite=overwrite, inputs=items,
                         default="table" if sys.stdout.isatty() and output is None else "jsonl")
    sources = as_sources(items)
    if target.journal is None:
        return target, sources, None
    todo = target.journal.pending(sources)  # read under the lock
    note = f"resuming: {len(sources) - len(todo)} of {counted(len(sources), 'file')} already in {output}"
    return target, todo, note if target.kind != "missing" else None  # nothing to say of a new file


def _run(target, sources, skipped: int, note: str | None, job: _Job) -> int:
    """Tag ``sources`` into ``target`` (planned, and holding its lock); returns how many failed."""
    from ._progress import BatchProgress

    journal = target.journal  # earlier results: made as this run makes them? If not, refused (with nothing left to
    checked = sources or (journal is not None and journal.records)  # do too, importing no torch: see _provenance)
    provenance, path = _provenance(target, job, loads=bool(sources)) if checked else ({}, None)
    if note and not job.quiet:
        say(job.stderr, note)
    progress = BatchProgress(job.stderr, len(sources), enabled=not job.quiet and job.stderr.is_terminal)
    failed = 0
    if sources:
        if job.cluster.ray:
            failed = _run_ray(target, sources, provenance, progress, job)
        else:
            tagger = load_tagger(job.model, job.run, job.stderr, job.quiet, resolved=path, heads=job.heads,
                                 base_head=job.base_head)
            if tagger.backend.fast_choice is not None:  # which mode --fast ran: the records say it
                provenance["settings"]["fast"] = tagger.backend.fast_choice.mode
            engine = tagger.engine()
            results = tagger.classify(sources, selection=job.selection, activation=job.activation,
                                      aggregate=job.aggregate, segments=job.segments, engine=engine)
            failed = _write(results, engine, target, provenance, progress, job)
    if not job.quiet:
        _summary(len(sources) - failed, failed, skipped, progress, job)
    return failed


def _provenance(target, job: _Job, loads: bool = True) -> tuple[dict, object]:
    """What records say made them (the model, and the settings that change scores), checked against a resumed
    output's records before the model loads, and the model's local path (resolved once, here). Unknown
    --include/--exclude names fail here too. Not ``loads`` (nothing is left to tag): nothing is downloaded (a hub
    model not in the cache is not checked) and torch is not imported, so the precision of ``--dtype auto`` with
    ``--device auto`` (fp16 on a GPU, else fp32) is not checked."""
    from ..checkpoint.heads import weights_stamp
    from ..checkpoint.hub import resolve_model
    from ..checkpoint.names import model_identity
    from ..errors import ModelNotFoundError
    from ..tasks.extract import Settings
    from ..run.tagger import Scorer, head_parts, is_single_label

    if loads:
        path = fetch_model(job.model, job.run, job.stderr, job.quiet)
    else:
        try:
            path = resolve_model(job.model, offline=True, cache_dir=job.run.cache_dir)
        except ModelNotFoundError:
            return {}, None
    config, features = model_config(path)
    parts = head_parts(job.model, config.id2label, is_single_label(config), job.heads, job.base_head)
    scorer = Scorer(parts, job.selection, job.activation)  # unknown --include/--exclude names fail here
    if job.calibrations is not None:  # thresholds of other labels or other scores: refused before the model loads
        job.selection = apply_calibrations(job.selection, parts, job.calibrations, job.activation, job.heads)
    settings = Settings(None, model_identity(job.model, path), job.run.hop_seconds, _compute(job, probe=loads),
                        _activations(scorer), tuple(p.name for p in parts) if job.heads else (), job.aggregate.value,
                        weights_stamp(job.model, path, job.heads))
    if target.journal is not None:
        target.journal.check(settings)
    return {"model": settings.model, "settings": settings.record(features.window_seconds)}, path


def _activations(scorer) -> str:
    """What made the scores, as records name it: one activation (``sigmoid``), or with heads whose defaults differ
    each head's (``audioset:sigmoid,birds:softmax``)."""
    kinds = [activation.value for activation in scorer.activations]
    if len(set(kinds)) == 1:
        return kinds[0]
    return ",".join(f"{part.name}:{kind}" for part, kind in zip(scorer.parts, kinds))


def _compute(job: _Job, probe: bool = True) -> str | None:
    return compute_name(job.run, job.cluster, probe=probe)


def _run_ray(target, sources, provenance: dict, progress, job: _Job) -> int:
    from ..tasks.distributed import connect, record_to_result, run_ray
    from ._io import stdout_for_data_only

    with stdout_for_data_only():
        connect(job.cluster, not debug_enabled(job.debug))  # no cluster there: one line, before any output opens
    with stdout_for_data_only() as data:  # Ray prints its workers' troubles on stdout: keep them off
        target.stream = data
        results = (record_to_result(r) for r in run_ray(sources, job.model, job.run, job.cluster,
                                                          selection=job.selection, activation=job.activation,
                                                          aggregate=job.aggregate, segments=job.segments))
        return _write(results, None, target, provenance, progress, job)


def _summary(tagged: int, failed: int, skipped: int, progress, job: _Job) -> None:
    from ._progress import summary

    counts = f"{tagged} tagged, {failed} failed"
    if skipped:
        counts += f", {skipped} skipped (already in {job.destination})"
    summary(job.stderr, counts, progress,
            f"results in {job.destination}" if job.destination else "results on standard output")


def _write(results, engine, target, provenance: dict, progress, job: _Job) -> int:
    """Write ``results`` into ``target``; returns how many failed. Ctrl-C keeps what is done (jsonl) or leaves
    the earlier file as it was (json/csv)."""
    from ..errors import OutputWriteError
    from . import _signals
    from ._io import native_stderr_silenced

    writer = target.open(job.segments, provenance, heads=bool(job.heads))
    failed = 0
    try:
        with native_stderr_silenced(not debug_enabled(job.debug)), progress:
            for result in results:
                progress.advance(result.duration)
                try:
                    with progress.above():
                        writer.write(result)
                except OutputWriteError as exc:
                    if not writer.per_input:
                        raise
                    result.error, result.exception = str(exc), exc  # this input's file only: the rest go on
                if result.error is not None:
                    failed += 1
                    report_failure(job.stderr, result.path, result.error)
                    if debug_enabled(job.debug) and result.exception is not None:
                        from ._errors import traceback_text

                        job.stderr.print(traceback_text(result.exception), markup=False, highlight=False)
        _signals.finishing()  # every result is in: from here the output is committed, whatever signal comes
    except BaseException:
        if engine is not None:
            engine.stop()
        writer.close(commit=False)
        raise
    writer.close(commit=True)
    return failed
