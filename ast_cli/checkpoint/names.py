"""Model names and where they live, without the network: the hub layout's file names, the registry of aliases
and their bundled labels, the parsing and checking of ``ORG/NAME[@REV]``, the cache folder, the endpoint and the
offline switch as the environment says now (and the int8 kernel ``AST_INT8_KERNEL`` names), and bounded reading
of config files.

Imports neither torch nor huggingface_hub: naming a model must not wait for either to load.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..constants import (AUDIOSET_MAX_LENGTH, AUDIOSET_MEAN, AUDIOSET_STD, FRAME_SECONDS, INT8_KERNEL_ENV, INT8_KERNELS,
                         SPEECH_COMMANDS_MAX_LENGTH, SPEECH_COMMANDS_MEAN, SPEECH_COMMANDS_STD)
from ..errors import CheckpointError, ModelNotFoundError, UsageError


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


def ast_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ast-cli`` (default ``~/.cache/ast-cli``): ``--fast``'s choices and the AMX kernel. A
    relative XDG_CACHE_HOME is ignored, as the XDG spec says: it would put the cache wherever the run started."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    base = base if os.path.isabs(base) else os.path.join("~", ".cache")
    return Path(os.path.expanduser(base)) / "ast-cli"


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


def model_identity(model: str, path) -> str:
    """How records (and heads, of their base) name a model: ``ORG/NAME@<commit>`` for a hub model (``path``: its
    cached snapshot, a folder named after the commit), else the resolved local path."""
    if looks_local(model):
        return os.path.realpath(path)
    return f"{parse_model_name(model)[0]}@{os.path.basename(os.path.normpath(str(path)))}"


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


def weights_path(path) -> str:
    """The weights file of a local checkpoint: ``path`` itself, or the one in the folder ``path`` (safetensors
    first); the folder when it holds none (reading it then fails, naming it)."""
    found = _weights_in(Path(path)) if os.path.isdir(path) else None
    return str(found if found is not None else path)


MAX_CONFIG_BYTES = 8 << 20  # a config.json of the published checkpoints is 40 kB


def read_regular(path, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of ``path`` (one more than allowed: the caller tells a file that is too
    large). OSError unless it is a regular file: a FIFO would block the read (opened non-blocking, it blocks not
    even the open) and a device such as /dev/zero never ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as handle:  # closes fd
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return handle.read(max_bytes + 1)


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` (a config file), or ``CheckpointError`` naming the file: unreadable, larger
    than MAX_CONFIG_BYTES, not JSON, nested too deep for the parser, or not an object."""
    try:
        text = read_regular(path, MAX_CONFIG_BYTES)
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] or type(exc).__name__


def int8_kernel_override() -> str | None:
    """The int8 kernel ``AST_INT8_KERNEL`` names (case and spaces aside), None where it is unset or empty; a value
    that names no kernel is a ``UsageError`` (a typo must not run the default kernel as if it were the one asked
    for)."""
    raw = os.environ.get(INT8_KERNEL_ENV, "")
    wanted = raw.strip().lower()
    if wanted and wanted not in INT8_KERNELS:
        raise UsageError(f"{INT8_KERNEL_ENV}={raw!r} names no int8 kernel (one of {', '.join(INT8_KERNELS)}, or "
                         "unset it for the default)")
    return wanted or None
