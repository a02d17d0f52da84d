"""Model names -> local checkpoint paths, downloading what is missing (names.py parses the names, cache.py reads
the cache).

A model is named once and is then there: ``resolve_model`` turns an alias (``speech-commands-v2``), a hub id
(``ORG/NAME[@REV]``), a hub-layout directory or a weights file into a local path, downloading a missing hub
model into the Hugging Face cache unless offline. Downloads fetch only what inference needs, all from one commit.

The work is huggingface_hub's own: ``HfApi.model_info`` resolves the revision, ``snapshot_download`` fetches
the files pinned to that commit (cache.py lists the cache with ``scan_cache_dir``). This module only chooses
the files, reads the environment and names the failures.

The environment (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_HUB_CACHE``) is read at call
time and passed to huggingface_hub explicitly, since that library reads most of it once, at import. Nothing
process-wide is changed beyond a call: the one setting that cannot be passed per call is huggingface_hub's own
offline switch (``HF_HUB_OFFLINE`` as it was when huggingface_hub was first imported); when it is on, this module
keeps to the cache too, and says why (see ``is_offline``). While a download runs, a request hook on
huggingface_hub's shared HTTP client bounds the waits it would leave unbounded (``_bounded_requests``).

Failures are our few named exceptions with structured fields (``ModelNotFoundError.problem``,
``CheckpointError.corrupt``...); their text and hints never name command-line options.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from .. import __version__
from ..constants import DEFAULT_MODEL
from ..errors import AstError, CheckpointError, HubError, ModelNotFoundError, OutputWriteError, UsageError
from .cache import cached_snapshot, damaged_snapshot, verify_weights
from .names import (AST_MODEL_TYPE, COMMIT_HASH, CONFIG_NAME, DEFAULT_REVISION, LIBRARY_NAME, PICKLE_NAME,
                    PREPROCESSOR_NAME, SAFETENSORS_NAME, _RETRY_HINT, _cache, _hub_library_offline, _model_type,
                    _one_line, _token, _weights_in, check_revision, hub_endpoint, is_offline, looks_local,
                    parse_model_name)

# Seconds the hub may take to accept a connection or send the next bytes (huggingface_hub's own default for
# file requests; its model_info waits forever unless told).
HUB_TIMEOUT_SECONDS = 10.0
# A transfer slower than this is stalled, as curl's --speed-limit/--speed-time: fewer than HUB_SLOW_BYTES in
# HUB_SLOW_SECONDS (about 1 KiB/s over a minute). A hub that trickles a byte every few seconds passes the per-read
# bound above forever; at that rate nothing would ever arrive anyway.
HUB_SLOW_SECONDS = 60.0
HUB_SLOW_BYTES = 64 * 1024


class HubStalled(TimeoutError):
    """A response body slower than HUB_SLOW_BYTES per HUB_SLOW_SECONDS. Not an HTTP client error, so huggingface_hub
    does not retry it (its resumed tries would trickle again, their retry count reset by every byte that came)."""

# -- progress --------------------------------------------------------------------------------------


class DownloadProgress(Protocol):
    """What ``download`` tells a front end about a transfer; the library itself prints nothing.

    ``start``: the weights of ``model`` are about to be fetched into ``cache``, ``size`` bytes (None: unknown);
    ``advance``: that many more bytes are on disk (called from huggingface_hub's download threads);
    ``finish``: the transfer ended, done or failed.
    """

    def start(self, model: str, size: int | None, cache: Path) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


def _tqdm_class(progress: DownloadProgress | None) -> type:
    """huggingface_hub's tqdm, silenced (its bars are not ours), passing the bytes its snapshot bar counts on to
    ``progress``. A subclass rather than ``disable_progress_bars()``, which would silence every caller in the
    process."""
    from huggingface_hub.utils import tqdm

    class Forwarding(tqdm):
        def __init__(self, *args, **kwargs):
            # The bar of bytes written, summed over the files (huggingface_hub names it so); not the file count.
            self.counts_bytes = progress is not None and kwargs.get("name") == "huggingface_hub.snapshot_download"
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self.counts_bytes and n:
                progress.advance(int(n))
            return super().update(n)

    return Forwarding


# -- resolving and downloading ---------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadResult:
    """What ``download`` left in the cache: the snapshot folder, the files inference needs there, whether
    anything was transferred (False: all of it was cached already) and their size in bytes."""

    path: Path
    files: tuple[str, ...]
    fetched: bool
    size: int


def resolve_model(name: str, *, offline: bool | None = None, cache_dir: str | None = None,
                  progress: DownloadProgress | None = None) -> Path:
    """Local checkpoint path for ``name``: a local file or directory as is; an alias or hub id from the cache,
    downloaded first when missing unless offline (``offline``, else HF_HUB_OFFLINE now; see ``is_offline``).

    ``progress``: told about a download (see ``DownloadProgress``); None downloads silently.
    Raises ``ModelNotFoundError`` (``problem`` says which), ``CheckpointError`` for corrupt cached weights,
    ``HubError`` when the hub cannot be reached.
    """
    if looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"no such model file or directory: {name}", model=name, problem="no_such_path")
        return path
    repo_id, revision = parse_model_name(name)
    snapshot = cached_snapshot(repo_id, revision, cache_dir)
    if snapshot is not None:
        verify_weights(_weights_in(snapshot), name)
        return snapshot
    if is_offline(offline) or _hub_library_offline():
        raise _not_cached(name, repo_id, cache_dir, library=not is_offline(offline), revision=revision)
    return download(name, cache_dir=cache_dir, offline=False, progress=progress).path


def _not_cached(name: str, repo_id: str, cache_dir: str | None, *, library: bool = False,
                revision: str | None = None) -> AstError:
    if (snapshot := damaged_snapshot(repo_id, revision, cache_dir)) is not None:  # there, a file of it gone
        return CheckpointError(f"the cached snapshot of {repo_id} is damaged: {snapshot} is gone or lacks its "
                               "config.json or weights file", path=str(snapshot), model=name, corrupt=True)
    if library:  # we would go online, but huggingface_hub was imported under HF_HUB_OFFLINE=1
        return ModelNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({_cache(cache_dir)}) and huggingface_hub is in "
            "offline mode in this process",
            model=name, problem="not_cached",
            hint="huggingface_hub reads HF_HUB_OFFLINE once, when first imported: start the process without it",
        )
    return ModelNotFoundError(
        f"model {repo_id!r} is not in the Hugging Face cache ({_cache(cache_dir)}) and offline mode is on",
        model=name, problem="not_cached", hint="download it where the hub is reachable (HF_HUB_OFFLINE unset)",
    )


def download(name: str = DEFAULT_MODEL, *, revision: str | None = None, cache_dir: str | None = None,
             force: bool = False, offline: bool | None = None,
             progress: DownloadProgress | None = None) -> DownloadResult:
    """Fetch what inference needs from the hub into the HF cache, all from one commit.

    Files: ``config.json``, ``preprocessor_config.json`` and ``model.safetensors`` (``pytorch_model.bin`` only
    when the repo has no safetensors). The revision (``revision``, or ``@REV`` in ``name``, default main) is
    resolved to a commit once, and every file is fetched at that commit, so a push during the download cannot
    mix two; the cache's ref for the revision then points at it, as huggingface_hub's own downloads leave it.
    The config is fetched and checked first, so no weights are fetched for a repo that is not an AST.

    Idempotent: files already cached are not transferred again unless ``force`` (``DownloadResult.fetched``
    tells). Offline (see ``is_offline``), a complete cached snapshot is returned as is. ``progress`` hears of
    the weights' transfer (``DownloadProgress``); huggingface_hub's own bars are never drawn.

    Raises ``UsageError`` (``option``: ``name``, ``revision`` or ``force``), ``ModelNotFoundError`` (``problem``:
    ``unknown_name``, ``not_cached``, ``no_such_repo``, ``no_such_revision``, ``gated``, ``not_ast``),
    ``CheckpointError(corrupt=True)``, ``HubError``. Their ``model`` is the name that retries the download:
    ``name``, with ``@REV`` appended when the revision came as ``revision``.
    """
    if looks_local(name):
        raise UsageError(f"{name} is a local path: nothing to download", option="name")
    repo_id, name_revision = parse_model_name(name)
    if revision and name_revision and revision != name_revision:
        raise UsageError(f"{name} and revision {revision!r} name different revisions", option="revision",
                         suggest={"revision": None})
    revision = check_revision(revision, name, option="revision") if revision else name_revision
    label = name if not revision or name_revision else f"{name}@{revision}"  # the name that retries this
    offline_now = is_offline(offline)
    if offline_now or _hub_library_offline():
        return _cached_download(label, repo_id, revision, cache_dir, force=force, library=not offline_now)

    from huggingface_hub import HfApi, snapshot_download

    endpoint, token, cache = hub_endpoint(), _token(), str(_cache(cache_dir))
    common = dict(cache_dir=cache, endpoint=endpoint, token=token, force_download=force, library_name=LIBRARY_NAME,
                  library_version=__version__, etag_timeout=HUB_TIMEOUT_SECONDS)
    state: dict = {"files": None}  # which files are on the wire, for messages
    with _hub_errors(label, repo_id, revision, endpoint, state), _bounded_requests():
        api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
        info = api.model_info(repo_id, revision=revision, files_metadata=True,  # with sizes, for progress
                              timeout=HUB_TIMEOUT_SECONDS)
        sha = info.sha
        if not sha or not COMMIT_HASH.fullmatch(sha):  # it becomes a folder name: snapshots/<sha>
            raise HubError(f"{endpoint} gave no valid commit for {repo_id} (it does not answer like a Hugging Face "
                           "hub)", model=label, hint="check HF_ENDPOINT and proxy settings")
        files = _pick_files([s.rfilename for s in info.siblings or ()], repo_id, label)
        snapshot = Path(cache) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha
        before = _stats(snapshot, files)
        # Two pinned passes: the configs first (checked before any weights move), then the weights.
        for batch in (files[:-1], files[-1:]):
            state["files"] = batch
            # The weights are what takes time: a front end hears of them, once, when they are to be fetched.
            told = progress is not None and batch[-1] == files[-1] and (force or files[-1] not in before)
            if told:
                size = next((s.size for s in info.siblings if s.rfilename == files[-1]), None)
                progress.start(label, size, Path(cache))
            try:
                path = Path(snapshot_download(repo_id, revision=sha, allow_patterns=list(batch),
                                              tqdm_class=_tqdm_class(progress if told else None), **common))
            finally:
                if told:
                    progress.finish()
            missing = [f for f in batch if not (path / f).is_file()]
            if missing:
                raise HubError(f"{endpoint} lists {', '.join(missing)} in {repo_id} at {sha[:12]} but did not "
                               "serve it", model=label, hint=_RETRY_HINT)
            if CONFIG_NAME in batch:
                _check_model_type(path / CONFIG_NAME, repo_id, label)
        state["files"] = None
    _record_ref(cache, repo_id, revision or DEFAULT_REVISION, sha)
    verify_weights(path / files[-1], label)
    return DownloadResult(path, files, _stats(path, files) != before, _size(path, files))


@contextmanager
def _bounded_requests() -> Iterator[None]:
    """Requests huggingface_hub makes with no timeout at all (snapshot_download's listing of the files) wait
    HUB_TIMEOUT_SECONDS too, while a download runs: a request hook on its shared HTTP client (``get_session``),
    and on any client it makes in the meantime (after a refused connection its retries close the shared client
    and build another from its client factory, which we wrap), removed afterwards. A timeout a request was given
    stands."""
    from huggingface_hub import get_session, set_client_factory
    from huggingface_hub.utils import _http

    def bound(request) -> None:
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {part: HUB_TIMEOUT_SECONDS if given.get(part) is None else given[part]
                                         for part in ("connect", "read", "write", "pool")}

    factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)  # private: where it is missing, the client only

    def bounded_factory():
        client = factory()
        client.event_hooks["request"].append(bound)
        client.event_hooks["response"].append(_guard_speed)
        return client

    if factory is not None:
        set_client_factory(bounded_factory)  # closes the shared client: the next request makes a bounded one
    else:
        get_session().event_hooks["request"].append(bound)
        get_session().event_hooks["response"].append(_guard_speed)
    try:
        yield
    finally:
        if factory is not None:
            set_client_factory(factory)  # and the bounded client goes
        else:
            for kind, hook in (("request", bound), ("response", _guard_speed)):
                hooks = get_session().event_hooks[kind]
                if hook in hooks:
                    hooks.remove(hook)


def _guard_speed(response) -> None:
    """A response hook: its body (read as a stream by huggingface_hub, or at once) raises HubStalled when it comes
    slower than HUB_SLOW_BYTES per HUB_SLOW_SECONDS. The HTTP client's own byte-stream class is the base, as
    its responses require."""
    import sys
    import time

    inner = response.stream
    base = sys.modules[type(response).__module__.split(".")[0]].SyncByteStream

    class Guarded(base):
        def __iter__(self):
            start, got = time.monotonic(), 0
            for chunk in inner:
                got += len(chunk)
                elapsed = time.monotonic() - start
                if elapsed >= HUB_SLOW_SECONDS:
                    if got < HUB_SLOW_BYTES:
                        raise HubStalled(f"the hub sent {got} bytes in {elapsed:.0f} s: stalled")
                    start, got = time.monotonic(), 0
                yield chunk

        def close(self):
            inner.close()

    response.stream = Guarded()


def _cached_download(label: str, repo_id: str, revision: str | None, cache_dir: str | None, *, force: bool,
                     library: bool) -> DownloadResult:
    """``download`` offline: the complete cached snapshot as is. ``library``: offline only because
    huggingface_hub was imported under HF_HUB_OFFLINE=1."""
    if force:
        raise UsageError("a forced download needs the hub, but offline mode is on"
                         + (" (huggingface_hub was imported under HF_HUB_OFFLINE=1)" if library else ""),
                         option="force", suggest={"force": None})
    snapshot = cached_snapshot(repo_id, revision, cache_dir)
    if snapshot is None:
        raise _not_cached(label, repo_id, cache_dir, library=library, revision=revision)
    verify_weights(_weights_in(snapshot), label)
    files = tuple(f for f in (CONFIG_NAME, PREPROCESSOR_NAME, SAFETENSORS_NAME, PICKLE_NAME)
                  if (snapshot / f).is_file() and (f != PICKLE_NAME or not (snapshot / SAFETENSORS_NAME).is_file()))
    return DownloadResult(snapshot, files, False, _size(snapshot, files))


def _stats(snapshot: Path, files) -> dict:
    """What identifies each present file's content in the cache (its blob): compared before and after a
    download, a difference means something was transferred."""
    found = {}
    for filename in files:
        try:
            st = (snapshot / filename).stat()
        except OSError:
            continue
        found[filename] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def _size(snapshot: Path, files) -> int:
    return sum(stat[2] for stat in _stats(snapshot, files).values())


def _record_ref(cache: str, repo_id: str, revision: str, sha: str) -> None:
    """Point the cache's ``refs/<revision>`` at ``sha``, as ``hf_hub_download`` does for a branch or tag: a
    download pinned to a commit hash records no ref, and offline resolution of ``revision`` needs it."""
    try:
        from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision as cache_ref
    except ImportError:  # a private helper: write the ref the same way (atomically) if it ever moves
        def cache_ref(storage_folder: str, revision: str, commit_hash: str) -> None:
            if revision == commit_hash:
                return
            ref = Path(storage_folder) / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            if not ref.is_file() or ref.read_text() != commit_hash:
                tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
                tmp.write_text(commit_hash)
                os.replace(tmp, ref)

    try:
        cache_ref(os.path.join(cache, f"models--{repo_id.replace('/', '--')}"), revision, sha)
    except OSError:
        pass  # a read-only cache: the snapshot is complete, only revision -> commit is not remembered


def _pick_files(repo_files: list[str], repo_id: str, name: str) -> tuple[str, ...]:
    """The files of INFERENCE_FILES the repo has, weights last; pytorch_model.bin only when there is no
    safetensors."""
    present = set(repo_files)
    weights = next((f for f in (SAFETENSORS_NAME, PICKLE_NAME) if f in present), None)
    missing = [what for what, ok in ((CONFIG_NAME, CONFIG_NAME in present),
                                     (f"{SAFETENSORS_NAME} or {PICKLE_NAME}", weights)) if not ok]
    if missing:
        raise ModelNotFoundError(f"{repo_id} does not look like an AST checkpoint (no {' and no '.join(missing)})",
                                 model=name, problem="not_ast")
    return (CONFIG_NAME,) + ((PREPROCESSOR_NAME,) if PREPROCESSOR_NAME in present else ()) + (weights,)


def _check_model_type(config_path: Path, repo_id: str, name: str) -> None:
    readable, model_type = _model_type(config_path)
    if not readable:
        return  # a broken config is reported, with its path, when the model is loaded
    if model_type not in (None, AST_MODEL_TYPE):
        raise ModelNotFoundError(
            f"{repo_id} does not look like an AST checkpoint (its config.json describes a {model_type!r} model)",
            model=name, problem="not_ast",
        )


# -- huggingface_hub exceptions -> ours ----------------------------------------------------------------


def _transport_errors() -> tuple[type, ...]:
    """The HTTP client's network errors (httpx2 in huggingface_hub 2.x, httpx in 1.x)."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


@contextmanager
def _hub_errors(name: str, repo_id: str, revision: str | None, endpoint: str, state: dict) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions into ModelNotFoundError / HubError."""
    try:
        yield
    except AstError:
        raise
    except Exception as exc:
        mapped = _map_hub_error(exc, name, repo_id, revision, endpoint, state["files"])
        if mapped is None:
            raise
        raise mapped from exc


def _map_hub_error(exc: BaseException, name: str, repo_id: str, revision: str | None, endpoint: str,
                   files) -> AstError | None:
    from huggingface_hub import errors as hf

    # Wrappers (LocalEntryNotFoundError after a failed request, ValueError after a failed forced download)
    # carry the cause.
    root = exc
    while isinstance(root, (hf.LocalEntryNotFoundError, ValueError)) and root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, hf.GatedRepoError):
        return ModelNotFoundError(
            f"{repo_id} is a gated repo on {endpoint}: access must be granted first", model=name, problem="gated",
            hint="accept its conditions on the model page, then set HF_TOKEN to a token of that account")
    if isinstance(root, hf.DisabledRepoError):
        return HubError(f"{repo_id} is disabled on {endpoint}", model=name)
    if isinstance(root, hf.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"no model {repo_id!r} on {endpoint} (or it is private)", model=name, problem="no_such_repo",
            hint="check the name; " + ("HF_TOKEN gives no access to it" if _token()
                                       else "for a private repo set HF_TOKEN"))
    if isinstance(root, hf.RevisionNotFoundError):
        return ModelNotFoundError(f"{repo_id} has no revision {revision!r}", model=name, problem="no_such_revision",
                                  hint="name a branch, tag or commit of the repo")
    if isinstance(root, hf.RemoteEntryNotFoundError):
        missing = " and ".join(files) if files else "such file"
        return ModelNotFoundError(f"{repo_id} does not look like an AST checkpoint (no {missing})", model=name,
                                  problem="not_ast")
    if isinstance(root, hf.OfflineModeIsEnabled):  # huggingface_hub went offline (its import) after we checked
        return _not_cached(name, repo_id, None, library=True)
    if isinstance(root, hf.FileMetadataError):
        return HubError(f"{endpoint} does not answer like a Hugging Face hub ({_one_line(root)[:100]})", model=name,
                        hint="check HF_ENDPOINT and proxy settings")
    if isinstance(root, hf.HfHubHTTPError):
        status = root.response.status_code if root.response is not None else "an"
        hint = "set HF_TOKEN to a token with access" if status in (401, 403) else "try again later"
        return HubError(f"the hub at {endpoint} answered {status} error for {repo_id}", model=name, hint=hint)
    network = isinstance(root, _transport_errors()) or isinstance(root, (ConnectionError, TimeoutError)) or (
        isinstance(root, OSError) and "Consistency check failed" in str(root)  # size mismatch: cut-off download
    )
    if network or isinstance(exc, hf.LocalEntryNotFoundError):
        if files:
            return HubError(f"download of {repo_id} interrupted while fetching {' and '.join(files)} "
                            f"({_one_line(root)})", model=name, hint=_RETRY_HINT)
        return HubError(f"cannot reach the hub at {endpoint} ({_one_line(root)})", model=name, hint=_RETRY_HINT)
    if isinstance(root, OSError) and root.filename is not None:  # the cache, not the hub: a folder we cannot write
        path = os.fsdecode(root.filename)
        return OutputWriteError(f"cannot write into the Hugging Face cache: {path}: {root.strerror or root}",
                                path=path, hint="make that folder writable, or download into a cache you can write")
    if isinstance(root, hf.HFValidationError):
        return ModelNotFoundError(f"{name!r} is not a valid hub model id ({_one_line(root)})", model=name,
                                  problem="unknown_name")
    return None
