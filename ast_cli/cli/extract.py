"""``ast extract-features``: per-window model inputs or pooled embeddings, one output file per input."""

from __future__ import annotations

from typing import Annotated

import typer

from ..run.options import FeatureFormat, FeatureKind, RunOptions
from ._app import app
from ._common import (DEFAULT_MODEL, DebugOpt, ExtOpt, ModelOpt, PathsArg, QuietOpt, checked_distributed,
                      distributed_options, fetch_model, load_tagger, refuse_piped_audio_on_ray,
                      report_failure, run_options, stderr_console, warn_if_gaps)
from ._errors import EXIT_FAILED, cli_errors, debug_enabled
from ._inputs import run_inputs
from ._progress import BatchProgress, summary


@app.command("extract-features")
@distributed_options
@run_options
def extract_features_command(
    paths: PathsArg,
    run: RunOptions,
    dist: dict,
    out: Annotated[str, typer.Option("--out", "-o", metavar="DIR", help="Output directory; mirrors the input tree.")],
    kind: Annotated[FeatureKind, typer.Option(help="embedding (pooled, hidden_size per window) or fbank (the model input).")] = FeatureKind.embedding,
    format: Annotated[FeatureFormat, typer.Option("--format", "-f", help="safetensors, or npy (+ a .json metadata file).")] = FeatureFormat.safetensors,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute outputs that exist (default: skip them).")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    ext: ExtOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write each file's model inputs (fbank) or pooled embeddings, one output file per input.

    One row per window of the model's input length (10.24 s for AudioSet models): --kind embedding gives
    (windows, hidden_size), --kind fbank (windows, max_length, num_mel_bins), exactly what the model sees
    (fbank needs only the model's configuration, not its weights). DIR mirrors the input tree:
    DIR/<path below the given directory>.safetensors, or the basename for files named directly. Existing
    outputs are skipped unless --overwrite, so a rerun resumes; writes are atomic. A summary goes to stderr.

    Examples:

      ast extract-features recordings/ --out embeddings/

      ast extract-features recordings/ --out fbank/ --kind fbank --format npy

      ast extract-features 'clips/*.flac' --out embeddings/ --hop 5 --overwrite
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        from ..tasks.extract import FeatureExtractor, load_feature_config, plan_outputs, refuse_other_settings

        cluster = checked_distributed(dist, run)
        items = run_inputs(paths, ext, cluster.shard, stderr, quiet, "extract")
        if not items:
            return  # an empty list on stdin, an empty shard: nothing written, exit 0, as classify
        refuse_piped_audio_on_ray(items, cluster)
        jobs = plan_outputs(items, out, format.value)  # collisions: before the model is looked for
        path = fetch_model(model, run, stderr, quiet)  # downloads a missing hub model, like classify
        settings = _settings(model, path, kind.value, run)
        if not overwrite:
            refuse_other_settings(jobs, out, format.value, settings)  # before any work
        todo = sum(1 for job in jobs if overwrite or not job.exists)

        extractor = None  # a rerun with nothing left to do loads no model
        if todo and cluster.ray:
            from ..tasks.distributed import connect
            from ._io import stdout_for_data_only

            extractor = ("ray", cluster, str(path), (settings.model, settings.weights))
            with stdout_for_data_only():
                connect(cluster, not debug_enabled(debug))  # no cluster at --ray-address: one line, before any write
        elif todo and kind is FeatureKind.embedding:
            tagger = load_tagger(model, run, stderr, quiet, resolved=path, embeddings=True)
            extractor = FeatureExtractor.embeddings(tagger, settings.model, settings.weights)
        elif todo:
            features = load_feature_config(str(path), offline=run.offline)
            warn_if_gaps(run, features, stderr)
            extractor = FeatureExtractor.fbank(settings.model, features, run, settings.weights)
        counts = {"written": 0, "skipped": 0, "failed": 0}
        progress = BatchProgress(stderr, todo, enabled=not quiet and stderr.is_terminal, description="extracting")
        try:
            _run(jobs, extractor, format.value, overwrite, progress, counts, stderr, debug, run, kind)
        finally:  # also after Ctrl-C: what was written is complete and stays; not with --quiet, as classify
            if not quiet:
                summary(stderr, f"{counts['written']} written, {counts['skipped']} skipped (already in {out}), "
                                f"{counts['failed']} failed", progress, f"results in {out}")
        if counts["failed"]:
            raise typer.Exit(EXIT_FAILED)


def _settings(model: str, path, kind: str, run: RunOptions):
    """What outputs record of their making: the model's identity (``model_identity``: a hub commit, or the resolved
    path) and a local model's weights stamp, not ``model`` as typed, which earlier versions recorded instead (their
    outputs are still recognised by it)."""
    from dataclasses import replace

    from ..checkpoint.heads import weights_stamp
    from ..checkpoint.names import model_identity
    from ..tasks.extract import Settings

    settings = Settings.of(kind, model_identity(model, path), run)
    stamp = None if kind == "fbank" else weights_stamp(model, path)  # model inputs: no weights make them
    return replace(settings, weights=stamp, given_as=model)


class _ExtractRecord:
    """A result as a Ray worker reports it."""

    def __init__(self, path, output, status, error=None, duration=None, windows=0):
        self.path, self.output, self.status, self.error, self.duration, self.windows = (
            path, output, status, error, duration, windows)


def _run(jobs, extractor, fmt: str, overwrite: bool, progress, counts: dict, stderr, debug: bool, run=None,
         kind=None) -> None:
    from ..tasks.extract import extract_features
    from ._io import native_stderr_silenced

    with native_stderr_silenced(not debug_enabled(debug)), progress:
        if isinstance(extractor, tuple):  # ("ray", cluster, model path, (identity, weights)): the actors write
            from ..tasks.distributed import run_ray_extract

            _, cluster, model, recorded = extractor
            todo_jobs = [job for job in jobs if overwrite or not job.exists]
            counts["skipped"] += len(jobs) - len(todo_jobs)
            results = (_ExtractRecord(**r) for r in run_ray_extract(todo_jobs, model, kind.value, fmt, run, cluster,
                                                                    recorded))
        else:
            results = extract_features(jobs, extractor, fmt=fmt, overwrite=overwrite,
                                       on_progress=lambda done: progress.advance(done.duration))
        for result in results:
            counts[result.status] += 1
            if isinstance(extractor, tuple):
                progress.advance(result.duration)
            if result.error is not None:
                report_failure(stderr, result.path, result.error)
