"""Model names -> local checkpoint paths: aliases, hub ids, local files and directories, and the HF cache.

A model is named once and is then there: ``resolve_model`` turns an alias (``speech-commands-v2``), a hub id
(``ORG/NAME[@REV]``), a hub-layout directory or a weights file into a local path, downloading a missing hub
model into the Hugging Face cache unless offline. Downloads fetch only what inference needs, all from one commit.

The work is huggingface_hub's own: ``HfApi.model_info`` resolves the revision, ``snapshot_download`` fetches
the files pinned to that commit, ``scan_cache_dir`` lists the cache, ``validate_repo_id`` checks names. This
module only chooses the files, reads the environment and names the failures.

The environment (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_HUB_CACHE``) is read at call
time and passed to huggingface_hub explicitly, since that library reads most of it once, at import. Nothing
process-wide is changed: the one setting that cannot be passed per call is huggingface_hub's own offline
switch (``HF_HUB_OFFLINE`` as it was when huggingface_hub was first imported); when it is on, this module
keeps to the cache too, and says why (see ``is_offline``).

Failures are our few named exceptions with structured fields (``ModelNotFoundError.problem``,
``CheckpointError.corrupt``...); their text and hints never name command-line options.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from .. import __version__
from ..constants import (AUDIOSET_MAX_LENGTH, AUDIOSET_MEAN, AUDIOSET_STD, DEFAULT_MODEL, FRAME_SECONDS,
                        SPEECH_COMMANDS_MAX_LENGTH, SPEECH_COMMANDS_MEAN, SPEECH_COMMANDS_STD)
from ..errors import AstError, CheckpointError, HubError, ModelNotFoundError, UsageError

# The hub layout's file names. weights.py takes them from here: this module must not import torch, since
# listing or downloading models should not wait for it to load.
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
# What inference needs from a hub repo; pytorch_model.bin only when there is no safetensors.
INFERENCE_FILES = (CONFIG_NAME, PREPROCESSOR_NAME, SAFETENSORS_NAME)
AST_MODEL_TYPE = "audio-spectrogram-transformer"  # config.json "model_type" of every AST checkpoint

LIBRARY_NAME = "ast-cli"  # sent to the hub as library_name / library_version, like every HF-based tool
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub accepts as true in HF_HUB_OFFLINE
_RETRY_HINT = "check the network (and HF_ENDPOINT, proxies), then try again; files already complete are kept"
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
# What git's check-ref-format refuses in a ref name: control characters, space, ~ ^ : ? * [ \ and DEL.
_REF_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


# -- the registry: the eight published MIT checkpoints -------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A published checkpoint: its short alias, hub id and the facts that tell the checkpoints apart."""

    alias: str
    repo_id: str
    frequency_stride: int
    time_stride: int
    max_length: int  # input frames (10 ms each)
    num_labels: int
    mean: float  # feature normalization of the checkpoint's training data
    std: float

    @property
    def input_seconds(self) -> float:
        """Audio per model input (window length), in seconds."""
        return round(self.max_length * FRAME_SECONDS, 2)


_AUDIOSET = dict(max_length=AUDIOSET_MAX_LENGTH, num_labels=527, mean=AUDIOSET_MEAN, std=AUDIOSET_STD)

REGISTRY: tuple[ModelSpec, ...] = (
    ModelSpec("audioset-10-10-0.4593", "MIT/ast-finetuned-audioset-10-10-0.4593", 10, 10, **_AUDIOSET),
    ModelSpec("audioset-10-10-0.450", "MIT/ast-finetuned-audioset-10-10-0.450", 10, 10, **_AUDIOSET),
    ModelSpec("audioset-10-10-0.448", "MIT/ast-finetuned-audioset-10-10-0.448", 10, 10, **_AUDIOSET),
    ModelSpec("audioset-10-10-0.448-v2", "MIT/ast-finetuned-audioset-10-10-0.448-v2", 10, 10, **_AUDIOSET),
    ModelSpec("audioset-12-12-0.447", "MIT/ast-finetuned-audioset-12-12-0.447", 12, 12, **_AUDIOSET),
    ModelSpec("audioset-14-14-0.443", "MIT/ast-finetuned-audioset-14-14-0.443", 14, 14, **_AUDIOSET),
    ModelSpec("audioset-16-16-0.442", "MIT/ast-finetuned-audioset-16-16-0.442", 16, 16, **_AUDIOSET),
    ModelSpec("speech-commands-v2", "MIT/ast-finetuned-speech-commands-v2", 10, 10,
              max_length=SPEECH_COMMANDS_MAX_LENGTH, num_labels=35, mean=SPEECH_COMMANDS_MEAN,
              std=SPEECH_COMMANDS_STD),
)


