"""The ``ast`` command: one module per command, glue over the library. Nothing heavy is imported at module
level, so ``ast --help`` and shell completion stay instant (torch loads only inside commands).

- ``_app``: the Typer app; ``_common``: shared option types and the RunOptions bundle; ``_errors``: the error
  table; ``_io``: stderr handling; ``_progress`` and ``_render``: what a person sees.
- ``classify``, ``listen``, ``extract``, ``train`` (train, evaluate), ``models`` (download, models, labels),
  ``benchmark``: the commands.
"""

from __future__ import annotations

from . import classify, listen, extract, index, search, train, models, benchmark  # noqa: F401, I001  (each registers its commands, in this order)
from ._app import app
from ._errors import describe_error


def main() -> None:
    """Entry point of the ``ast`` executable."""
    from ._signals import run_main

    run_main(app)


__all__ = ["app", "main", "describe_error"]
