"""Model names -> local checkpoint paths: aliases, hub ids, local files and directories, and the HF cache.

A model is named once and is then there: ``resolve_model`` turns an alias (``speech-commands-v2``), a hub id
(``ORG/NAME[@REV]``), a hub-layout directory or a weights file into a local path, downloading a missing hub
model into the Hugging Face cache unless offline. Downloads fetch only what inference needs.

The environment (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_HUB_CACHE``) is read at call
time and passed to ``huggingface_hub`` explicitly: that library reads it once, at import, which would make a
changed environment (and in-process tests) silently ignored. Its exceptions become our few named ones, each
with a hint (``ModelNotFoundError``, ``HubError``, ``CheckpointError``).
"""

from __future__ import annotations

import difflib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import DEFAULT_MODEL, __version__
from .errors import AstError, CheckpointError, HubError, ModelNotFoundError, UsageError

# The hub layout's file names. weights.py takes them from here: this module must not import torch, since
# listing or downloading models should not wait for it to load.
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
# What inference needs from a hub repo; pytorch_model.bin only when there is no safetensors.
INFERENCE_FILES = (CONFIG_NAME, PREPROCESSOR_NAME, SAFETENSORS_NAME)

LIBRARY_NAME = "ast-cli"  # sent to the hub as library_name / library_version, like every HF-based tool
DEFAULT_ENDPOINT = "https://huggingface.co"
FRAME_SHIFT_SECONDS = 0.01  # one spectrogram frame per 10 ms (features.HOP_LENGTH / SAMPLE_RATE)
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub accepts as true in HF_HUB_OFFLINE
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.-]{1,96}")


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
        return round(self.max_length * FRAME_SHIFT_SECONDS, 2)


_AUDIOSET = dict(max_length=1024, num_labels=527, mean=-4.2677393, std=4.5689974)

REGISTRY: tuple[ModelSpec, ...] = (
    ModelSpec("audioset-10-10-0.4593", "MIT/ast-finetuned-audioset-10-10-0.4593", 10, 10, **_AUDIOSET),
    ModelSpec("audioset-10-10-0.450", "MIT/ast-finetuned-audioset-10-10-0.450", 10, 10, **_AUDIOSET),
    ModelSpec("audioset-10-10-0.448", "MIT/ast-finetuned-audioset-10-10-0.448", 10, 10, **_AUDIOSET),
    ModelSpec("audioset-10-10-0.448-v2", "MIT/ast-finetuned-audioset-10-10-0.448-v2", 10, 10, **_AUDIOSET),
    ModelSpec("audioset-12-12-0.447", "MIT/ast-finetuned-audioset-12-12-0.447", 12, 12, **_AUDIOSET),
    ModelSpec("audioset-14-14-0.443", "MIT/ast-finetuned-audioset-14-14-0.443", 14, 14, **_AUDIOSET),
    ModelSpec("audioset-16-16-0.442", "MIT/ast-finetuned-audioset-16-16-0.442", 16, 16, **_AUDIOSET),
    ModelSpec("speech-commands-v2", "MIT/ast-finetuned-speech-commands-v2", 10, 10,
              max_length=128, num_labels=35, mean=-6.845978, std=5.5654526),
)


def find_alias(name: str) -> ModelSpec | None:
    """The registry entry for an alias (case-insensitive), or None."""
    lowered = name.lower()
    return next((spec for spec in REGISTRY if spec.alias == lowered), None)


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


def hub_endpoint() -> str:
    """HF_ENDPOINT (a mirror, or a local test server), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def is_offline(offline: bool | None = None) -> bool:
    """An explicit ``offline`` wins; None means HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set right now."""
    if offline is not None:
        return offline
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


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
    """(hub id, revision or None) for an alias or ``ORG/NAME``, each optionally followed by ``@REV``."""
    base, at, revision = name.strip().partition("@")
    if at and not revision:
        raise ModelNotFoundError(f"no revision after '@' in {name!r}", hint="write ORG/NAME@REV, e.g. @main")
    spec = find_alias(base)
    repo_id = spec.repo_id if spec else base
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        close = difflib.get_close_matches(base.lower(), [s.alias for s in REGISTRY], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ModelNotFoundError(
            f"unknown model {name!r}: not an alias, a hub id (ORG/NAME) or an existing path",
            hint=hint + "`ast models` lists the aliases",
        )
    return repo_id, revision or None


# -- the cache -------------------------------------------------------------------------------------


def _weights_in(snapshot: Path) -> Path | None:
    for filename in (SAFETENSORS_NAME, PICKLE_NAME):
        if (snapshot / filename).is_file():
            return snapshot / filename
    return None


def cached_snapshot(repo_id: str, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default main) if it holds a config and
    weights; None otherwise. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=str(hub_cache_dir(cache_dir)),
                                    revision=revision or "main")
    if not isinstance(config, str):  # None, or the "known not to exist" marker
        return None
    snapshot = Path(config).parent
    return snapshot if _weights_in(snapshot) else None


def cached_models(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Hub id -> cached snapshot folder for every complete model in the cache (main first, else any ref)."""
    cache = hub_cache_dir(cache_dir)
    found: dict[str, Path] = {}
    for repo_dir in sorted(cache.glob("models--*")):
        repo_id = repo_dir.name[len("models--"):].replace("--", "/")
        refs = sorted(str(p.relative_to(repo_dir / "refs")) for p in (repo_dir / "refs").rglob("*") if p.is_file())
        for revision in ["main"] + [r for r in refs if r != "main"]:
            snapshot = cached_snapshot(repo_id, revision, cache)
            if snapshot is not None:
                found[repo_id] = snapshot
                break
    return found


