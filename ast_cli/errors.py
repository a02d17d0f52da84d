"""The few exceptions the library raises, with structured fields.

The library never speaks in command-line flags: an exception says what went wrong (``str(exc)``) and carries
the facts a front end needs to say how to fix it (which option, which model, whether a download would help).
The CLI's error table (``ast_cli/cli/_errors.py``) is the one place that turns them into ``Error:``/``Hint:``
lines naming options and commands. ``hint`` is optional prose that names no flag.
"""

from __future__ import annotations

from typing import Any, Literal


class AstError(Exception):
    """Base class: an expected failure with a message fit for a user.

    Subclasses declare their structured fields as annotated class attributes (with defaults); they are set
    from keyword arguments: ``ModelNotFoundError("...", model="x", problem="not_cached")``.
    """

    hint: str | None = None

    def __init__(self, message: str, **fields: Any):
        super().__init__(message)
        known = {name for cls in type(self).__mro__ for name in getattr(cls, "__annotations__", {})}
        unknown = set(fields) - known
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        for name, value in fields.items():
            setattr(self, name, value)


class UsageError(AstError):
    """Options that do not fit together, or a value out of range.

    ``option``: the offending parameter, by its library name (a ``RunOptions`` field such as ``hop_seconds``,
    or a parameter such as ``include``); ``suggest``: option -> value that would work (``{"device": "cpu"}``;
    ``True`` for a switch, ``None`` for "drop this option").
    """

    option: str | None = None
    suggest: dict[str, Any] = {}


class AudioDecodeError(AstError):
    """A file could not be read as audio (missing, empty, truncated, unsupported...)."""

    needs_ffmpeg: bool = False


ModelProblem = Literal["unknown_name", "no_such_path", "not_cached", "no_such_repo", "no_such_revision",
                       "gated", "not_ast"]


class ModelNotFoundError(AstError):
    """A model name that is neither an alias, a cached/downloadable hub repo, nor a local path.

    ``model``: the name as given; ``problem``: which of ``ModelProblem``; ``suggestion``: a close alias, if any.
    """

    model: str | None = None
    problem: ModelProblem | None = None
    suggestion: str | None = None


class CheckpointError(AstError):
    """A checkpoint that exists but cannot be used: wrong keys or shapes, corrupt file, bad config.

    ``path``: the file at fault; ``model``: the hub name it came from, when it came from the cache (then a fresh
    download can repair a ``corrupt`` file).
    """

    path: str | None = None
    model: str | None = None
    corrupt: bool = False


HeadProblem = Literal["missing", "not_a_head", "corrupt", "other_base"]


class HeadError(AstError):
    """A head folder that cannot run next to this model: ``path``; ``problem``: which of ``HeadProblem`` (no such
    folder, not made by head-mode training, unreadable or ill-fitting files, or trained on another base);
    ``base``: the base model the head names (``other_base``)."""

    path: str | None = None
    problem: HeadProblem | None = None
    base: str | None = None


class HubError(AstError):
    """The Hugging Face hub could not be reached or refused the request (``model``: the name as given)."""

    model: str | None = None


class OutputWriteError(AstError):
    """An output could not be written (disk full, a device that refuses, a vanished folder): ``path``."""

    path: str | None = None


class DeviceOutOfMemoryError(AstError):
    """The model ran out of device (or host) memory on a batch of ``batch_size`` windows (``training``: of
    training examples, in a training step)."""

    batch_size: int | None = None
    training: bool = False


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory failure of torch (CUDA, MPS or the CPU allocator) or Python."""
    if isinstance(exc, (MemoryError, DeviceOutOfMemoryError)):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    # MPS and the CPU allocator raise a plain RuntimeError; its text is the only mark they leave.
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
