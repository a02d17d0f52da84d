"""The error table: the one place where library exceptions become ``Error:``/``Hint:`` lines that name
options and commands, and exit codes. ``--debug`` (or AST_DEBUG=1) brings tracebacks back."""

from __future__ import annotations

import errno
import os
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import typer

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Library parameter names -> the flag that sets them.
FLAGS = {
    "device": "--device", "dtype": "--dtype", "attn": "--attn", "quantize": "--quantize", "threads": "--threads",
    "batch_size": "--batch-size", "workers": "--workers", "hop_seconds": "--hop", "offline": "--offline",
    "cache_dir": "--cache-dir", "labels": "--include/--exclude", "include": "--include", "exclude": "--exclude",
    "format": "--format", "output": "--output", "resume": "--resume", "out": "--out", "revision": "--revision",
    "force": "--force", "batch_sizes": "--batch-sizes", "threshold": "--threshold", "top": "--top",
    "kind": "--kind", "overwrite": "--overwrite", "activation": "--activation", "aggregate": "--aggregate",
    "RAY_ADDRESS": "RAY_ADDRESS (environment)",
    "allow_other": "--yes",
    "data": "DATA", "warmup_epochs": "--warmup", "heads": "--head", "base_head": "--no-base-head",
    "db_argument": "DB",  # ast search's index (the library's ``db`` is ast index's --db)
    "name": "MODEL",  # hub.download's model name: ast download's argument
}


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("AST_DEBUG", "") not in ("", "0", "false", "no")


def flag(option: str) -> str:
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def _suggestion(suggest: dict[str, Any]) -> str:
    parts = []
    for option, value in suggest.items():
        if value is None:
            parts.append(f"drop {flag(option)}")
        elif value is True:
            parts.append(f"add {flag(option)}")
        else:
            parts.append(f"use {flag(option)} {value}")
    replace = None in suggest.values() and any(value is not None for value in suggest.values())
    return (" and " if replace else ", or ").join(parts)  # drop --resume and add --overwrite; use A, or use B


def _model_hint(exc) -> str | None:
    name = exc.model
    if exc.problem == "unknown_name":
        close = f"did you mean {exc.suggestion}? " if exc.suggestion else ""
        return close + "`ast models` lists the aliases"
    if exc.problem == "not_cached":
        return f"`ast download {name}` where the hub is reachable (it is not in the cache yet)"
    if exc.problem == "no_such_repo":
        return "check the name (`ast models` lists the aliases); for a private repo set HF_TOKEN"
    if exc.problem == "no_such_revision":
        return "name a branch, tag or commit of the repo (--revision or ORG/NAME@REV)"
    if exc.problem == "gated":
        return "accept its conditions on the model page, then set HF_TOKEN to a token of that account"
    if exc.problem == "not_ast":
        return "`ast models` lists the published AST checkpoints"
    return None


def _head_hint(exc) -> str | None:
    if exc.problem in ("missing", "not_a_head"):
        return "--head takes a folder written by `ast train --mode head`; a full checkpoint runs alone with --model"
    if exc.problem == "other_base":
        return f"classify with --model {exc.base}, or train the head again on this model" if exc.base else exc.hint
    return exc.hint


def _with_path_note(model: str | None, hint: str | None) -> str | None:
    """``recordings/model`` reads as a hub id ORG/NAME; when its first part is a local folder, the user most
    likely meant a path that does not exist: say so."""
    if model and "/" in model and not model.startswith(("./", "../", "/")) and os.path.isdir(model.split("/", 1)[0]) \
            and not os.path.exists(model):  # (./x, ../x, /x: the error is about that path already)
        note = f"as a local path, ./{model} does not exist either"
        return f"{hint}; {note}" if hint else note
    return hint