def verify_weights(path: Path, name: str) -> None:
    """Raise CheckpointError, naming the file and suggesting ``--force``, if a safetensors header is unreadable
    (truncated or corrupt download). Reads the header only."""
    if path.suffix != ".safetensors":
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"corrupt or truncated weights file {path} ({_one_line(exc)})",
            hint=f"download it again: `ast download {name} --force`",
        ) from None


# -- resolving and downloading ---------------------------------------------------------------------


def resolve_model(name: str, *, offline: bool | None = None, cache_dir: str | None = None,
                  console=None) -> Path:
    """Local checkpoint path for ``name``: a local file or directory as is; an alias or hub id from the cache,
    downloaded first when missing unless offline (``offline`` flag, or HF_HUB_OFFLINE).

    ``console`` (a rich Console, e.g. on stderr) shows download progress; None downloads silently.
    """
    if looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"no such model file or directory: {name}")
        return path
    repo_id, revision = parse_model_name(name)
    snapshot = cached_snapshot(repo_id, revision, cache_dir)
    if snapshot is not None:
        verify_weights(_weights_in(snapshot), name)
        return snapshot
    if is_offline(offline):
        raise _not_cached(name, repo_id, cache_dir)
    return download(name, cache_dir=cache_dir, console=console)


def _not_cached(name: str, repo_id: str, cache_dir: str | None = None) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {repo_id!r} is not in the Hugging Face cache ({hub_cache_dir(cache_dir)}) and offline mode is on",
        hint=f"run `ast download {name}` where the hub is reachable",
    )


def download(name: str = DEFAULT_MODEL, *, revision: str | None = None, cache_dir: str | None = None,
             force: bool = False, offline: bool | None = None, console=None) -> Path:
    """Fetch what inference needs from the hub into the HF cache; return the local snapshot folder.

    Files: ``config.json``, ``preprocessor_config.json`` and ``model.safetensors`` (``pytorch_model.bin`` only
    when the repo has no safetensors). Idempotent: files already cached are not downloaded again unless
    ``force``. Offline, a complete cached snapshot is returned as is. ``console``: where progress is drawn.
    """
    if looks_local(name):
        raise UsageError(f"{name} is a local path: nothing to download")
    repo_id, name_revision = parse_model_name(name)
    if revision and name_revision and revision != name_revision:
        raise UsageError(f"{name} and --revision {revision} name different revisions")
    revision = revision or name_revision
    label = name if not revision or name_revision else f"{name}@{revision}"
    if is_offline(offline):
        if force:
            raise UsageError("--force downloads again, but offline mode is on (--offline or HF_HUB_OFFLINE)")
        snapshot = cached_snapshot(repo_id, revision, cache_dir)
        if snapshot is None:
            raise _not_cached(label, repo_id, cache_dir)
        verify_weights(_weights_in(snapshot), label)
        return snapshot

    from huggingface_hub import HfApi, hf_hub_download

    endpoint, token, cache = hub_endpoint(), _token(), str(hub_cache_dir(cache_dir))
    state = {"file": None}  # which file is on the wire, for messages and progress labels
    with _hub_errors(label, repo_id, revision, endpoint, state), _online(), _download_bars(console, state) as bars:
        api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
        info = api.model_info(repo_id, revision=revision)
        files = _pick_files([s.rfilename for s in info.siblings or ()], repo_id)
        paths = []
        for filename in files:
            state["file"] = filename
            paths.append(Path(hf_hub_download(
                repo_id, filename, revision=revision or "main", endpoint=endpoint, token=token, cache_dir=cache,
                force_download=force, library_name=LIBRARY_NAME, library_version=__version__, tqdm_class=bars,
            )))
            if filename == CONFIG_NAME:
                _check_model_type(paths[-1], repo_id)
        state["file"] = None
    verify_weights(paths[-1], label)
    return paths[-1].parent


def _pick_files(repo_files: list[str], repo_id: str) -> list[str]:
    """The files of INFERENCE_FILES the repo has; pytorch_model.bin only when there is no safetensors."""
    present = set(repo_files)
    weights = next((f for f in (SAFETENSORS_NAME, PICKLE_NAME) if f in present), None)
    missing = [what for what, ok in ((CONFIG_NAME, CONFIG_NAME in present),
                                     (f"{SAFETENSORS_NAME} or {PICKLE_NAME}", weights)) if not ok]
    if missing:
        raise CheckpointError(
            f"{repo_id} does not look like an AST checkpoint (no {' and no '.join(missing)})",
            hint="`ast models` lists the published AST checkpoints",
        )
    return [CONFIG_NAME] + ([PREPROCESSOR_NAME] if PREPROCESSOR_NAME in present else []) + [weights]


