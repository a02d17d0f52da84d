"""Output files that never harm what was there before: atomic writes beside the target, stale temporary
files, the lock a run holds on its output, and the checks that a place can be written.

New files get the mode the umask allows; a replaced file keeps its mode. From planning (before a resumed
output is read) to the end of writing, a run holds an exclusive lock (a second run on the same output stops
with one line).

And ``console``: the rich console for stdout or stderr, which treats a reader going away as the rest of the
package does; ``native_stderr_silenced``: what C libraries print on file descriptor 2 kept off stderr.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import re
import stat
import sys
import tempfile
import time
from typing import IO, Iterator

from ..errors import UsageError

TEMP_SUFFIX = ".ast-tmp"  # our temporary files: `.<name>.<random>.ast-tmp` beside the output
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, APFS, NTFS)
_BESIDE_ROOM = 32  # what our names add to `.<name>`: `.<random>.ast-tmp` (17), `.ast-lock` (9)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def beside(path: str) -> str:
    """The stem of our files beside ``path`` (temporary files, the lock): ``<folder>/.<name>``, or, where the
    name is too long to take our suffixes within NAME_MAX, ``<folder>/.<hash of the name>``, so that any name
    the file system allows can be an output."""
    path = os.path.realpath(path)
    name = os.path.basename(path)
    if len(os.fsencode(name)) + 1 + _BESIDE_ROOM > NAME_MAX:
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return os.path.join(os.path.dirname(path), "." + name)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it over ``path`` only on success, so an interrupted
    run never leaves a half-written file. A symlink is written through; the file gets the mode the umask
    allows, or keeps the mode of the file it replaces."""
    link, path = os.path.islink(path), os.path.realpath(path)  # through symlinks: the link stays a link
    try:
        before = os.stat(path).st_mode
    except FileNotFoundError:
        before = None
    if link and before is not None and not stat.S_ISREG(before):  # a link to a device or FIFO (a planted link
        # to /dev/zero): the rename would replace that, wherever it is
        raise OSError(errno.EINVAL, "a link to what is not a regular file: not replaced", path)
    fd, tmp = _temp_file(path)
    try:
        os.fchmod(fd, _umask_mode() if before is None else stat.S_IMODE(before))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _temp_file(path: str) -> tuple[int, str]:
    """A new temporary file beside ``path``: (descriptor, name). The descriptor holds a lock on it (flock, released
    by the kernel when the process dies), so that ``remove_stale_temp_files`` leaves a live run's file alone."""
    import fcntl

    stem = beside(path)
    fd, name = tempfile.mkstemp(prefix=os.path.basename(stem) + ".", suffix=TEMP_SUFFIX, dir=os.path.dirname(stem))
    with contextlib.suppress(OSError):  # a file system without flock: the output's lock alone guards it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
    return fd, name