def find_alias(name: str) -> ModelSpec | None:
    """The registry entry for an alias (case-insensitive), or None."""
    lowered = name.lower()
    return next((spec for spec in REGISTRY if spec.alias == lowered), None)


def bundled_labels(name: str) -> tuple[str, ...] | None:
    """The label list of a published checkpoint (alias or hub id, at its default revision), from the lists that
    ship with ast-cli (their order is the checkpoints' ``id2label``); None for any other model."""
    base, _, revision = name.strip().partition("@")
    spec = find_alias(base) or next((s for s in REGISTRY if s.repo_id == base), None)
    if spec is None or revision:
        return None
    return load_labels("audioset" if spec.num_labels == 527 else "speechcommands")


def load_labels(name: str) -> tuple[str, ...]:
    """Bundled label list ``audioset`` (527) or ``speechcommands`` (35), in checkpoint index order."""
    import csv
    from importlib import resources

    text = resources.files("ast_cli").joinpath(f"data/{name}_class_labels_indices.csv").read_text("utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    return tuple(row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"])))


def _alias_of(repo_id: str) -> str | None:
    return next((spec.alias for spec in REGISTRY if spec.repo_id == repo_id), None)


# -- the environment, read at call time ------------------------------------------------------------


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache every HF tool shares: ``cache_dir``, else HF_HUB_CACHE, else HF_HOME/hub
    (default ~/.cache/huggingface/hub)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    # huggingface_hub resolves the cache folder (snapshot_download, scan_cache_dir): so do we, so that every
    # path this module returns is spelled the same way whichever function found it.
    return hub_cache_dir(cache_dir).resolve()


def hub_endpoint() -> str:
    """HF_ENDPOINT (a mirror, or a local test server), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def is_offline(offline: bool | None = None) -> bool:
    """Whether this call keeps to the cache: an explicit ``offline`` wins; None means HF_HUB_OFFLINE (or
    TRANSFORMERS_OFFLINE) as set right now.

    Independently of this, huggingface_hub refuses every request when HF_HUB_OFFLINE was set at the moment it
    was first imported (it reads the variable once); ``resolve_model`` and ``download`` then keep to the cache
    as well, and their errors say so.
    """
    if offline is not None:
        return offline
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def _hub_library_offline() -> bool:
    """huggingface_hub's own offline switch, fixed when it was imported. There is no per-call override (its
    HTTP client's request hook consults it), and flipping it would change every thread of the process."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _token() -> str | None:
    # None lets huggingface_hub fall back to the token saved by `hf auth login`.
    return os.environ.get("HF_TOKEN") or None


# -- names -----------------------------------------------------------------------------------------


def looks_local(name: str) -> bool:
    """A path the user means as a file or directory (exists, or is spelled like a path)."""
    base = name.split("@", 1)[0]  # ORG/NAME@refs/pr/1 is a hub id, not a path
    return (
        os.path.exists(name)
        or name.startswith((".", "/", "~"))
        or base.endswith(WEIGHT_SUFFIXES)
        or os.sep in base.strip("/").replace("/", "", 1)  # more than one slash: not ORG/NAME
    )


