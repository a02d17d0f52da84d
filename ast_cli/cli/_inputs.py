"""What a run reads from the paths it is given: its audio inputs (``classify``, ``extract-features``: named paths,
folders, patterns and ``-``, one ``--shard`` of them, and what to say when there are none), and label lists
(``--include @FILE``)."""

from __future__ import annotations

from ._errors import counted, say

_MISSING = ("no such file", "no file matches this pattern")  # inputs.expand_inputs' errors for a path not there
MAX_LABEL_LIST_BYTES = 4 << 20  # far more than any model's labels: anything larger (@/dev/zero) is not a list


def run_inputs(paths: list[str], ext, shard: tuple[int, int] | None, stderr, quiet: bool, verb: str) -> list:
    """The inputs of a run (``inputs.InputFile``), ``shard``'s part of them; a folder named next to other inputs
    that holds no audio is an error item of its own. [] when there is nothing to do, an empty list on stdin or an
    empty shard: said on stderr (not with ``quiet``), and the run ends with exit 0, writing nothing. Named folders
    or patterns with no audio at all are an ``AstError`` (exit 1): a typo in a path or --ext must not look like
    success."""
    from ..audio.inputs import expand_inputs, parse_extensions
    from ..errors import AstError
    from ..tasks.distributed import take_shard
    from ._common import path_stdin

    found = expand_inputs(paths, parse_extensions(ext), stdin=path_stdin(paths))
    named = [path for path in paths if path != "-"]
    if not found and named:
        raise AstError(f"no {_looked_for(ext)} in {', '.join(named)}",
                       hint="check the paths and --ext" if ext else "--ext chooses the extensions taken from folders")
    refuse_only_missing(found, verb)
    every = found + _empty_folders(paths, found, ext)
    import os

    # a path as given, written one way: ./data/a.wav and data/a.wav (or data//a.wav) are in the same shard
    items = take_shard(every, shard, key=lambda item: os.path.normpath(item.path))
    if not items and not quiet:
        where = "standard input listed no files" if not found else (
            f"shard {shard[0]}/{shard[1]} holds none of the {counted(len(every), 'input')}")
        say(stderr, f"nothing to {verb}: {where}")
    return items


def refuse_only_missing(found, verb: str, hint: str = "check the paths") -> None:
    """An ``AstError`` (exit 1) when every input is a path that is not there (a typo, a pattern that matches
    nothing): not a run whose every file fails, which would open the output (and with --overwrite replace a good
    one with its error records) and load the model first."""
    from ..errors import AstError

    import os

    if found and all(item.error in _MISSING or (item.error is None and getattr(item, "source", None) is None
                                                and os.path.islink(item.path) and not os.path.exists(item.path))
                     for item in found):  # (a link to nothing is not there either)
        shown = "; ".join(f"{item.path}: {item.error or 'no such file (a broken link)'}" for item in found[:3])
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise AstError(f"nothing to {verb}: {shown}{more}", hint=hint)


def _looked_for(ext) -> str:
    from ..audio.inputs import parse_extensions

    if not ext:
        return "audio or video files"
    return "files ending in " + ", ".join("." + e for e in sorted(parse_extensions(ext)))


def _empty_folders(paths: list[str], found, ext) -> list:
    """A folder named next to other inputs that gave no file: an error item of its own (like a pattern that
    matches nothing), so the rest goes on and the exit code says something was wrong."""
    import os

    from ..audio.inputs import InputFile, named_by

    return [InputFile(path, error=f"no {_looked_for(ext)} in this folder") for path in dict.fromkeys(paths)
            if path != "-" and os.path.isdir(path) and not any(named_by(item.path, [path]) for item in found)]


def label_file(path: str) -> list[str]:
    """The labels in ``--include``/``--exclude`` ``@FILE``: one per line, UTF-8, ``#`` comments, read with a bound.
    One that cannot be read, is larger than MAX_LABEL_LIST_BYTES or is not UTF-8 is a UsageError naming it."""
    from ..errors import UsageError

    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_LABEL_LIST_BYTES + 1)
        if len(data) > MAX_LABEL_LIST_BYTES:
            raise UsageError(f"the label list {path} is larger than {MAX_LABEL_LIST_BYTES >> 20} MiB: not a list "
                             "of labels", option="labels")
        text = data.decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the label list {path}: {exc.strerror or exc}", option="labels") from None
    except UnicodeDecodeError:
        raise UsageError(f"the label list {path} is not UTF-8 text", option="labels") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [line for line in lines if line]
