"""Command-line inputs -> an ordered list of files: paths, directories (walked), globs and ``-`` (stdin)."""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, TextIO

from .decode import AUDIO_EXTENSIONS

GLOB_CHARS = set("*?[")
NOT_REGULAR = "not a regular file (a FIFO, socket or device is read only when named on its own)"


@dataclass(frozen=True)
class InputFile:
    """One file to process. ``path`` is how the user named it (or as found under a given directory);
    ``root`` is the directory it was found under, or None when given directly."""

    path: str
    root: str | None = None
    error: str | None = None  # set when the argument itself is unusable (no such file)
    source: object = field(default=None, compare=False, repr=False)  # audio that is no file: ``-`` on stdin

    @property
    def relative(self) -> str:
        """Path below its root, or its basename when given directly (used to mirror trees)."""
        if self.root is None:
            return os.path.basename(self.path)
        return os.path.relpath(self.path, self.root)


def parse_extensions(values: Iterable[str] | None) -> frozenset[str]:
    """``--ext wav,flac --ext .mp3`` -> {"wav", "flac", "mp3"}; None -> the default audio/video set."""
    if not values:
        return AUDIO_EXTENSIONS
    exts = {e.strip().lstrip(".").lower() for value in values for e in value.split(",")}
    return frozenset(e for e in exts if e)


def regular_or_missing(path: str) -> bool:
    """False for a FIFO, socket or device (or a link to one): reading it could wait forever for a writer."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # a dangling link and the like: decoding it says what is wrong


def _walk(directory: str, extensions: frozenset[str],
          unreadable: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """(path, error) of the audio files below ``directory``, sorted; the error is ``NOT_REGULAR`` for a FIFO,
    socket or device, else None. Directories that cannot be read are added to ``unreadable``.

    Links to folders are followed (an archive put together from links is common), each real folder once: a
    loop, or a second way to a folder already walked, is not entered again; nor is a link to a folder that holds
    ``directory`` (``/``, ``..``): it leads around and out of it, up to the whole file system."""
    found = []
    walked = {_identity(directory)}
    top = os.path.realpath(directory)

    def onerror(exc: OSError) -> None:
        unreadable.append((exc.filename or directory, f"cannot read this directory: {exc.strerror or exc}"))

    def first_visit(folder: str) -> bool:
        identity = _identity(folder)
        if identity in walked or (os.path.islink(folder) and _holds(os.path.realpath(folder), top)):
            return False
        walked.add(identity)
        return True

    for current, dirs, files in os.walk(directory, onerror=onerror, followlinks=True):
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".") and first_visit(os.path.join(current, d))]
        for name in files:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lstrip(".").lower() in extensions:
                path = os.path.join(current, name)
                found.append((path, None if regular_or_missing(path) else NOT_REGULAR))
    # Sort by path components so that "a/b.wav" < "a b.wav" ordering is the same on every machine.
    return sorted(found, key=lambda item: Path(os.path.relpath(item[0], directory)).parts)


def _holds(folder: str, path: str) -> bool:
    """Whether real path ``folder`` is ``path`` or one of the folders above it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _identity(folder: str) -> tuple[int, int] | str:
    """What a folder is, whatever the path to it: (device, inode), or its path when it cannot be looked at (the
    walk then says why)."""
    try:
        info = os.stat(folder)
    except OSError:
        return folder
    return info.st_dev, info.st_ino


