"""``ast index``: the pooled embedding of every window of every file, stored in one database directory."""

from __future__ import annotations

from typing import Annotated

import typer

from ..run.options import RunOptions
from ._app import app
from ._common import (DEFAULT_MODEL, DebugOpt, ExtOpt, ModelOpt, PathsArg, QuietOpt, checked_distributed,
                      distributed_options, fetch_model, load_tagger, model_config, model_identity, path_stdin,
                      refuse_piped_audio_on_ray, report_failure, run_options, stderr_console)
from ._errors import EXIT_FAILED, cli_errors, counted, debug_enabled

DbOpt = Annotated[str, typer.Option("--db", metavar="DIR", help="The index directory (created if missing).")]


@app.command("index")
@distributed_options
@run_options
def index_command(
    paths: PathsArg,
    run: RunOptions,
    dist: dict,
    db: DbOpt,
    prune: Annotated[bool, typer.Option("--prune", help="Drop stored files that the given paths no longer hold.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    ext: ExtOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Store the pooled embedding of every window of every file in DIR, for ast search.

    The windows are those classify scores (--hop for overlap). A rerun embeds only new or changed files
    (size or mtime) and retries failed ones; --prune drops files no longer found. Each file is stored whole
    or not at all, so a killed run resumes with every window once. A DIR made with another model or other
    window settings is refused. --shard K/N runs write parts that the next run (or a search) merges.

    Examples:

      ast index recordings/ --db archive.db

      ast index recordings/ --db archive.db --hop 5 --prune

      ast search archive.db door.wav --top 20
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        from ..errors import UsageError
        from ..audio.inputs import expand_inputs, parse_extensions
        from ..run.vectordb import require_usearch
        from ..tasks.distributed import take_shard

        require_usearch()
        run.validate()
        cluster = checked_distributed(dist, run)
        if prune and cluster.shard is not None:
            raise UsageError("--prune needs every file: it goes without --shard", option="prune")
        items = take_shard(expand_inputs(paths, parse_extensions(ext), stdin=path_stdin(paths)), cluster.shard)
        refuse_piped_audio_on_ray(items, cluster)
        if any(getattr(item, "source", None) is not None for item in items):
            raise UsageError("audio on stdin has no path to store: index files", option="paths")
        if not items:
            raise UsageError("no audio files found in the given paths", hint="check --ext, or name files directly")
        store, plan, path = _open(items, db, model, run, cluster, prune, stderr, quiet)
        try:
            failed = _index(store, plan, path, model, run, cluster, stderr, quiet, debug)
        finally:
            store.close()
        if failed:
            raise typer.Exit(EXIT_FAILED)


def _identity(model: str, run: RunOptions, stderr, quiet: bool) -> tuple[dict, str]:
    """(identity, resolved model path): checked against the database before the model loads."""
    from ..checkpoint.names import looks_local
    from ..tasks.extract import Settings
    from ..tasks.index import identity_of

    path = fetch_model(model, run, stderr, quiet)
    config, features = model_config(path)
    settings = Settings.of("embedding", model, run)
    return identity_of(model_identity(model, path), str(path), looks_local(model), config, features,
                       settings.hop(features.window_seconds), settings.compute), str(path)


def _open(items, db: str, model: str, run: RunOptions, cluster, prune: bool, stderr, quiet: bool):
    """The store this run writes (the index, or its shard's part), after every check; and the plan."""
    import os

    from ..errors import UsageError
    from ..run.vectordb import SQLITE_NAME, ShardLock, VectorStore, check_identity, read_identity
    from ..tasks.index import plan_index, shard_file

    if os.path.exists(db) and not os.path.isdir(db):
        raise UsageError(f"{db} exists and is not a directory", option="db")
    identity, path = _identity(model, run, stderr, quiet)
    target = shard_file(cluster.shard)
    for file in {SQLITE_NAME, target}:  # another model: refused before anything is written
        stored = read_identity(db, file)
        if stored is not None:
            check_identity(stored, identity, db)
    store = VectorStore.open(db, target)
    if cluster.shard is not None:
        store.lock = ShardLock(store.path)
        if not store.lock.try_acquire():
            store.close()
            raise UsageError(f"another run is writing shard {target} of {db}", option="shard")
    store.claim(identity)
    known = store.files()
    if cluster.shard is None:
        store.merge_shards()
        known = store.files()
    elif os.path.isfile(os.path.join(db, SQLITE_NAME)):
        main = VectorStore.open(db)
        known = main.files() + known  # the part's own records last: they are newer
        main.close()
    plan = plan_index(items, known)
    if prune and plan.gone:
        store.remove(plan.gone)
    plan.pruned = len(plan.gone) if prune else 0
    return store, plan, path


def _index(store, plan, path: str, model: str, run: RunOptions, cluster, stderr, quiet: bool, debug: bool) -> int:
    """Embed and store ``plan.todo``; returns how many failed."""
    from ._io import native_stderr_silenced
    from ._progress import BatchProgress, summary

    progress = BatchProgress(stderr, len(plan.todo), enabled=not quiet and stderr.is_terminal,
                             description="indexing")
    counts = {"indexed": 0, "failed": 0}
    try:
        if plan.todo:
            records = _records(plan.todo, path, model, run, cluster, stderr, quiet, progress)
            with native_stderr_silenced(not debug_enabled(debug)), progress:
                for record in records:
                    store.put(record)
                    counts["failed" if record.error else "indexed"] += 1
                    if record.error is not None:
                        report_failure(stderr, record.path, record.error)
    finally:  # also after Ctrl-C: every file stored so far is stored whole
        if not quiet:
            pruned = f", {plan.pruned} pruned" if plan.pruned else ""
            summary(stderr, f"{counts['indexed']} indexed, {plan.unchanged} unchanged, {counts['failed']} failed"
                            f"{pruned}", progress, f"{counted(len(store), 'window')} in "
                            f"{store.directory if store.lock is None else store.path}")
        if store.lock is not None:
            store.lock.release()
    return counts["failed"]


def _records(todo, path: str, model: str, run: RunOptions, cluster, stderr, quiet: bool, progress):
    """The stored form of each file still to do, in order: embedded here, or by Ray actors (the driver stores)."""
    if cluster.ray:
        from ..tasks.distributed import connect, run_ray_embed
        from ._io import stdout_for_data_only

        with stdout_for_data_only():
            connect(cluster)

        def advanced(records):
            for record in records:
                progress.advance(record.duration)
                yield record

        return advanced(run_ray_embed(todo, path, run, cluster))
    from ..tasks.index import embed_files

    tagger = load_tagger(model, run, stderr, quiet)
    return (record for record, _ in embed_files(todo, tagger, on_progress=lambda out: progress.advance(out.duration)))
