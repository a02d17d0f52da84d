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
def native_stderr_silenced(enabled: bool = True) -> Iterator[None]:
    """Send what C libraries print on file descriptor 2 (mpg123's "Note: Trying to resync...", ffmpeg,
    libsndfile) to /dev/null while a batch runs, so that stderr carries only our progress and one line
    per failure. Python's own ``sys.stderr`` keeps writing to the real stderr. Off with --debug."""
    if not enabled:
        yield
        return
    import io
    import warnings

    try:
        python_fd = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        python_fd = None  # sys.stderr is not a real file (a test runner's capture): leave it alone
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    old_stderr = sys.stderr
    if python_fd == 2:
        sys.stderr = open(os.dup(saved), "w", encoding=old_stderr.encoding or "utf-8", errors="backslashreplace",
                          buffering=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library warnings are not the user's business without --debug
            yield
    finally:
        if sys.stderr is not old_stderr:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)


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
        raise typer.Exit(_print_error(_stderr_console(), exc)) from None


def _print_error(console, exc: BaseException) -> int:
    """``Error: ...`` and ``Hint: ...`` lines for ``exc``; returns its exit code."""
    message, hint, code = describe_error(exc)
    console.print(f"Error: {message}", markup=False)
    if hint:
        console.print(f"Hint: {hint}", markup=False)
    return code


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
    _warn_if_slow_bf16([dtype], device, console)
    _fetch_model(model, offline, console, quiet)  # first use of a hub model: download it, with its own progress
    if not quiet and console.is_terminal:
        with console.status(f"loading {model}"):
            return Tagger.load(model, device=device, attn=attn, dtype=dtype, quantize=quantize,
                               offline=offline or None)
    return Tagger.load(model, device=device, attn=attn, dtype=dtype, quantize=quantize, offline=offline or None)


def _fetch_model(model: str, offline: bool, console, quiet: bool):
    """Local path of ``model``, downloading a missing hub model (progress bars unless quiet or not a terminal)."""
    from .hub import resolve_model

    return resolve_model(model, offline=offline or None, console=console if not quiet and console.is_terminal else None)


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
            with native_stderr_silenced(not _debug_enabled(debug)), progress:
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


# -- extract-features -------------------------------------------------------------------------------


