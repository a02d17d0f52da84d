"""The Typer app and its top-level callback; each command lives in its own module of this package."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import __version__

app = typer.Typer(
    name="ast",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ast-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        Optional[bool], typer.Option("--version", help="Show the version and exit.", callback=_version, is_eager=True)
    ] = None,
) -> None:
    """Tag audio with the Audio Spectrogram Transformer (AST).

    Data goes to stdout, progress and messages to stderr. Exit codes: 0 all good, 1 some files failed
    (or the model could not be loaded), 2 usage error, 130 interrupted (143 on SIGTERM).
    """
