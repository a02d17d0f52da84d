"""The few exceptions the library raises. The CLI turns each into one line with a hint (``cli_errors.py``)."""

from __future__ import annotations


class AstError(Exception):
    """Base class: an expected failure with a message fit for a user."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class AudioDecodeError(AstError):
    """A file could not be read as audio (missing, empty, truncated, unsupported...)."""


class ModelNotFoundError(AstError):
    """A model name that is neither an alias, a cached/downloadable hub repo, nor a local path."""


class CheckpointError(AstError):
    """A checkpoint that exists but cannot be used: wrong keys or shapes, corrupt file, bad config."""


class UsageError(AstError):
    """Options that do not fit together."""


class HubError(AstError):
    """The Hugging Face hub could not be reached or refused the request."""
