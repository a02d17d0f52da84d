"""``ast index``: the pooled embedding of every window of every file, stored in one database directory."""

from __future__ import annotations

from typing import Annotated

import typer

from ..run.options import RunOptions
from ._app import app
from ._common import (DEFAULT_MODEL, DebugOpt, ExtOpt, HeadOpt, ModelOpt, PathsArg, QuietOpt, checked_distributed, compute_name,
                      distributed_options, fetch_model, load_tagger, model_config, path_stdin,
                      refuse_piped_audio_on_ray, report_failure, run_options, stderr_console)
from ._errors import EXIT_FAILED, cli_errors, counted, debug_enabled, say
from ._inputs import refuse_only_missing

DbOpt = Annotated[str, typer.Option("--db", metavar="DIR", help="The index directory (created if missing).")]


@app.command("index")
@distributed_options
@run_options
def index_command(
    paths: PathsArg,
    run: RunOptions,
    dist: dict,
    db: DbOpt,
    prune: Annotated[bool, typer.Option("--prune", help="Drop stored files below the given paths that are no longer there.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    head: HeadOpt = None,
    ext: ExtOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Store the pooled embedding of every window of every file in DIR, for ast search.

    The windows are those classify scores (--hop for overlap). A rerun embeds only new or changed files
    (size or mtime) and retries failed ones; --prune drops files no longer found. Each file is stored whole
    or not at all, so a killed run resumes with every window once. A DIR made with another model or other
    window settings is refused. --shard K/N runs write parts that the next run (or a search) merges.
    --head DIR also stores each window's scores from that head (trained on this model), for
    ast search --label; windows stored earlier are scored from their stored embeddings.

    Examples:

      ast index recordings/ --db archive.db

      ast index recordings/ --db archive.db --hop 5 --prune

      ast index recordings/ --db archive.db --head birds/

      ast search archive.db --label robin --top 20

      ast search archive.db door.wav --top 20
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        import glob
        import os

        from ..errors import UsageError
        from ..audio.inputs import expand_inputs, parse_extensions
        from ..checkpoint.heads import read_heads
        from ..run.files import check_writable_dir
        from ..run.vectordb import require_ann_backend
        from ..tasks.distributed import take_shard
        from ..tasks.index import check_stores, file_key

        require_ann_backend()
        run.validate()
        cluster = checked_distributed(dist, run)
        if prune and cluster.shard is not None:
            raise UsageError("--prune needs every file: it goes without --shard", option="prune")
        listed: list[str] = []  # the paths a list on stdin named: --prune takes them as the run's paths too
        found = expand_inputs(paths, parse_extensions(ext), stdin=_recorded(path_stdin(paths), listed))
        items = take_shard(found, cluster.shard, key=lambda item: file_key(item.path))  # as the index names it
        refuse_piped_audio_on_ray(found, cluster)
        heads = read_heads(head or ())  # a missing folder or not a head: before anything else
        if heads and cluster.ray:
            raise UsageError("heads run in this process, not on a Ray cluster", option="heads")
        if any(getattr(item, "source", None) is not None for item in found):
            raise UsageError("audio on stdin has no path to store: index files", option="paths")
        if not db:
            raise UsageError("is empty: it names the index directory", option="db")
        if os.path.exists(db) and not os.path.isdir(db):
            raise UsageError(f"{db} exists and is not a directory", option="db")
        named = [path for path in paths if path != "-"] + [glob.escape(path) for path in listed]  # names, not patterns
        plan = _plan(items, named if prune else (), db, cluster.shard)  # read only
        if not found and not plan.gone:  # --prune of a folder deleted with its files: they are pruned
            if set(paths) == {"-"}:  # an empty list on stdin: nothing to do (exit 0), as in classify
                return None if quiet else say(stderr, "nothing to index: standard input listed no files")
            raise UsageError("no audio files found in the given paths", hint="check --ext, or name files directly")
        _refuse_emptied_folders(named, found, plan.gone)
        if not plan.gone:  # --prune of named files deleted since: they are pruned
            refuse_only_missing(found, "index", hint="check the paths; add --prune to drop indexed files deleted since")
        check_writable_dir(db, option="db")  # before the model loads: /proc/nope, a read-only folder
        identity, path = _identity(model, run, cluster, stderr, quiet)
        check_stores(db, identity)  # the index or any part made otherwise: refused before any write
        # the model loads here; a head trained on another base is refused
        records = _records(plan.todo, path, model, run, cluster, stderr, quiet, heads, debug)
        store = _writable(db, identity, cluster.shard, heads, stderr)
        try:
            if prune and plan.gone:
                store.remove(plan.gone)
                plan.pruned = len(plan.gone)
            failed = _index(store, plan, records, stderr, quiet, debug, heads)
            _score_stored(store, heads, stderr, quiet)
            if cluster.shard is None:
                _update_ann(store, stderr, quiet)
        finally:
            store.close()
        if failed:
            raise typer.Exit(EXIT_FAILED)


def _recorded(stdin, listed: list[str]):
    """``stdin`` as ``expand_inputs`` reads it, each path of a list on it also added to ``listed``."""
    if stdin is None or hasattr(stdin, "blocks"):  # no stdin, or audio on it
        return stdin

    def lines():
        for line in stdin:
            if line.strip():
                listed.append(line.rstrip("\r\n"))
            yield line
    return lines()


def _refuse_emptied_folders(paths: list[str], found, gone: list[str]) -> None:
    """``--prune`` of a folder that is there but gives no audio now, while the index holds files below it: an
    unmounted drive or share looks just like this. Refused before anything is written; a folder that is gone
    itself (deleted with its files) prunes them."""
    import os

    from ..audio.inputs import named_by
    from ..errors import UsageError

    for path in paths:
        if path == "-" or not os.path.isdir(path) or any(named_by(item.path, [path]) for item in found):
            continue
        below = sum(named_by(stored, [path]) for stored in gone)
        if below:
            raise UsageError(f"{path} gives no audio now, but the index holds {counted(below, 'file')} below it: "
                             "--prune would drop them (an unmounted drive or share looks like this)", option="prune",
                             hint=f"if they are gone for good, remove the empty folder {path} (or name the "
                                  "deleted files) and run again")


def _identity(model: str, run: RunOptions, cluster, stderr, quiet: bool) -> tuple[dict, str]:
    """(identity, resolved model path): checked against the database before the model loads."""
    from ..checkpoint.names import looks_local, model_identity
    from ..tasks.extract import Settings
    from ..tasks.index import identity_of

    path = fetch_model(model, run, stderr, quiet)
    config, features = model_config(path)
    settings = Settings.of("embedding", model, run)
    return identity_of(model_identity(model, path), str(path), looks_local(model), config, features,
                       settings.hop(features.window_seconds), compute_name(run, cluster)), str(path)


def _plan(items, prune_below, db: str, shard):
    """What is to do, from what the index and its shards (or this run's part) hold, read only."""
    import os

    from ..run.vectordb import SQLITE_NAME, read_files, shard_paths
    from ..tasks.index import plan_index, shard_file

    stores = [os.path.join(db, SQLITE_NAME)]
    stores += [os.path.join(db, shard_file(shard))] if shard is not None else shard_paths(db)
    known = [record for path in stores for record in read_files(path)]  # later ones win
    return plan_index(items, known, prune_below)


def _writable(db: str, identity: dict, shard, heads, stderr):
    """The store this run writes: the index (with finished shards merged in), or this shard's part (locked),
    with ``heads`` recorded in it (one retrained since it scored the store: its old scores dropped)."""
    import os

    from ..run import headscores
    from ._errors import say

    from ..errors import UsageError
    from ..run.vectordb import SHARDS_DIR, ShardLock, VectorStore
    from ..tasks.index import shard_file

    lock = None
    if shard is not None:  # locked before the file exists: a merge never takes a part that is being written
        os.makedirs(os.path.join(db, SHARDS_DIR), exist_ok=True)
        lock = ShardLock(os.path.join(db, shard_file(shard)))
        if not lock.try_acquire():
            raise UsageError(f"another run is writing shard {shard_file(shard)} of {db}", option="shard")
    store = VectorStore.open(db, shard_file(shard))
    store.lock = lock
    store.claim(identity)
    if shard is None:
        store.merge_shards()
    if heads:
        with store.transaction():
            changed = headscores.register(store.db, {head.name: headscores.head_entry(head) for head in heads})
        for name in changed:
            say(stderr, f"head {name} changed since it scored {db}: its scores are redone")
    return store


def _index(store, plan, records, stderr, quiet: bool, debug: bool, heads=()) -> int:
    """Store ``records`` (of ``plan.todo``, as they are embedded, with ``heads``' scores); returns how many
    failed."""
    from ..tasks.index import score_heads
    from ._io import native_stderr_silenced
    from ._progress import BatchProgress, summary

    progress = BatchProgress(stderr, len(plan.todo), enabled=not quiet and stderr.is_terminal,
                             description="indexing")
    counts = {"indexed": 0, "failed": 0}
    try:
        if plan.todo:
            with native_stderr_silenced(not debug_enabled(debug)), progress:
                for record in records:
                    progress.advance(record.duration)
                    if record.error is None:
                        record.scores = score_heads(heads, record.vectors)
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
    return counts["failed"]


def _score_stored(store, heads, stderr, quiet: bool) -> None:
    """Windows stored before (by runs without these heads, or before one changed): scored from their stored
    embeddings, no backbone pass."""
    from ..tasks.index import score_stored
    from ._errors import say

    scored: dict[str, int] = {}  # per head: the windows it scored (a head that had scored them all is left out)
    score_stored(store, heads, lambda name, rows: scored.__setitem__(name, scored.get(name, 0) + rows))
    by_count: dict[int, list[str]] = {}
    for name, windows in scored.items():
        by_count.setdefault(windows, []).append(name)
    if by_count and not quiet:
        say(stderr, "scored " + "; ".join(f"{counted(windows, 'stored window')} with {', '.join(names)}"
                                          for windows, names in by_count.items()))


def _update_ann(store, stderr, quiet: bool) -> None:
    """Past the exact-search size, bring the ANN index up to date now (the windows added by this run), so that
    no search has to; a killed run leaves it to the next search."""
    from ..run import vectordb
    from ._errors import say

    windows = len(store)
    if windows <= vectordb.EXACT_LIMIT or store.ann_is_current():
        return
    if not quiet:
        say(stderr, f"updating the search index ({counted(windows, 'window')})")
    store.ann()
    if store.unsaved is not None:  # a full disk: the windows are stored, the next search builds it again
        say(stderr, f"warning: {store.unsaved}")


def _records(todo, path: str, model: str, run: RunOptions, cluster, stderr, quiet: bool, heads=(), debug=False):
    """The stored form of each file still to do, in order: embedded here, or by Ray actors (the driver stores).
    The model is loaded (or the cluster joined) now; nothing when there is nothing to do (with ``heads`` it is
    loaded all the same: it checks that they were trained on it)."""
    if not todo and not heads:
        return iter(())
    if cluster.ray:
        from ..tasks.distributed import connect, run_ray_embed
        from ._io import stdout_for_data_only

        with stdout_for_data_only():
            connect(cluster, not debug_enabled(debug))  # no cluster there: one line, before the index is opened
        return run_ray_embed(todo, path, run, cluster)
    from ..tasks.index import embed_files

    tagger = load_tagger(model, run, stderr, quiet, resolved=path, heads=heads,  # resolved once, for the identity
                         embeddings=True)
    return (record for record, _ in embed_files(todo, tagger)) if todo else iter(())