def describe_error(exc: BaseException) -> tuple[str, str | None, int]:
    """(message, hint, exit code) for an exception that reached the CLI."""
    from ..errors import (AstError, CheckpointError, DeviceOutOfMemoryError, HeadError, HubError, ModelNotFoundError,
                          UsageError, is_out_of_memory)

    if isinstance(exc, UsageError):
        message = f"{flag(exc.option)}: {exc}" if exc.option else str(exc)
        hint = _suggestion(exc.suggest) if exc.suggest else exc.hint
        return message, hint, EXIT_USAGE
    if isinstance(exc, ModelNotFoundError):
        return str(exc), _with_path_note(exc.model, _model_hint(exc) or exc.hint), EXIT_FAILED
    if isinstance(exc, CheckpointError):
        hint = exc.hint
        if exc.corrupt and exc.model:
            hint = f"download it again: `ast download {exc.model} --force`"
        return str(exc), hint, EXIT_FAILED
    if isinstance(exc, HeadError):
        return str(exc), _head_hint(exc), EXIT_USAGE
    if isinstance(exc, HubError):
        hint = exc.hint or "check the network (and HF_ENDPOINT, proxies), then try again"
        return str(exc), _with_path_note(exc.model, hint), EXIT_FAILED
    if isinstance(exc, DeviceOutOfMemoryError) and exc.training:
        return str(exc), "use a smaller --train-batch (or --device cpu)", EXIT_FAILED
    if isinstance(exc, DeviceOutOfMemoryError) or (not isinstance(exc, AstError) and is_out_of_memory(exc)):
        smaller = "use a smaller --batch-size (--batch-sizes in ast benchmark)"
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):  # Python's, or torch's CPU allocator
            return "out of memory", f"{smaller} or fewer --workers", EXIT_FAILED
        return "out of memory on the device", f"{smaller}, or --device cpu", EXIT_FAILED
    if isinstance(exc, AstError):
        return str(exc), exc.hint, EXIT_FAILED
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename:
        return f"{os.fsdecode(exc.filename)}: {exc.strerror or text}", None, EXIT_FAILED
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # a stream, unnamed
        return f"writing failed: {exc.strerror}", "make room where the output goes, then run again", EXIT_FAILED
    name = type(exc).__name__
    return f"unexpected error: {name}: {text}", "run again with --debug (or AST_DEBUG=1) for the traceback", EXIT_FAILED


def print_error(console, exc: BaseException) -> int:
    """``Error: ...`` and ``Hint: ...`` lines for ``exc`` (best effort: stderr may be gone); its exit code."""
    message, hint, code = describe_error(exc)
    say(console, f"Error: {message}")
    if hint:
        say(console, f"Hint: {hint}")
    return code


def say(console, text: str) -> None:
    """One line on stderr, never failing the run: messages are best effort, data is not."""
    try:
        console.print(one_line(text), markup=False, highlight=False, soft_wrap=True)
    except (OSError, ValueError):
        pass


def counted(n: int, noun: str) -> str:
    """``1 file``, ``2 files``: a count with its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def one_line(text: str) -> str:
    """Control characters (a newline in a file name) shown escaped, so that one message stays one line."""
    return "".join(ch if ch.isprintable() or ch == "\t" else repr(ch)[1:-1] for ch in text)


def traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@contextmanager
def cli_errors(console, debug: bool = False) -> Iterator[None]:
    """Print ``Error: ...`` (+ ``Hint: ...``) and exit non-zero instead of a traceback; without ``--debug``, no
    library warning reaches the user either (loading and ``--fast``'s calibration run outside the runs' own
    silencing, ``_io.native_stderr_silenced``)."""
    with warnings.catch_warnings(), _hub_logs_quiet(not debug_enabled(debug)):
        if not debug_enabled(debug):
            warnings.simplefilter("ignore")
        with _errors_as_lines(console, debug):
            yield


@contextmanager
def _hub_logs_quiet(enabled: bool) -> Iterator[None]:
    """huggingface_hub logs its own warnings to stderr ("Ignored error while writing tree cache file ..."): only
    its errors, while ``enabled``. It sets its level when first imported, from HF_HUB_VERBOSITY (a user's own
    setting stands), so both are set; its logger by name, so nothing is imported here."""
    import logging

    if not enabled or "HF_HUB_VERBOSITY" in os.environ:
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)  # imported already
    os.environ["HF_HUB_VERBOSITY"] = "error"  # imported in the run
    try:
        yield
    finally:
        del os.environ["HF_HUB_VERBOSITY"]
        logger.setLevel(level)


@contextmanager
def _errors_as_lines(console, debug: bool) -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt as exc:
        from ._signals import EXIT_TERMINATED, Terminated

        terminated = isinstance(exc, Terminated)
        say(console, "Terminated." if terminated else "Interrupted.")
        raise typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        from ._signals import EXIT_BROKEN_PIPE

        raise typer.Exit(EXIT_BROKEN_PIPE) from None  # the reader of stdout went away: stop quietly
    except Exception as exc:
        if debug_enabled(debug):
            raise
        raise typer.Exit(print_error(console, exc)) from None
