"""``ast search``: the windows of an index most like an example window, or a label's direction."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Optional

import typer

from ..run.options import _choices
from ._app import app
from ._common import DebugOpt, stderr_console
from ._errors import cli_errors, debug_enabled, say
from ._io import native_stderr_silenced

SearchFormat = _choices("SearchFormat", "table jsonl csv audacity", "How search results are printed.")
CSV_COLUMNS = ["path", "start", "end", "score", "label"]


@app.command()
def search(
    db: Annotated[str, typer.Argument(metavar="DB", help="An index directory (ast index made it).")],
    query: Annotated[Optional[str], typer.Argument(metavar="QUERY", help="An audio file: its window from --start is the example.")] = None,
    start: Annotated[float, typer.Option(min=0.0, metavar="SECONDS", help="Where the query window starts.")] = 0.0,
    end: Annotated[Optional[float], typer.Option(metavar="SECONDS", help="Where it ends (default: one model window; a shorter one is padded).")] = None,
    label: Annotated[Optional[str], typer.Option(metavar="NAME", help="Instead of a QUERY: the windows a head the index scores (ast index --head) gives this label's highest probability, or else along the model's own classifier direction for it.")] = None,
    head: Annotated[Optional[str], typer.Option("--head", metavar="NAME", help="With --label: this stored head's scores (when two heads have the label).")] = None,
    top: Annotated[int, typer.Option(min=1, metavar="K", help="Windows to return.")] = 10,
    exclude_file: Annotated[bool, typer.Option("--exclude-file", help="Leave out windows of the query's own file.")] = False,
    min_score: Annotated[Optional[float], typer.Option(min=-1.0, max=1.0, metavar="X", help="Only windows with score >= X (cosine, -1 to 1; a head's probability, 0 to 1).")] = None,
    format: Annotated[SearchFormat, typer.Option("--format", "-f", help="table, jsonl, csv (with an empty label column to fill for ast train --features-db) or audacity labels.")] = SearchFormat.table,
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="PATH", help="Where the index's model is now, when its folder moved (its weights must be the ones the index was made with).")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", metavar="DIR", help="--format audacity: one label track per file with hits, DIR/<name>.labels.txt (replaced; files in several folders: their tree below the common one).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Find the indexed windows most like an example: results are windows (path, start, end, cosine score),
    best first. The query is embedded with the model the index was made with. With --label, a label of a head
    that ast index --head stored: the windows it scores highest (the score is its probability).

    Examples:

      ast search archive.db door.wav --start 12.5 --top 20

      ast search archive.db --label Dog --format csv > hits.csv

      ast search archive.db --label robin --head birds --min-score 0.8

      ast train hits.csv --features-db archive.db --out dog-detector/
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        import os

        from ..errors import UsageError
        from ..tasks.index import Index

        if (query is None) == (label is None):
            raise UsageError("give a QUERY audio file or --label NAME (one of them)", option="label")
        if query == "-":  # a query window is read at an offset, from a file
            raise UsageError("QUERY is an audio file: audio on stdin (-) is not taken as a query",
                             hint="save it to a file and give its path")
        if head is not None and label is None:
            raise UsageError("names the head whose --label to search: it goes with --label", option="head")
        if end is not None and not end > start:
            raise UsageError(f"{end:g} s is not after --start {start:g} s", option="end")
        if output_dir is not None and format is not SearchFormat.audacity:
            raise UsageError("writes Audacity label tracks: it goes with --format audacity",
                             option="output_dir")
        if output_dir is not None:  # a folder that cannot take the tracks: before the model loads
            from ..run.output import plan_output_dir

            plan_output_dir(output_dir, "audacity", [], overwrite=True)
        # a query that cannot be decoded: our one line, without mpg123's or libsndfile's notes before it
        with native_stderr_silenced(not debug_enabled(debug)), named_db(), Index.open(db) as index:
            _note_read_only(index, db, stderr)
            if model is not None:  # checked before the model loads
                index.use_model(model)
            found = index.head_of(label, head) if label is not None else None
            if found is not None:
                hits = index.search_head(label, found[0], top, min_score)
                _note_unscored(index, found[0], stderr)
                _note_changed(index, found[0], db, stderr)
            elif label is not None:
                hits = index.search(index.label_vector(label), top, min_score=min_score)
            else:
                hits = index.search(query, top, start=start, end=end, exclude_file=exclude_file,
                                    min_score=min_score)
            from ._common import announce_fast

            announce_fast(index.fast_choice, stderr, quiet=False)  # an index made with --fast searches so too
            if index.store.unsaved is not None:  # a full disk: searched all the same, built again next time
                say(stderr, f"warning: {index.store.unsaved}")
            if index.fallback is not None:
                say(stderr, f"note: the index was made in {index.identity['compute']}, which does not run here: the "
                            f"query is embedded in {index.fallback} (scores within {index.identity['compute']}'s "
                            "rounding of the stored ones)")
        if output_dir is not None:
            return _label_tracks(hits, output_dir, label or f"like {os.path.basename(query)}")
        _print(hits, format)


@contextmanager
def named_db():
    """The library's refusals of its ``db`` (``ast index --db``) name the argument DB here."""
    from ..errors import UsageError

    try:
        yield
    except UsageError as exc:
        if exc.option == "db":
            exc.option = "db_argument"
        raise