@app.command("extract-features")
def extract_features_command(
    paths: Annotated[list[str], typer.Argument(help="Audio files, directories, glob patterns, or - for stdin.")],
    out: Annotated[str, typer.Option("--out", "-o", metavar="DIR", help="Output directory; mirrors the input tree.")],
    kind: Annotated[str, typer.Option(help="embedding (pooled, hidden_size per window) or fbank (the model input).")] = "embedding",
    format: Annotated[str, typer.Option("--format", "-f", help="safetensors, or npy (+ a .json metadata file).")] = "safetensors",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute outputs that exist (default: skip them).")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    hop: HopOpt = None,
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
    """Write each file's model inputs (fbank) or pooled embeddings, one output file per input.

    One row per window of the model's input length (10.24 s for AudioSet models): --kind embedding gives
    (windows, hidden_size), --kind fbank (windows, max_length, num_mel_bins), exactly what the model sees
    (fbank needs only the model's configuration, not its weights). DIR mirrors the input tree:
    DIR/<path below the given directory>.safetensors, or the basename for files named directly. Existing
    outputs are skipped unless --overwrite, so a rerun resumes; writes are atomic. A summary goes to stderr.

    Examples:

      ast extract-features recordings/ --out embeddings/

      ast extract-features recordings/ --out fbank/ --kind fbank --format npy

      ast extract-features 'clips/*.flac' --out embeddings/ --hop 5 --overwrite
    """
    stderr = _stderr_console()
    with cli_errors(debug):
        from .errors import UsageError
        from .extract import FORMATS, KINDS, FeatureSource, extract_features, load_feature_config, plan_outputs
        from .inputs import expand_inputs, parse_extensions
        from .progress import BatchProgress
        from .tagger import hop_to_frames

        _check_choice(kind, KINDS, "--kind")
        _check_choice(format, FORMATS, "--format")
        hop_to_frames(hop)  # a bad --hop fails before any work
        items = expand_inputs(paths, parse_extensions(ext), stdin=sys.stdin)
        if not items:
            raise UsageError("no audio files found in the given paths", hint="check --ext, or name files directly")
        jobs = plan_outputs(items, out, format)  # output collisions fail here, before any work
        todo = sum(1 for job in jobs if overwrite or not job.exists)

        source = None  # a rerun with nothing left to do loads no model
        if todo and kind == "embedding":
            tagger = _load_tagger(model, device, attn, dtype, quantize, threads, offline, stderr, quiet)
            source = FeatureSource.from_tagger(tagger, model)
        elif todo:
            path = _fetch_model(model, offline, stderr, quiet)  # downloads a missing hub model, like classify
            source = FeatureSource.fbank(model, load_feature_config(str(path), offline=offline or None))

        counts = {"written": 0, "skipped": 0, "failed": 0}
        progress = BatchProgress(stderr, todo, enabled=not quiet and stderr.is_terminal, description="extracting")
        try:
            with native_stderr_silenced(not _debug_enabled(debug)), progress:
                results = extract_features(
                    jobs, source, fmt=format, overwrite=overwrite, hop_seconds=hop, batch_size=batch_size,
                    workers=workers, debug=_debug_enabled(debug),
                    on_progress=lambda done: progress.advance(done.duration, done.error is not None),
                )
                for result in results:
                    counts[result.status] += 1
                    if result.error is not None:
                        _report_failure(stderr, result.path, result.error)
        finally:
            stderr.print(f"{counts['written']} written, {counts['skipped']} skipped (already in {out}), "
                         f"{counts['failed']} failed", markup=False)
        if counts["failed"]:
            raise typer.Exit(EXIT_FAILED)


# -- download, models -------------------------------------------------------------------------------

ListFormatOpt = Annotated[str, typer.Option("--format", "-f", help="table or json.")]
CacheDirOpt = Annotated[
    Optional[str], typer.Option("--cache-dir", metavar="DIR", help="Hub cache (default: HF_HUB_CACHE, or HF_HOME/hub).")
]


@app.command()
def download(
    models: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="MODEL", show_default=False,
                       help="Aliases or hub ids (ORG/NAME[@REV]); default: the default model of classify."),
    ] = None,
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit (default: main).")] = None,
    cache_dir: CacheDirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if cached (repairs a corrupt file).")] = False,
    list_models: Annotated[bool, typer.Option("--list", help="List the model aliases instead (as `ast models`).")] = False,
    format: ListFormatOpt = "table",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Download models into the Hugging Face cache, so that they work offline; print each local path.

    Fetches config.json, preprocessor_config.json and model.safetensors (pytorch_model.bin only when a
    repo has no safetensors) from HF_ENDPOINT (default huggingface.co), with HF_TOKEN for private repos,
    into HF_HUB_CACHE (default HF_HOME/hub), where every Hugging Face tool looks. Files already cached
    are not downloaded again.

    Examples:

      ast download

      ast download speech-commands-v2 audioset-16-16-0.442

      HF_ENDPOINT=https://hf-mirror.example ast download MIT/ast-finetuned-audioset-10-10-0.4593@main
    """
    if list_models:
        _list_models(format, cache_dir, debug)
        return
    stderr = _stderr_console()
    with cli_errors(debug):
        from . import hub

        failed_code = EXIT_OK
        show_progress = not quiet and stderr.is_terminal
        for name in models or [DEFAULT_MODEL]:
            try:
                path = hub.download(name, revision=revision, cache_dir=cache_dir, force=force,
                                    console=stderr if show_progress else None)
            except Exception as exc:
                if _debug_enabled(debug) or len(models or ()) <= 1:
                    raise  # one model: cli_errors reports it
                failed_code = max(failed_code, _print_error(stderr, exc))  # a bad name never sinks the rest
                continue
            typer.echo(str(path))
            if not quiet:
                files = sorted(p.name for p in path.iterdir() if p.name in hub.INFERENCE_FILES + (hub.PICKLE_NAME,))
                size = sum((path / file).stat().st_size for file in files) / 1e6
                stderr.print(f"{name}: {', '.join(files)} ({size:.1f} MB) in the cache", markup=False)
        if failed_code:
            raise typer.Exit(failed_code)


@app.command()
def models(
    format: ListFormatOpt = "table",
    cache_dir: CacheDirOpt = None,
    debug: DebugOpt = False,
) -> None:
    """List the model aliases: hub id, labels, input length, strides, and whether each is in the cache.

    Any alias works wherever a model is named (--model, ast download); so does a hub id (ORG/NAME[@REV]),
    a local directory in hub layout, or a weights file.

    Examples:

      ast models

      ast models --format json | jq -r '.[] | select(.cached) | .alias'

      ast classify clip.wav --model speech-commands-v2
    """
    _list_models(format, cache_dir, debug)


def _list_models(fmt: str, cache_dir: str | None, debug: bool) -> None:
    with cli_errors(debug):
        import json

        from . import hub

        _check_choice(fmt, ("table", "json"), "--format")
        cached = hub.cached_models(cache_dir)
        rows = [
            {
                "alias": spec.alias, "repo_id": spec.repo_id, "num_labels": spec.num_labels,
                "max_length": spec.max_length, "input_seconds": spec.input_seconds,
                "frequency_stride": spec.frequency_stride, "time_stride": spec.time_stride,
                "mean": spec.mean, "std": spec.std, "default": spec.repo_id == DEFAULT_MODEL,
                "cached": spec.repo_id in cached,
                "path": str(cached[spec.repo_id]) if spec.repo_id in cached else None,
            }
            for spec in hub.REGISTRY
        ]
        if fmt == "json":
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for column, justify in (("alias", "left"), ("hub id", "left"), ("labels", "right"), ("input", "right"),
                                ("strides", "right"), ("cached", "left")):
            table.add_column(column, justify=justify)
        for row in rows:
            table.add_row(row["alias"] + (" (default)" if row["default"] else ""), row["repo_id"],
                          str(row["num_labels"]), f"{row['input_seconds']:.2f} s",
                          f"{row['frequency_stride']}/{row['time_stride']}", "yes" if row["cached"] else "no")
        # Not a terminal: rich would squeeze the table into 80 columns and cut the hub ids.
        Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)


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
        from .weights import load_checkpoint, read_configs

        path = _fetch_model(model, offline, _stderr_console(), quiet=False)
        config = read_configs(path)[0] if path.is_dir() else load_checkpoint(path).config
        for index, name in enumerate(config.id2label):
            typer.echo(f"{index}\t{name}")


# -- benchmark --------------------------------------------------------------------------------------


def _warn_if_slow_bf16(dtypes: list[str], device: str, console) -> None:
    """bf16 on a CPU without bf16 hardware is emulated: slower than fp32. Say so on stderr, then do it anyway."""
    if "bf16" not in dtypes:
        return
    from .speed import cpu_has_native_bf16
    from .tagger import pick_device

    if pick_device(device) == "cpu" and not cpu_has_native_bf16():
        console.print("warning: this CPU has no bf16 hardware (AVX512-BF16, AMX or ARM BF16): bf16 runs slower "
                      "than fp32 here; --quantize int8 is the fast CPU mode", markup=False)


@app.command()
def benchmark(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Audio files or directories timed with --end-to-end.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Time a default-shape AST with random weights (nothing downloaded; for hardware comparisons).")] = False,
    device: DeviceOpt = "auto",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", metavar="N,N,...", help="Batch sizes to time.")] = "1,2,4,8",
    attn: Annotated[str, typer.Option("--attn", metavar="LIST", help="eager and/or sdpa, comma-separated.")] = "eager,sdpa",
    dtype: Annotated[str, typer.Option(metavar="LIST", help="auto (fp32 on CPU, fp16 on CUDA), fp32, fp16, bf16; comma-separated.")] = "auto",
    quantize: Annotated[str, typer.Option(metavar="LIST", help="none and/or int8 (dynamic int8 Linear layers, CPU); comma-separated.")] = "none",
    iters: Annotated[Optional[int], typer.Option(min=1, help="Timed passes per row (default: 10 on a GPU, 3 on the CPU).")] = None,
    warmup: Annotated[Optional[int], typer.Option(min=0, help="Untimed passes first (default: 3 on a GPU, 1 on the CPU).")] = None,
    end_to_end: Annotated[bool, typer.Option("--end-to-end", help="Also time classify on PATHS, split by stage (decode, resample, features, model).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per model call with --end-to-end.")] = 4,
    workers: WorkersOpt = 2,
    threads: ThreadsOpt = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    ext: ExtOpt = None,
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Time the model forward (every mode, batch size and attention) and, with --end-to-end, classify on files.

    Inputs have the checkpoint's shape (1024 frames = 10.24 s for AudioSet models). The table gives ms per
    batch (mean and median), ms per clip, clips/s, x real-time and the SDPA-over-eager speedup; --format json
    gives the same rows plus the environment (torch version, device, threads).

    Examples:

      ast benchmark --device cpu --batch-sizes 1,2

      ast benchmark --random-weights --quantize none,int8 --format json

      ast benchmark --end-to-end clips/ --quantize int8 --attn sdpa
    """
    stderr = _stderr_console()
    with cli_errors(debug):
        from .benchmark import (BenchmarkReport, benchmark_end_to_end, benchmark_model, environment, parse_attns,
                                parse_batch_sizes, random_model, resolve_modes, variant)
        from .errors import UsageError
        from .speed import set_threads
        from .tagger import Tagger, pick_device

        _check_choice(format, ("table", "json"), "--format")
        sizes = parse_batch_sizes(batch_sizes)
        attns = parse_attns(attn)
        if paths and not end_to_end:
            raise UsageError("files are timed only with --end-to-end", hint="ast benchmark --end-to-end PATH...")
        items = []
        if end_to_end:
            from .inputs import expand_inputs, parse_extensions

            items = [item for item in expand_inputs(paths or [], parse_extensions(ext)) if item.error is None]
            if not items:
                raise UsageError("--end-to-end needs audio files", hint="ast benchmark --end-to-end clips/")
        if random_weights and model != DEFAULT_MODEL:
            raise UsageError("--random-weights builds its own model", hint="drop --model")
        resolved = pick_device(device)
        modes = resolve_modes(dtype, quantize, resolved)
        _warn_if_slow_bf16([m.dtype for m in modes], resolved, stderr)
        set_threads(threads)
        gpu = resolved != "cpu"
        iters = iters or (10 if gpu else 3)
        warmup = (3 if gpu else 1) if warmup is None else warmup
        # A missing hub model downloads first, with its own progress bars.
        path = None if random_weights else _fetch_model(model, offline, stderr, quiet)

        status = stderr.status("loading") if not quiet and stderr.is_terminal else None
        step = (lambda text: status.update(text)) if status is not None else None
        if status is not None:
            status.start()
        try:
            if random_weights:
                from .features import FeatureConfig

                master, name = random_model(), "random weights"
                features = FeatureConfig(max_length=master.config.max_length, num_mel_bins=master.config.num_mel_bins)
            else:
                from .weights import build_model, load_checkpoint

                checkpoint = load_checkpoint(path)
                master, features, name = build_model(checkpoint), checkpoint.features, model
            report = BenchmarkReport(environment(master, features, resolved, name))
            report.rows = benchmark_model(master, features, device=resolved, modes=modes, batch_sizes=sizes,
                                          attns=attns, iters=iters, warmup=warmup, on_step=step)
            for mode in modes if end_to_end else ():
                net = variant(master, mode, resolved, share=True)
                tagger = Tagger(net, features, device=resolved, dtype=next(net.parameters()).dtype, name=name)
                for attn_name in attns:
                    if step is not None:
                        step(f"end to end: {mode.name} {attn_name}, {len(items)} files")
                    with native_stderr_silenced(not _debug_enabled(debug)):
                        report.end_to_end.append(benchmark_end_to_end(
                            tagger, [item.path for item in items], attn=attn_name, mode=mode,
                            batch_size=batch_size, workers=workers))
        finally:
            if status is not None:
                status.stop()
        if format == "json":
            import json

            typer.echo(json.dumps(report.to_dict(), indent=2))
        else:
            _print_benchmark(report)