def _ours(name: str, stem: str) -> bool:
    """``name`` is exactly a temporary file ``_temp_file`` makes for the output whose stem is ``stem``:
    ``.<name>.<8 of mkstemp's characters>.ast-tmp``, not that of another output whose name begins the same
    (``.tags.csv.week2.csv.<random>.ast-tmp`` beside ``tags.csv``)."""
    return re.fullmatch(re.escape(stem) + r"\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX), name) is not None


def remove_stale_temp_files(path: str, older_than: float = 0.0) -> int:
    """Remove our temporary files beside ``path`` left by runs that were killed: exactly the names made for
    ``path``, and only those no live process holds. Returns how many were removed."""
    import fcntl

    stem = beside(path)
    removed = 0
    for stale in glob.glob(f"{glob.escape(stem)}.*{TEMP_SUFFIX}"):
        if not _ours(os.path.basename(stale), os.path.basename(stem)):
            continue
        with contextlib.suppress(OSError):
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live run writes it
                if time.time() - os.fstat(fd).st_mtime >= older_than:
                    os.unlink(stale)
                    removed += 1
            finally:
                os.close(fd)
    return removed


class OutputLock:
    """An exclusive advisory lock for one output, held while a run writes it (flock on a lock file beside it;
    the kernel releases it when the process dies, so a killed run never blocks the next)."""

    def __init__(self, path: str):
        self.output = path
        self.path = beside(path) + ".ast-lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write beside {self.path}: {exc.strerror or exc}", option="output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another run is writing {self.output} right now", option="output") from None
        if not _same_file(fd, self.path):  # the run that held it removed it meanwhile: lock the one there now
            os.close(fd)
            return self.acquire()
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _kind(path: str) -> str:
    """``missing``, ``regular`` (through symlinks), ``directory`` or ``special`` (device, FIFO, socket)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise UsageError(f"cannot use {path}: {exc.strerror or exc}", option="output") from None
    if stat.S_ISDIR(info.st_mode):
        return "directory"
    return "regular" if stat.S_ISREG(info.st_mode) else "special"

def check_writable_dir(out_dir: str, option: str = "out") -> None:
    """Fail before any work where nothing can be written below ``out_dir`` (a read-only file system, no
    permission), probing its nearest existing ancestor with a temporary file."""
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ast-probe-", suffix=TEMP_SUFFIX, dir=existing)
    except OSError as exc:
        raise UsageError(f"cannot write in {out_dir}: {exc.strerror or exc}", option=option) from None
    os.close(fd)
    os.unlink(probe)


def _check_writable(path: str) -> None:
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    if not os.path.isdir(directory):
        raise UsageError(f"the folder of {path} does not exist", option="output")
    try:
        fd, probe = _temp_file(real)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}", option="output") from None
    os.unlink(probe)  # while its lock is held: no clean-up of another run takes it first
    os.close(fd)
    if os.path.exists(real) and not os.access(real, os.W_OK):
        raise UsageError(f"cannot write {path}: permission denied", option="output")


class ShardLock:
    """Held by a ``--shard`` run while it writes its shard file, so a merge leaves that file alone (flock: the
    kernel drops it when the process dies, and a killed shard is merged as far as it got)."""

    def __init__(self, path: str):
        self.path = path + ".lock"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


PIECE = 2048  # characters: at most 8 KiB of UTF-8, within the buffer of Python's text streams


class _Pieces:
    """A text stream (a given one, else ``sys.stdout`` or ``sys.stderr`` as they are at each call) written in
    pieces of at most ``PIECE`` characters. CPython loses the rest of one larger write that a pipe takes only in
    part, without an error, when the reader goes away mid-write (`ast search -f table | head -1` exited 0 with
    the table cut); pieces go through the stream's buffer, whose flush raises ``BrokenPipeError`` there."""

    def __init__(self, stream=None, stderr: bool = False) -> None:
        self._stream, self._stderr = stream, stderr

    def _target(self):
        import sys

        target = self._stream if self._stream is not None else (sys.stderr if self._stderr else sys.stdout)
        return getattr(target, "rich_proxied_file", target)  # under a rich Live's redirection: the stream below

    def write(self, text: str) -> int:
        target = self._target()
        for at in range(0, len(text), PIECE):
            target.write(text[at:at + PIECE])
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._target(), name)


def console(**options):
    """A rich ``Console`` (``options`` as rich's) that meets a reader going away as ``ast`` does, not as rich's
    default does (stdout pointed at /dev/null and ``SystemExit(1)``, whichever stream broke): on stdout a
    ``BrokenPipeError``, which the front end ends quietly with exit 141 as with every other format; on stderr
    silence from then on, since messages are best effort and the data must go on. It writes in pieces
    (``_Pieces``), so that a reader going away is always noticed."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True  # nothing more reaches this stream
            if not self.stderr:
                raise BrokenPipeError(32, "the reader of standard output went away")

    options["file"] = _Pieces(options.get("file"), stderr=options.get("stderr", False))
    return _Console(**options)


@contextlib.contextmanager
def native_stderr_silenced(enabled: bool = True) -> Iterator[None]:
    """Send what C libraries print on file descriptor 2 (mpg123's "Note: Trying to resync...", ffmpeg,
    libsndfile) to /dev/null while a batch runs, so that stderr carries only our progress and one line
    per failure. Python's own ``sys.stderr`` keeps writing to the real stderr. (The CLI's --debug: not enabled.)"""
    if not enabled:
        yield
        return
    import io
    import warnings

    try:
        python_fd = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        python_fd = None  # sys.stderr is not a real file (a test runner's capture): leave it alone
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    old_stderr = sys.stderr
    if python_fd == 2:
        sys.stderr = open(os.dup(saved), "w", encoding=old_stderr.encoding or "utf-8", errors="backslashreplace",
                          buffering=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library warnings are not the user's business without --debug
            yield
    finally:
        if sys.stderr is not old_stderr:
            try:  # stderr may be full or gone (2>/dev/full): messages are best effort
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            try:
                sys.stderr.close()
            except (OSError, ValueError):
                pass
            sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)
