"""``--fast``'s cache file, ``fast_cache_path()``: a list of (key, choice) entries. Part of ``fast.choose``.

Read and written only in a folder that is ours alone (owned by this user, writable by nobody else, not a link),
as the AMX kernels' folder is: under umask 002 an older version left ``ast-cli`` group-writable, where another
user could have planted a link that a write would have gone through. A link in place of the file is never read
nor written through: the write replaces the link itself. Writers take a lock beside the file and merge with what
is there just before the rename, so that two runs calibrating at once both keep their choice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from typing import Iterator

# 2: the bf16 candidate fuses QKV and the residual adds; 3: its attention runs on AMX tiles; 4: the int8
# candidates' attention runs on int16 dot products (VNNI)
CACHE_VERSION = 4
MAX_CACHE_BYTES = 1 << 20  # a larger cache file is not ours: ignored, rewritten
MAX_CACHE_ENTRIES = 64  # oldest dropped beyond this
LOCK_SECONDS = 10.0  # the most a writer waits for another's lock (a write takes milliseconds): then it skips


def fast_cache_path() -> str:
    """``$XDG_CACHE_HOME/ast-cli/fast-v4.json`` (``ast_cache_dir``); the environment is read at call time."""
    from ..checkpoint.names import ast_cache_dir

    return str(ast_cache_dir() / f"fast-v{CACHE_VERSION}.json")


def untrusted(folder: str) -> str | None:
    """Why the cache in ``folder`` must be neither read nor written (None: it is ours alone, or not made yet)."""
    from pathlib import Path

    from ..checkpoint.amx import _private

    if not os.path.lexists(folder):
        return None
    if os.path.islink(folder) or not os.path.isdir(folder) or not _private(Path(folder)):
        return f"{folder} is not private (a link, another user's, or writable by others: chmod 700 it)"
    return None


def read_cache(path: str) -> list:
    """The cache's entries; [] for a missing, oversized, corrupt or foreign file (it is rewritten later), and for
    anything but a regular file (a FIFO would block, a device never end) or a link (never followed)."""
    from ..checkpoint.names import read_regular

    try:
        if os.path.islink(path):
            return []
        text = read_regular(path, MAX_CACHE_BYTES)
        if len(text) > MAX_CACHE_BYTES:
            return []
        data = json.loads(text.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), list):
        return []
    return [entry for entry in data["entries"] if isinstance(entry, dict)]


@contextlib.contextmanager
def _locked(path: str, seconds: float = LOCK_SECONDS, clock=time.monotonic, sleep=time.sleep) -> Iterator[bool]:
    """Holds an exclusive flock on ``path`` (made if missing, never through a link) while the block runs; yields
    False, holding nothing, where it is still taken by another after ``seconds``. OSError where it cannot be
    made or locked at all (a read-only folder, a directory in its place, a file system without flock)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        deadline = clock() + seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if clock() >= deadline:
                    yield False
                    return
                sleep(0.05)
        yield True
    finally:
        os.close(fd)  # releases the lock


def write_cache(path: str, key: dict, choice) -> str | None:
    """Add ``choice`` (a ``FastChoice``) for ``key`` to the entries there now, atomically, under the lock (two
    runs that calibrated at once both keep theirs); None, or why it was not cached (a cache that cannot be
    written only costs the next run a calibration)."""
    from .files import atomic_write

    entry = {"key": key, "choice": {"mode": choice.mode, "speedup": choice.speedup, "max_diff": choice.max_diff,
                                    "measure": choice.measure, "candidates": [asdict(c) for c in choice.candidates],
                                    **({"busy": True} if choice.busy else {})}}
    folder = os.path.dirname(path)
    try:
        # ours alone, whatever the umask (002 made it group-writable, and the kernels in it were refused for good)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if (why := untrusted(folder)) is not None:
            return why
        with _locked(os.path.join(folder, f".{os.path.basename(path)}.lock")) as held:
            if not held:
                return "another run held its lock"
            entries = [e for e in read_cache(path) if e.get("key") != key][-(MAX_CACHE_ENTRIES - 1):]
            if os.path.islink(path):  # the rename replaces the link itself, never what it points to
                os.unlink(path)
            with atomic_write(path) as handle:
                json.dump({"version": CACHE_VERSION, "entries": entries + [entry]}, handle, indent=1)
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    return None


BUSY_LOAD = 0.5  # the 1-minute load average, per CPU, from which the machine counts as busy


def machine_busy() -> bool:
    """Whether other jobs load the machine now: a calibration taken then is timed on a machine that slows some
    candidates more than others (int8 timed at 1522 ms against fp32's 774 while the test suite ran beside it on
    the 2-core Sapphire Rapids CPU, 362 against 754 quiet: fp32 was cached). The load average is the whole
    machine's, as ``os.cpu_count``."""
    try:
        return is_busy(os.getloadavg()[0], os.cpu_count() or 1)
    except (OSError, AttributeError):  # no load average on this platform
        return False


def is_busy(load: float, cpus: int) -> bool:
    return load >= BUSY_LOAD * cpus


FIDELITY_ONLY = ("heads", "measure", "activation")  # key fields that change what is compared, not the speed


def cached_timings(entries: list, key: dict) -> dict[str, float]:
    """ms per candidate from an entry of the same machine, torch, weights, threads, device and attention that
    compared something else (other heads, embeddings or scores); {} when there is none, or it is malformed."""
    def timing_key(k: dict) -> dict:
        return {name: value for name, value in k.items() if name not in FIDELITY_ONLY}

    for entry in entries:
        other, choice = entry.get("key"), entry.get("choice")
        if not isinstance(other, dict) or not isinstance(choice, dict) or timing_key(other) != timing_key(key):
            continue
        if choice.get("busy") is True:  # timed on a busy machine: not reused
            continue
        candidates = choice.get("candidates") if isinstance(choice.get("candidates"), list) else []
        timings = {c["name"]: float(c["ms"]) for c in candidates if isinstance(c, dict) and isinstance(
            c.get("name"), str) and isinstance(c.get("ms"), (int, float)) and not isinstance(c.get("ms"), bool)
            and math.isfinite(c["ms"]) and c["ms"] > 0}
        if "fp32" in timings:
            return timings
    return {}