def _note_read_only(index, db: str, stderr) -> None:
    """Once, what a search that cannot write the index leaves undone."""
    from ..run.readonly import ReadOnlyStore
    from ..run.vectordb import EXACT_LIMIT, shard_paths
    from ._errors import counted, say

    if not isinstance(index.store, ReadOnlyStore):
        return
    undone = [f"{counted(len(shards), 'shard')} not merged (searched without them)"] if (
        shards := shard_paths(db)) else []
    if len(index) > EXACT_LIMIT and not index.store.ann_is_current():
        undone.append("its search index is built in memory, not saved")
    if undone:
        say(stderr, f"note: {db} cannot be written here: {'; '.join(undone)}")


def _note_changed(index, head: str, db: str, stderr) -> None:
    """A head retrained in its folder since it scored the index: the stored scores are its old ones."""
    from ..run.headscores import head_digest
    from ._errors import say

    entry = index.heads()[head]
    try:
        changed = head_digest(entry["path"]) != entry["digest"]
    except (OSError, KeyError):  # its folder gone or unreadable: the stored scores are all there is
        return
    if changed:
        say(stderr, f"note: head {head} changed since it scored {db}: these are its old scores; ast index ... "
                    f"--db {db} --head {entry['path']} scores the index again")


def _note_unscored(index, head: str, stderr) -> None:
    from ._errors import counted, say

    missing = index.unscored(head)
    if missing:
        # stored by a run without the head, or a --shard run (it scores only its own part), or before it changed
        say(stderr, f"{counted(missing, 'window')} of the index are not scored by head {head}: ast index ... "
                    f"--head {index.heads()[head]['path']} (without --shard) scores them")


def _label_tracks(hits, output_dir: str, text: str) -> None:
    """One Audacity label track per file with hits (the writers ``classify --output-dir`` uses), each hit a
    label ``text (score)``."""
    import os

    from ..audio.inputs import InputFile
    from ..run.output import plan_output_dir
    from ..run.tagger import FileResult, LabelScore, Segment

    by_file: dict[str, list] = {}
    for hit in hits:
        by_file.setdefault(hit.path, []).append(Segment(hit.start, hit.end, [LabelScore(text, 0, hit.score)]))
    # below the hits' common folder, as classify mirrors a folder it was given: two files of one name in
    # different folders (day1/0001.wav, day2/0001.wav) each get their own track
    root = os.path.commonpath([os.path.dirname(path) for path in by_file]) if len(by_file) > 1 else None
    target, _ = plan_output_dir(output_dir, "audacity", [InputFile(path, root=root) for path in by_file],
                                overwrite=True)
    writer = target.open(segments=True)
    for path, segments in by_file.items():
        writer.write(FileResult(path, None, [], segments=sorted(segments, key=lambda s: s.start)))
    writer.close(commit=True)


def _print(hits, format) -> None:
    import csv
    import sys
    from dataclasses import replace

    from ..run.records import display_path, dumps

    if format is SearchFormat.jsonl:  # a name that is not UTF-8 as \udcXX escapes, as classify writes it
        for hit in hits:
            sys.stdout.write(dumps({"path": hit.path, "start": hit.start, "end": hit.end, "score": hit.score}) + "\n")
        return
    hits = [replace(hit, path=display_path(hit.path)) for hit in hits]  # as classify shows it: \xNN
    if format is SearchFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows([hit.path, hit.start, hit.end, hit.score, ""] for hit in hits)
    elif format is SearchFormat.audacity:  # Audacity's label track: start, end, text (the file and score)
        for hit in hits:
            sys.stdout.write(f"{hit.start:.6f}\t{hit.end:.6f}\t{hit.path} {hit.score:.4f}\n")
    else:
        _table(hits)


def _table(hits) -> None:
    """One line per hit. A path is text, never rich markup (``[red]take 1.wav``); in a terminal a long one folds,
    piped it is never cut (the width is then what the longest line needs)."""
    import sys

    from rich.table import Table
    from rich.text import Text

    from ..run.files import console

    table = Table(box=None, pad_edge=False)
    for column, justify in (("score", "right"), ("start", "right"), ("end", "right"), ("path", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for hit in hits:
        table.add_row(f"{hit.score:.4f}", f"{hit.start:.2f}", f"{hit.end:.2f}", Text(hit.path))
    width = None if sys.stdout.isatty() else 30 + max([len(hit.path) for hit in hits] + [50])
    console(highlight=False, soft_wrap=False, emoji=False, width=width).print(table)