def _print_benchmark(report) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report.environment
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(f"{env.model}: {env.parameters / 1e6:.1f} M parameters, input {env.input_frames} x "
                  f"{env.input_mel_bins} ({env.window_seconds:.2f} s of audio, {env.gflop_per_clip:g} GFLOP); "
                  f"{env.device} ({env.device_name}), {env.threads} threads, torch {env.torch}", markup=False)
    speedups = report.speedups()
    if speedups:
        table = Table(title="SDPA vs eager (median ms per batch)", title_justify="left")
        for column in ("mode", "batch size", "eager ms", "sdpa ms", "speedup"):
            table.add_column(column, justify="left" if column == "mode" else "right")
        medians = {(r.quantize or r.dtype, r.batch_size, r.attn): r.ms_per_batch_median for r in report.rows}
        for (mode, batch), speedup in speedups.items():
            table.add_row(mode, str(batch), f"{medians[(mode, batch, 'eager')]:.1f}",
                          f"{medians[(mode, batch, 'sdpa')]:.1f}", f"{speedup:.2f}x")
        console.print(table)
    table = Table(title="Model forward", title_justify="left")
    for column in ("mode", "attn", "batch size", "mean ms", "median ms", "ms/clip", "clips/s", "x real-time"):
        table.add_column(column, justify="left" if column in ("mode", "attn") else "right")
    for r in report.rows:
        table.add_row(r.quantize or r.dtype, r.attn, str(r.batch_size), f"{r.ms_per_batch:.1f}",
                      f"{r.ms_per_batch_median:.1f}", f"{r.ms_per_clip:.1f}", f"{r.clips_per_s:.2f}",
                      f"{r.x_realtime:.1f}")
    console.print(table)
    if report.end_to_end:
        table = Table(title="End to end (stage seconds from a sequential pass; files/s from the pipelined one)",
                      title_justify="left")
        columns = ("mode", "attn", "files", "audio s", "decode s", "resample s", "features s", "model s",
                   "pipelined s", "files/s", "x real-time")
        for column in columns:
            table.add_column(column, justify="left" if column in ("mode", "attn") else "right")
        for r in report.end_to_end:
            table.add_row(r.quantize or r.dtype, r.attn, f"{r.files - r.failed}/{r.files}", f"{r.audio_seconds:.1f}",
                          f"{r.decode_s:.2f}", f"{r.resample_s:.2f}", f"{r.features_s:.2f}", f"{r.model_s:.2f}",
                          f"{r.pipelined_s:.2f}", f"{r.files_per_s:.2f}", f"{r.x_realtime:.1f}")
        console.print(table)


def main() -> None:
    app()