def parse_model_name(name: str) -> tuple[str, str | None]:
    """(hub id, revision or None) for an alias or ``ORG/NAME``, each optionally followed by ``@REV``.

    Raises ``ModelNotFoundError(problem="unknown_name")`` for anything else, with the closest alias as
    ``suggestion`` when there is one. A hub id must name its owner (``ORG/NAME``): bare legacy names such as
    ``gpt2`` are never AST checkpoints, so a bare word is taken for a misspelt alias.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    base, at, revision = name.strip().partition("@")
    if at and not revision:
        raise ModelNotFoundError(f"no revision after '@' in {name!r}", model=name, problem="unknown_name",
                                 hint="write ORG/NAME@REV, e.g. ORG/NAME@main")
    spec = find_alias(base)
    repo_id = spec.repo_id if spec else base
    try:
        if "/" not in repo_id:
            raise HFValidationError(f"not an alias and not ORG/NAME: {repo_id!r}")
        validate_repo_id(repo_id)
    except HFValidationError:
        close = difflib.get_close_matches(base.lower(), [s.alias for s in REGISTRY], n=1, cutoff=0.6)
        suggestion = close[0] if close else None
        raise ModelNotFoundError(
            f"unknown model {name!r}: not an alias, a hub id (ORG/NAME) or an existing path",
            model=name, problem="unknown_name", suggestion=suggestion,
            hint=f"did you mean {suggestion}?" if suggestion else None,
        ) from None
    return repo_id, check_revision(revision, repo_id) if revision else None


def check_revision(revision: str, model: str, option: str | None = None) -> str:
    """``revision`` if it is a full commit hash or a name git accepts for a ref (``main``, ``v1.0``,
    ``refs/pr/1``); else ``UsageError``. The revision becomes a path in the cache (``refs/<revision>``), so
    ``..``, empty or dot-led parts, a leading or trailing slash and git's forbidden characters never get there."""
    if COMMIT_HASH.fullmatch(revision):
        return revision
    bad_part = any(not part or part.startswith(".") or part.endswith(".lock") for part in revision.split("/"))
    if (bad_part or len(revision) > 200 or revision == "@" or "@{" in revision or ".." in revision
            or revision.endswith(".") or _REF_BAD_CHARS.search(revision)):
        raise UsageError(f"{revision!r} is not a valid revision of {model} (a branch, tag or commit name)",
                         option=option, hint="name a branch, tag or 40-character commit hash of the repo")
    return revision


# -- the cache -------------------------------------------------------------------------------------


def _weights_in(snapshot: Path) -> Path | None:
    for filename in (SAFETENSORS_NAME, PICKLE_NAME):
        if (snapshot / filename).is_file():
            return snapshot / filename
    return None


