"""The ``ast`` command: one module per command, glue over the library. Nothing heavy is imported at module
level, so ``ast --help`` and shell completion stay instant (torch loads only inside commands).

- ``_app``: the Typer app; ``_common``: shared option types and the RunOptions bundle; ``_errors``: the error
  table; ``_io``: stderr handling; ``_inputs``: the audio inputs of a run; ``_progress`` and ``_render``: what a
  person sees.
- ``classify``, ``listen``, ``extract``, ``train`` (train, evaluate), ``models`` (download, models, labels),
  ``benchmark``: the commands.
"""

from __future__ import annotations

from . import classify, listen, extract, index, search, train, models, benchmark  # noqa: F401, I001  (each registers its commands, in this order)
from ._app import app
from ._errors import describe_error


def main() -> None:
    """Run the ``ast`` command line on ``sys.argv``; ends in ``SystemExit`` with the exit code."""
    from ._signals import run_main

    run_main(app)


def main_process() -> None:
    """Entry point of the ``ast`` executable and ``python -m ast_cli``: glibc's malloc told to keep freed memory
    for reuse (``_signals.keep_freed_memory``), ``main()``, then the process ends, without CPython's teardown once
    torch is loaded (``_signals.end_process``: ~0.4 s saved)."""
    from ._signals import end_process, exit_code, keep_freed_memory

    keep_freed_memory()
    try:
        main()
    except SystemExit as exc:
        code = exit_code(exc)
    else:
        code = 0
    end_process(code)


__all__ = ["app", "main", "main_process", "describe_error"]
