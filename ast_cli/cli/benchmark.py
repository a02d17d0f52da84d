"""``ast benchmark``: the model forward in every mode, and ``classify`` end to end on real files."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Annotated, Optional

import typer

from ..constants import DEFAULT_MODEL
from ..run.options import ListFormat, RunOptions
from ._app import app
from ._common import (CacheDirOpt, DebugOpt, ExtOpt, ModelOpt, OfflineOpt, QuietOpt, fetch_model, model_labels,
                      stderr_console, warn_if_slow_bf16)
from ._errors import cli_errors, debug_enabled, say


@app.command()
def benchmark(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="PATH...", help="Audio files or directories timed with --end-to-end.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Time a default-shape AST with random weights (nothing downloaded; for hardware comparisons).")] = False,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", metavar="N,N,...", help="Batch sizes to time.")] = "1,2,4,8",
    attn: Annotated[str, typer.Option("--attn", metavar="LIST", help="eager and/or sdpa, comma-separated.")] = "eager,sdpa",
    dtype: Annotated[str, typer.Option(metavar="LIST", help="auto (fp32 on CPU, fp16 on CUDA), fp32, fp16, bf16; comma-separated.")] = "auto",
    quantize: Annotated[str, typer.Option(metavar="LIST", help="none and/or int8 (dynamic int8 Linear layers, CPU); comma-separated.")] = "none",
    iters: Annotated[Optional[int], typer.Option(min=1, metavar="N", help="Timed passes per row (default: 10 on a GPU, 3 on the CPU).")] = None,
    warmup: Annotated[Optional[int], typer.Option(min=0, metavar="N", help="Untimed passes first (default: until two in a row agree within 5%, at most 20).")] = None,
    end_to_end: Annotated[bool, typer.Option("--end-to-end", help="Also time classify on PATHS, split by stage (decode, resample, features, model).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, metavar="N", help="Windows per model call with --end-to-end.")] = 4,
    workers: Annotated[int, typer.Option(min=1, max=64, metavar="N", help="Decoding/feature threads with --end-to-end.")] = 2,
    threads: Annotated[Optional[int], typer.Option(min=1, metavar="N", help="CPU threads for the model (default: torch's).")] = None,
    format: Annotated[ListFormat, typer.Option("--format", "-f", help="table or json.")] = ListFormat.table,
    ext: ExtOpt = None,
    offline: OfflineOpt = False,
    cache_dir: CacheDirOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Time the model forward (every mode, batch size and attention) and, with --end-to-end, classify on files.

    Inputs have the checkpoint's shape (1024 frames = 10.24 s for AudioSet models). The table gives ms per
    batch (mean and median), ms per clip, clips/s, x real-time and the SDPA-over-eager speedup; then every --fast
    candidate (ms at batch size 1, speed-up over fp32, largest score difference) and the one --fast picks.
    --format json gives the same rows, the environment (torch version, device, threads) and "fast".

    Examples:

      ast benchmark --device cpu --batch-sizes 1,2

      ast benchmark --random-weights --quantize none,int8 --format json

      ast benchmark --end-to-end clips/ --quantize int8 --attn sdpa
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        from ..run.backends import pick_device
        from ..tasks.benchmark import parse_attns, parse_batch_sizes, resolve_modes, run_benchmark
        from ..errors import UsageError
        from ..checkpoint.speed import set_threads

        sizes, attns = parse_batch_sizes(batch_sizes), parse_attns(attn)
        if paths and not end_to_end:
            raise UsageError("files are timed only with --end-to-end", hint="ast benchmark --end-to-end PATH...")
        given = getattr(ctx.get_parameter_source("model"), "name", None) == "COMMANDLINE"  # not from AST_MODEL
        if random_weights and given:
            raise UsageError("--random-weights builds its own model", hint="drop --model")
        files = _files(paths, ext) if end_to_end else []
        resolved = pick_device(device)
        modes, skipped = resolve_modes(dtype, quantize, resolved)
        if skipped and not quiet:
            say(stderr, f"note: left out {', '.join(skipped)} (int8 computes in fp32 around its int8 layers)")
        warn_if_slow_bf16([m.dtype for m in modes], resolved, stderr)
        set_threads(threads)
        gpu = resolved != "cpu"
        run = RunOptions(device=resolved, offline=offline or None, cache_dir=cache_dir)
        if end_to_end and not random_weights and not model_labels(model, run, stderr, quiet):
            raise UsageError(f"--end-to-end times classify, and {model} has no labels of its own (a bare encoder)",
                             hint="time its forward without --end-to-end")
        master, features, name = _model(model, random_weights, run, stderr, quiet)
        status = stderr.status("timing") if not quiet and stderr.is_terminal else None
        from ._io import native_stderr_silenced

        with status if status is not None else nullcontext(), native_stderr_silenced(not debug_enabled(debug)):
            report = run_benchmark(
                master, features, name, device=resolved, modes=modes, batch_sizes=sizes, attns=attns,
                iters=iters or (10 if gpu else 3), warmup=warmup,
                paths=files, batch_size=batch_size, workers=workers,
                on_step=status.update if status is not None else None)
        if format is ListFormat.json:
            import json

            typer.echo(json.dumps(report.to_dict(), indent=2))
        else:
            from ._render import print_benchmark

            print_benchmark(report)


def _files(paths, ext) -> list[str]:
    from ..errors import UsageError
    from ..audio.inputs import expand_inputs, parse_extensions

    items = expand_inputs(paths or [], parse_extensions(ext))
    for item in items:
        if item.error is not None and item.root is None:  # a path as given: a typo is named, not timed as nothing
            raise UsageError(f"{item.path}: {item.error}")
    files = [item.path for item in items if item.error is None]
    if not files:
        raise UsageError("--end-to-end needs audio files", hint="ast benchmark --end-to-end clips/")
    return files


def _model(model: str, random_weights: bool, run: RunOptions, stderr, quiet: bool):
    """(float32 CPU master model, its FeatureConfig, its name): random weights, or the checkpoint."""
    if random_weights:
        from ..tasks.benchmark import random_model
        from ..audio.features import FeatureConfig

        master = random_model()
        return master, FeatureConfig(max_length=master.config.max_length,
                                     num_mel_bins=master.config.num_mel_bins), "random weights"
    from ..checkpoint.weights import build_model, load_checkpoint

    checkpoint = load_checkpoint(fetch_model(model, run, stderr, quiet))  # a missing hub model downloads first
    return build_model(checkpoint), checkpoint.features, model