MAX_CONFIG_BYTES = 8 << 20  # a config.json of the published checkpoints is 40 kB


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` (a config file), or ``CheckpointError`` naming the file: unreadable, larger
    than MAX_CONFIG_BYTES, not JSON, nested too deep for the parser, or not an object."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path} is larger than a config file can be ({MAX_CONFIG_BYTES >> 20} MiB)",
                                  path=str(path))
        data = json.loads(text.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: JSON nested too deep", path=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", path=str(path)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object", path=str(path))
    return data


def _model_type(config: Path) -> tuple[bool, str | None]:
    """(readable, model_type) of a config.json."""
    try:
        data = read_json(config)
    except CheckpointError:
        return False, None
    return True, data.get("model_type")


def cached_snapshot(repo_id: str, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default main) if it holds a config and
    weights; None otherwise. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    revision = check_revision(revision or DEFAULT_REVISION, repo_id)  # read as refs/<revision>
    config = try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=str(_cache(cache_dir)), revision=revision)
    if not isinstance(config, str):  # None, or the "known not to exist" marker
        return None
    snapshot = Path(config).parent
    return snapshot if _weights_in(snapshot) else None


@dataclass(frozen=True)
class CachedModel:
    """One cached snapshot of an AST checkpoint (a row of ``cached_checkpoints``).

    ``path``: the snapshot folder; ``commit_hash``: the commit it holds; ``refs``: the branches and tags that
    point at it (``("main",)``), possibly none; ``size_on_disk``: bytes of its files (blobs shared with another
    snapshot of the repo count in each); ``last_modified``: newest file, as a POSIX timestamp.
    """

    repo_id: str
    path: Path
    commit_hash: str
    refs: tuple[str, ...]
    size_on_disk: int
    last_modified: float

    @property
    def alias(self) -> str | None:
        """The registry alias of ``repo_id``, if it is one of the published checkpoints."""
        return _alias_of(self.repo_id)


def _scan(cache_dir: str | os.PathLike | None):
    """huggingface_hub's scan of the cache: the model repos, or () when there is no cache yet. Repos it finds
    corrupt (a ref to a missing snapshot, a broken symlink) are in its warnings and left out."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        info = scan_cache_dir(_cache(cache_dir))
    except CacheNotFound:
        return ()
    return sorted((repo for repo in info.repos if repo.repo_type == "model"), key=lambda repo: repo.repo_id)


def _by_preference(revisions) -> list:
    """A repo's cached revisions, the one ``main`` points at first, then others with a ref, newest first."""
    return sorted(revisions, key=lambda rev: (DEFAULT_REVISION not in rev.refs, not rev.refs, -rev.last_modified,
                                              rev.commit_hash))


def cached_models(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Hub id -> cached snapshot folder for every complete model in the cache (config.json and weights): the
    snapshot ``main`` points at, else one another ref points at, else the newest. Never touches the network."""
    found: dict[str, Path] = {}
    for repo in _scan(cache_dir):
        for revision in _by_preference(repo.revisions):
            path = Path(revision.snapshot_path)
            if (path / CONFIG_NAME).is_file() and _weights_in(path):
                found[repo.repo_id] = path
                break
    return found


def cached_checkpoints(cache_dir: str | os.PathLike | None = None) -> list[CachedModel]:
    """Every cached snapshot that holds an AST checkpoint, of any repo (not only the registry's): a config.json
    whose ``model_type`` is the AST's (or absent) and weights. Sorted by hub id, then as ``cached_models``
    prefers them. Never touches the network."""
    rows: list[CachedModel] = []
    for repo in _scan(cache_dir):
        for revision in _by_preference(repo.revisions):
            path = Path(revision.snapshot_path)
            if not _is_ast_snapshot(path):
                continue
            rows.append(CachedModel(repo_id=repo.repo_id, path=path, commit_hash=revision.commit_hash,
                                    refs=tuple(sorted(revision.refs)), size_on_disk=revision.size_on_disk,
                                    last_modified=revision.last_modified))
    return rows


@dataclass(frozen=True)
class Removal:
    """What removing a cached model deletes (``plan_removal``), all inside one repo folder of the cache.

    ``commits``: the snapshots that go; ``refs``: the branches and tags that point at them and go with them;
    ``whole_repo``: the repo folder goes (no ``@REV``); ``blobs``: with ``@REV``, the files no other snapshot of
    the repo shares; ``size``: bytes freed.
    """

    repo_id: str
    repo_path: Path
    commits: tuple[str, ...]
    refs: tuple[str, ...]
    whole_repo: bool
    blobs: tuple[Path, ...]
    size: int


def _is_ast_snapshot(path: Path) -> bool:
    readable, model_type = _model_type(path / CONFIG_NAME)
    return readable and model_type in (None, AST_MODEL_TYPE) and _weights_in(path) is not None


def plan_removal(name: str, cache_dir: str | os.PathLike | None = None, *, allow_other: bool = False) -> Removal:
    """What removing ``name`` (alias or ``ORG/NAME``: every cached revision; ``ORG/NAME@REV``: the snapshot REV
    names, a ref or a commit hash, and the refs pointing at it) would delete. Deletes nothing.

    Raises ``ModelNotFoundError(problem="not_cached")`` when the cache has no such repo or revision, and
    ``UsageError`` for a repo that holds no AST checkpoint unless ``allow_other`` and ``name`` spells its hub id
    exactly (not an alias)."""
    repo_id, revision = parse_model_name(name)
    repo = next((repo for repo in _scan(cache_dir) if repo.repo_id == repo_id), None)
    revisions = [rev for rev in (repo.revisions if repo else ()) if revision in (None, rev.commit_hash, *rev.refs)]
    if not revisions:
        what = f"{repo_id!r}" + (f" at revision {revision!r}" if revision and repo else "")
        raise ModelNotFoundError(f"model {what} is not in the Hugging Face cache ({_cache(cache_dir)})",
                                 model=name, problem="not_cached", hint="nothing to remove")
    is_ast = any(_is_ast_snapshot(Path(rev.snapshot_path)) for rev in revisions)
    if not (is_ast or allow_other and name.partition("@")[0] == repo_id):
        raise UsageError(f"{repo_id} in the cache holds no AST checkpoint: not removing it unless named by its hub "
                         "id and confirmed", suggest={"allow_other": True})
    kept = {f.blob_path for rev in repo.revisions if rev not in revisions for f in rev.files}
    blobs = {f.blob_path: f.size_on_disk for rev in revisions for f in rev.files if f.blob_path not in kept}
    whole = revision is None
    return Removal(repo_id=repo_id, repo_path=Path(repo.repo_path), commits=tuple(r.commit_hash for r in revisions),
                   refs=tuple(sorted(ref for r in revisions for ref in r.refs)), whole_repo=whole,
                   blobs=() if whole else tuple(sorted(blobs)),
                   size=repo.size_on_disk if whole else sum(blobs.values()))


def remove_cached(plan: Removal, cache_dir: str | os.PathLike | None = None) -> int:
    """Delete what ``plan`` names (nothing outside its repo folder), then check in a new scan of the cache
    that exactly that went: every other snapshot of every repo is still there. Returns the bytes freed.
    Raises ``AstError`` if the cache is not as planned afterwards."""
    import shutil

    before = _snapshots(cache_dir)
    repo = plan.repo_path
    doomed = [repo / "snapshots" / commit for commit in plan.commits] + [repo / "refs" / ref for ref in plan.refs]
    doomed += [Path(blob) for blob in plan.blobs]
    if repo.parent != _cache(cache_dir) or not repo.name.startswith("models--") or any(
            repo not in Path(os.path.abspath(path)).parents for path in doomed):
        raise AstError(f"{repo} is not a model folder of the cache {_cache(cache_dir)}: not removing it")
    if plan.whole_repo:
        shutil.rmtree(repo)
    for path in [] if plan.whole_repo else doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    expected = {key for key in before if key[0] != plan.repo_id or (not plan.whole_repo
                                                                      and key[1] not in plan.commits)}
    after = _snapshots(cache_dir)
    if after != expected:
        changed = sorted(f"{repo_id}@{commit[:12]}" for repo_id, commit in after ^ expected)
        raise AstError(f"removing {plan.repo_id} left the cache other than planned ({', '.join(changed)})")
    return plan.size


def _snapshots(cache_dir) -> set[tuple[str, str]]:
    """(hub id, commit) of every cached model snapshot."""
    return {(repo.repo_id, rev.commit_hash) for repo in _scan(cache_dir) for rev in repo.revisions}


def verify_weights(path: Path, name: str | None = None) -> None:
    """Raise ``CheckpointError(corrupt=True)``, naming the file, if a safetensors header is unreadable (truncated
    or corrupt download). Reads the header only. ``name``: the model as given, when the file came from the cache
    (a forced download repairs it)."""
    if path.suffix != ".safetensors":
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"corrupt or truncated weights file {path} ({_one_line(exc)})", path=str(path), model=name,
            corrupt=True,
            hint="a forced download replaces it" if name else None,
        ) from None


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
        raise _not_cached(name, repo_id, cache_dir, library=not is_offline(offline))
    return download(name, cache_dir=cache_dir, offline=False, progress=progress).path


def _not_cached(name: str, repo_id: str, cache_dir: str | None, *, library: bool = False) -> ModelNotFoundError:
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
        if force:
            raise UsageError("a forced download needs the hub, but offline mode is on"
                             + ("" if offline_now else " (huggingface_hub was imported under HF_HUB_OFFLINE=1)"),
                             option="force", suggest={"force": None})
        snapshot = cached_snapshot(repo_id, revision, cache_dir)
        if snapshot is None:
            raise _not_cached(label, repo_id, cache_dir, library=not offline_now)
        verify_weights(_weights_in(snapshot), label)
        files = tuple(f for f in (CONFIG_NAME, PREPROCESSOR_NAME, SAFETENSORS_NAME, PICKLE_NAME)
                      if (snapshot / f).is_file() and (f != PICKLE_NAME or not (snapshot / SAFETENSORS_NAME).is_file()))
        return DownloadResult(snapshot, files, False, _size(snapshot, files))

    from huggingface_hub import HfApi, snapshot_download

    endpoint, token, cache = hub_endpoint(), _token(), str(_cache(cache_dir))
    common = dict(cache_dir=cache, endpoint=endpoint, token=token, force_download=force, library_name=LIBRARY_NAME,
                  library_version=__version__)
    state: dict = {"files": None}  # which files are on the wire, for messages
    with _hub_errors(label, repo_id, revision, endpoint, state):
        api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
        info = api.model_info(repo_id, revision=revision, files_metadata=True)  # with sizes, for progress
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] or type(exc).__name__


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
    if isinstance(root, hf.HFValidationError):
        return ModelNotFoundError(f"{name!r} is not a valid hub model id ({_one_line(root)})", model=name,
                                  problem="unknown_name")
    return None