def _check_model_type(config_path: Path, repo_id: str) -> None:
    import json

    try:
        model_type = json.loads(config_path.read_text("utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # a broken config is reported, with its path, when the model is loaded
    if model_type not in (None, "audio-spectrogram-transformer"):
        raise CheckpointError(
            f"{repo_id} does not look like an AST checkpoint (its config.json describes a {model_type!r} model)",
            hint="`ast models` lists the published AST checkpoints",
        )


@contextmanager
def _online() -> Iterator[None]:
    """Let huggingface_hub make requests for this call: its own offline guard was fixed at import time from
    HF_HUB_OFFLINE, while ours (``is_offline``) was just decided from the current environment."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


@contextmanager
def _download_bars(console, state: dict) -> Iterator[type]:
    """A tqdm-like class for huggingface_hub's ``tqdm_class``: one rich bar per file on ``console``, or silence."""
    progress = None
    if console is not None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=console, transient=True)

    class Bar:
        """The part of tqdm's interface that huggingface_hub's ``http_get`` uses."""

        def __init__(self, *args, total=None, initial=0, **kwargs):
            self.task = None
            if progress is not None:
                self.task = progress.add_task(state["file"] or "downloading", total=total, completed=initial or 0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def update(self, n=1):
            if self.task is not None:
                progress.update(self.task, advance=n or 0)

        def close(self):
            pass

        def set_postfix_str(self, *args, **kwargs):
            pass

        def refresh(self, *args, **kwargs):
            pass

    if progress is None:
        yield Bar
        return
    with progress:
        yield Bar


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
    """Turn huggingface_hub and network exceptions into ModelNotFoundError / HubError / CheckpointError."""
    try:
        yield
    except AstError:
        raise
    except Exception as exc:
        mapped = _map_hub_error(exc, name, repo_id, revision, endpoint, state["file"])
        if mapped is None:
            raise
        raise mapped from exc


def _map_hub_error(exc: BaseException, name: str, repo_id: str, revision: str | None, endpoint: str,
                   filename: str | None) -> AstError | None:
    from huggingface_hub import errors as hf

    # Wrappers (LocalEntryNotFoundError after a failed HEAD, ValueError after a failed --force) carry the cause.
    root = exc
    while isinstance(root, (hf.LocalEntryNotFoundError, ValueError)) and root.__cause__ is not None:
        root = root.__cause__
    retry = f"check the network (and HF_ENDPOINT, proxies), then run `ast download {name}` again"
    if isinstance(root, hf.GatedRepoError):
        return HubError(f"{repo_id} is a gated repo on {endpoint}: access must be granted first",
                        hint="accept its conditions on the model page, then set HF_TOKEN to a token of that account")
    if isinstance(root, hf.RepositoryNotFoundError):
        token_hint = "HF_TOKEN gives no access to it" if _token() else "for a private repo set HF_TOKEN"
        return ModelNotFoundError(f"no model {repo_id!r} on {endpoint} (or it is private)",
                                  hint=f"check the name (`ast models` lists the aliases); {token_hint}")
    if isinstance(root, hf.RevisionNotFoundError):
        return ModelNotFoundError(f"{repo_id} has no revision {revision!r}",
                                  hint="name a branch, tag or commit of the repo (--revision or ORG/NAME@REV)")
    if isinstance(root, hf.RemoteEntryNotFoundError):
        return CheckpointError(f"{repo_id} does not look like an AST checkpoint (no {filename or 'such file'})",
                               hint="`ast models` lists the published AST checkpoints")
    if isinstance(root, hf.OfflineModeIsEnabled):
        return _not_cached(name, repo_id)
    if isinstance(root, hf.FileMetadataError):
        return HubError(f"{endpoint} does not answer like a Hugging Face hub ({_one_line(root)[:100]})",
                        hint="check HF_ENDPOINT and proxy settings")
    if isinstance(root, hf.HfHubHTTPError):
        status = root.response.status_code if root.response is not None else "an"
        hint = "set HF_TOKEN to a token with access" if status in (401, 403) else "try again later"
        return HubError(f"the hub at {endpoint} answered {status} error for {repo_id}", hint=hint)
    network = isinstance(root, _transport_errors()) or isinstance(root, (ConnectionError, TimeoutError)) or (
        isinstance(root, OSError) and "Consistency check failed" in str(root)  # size mismatch: cut-off download
    )
    if network or isinstance(exc, hf.LocalEntryNotFoundError):
        if filename is not None:
            return HubError(f"download of {repo_id} interrupted while fetching {filename} ({_one_line(root)})",
                            hint=retry + " (files already complete are kept)")
        return HubError(f"cannot reach the hub at {endpoint} ({_one_line(root)})", hint=retry)
    if isinstance(root, hf.HFValidationError):
        return ModelNotFoundError(f"{name!r} is not a valid hub model id ({_one_line(root)})")
    return None