def expand_inputs(
    arguments: Iterable[str], extensions: frozenset[str] = AUDIO_EXTENSIONS, stdin: TextIO | None = None
) -> list[InputFile]:
    """Files in a deterministic order, each once. ``-`` reads one path per line from ``stdin``; when ``stdin``
    is an audio source instead (``sources.PipedAudio``: audio arrived there), ``-`` is that one input.

    A named path that does not exist, a directory that cannot be listed, and a FIFO, socket or device found in a
    directory or by a pattern (one named on its own is read as a stream) become ``InputFile``s with ``error``
    set, so that they get an error record like any unreadable file instead of stopping (or hanging) the run, or
    being skipped in silence.
    """
    out: list[InputFile] = []
    seen: set[str] = set()

    def add(item: InputFile) -> None:
        key = os.path.normcase(os.path.abspath(item.path))
        if key not in seen:
            seen.add(key)
            out.append(item)

    def handle(arg: str, from_stdin: bool = False) -> None:
        if os.path.isdir(arg):
            unreadable: list[tuple[str, str]] = []
            for path, error in _walk(arg, extensions, unreadable):
                add(InputFile(path, root=arg, error=error))
            for path, error in unreadable:  # a folder we could not list is a failure, not silence
                add(InputFile(os.fspath(path), root=arg, error=error))
        elif os.path.exists(arg) or os.path.islink(arg):
            add(InputFile(arg))
        elif not from_stdin and GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                add(InputFile(arg, error="no file matches this pattern"))
            for match in matches:
                if os.path.isdir(match) or regular_or_missing(match):
                    handle(match, from_stdin=True)
                else:
                    add(InputFile(match, error=NOT_REGULAR))
        else:
            add(InputFile(arg, error="no such file"))

    for arg in arguments:
        if arg == "-":
            if stdin is None:
                continue
            if hasattr(stdin, "blocks"):
                add(InputFile("-", source=stdin))
                continue
            for line in stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    handle(line, from_stdin=True)
        else:
            handle(arg)
    return out


def named_by(path: str, arguments: Iterable[str]) -> bool:
    """Whether one of the command-line ``arguments`` (files, folders, glob patterns; ``-``, a list on stdin, names
    nothing in advance) names ``path``, whether or not either exists now: the path itself, one below a named
    folder, or a pattern's match or one below it. As ``glob`` matches: ``*``, ``?`` and ``[...]`` within one path
    component (never across a ``/``), ``**`` any number of components, a hidden name only where the pattern's
    component starts with a dot."""
    parts = _components(path)
    for argument in arguments:
        pattern = _components(argument) if argument != "-" else None
        if pattern is not None and (parts[: len(pattern)] == pattern or
                                    (bool(GLOB_CHARS & set(argument)) and _glob_prefix(parts, pattern))):
            return True
    return False


def gone(path: str) -> bool:
    """Whether nothing is at ``path`` any more (a folder on the way that cannot be read now: not gone)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _components(path: str) -> list[str]:
    return [part for part in os.path.abspath(path).split(os.sep) if part]


def _glob_prefix(parts: list[str], pattern: list[str]) -> bool:
    """Whether the first of ``parts`` (path components) match the glob ``pattern``'s components, all of them."""
    if not pattern:
        return True
    if pattern[0] == "**":  # none of the components, or one more (not a hidden one)
        return _glob_prefix(parts, pattern[1:]) or (
            bool(parts) and not parts[0].startswith(".") and _glob_prefix(parts[1:], pattern))
    if not parts or not fnmatch.fnmatchcase(parts[0], pattern[0]):
        return False
    hidden = parts[0].startswith(".") and not pattern[0].startswith(".") and bool(GLOB_CHARS & set(pattern[0]))
    return not hidden and _glob_prefix(parts[1:], pattern[1:])


def mirrored_path(item: InputFile, out_dir: str, suffix: str) -> str:
    """``out_dir/<path relative to the directory it was found under>`` + suffix; a file named directly keeps
    its basename. The audio extension stays (``a/song.wav`` -> ``a/song.wav.json``), so ``song.wav`` and
    ``song.flac`` side by side do not collide."""
    relative = os.path.normpath(item.relative)
    if os.path.isabs(relative) or relative == ".." or relative.startswith(".." + os.sep):
        relative = os.path.basename(item.path)  # never write outside out_dir
    return os.path.join(out_dir, relative + suffix)


def claim_outputs(items: Iterable[InputFile], out_dir: str, suffix: str) -> list[tuple[InputFile, str]]:
    """(item, its mirrored output) for every item, before any work. Two usable inputs that would write the
    same file are a ``UsageError`` naming both (two files of one name given directly, or a folder given twice
    under different names)."""
    from ..errors import UsageError

    pairs = []
    claimed: dict[str, str] = {}
    for item in items:
        output = mirrored_path(item, out_dir, suffix)
        if item.error is None:
            key = os.path.normcase(os.path.abspath(output))
            if key in claimed:
                raise UsageError(
                    f"{claimed[key]} and {item.path} would both be written to {output}",
                    hint="give their common parent directory instead, or run them separately",
                )
            claimed[key] = item.path
        pairs.append((item, output))
    return pairs
