"""The ``ast`` command: parses options, calls the library, renders. Nothing heavy is imported at module
level, so ``ast --help`` and shell completion stay instant (torch loads only inside commands)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated, Iterator, Optional

import typer

from . import DEFAULT_MODEL, __version__

app = typer.Typer(
    name="ast",
    help="Tag audio with the Audio Spectrogram Transformer: exact reference scores, long files, batches.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# -- errors: one place that turns exceptions into one line and an exit code ---------------------------


def _debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("AST_DEBUG", "") not in ("", "0", "false", "no")


def describe_error(exc: BaseException) -> tuple[str, str | None, int]:
    """(message, hint, exit code) for an exception that reached the CLI."""
    from .errors import AstError, UsageError

    if isinstance(exc, UsageError):
        return str(exc), exc.hint, EXIT_USAGE
    if isinstance(exc, AstError):
        return str(exc), exc.hint, EXIT_FAILED
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return "out of memory on the device", "use a smaller --batch-size, or --device cpu", EXIT_FAILED
    if isinstance(exc, MemoryError):
        return "out of memory", "use a smaller --batch-size or fewer --workers", EXIT_FAILED
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or text}", None, EXIT_FAILED
    return f"unexpected error: {name}: {text}", "run again with --debug (or AST_DEBUG=1) for the traceback", EXIT_FAILED


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def cli_errors(debug: bool = False) -> Iterator[None]:
    """Print ``Error: ...`` (+ ``Hint: ...``) and exit non-zero instead of a traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _stderr_console().print("Interrupted.", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if _debug_enabled(debug):
            raise
        message, hint, code = describe_error(exc)
        console = _stderr_console()
        console.print(f"Error: {message}", markup=False)
        if hint:
            console.print(f"Hint: {hint}", markup=False)
        raise typer.Exit(code) from None


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
    (or the model could not be loaded), 2 usage error, 130 interrupted.
    """


# -- shared options ---------------------------------------------------------------------------------

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Model alias, hub id (ORG/NAME[@REV]), local directory or weights file."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
AttnOpt = Annotated[str, typer.Option("--attn", help="Attention implementation: sdpa or eager.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (fp32 on CPU, fp16 on CUDA), fp32, fp16 or bf16.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(help="int8: dynamic int8 Linear layers (CPU).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="CPU threads for the model (default: torch's).")]
HopOpt = Annotated[
    Optional[float], typer.Option(help="Seconds between window starts for long audio (default: window length).")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per model call.")]
WorkersOpt = Annotated[int, typer.Option(min=1, help="Decoding/feature threads.")]
ExtOpt = Annotated[
    Optional[list[str]], typer.Option("--ext", help="Extensions taken from directories (repeatable, or a,b,c).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks (also AST_DEBUG=1).")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Use only the local cache (also HF_HUB_OFFLINE=1).")]


def _check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    from .errors import UsageError

    if value not in choices:
        raise UsageError(f"{option} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _load_tagger(model, device, attn, dtype, quantize, threads, offline, console, quiet):
    import torch

    from .tagger import Tagger

    _check_choice(attn, ("sdpa", "eager"), "--attn")
    if quantize is not None:
        _check_choice(quantize, ("int8",), "--quantize")
    if threads:
        torch.set_num_threads(threads)
    if not quiet and console.is_terminal:
        with console.status(f"loading {model}"):
            return Tagger.load(model, device=device, attn=attn, dtype=dtype, quantize=quantize,
                               offline=offline or None)
    return Tagger.load(model, device=device, attn=attn, dtype=dtype, quantize=quantize, offline=offline or None)


def _report_failure(console, path: str, error: str) -> None:
    console.print(f"error: {path}: {error}", markup=False, highlight=False)


# -- classify ---------------------------------------------------------------------------------------


@app.command()
def classify(
    paths: Annotated[list[str], typer.Argument(help="Audio files, directories, glob patterns, or - for stdin.")],
    model: ModelOpt = DEFAULT_MODEL,
    top: Annotated[Optional[int], typer.Option(min=0, help="Labels per file (0 = all; default 5, or all with --threshold).")] = None,
    threshold: Annotated[Optional[float], typer.Option(min=0.0, help="Keep labels with score >= P.")] = None,
    include: Annotated[Optional[list[str]], typer.Option(help="Only these labels (repeatable, case-insensitive).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Never these labels (repeatable, case-insensitive).")] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="table, json, jsonl or csv (default: table on a terminal, jsonl otherwise).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write to this file (json/csv atomically, jsonl line by line).")] = None,
    resume: Annotated[bool, typer.Option(help="With --output x.jsonl: skip files already recorded there.")] = False,
    activation: Annotated[str, typer.Option(help="sigmoid (multi-label, default), softmax or none (raw logits).")] = "sigmoid",
    segments: Annotated[bool, typer.Option(help="Add per-window results (start, end, labels).")] = False,
    hop: HopOpt = None,
    aggregate: Annotated[str, typer.Option(help="Window scores -> file score: max (default) or mean.")] = "max",
    device: DeviceOpt = "auto",
    attn: AttnOpt = "sdpa",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = 4,
    workers: WorkersOpt = 2,
    ext: ExtOpt = None,
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Tag audio files with ranked labels and scores.

    Long files are cut into windows of the model's input length (10.24 s for AudioSet models) and the
    window scores aggregated; --segments shows each window.

    Examples:

      ast classify song.wav --top 5

      ast classify recordings/ --format jsonl --output tags.jsonl --resume

      find . -name '*.flac' | ast classify - --threshold 0.3 --format csv > tags.csv
    """
    stderr = _stderr_console()
    with cli_errors(debug):
        from .errors import UsageError
        from .inputs import expand_inputs, parse_extensions
        from .tagger import LabelSelection

        fmt = format or ("table" if sys.stdout.isatty() and output is None else "jsonl")
        _check_choice(fmt, ("table", "json", "jsonl", "csv"), "--format")
        _check_choice(activation, ("sigmoid", "softmax", "none"), "--activation")
        _check_choice(aggregate, ("max", "mean"), "--aggregate")
        if resume and (output is None or fmt != "jsonl"):
            raise UsageError("--resume needs --output FILE with --format jsonl")
        if fmt == "table" and output is not None:
            raise UsageError("--output needs --format json, jsonl or csv")
        if top is None:
            top = None if threshold is not None else 5
        selection = LabelSelection(top=top or None, threshold=threshold, include=tuple(include or ()),
                                   exclude=tuple(exclude or ()))
        items = expand_inputs(paths, parse_extensions(ext), stdin=sys.stdin)
        if not items:
            raise UsageError("no audio files found in the given paths", hint="check --ext, or name files directly")

        journal: dict = {}
        if resume:
            from .output import already_done, read_journal

            journal = read_journal(output)
        tagger = _load_tagger(model, device, attn, dtype, quantize, threads, offline, stderr, quiet)
        selection.mask(tagger.labels)  # unknown --include/--exclude names fail before any work

        skipped_errors = 0
        if journal:
            todo = []
            for item in items:
                try:
                    stat = os.stat(item.path)
                    size, mtime = stat.st_size, stat.st_mtime
                except OSError:
                    size = mtime = None
                record = journal.get(item.path)
                if already_done(record, size, mtime):
                    skipped_errors += record.get("error") is not None
                else:
                    todo.append(item)
            if not quiet:
                stderr.print(f"resuming: {len(items) - len(todo)} files already in {output}", markup=False)
            items = todo

        writer = _make_writer(fmt, output, segments, append=resume)
        failed = skipped_errors
        from .progress import BatchProgress

        progress = BatchProgress(stderr, len(items), enabled=not quiet and stderr.is_terminal)
        commit = True
        try:
            with progress:
                results = tagger.classify(
                    items, selection=selection, activation=activation, aggregate=aggregate, segments=segments,
                    hop_seconds=hop, batch_size=batch_size, workers=workers, debug=_debug_enabled(debug),
                    on_progress=lambda out: progress.advance(out.duration, out.error is not None),
                )
                for result in results:
                    if result.error is not None:
                        failed += 1
                        _report_failure(stderr, result.path, result.error)
                    writer.write(result)
        except KeyboardInterrupt:
            writer.close(commit=True)  # keep what is done
            commit = False
            raise
        except BaseException:
            commit = False
            writer.close(commit=False)
            raise
        finally:
            if commit:
                writer.close(commit=True)
        if failed:
            raise typer.Exit(EXIT_FAILED)


def _make_writer(fmt: str, output: str | None, segments: bool, append: bool = False):
    from .output import CsvWriter, JsonlWriter, JsonWriter, TableWriter

    if fmt == "table":
        from rich.console import Console

        return TableWriter(Console(highlight=False, soft_wrap=False))
    if fmt == "json":
        return JsonWriter(sys.stdout, output)
    if fmt == "jsonl":
        return JsonlWriter(sys.stdout, output, append=append)
    return CsvWriter(sys.stdout, output, segments=segments)


@app.command()
def labels(
    model: ModelOpt = DEFAULT_MODEL,
    offline: OfflineOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List a model's labels, one per line: index, tab, name.

    Examples:

      ast labels

      ast labels --model speech-commands-v2 | grep -i yes
    """
    with cli_errors(debug):
        from .hub import resolve_model
        from .weights import load_checkpoint, read_configs

        path = resolve_model(model, offline=offline or None)
        config = read_configs(path)[0] if path.is_dir() else load_checkpoint(path).config
        for index, name in enumerate(config.id2label):
            typer.echo(f"{index}\t{name}")


def main() -> None:
    app()
