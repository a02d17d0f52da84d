"""The few exceptions the library raises, with structured fields.

The library never speaks in command-line flags: an exception says what went wrong (``str(exc)``) and carries
the facts a front end needs to say how to fix it (which option, which model, whether a download would help).
The CLI's error table (``ast_cli/cli/_errors.py``) is the one place that turns them into ``Error:``/``Hint:``
lines naming options and commands. ``hint`` is optional prose that names no flag.
"""

from __future__ import annotations

from typing import Any, Literal


class AstError(Exception):
    """Base class: an expected failure with a message fit for a user."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(AstError):
    """Options that do not fit together, or a value out of range.

    ``option``: the offending parameter, by its library name (a ``RunOptions`` field such as ``hop_seconds``,
    or a parameter such as ``include``); ``suggest``: option -> value that would work (``{"device": "cpu"}``;
    ``True`` for a switch, ``None`` for "drop this option").
    """

    def __init__(self, message: str, *, option: str | None = None, suggest: dict[str, Any] | None = None,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.option = option
        self.suggest = suggest or {}


class AudioDecodeError(AstError):
    """A file could not be read as audio (missing, empty, truncated, unsupported...)."""

    def __init__(self, message: str, *, needs_ffmpeg: bool = False, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.needs_ffmpeg = needs_ffmpeg


ModelProblem = Literal["unknown_name", "no_such_path", "not_cached", "no_such_repo", "no_such_revision",
                       "gated", "not_ast"]


class ModelNotFoundError(AstError):
    """A model name that is neither an alias, a cached/downloadable hub repo, nor a local path.

    ``model``: the name as given; ``problem``: which of ``ModelProblem``; ``suggestion``: a close alias, if any.
    """

    def __init__(self, message: str, *, model: str, problem: ModelProblem, suggestion: str | None = None,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.model = model
        self.problem = problem
        self.suggestion = suggestion


class CheckpointError(AstError):
    """A checkpoint that exists but cannot be used: wrong keys or shapes, corrupt file, bad config.

    ``path``: the file at fault; ``model``: the hub name it came from, when it came from the cache (then a fresh
    download can repair a ``corrupt`` file).
    """

    def __init__(self, message: str, *, path: str | None = None, model: str | None = None, corrupt: bool = False,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.path = path
        self.model = model
        self.corrupt = corrupt


class HubError(AstError):
    """The Hugging Face hub could not be reached or refused the request (``model``: the name as given)."""

    def __init__(self, message: str, *, model: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.model = model


class DeviceOutOfMemoryError(AstError):
    """The model ran out of device (or host) memory on a batch of ``batch_size`` windows."""

    def __init__(self, message: str = "out of memory on the device", *, batch_size: int | None = None):
        super().__init__(message)
        self.batch_size = batch_size


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
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
