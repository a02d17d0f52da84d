"""The Typer app and its top-level callback; each command lives in its own module of this package."""

from __future__ import annotations

import re
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from .. import __version__

# click's UsageError: typer raises it for a bad option value, an unknown option or command, a missing argument,
# but does not re-export it; BadParameter (public) is its subclass.
_UsageError = typer.BadParameter.__mro__[1]


class _OneLineUsageError(_UsageError):
    """A usage error from option parsing, in our style: ``Error: ...`` and ``Hint: ...`` lines on stderr
    instead of typer's usage block."""

    def show(self, file=None) -> None:
        flag, message = "", self.format_message()
        bad_value = re.match(r"Invalid value for '([^']+)'(?: / '[^']+')*: (?:Value error, )?(.*)", message, re.S)
        if bad_value:  # "Invalid value for '--format' / '-f': Value error, 'x' is ..." -> "--format: 'x' is ..."
            flag, message = f"{bad_value[1]}: ", bad_value[2]
        message = flag + message[:1].lower() + message[1:].rstrip(".")  # "No such option" -> "no such option"
        hint = None
        if self.ctx is not None:
            listed = "commands" if isinstance(self.ctx.command, TyperGroup) else "options"
            hint = f"`{self.ctx.command_path} --help` lists the {listed}"
        elif getattr(self, "command_path", None):  # raised before the command's context was made (--top, no value)
            hint = f"`{self.command_path} --help` lists the options"
        typer.echo(f"Error: {message}" + (f"\nHint: {hint}" if hint else ""), err=True)


def _one_line(exc, command_path: str | None = None) -> _OneLineUsageError:
    error = _OneLineUsageError(exc.format_message(), ctx=exc.ctx)
    error.command_path = command_path
    return error


class _Group(TyperGroup):
    """The app's group: parsing errors of the app and of every command come out in one style."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `ast`: the help, as asked for
                raise
            raise _one_line(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _OneLineUsageError:
            raise
        except _UsageError as exc:
            name = ctx.invoked_subcommand  # set before the command's own context is made
            raise _one_line(exc, f"{ctx.command_path} {name}" if name else None) from None


app = typer.Typer(
    name="ast",
    cls=_Group,
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
    (or the model could not be loaded, an output could not be written, the paths named held no audio),
    2 usage error, 130 interrupted (143 on SIGTERM), 141 the reader of stdout went away.
    """
