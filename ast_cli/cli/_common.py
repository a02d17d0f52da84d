"""What every command shares: option types (``Annotated`` aliases, defined once), the ``RunOptions`` bundle,
consoles and the per-file failure line. Nothing heavy is imported here: ``ast --help`` and completion stay
instant."""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Callable, Optional

import typer

from ..constants import DEFAULT_MODEL
from ..run.options import Attn, DType, Quantize, RunOptions, _choices


def _complete_model(incomplete: str) -> list[str]:
    """Aliases, published hub ids and cached hub ids, for shell completion. No hub access and no torch or
    huggingface_hub import (completion must answer at once), so the cache's folder names are read directly:
    ``models--ORG--NAME`` is the hub cache's documented layout."""
    import os

    from ..checkpoint.names import REGISTRY, hub_cache_dir

    names = [spec.alias for spec in REGISTRY] + [spec.repo_id for spec in REGISTRY]
    try:
        cached = os.listdir(hub_cache_dir())
    except OSError:
        cached = []
    names += sorted(entry[len("models--"):].replace("--", "/", 1) for entry in cached if entry.startswith("models--"))
    return [name for name in dict.fromkeys(names) if name.startswith(incomplete)]


ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", metavar="MODEL", autocompletion=_complete_model, envvar="AST_MODEL",
                 help="Model alias, hub id (ORG/NAME[@REV]), local directory or weights file."),
]
PathsArg = Annotated[
    list[str], typer.Argument(metavar="PATH", help="Audio files, directories, glob patterns, or - for stdin.")
]
ExtOpt = Annotated[
    Optional[list[str]],
    typer.Option("--ext", metavar="EXT", help="Extensions taken from directories (repeatable, or a,b,c)."),
]
ThresholdOpt = Annotated[
    Optional[str],
    typer.Option(metavar="P|calibrated[:P]", help="Keep labels with score >= P. calibrated: each label's own threshold from ast evaluate --calibrate (--thresholds); labels without one are chosen by --top, or with calibrated:P by score >= P."),
]
ThresholdsOpt = Annotated[
    Optional[str],
    typer.Option("--thresholds", metavar="FILE", help="The thresholds file --threshold calibrated reads (default: thresholds.json in the --model folder)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
HeadOpt = Annotated[
    Optional[list[str]],
    typer.Option("--head", metavar="DIR", help="Also run this head (a folder `ast train --mode head` wrote on the same model) on the same pass (repeatable)."),
]
NoBaseHeadOpt = Annotated[bool, typer.Option("--no-base-head", help="Leave out the model's own labels (with --head).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and library messages (also AST_DEBUG=1).")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Use only the local cache (also HF_HUB_OFFLINE=1).")]
CacheDirOpt = Annotated[
    Optional[str],
    typer.Option("--cache-dir", metavar="DIR", help="Hub cache (default: HF_HUB_CACHE, or HF_HOME/hub)."),
]

# The run options, as (name, annotation, default). ``run_options`` adds them to a command's signature.
RUN_OPTIONS: list[tuple[str, object, object]] = [
    ("device", Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps.")], "auto"),
    ("dtype", Annotated[DType, typer.Option(help="Compute dtype: auto is fp16 on CUDA, fp32 elsewhere.")], DType.auto),
    ("attn", Annotated[Attn, typer.Option(help="Attention implementation.")], Attn.sdpa),
    ("quantize", Annotated[Quantize, typer.Option(help="int8: dynamic int8 Linear layers (CPU).")], Quantize.none),
    ("fast", Annotated[bool, typer.Option("--fast", help="The fastest mode whose scores (or embeddings) stay within 0.02 of fp32 on this machine (fp32, bf16 or int8; fp16 or bf16 on CUDA); calibrated once, cached.")], False),
    ("threads", Annotated[Optional[int], typer.Option(metavar="N", help="CPU threads for the model (default: torch's).")], None),
    ("batch_size", Annotated[int, typer.Option("--batch-size", metavar="N", help="Windows per model call.")], 4),
    ("workers", Annotated[int, typer.Option(metavar="N", help="Decoding/feature threads (1-64).")], 2),
    ("hop", Annotated[Optional[float], typer.Option(metavar="SECONDS", help="Seconds between window starts for long audio (default: the window length).")], None),
    ("offline", OfflineOpt, False),
    ("cache_dir", CacheDirOpt, None),
]


def _bundle(name: str, params: list[tuple[str, object, object]], build: Callable[[dict], object]) -> Callable:
    """A decorator giving a command ``params`` as CLI options, passed to it as one object ``name=build(values)``."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != name]
        extra = [inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for option, annotation, default in params]

        @functools.wraps(command)
        def wrapper(**kwargs):
            from ._errors import cli_errors

            values = {option: kwargs.pop(option) for option, _, _ in params}
            with cli_errors(stderr_console(), kwargs.get("debug", False)):  # a bad value: one line, exit 2
                bundle = build(values)
            return command(**{name: bundle}, **kwargs)

        del wrapper.__wrapped__  # typer must read the signature below, not the command's own
        wrapper.__signature__ = signature.replace(parameters=own + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
        return wrapper

    return decorate


def _run_options(values: dict) -> RunOptions:
    return RunOptions(device=values["device"], dtype=values["dtype"], attn=values["attn"], quantize=values["quantize"],
                      threads=values["threads"], batch_size=values.get("batch_size", RunOptions.batch_size),
                      workers=values.get("workers", RunOptions.workers), hop_seconds=values["hop"],
                      offline=values["offline"] or None, cache_dir=values["cache_dir"],
                      fast=values["fast"])


run_options = _bundle("run", RUN_OPTIONS, _run_options)
run_options.__doc__ = "Give a command the shared run options, passed to it as one ``run: RunOptions``."

# ``ast listen`` scores one window at a time from one stream: no batches, no decoding threads, and its own hop.
LISTEN_HOP = Annotated[Optional[float],
                       typer.Option(metavar="SECONDS", help="Seconds between window ends (default 1 s).")]
listen_run_options = _bundle("run", [(name, LISTEN_HOP if name == "hop" else annotation, default)
                                     for name, annotation, default in RUN_OPTIONS
                                     if name not in ("batch_size", "workers")], _run_options)

Engine = _choices("Engine", "local ray", "Where a batch runs.")
DISTRIBUTED_OPTIONS: list[tuple[str, object, object]] = [
    ("shard", Annotated[Optional[str], typer.Option(metavar="K/N", help="Only shard K of N of the inputs, by a hash of each path (for job arrays; the shards together are every file once).")], None),
    ("engine", Annotated[Engine, typer.Option(help="local (this process) or ray (a Ray cluster; pip install 'ast-cli[ray]').")], Engine.local),
    ("ray_address", Annotated[Optional[str], typer.Option("--ray-address", metavar="ADDR", help="Ray cluster to join: auto, or host:port (default: RAY_ADDRESS, else a local Ray).")], None),
    ("ray_workers", Annotated[Optional[int], typer.Option("--ray-workers", min=1, metavar="N", help="Ray actors, each with the model loaded once (default: as many as the cluster's CPUs, and GPUs with --gpus-per-worker, hold).")], None),
    ("cpus_per_worker", Annotated[float, typer.Option("--cpus-per-worker", metavar="N", help="CPUs (and torch threads) per Ray actor.")], 1.0),
    ("gpus_per_worker", Annotated[float, typer.Option("--gpus-per-worker", metavar="N", help="GPUs per Ray actor (1, or 0.5 to share one).")], 0.0),
]


def _distributed(values: dict):
    """The options as given; ``checked_distributed`` (inside the command's error handling) validates them."""
    return values


def checked_distributed(values: dict, run: RunOptions | None = None):
    """``RaySettings`` from the distributed options; a UsageError for a bad --shard, Ray missing, or --fast on Ray
    (its calibration belongs to the machine that runs the model, which Ray workers are not)."""
    from ..tasks.distributed import RaySettings, parse_shard, require_ray
    from ..errors import UsageError

    if not values["cpus_per_worker"] > 0:
        raise UsageError(f"must be more than 0, not {values['cpus_per_worker']:g}", option="cpus_per_worker")
    if not values["gpus_per_worker"] >= 0:
        raise UsageError(f"must be 0 or more, not {values['gpus_per_worker']:g}", option="gpus_per_worker")
    if values["engine"] is not Engine.ray and values["ray_address"] is not None:  # else it is silently not used
        raise UsageError(f"{values['ray_address']} is a Ray cluster to join, and this run is local",
                         option="ray_address", suggest={"engine": "ray"})
    if values["engine"] is Engine.ray:
        if run is not None and run.fast:
            raise UsageError("the fast mode is calibrated on this machine, not on Ray workers", option="engine",
                             suggest={"engine": "local"})
        require_ray()
    return RaySettings(values["ray_address"], values["ray_workers"], values["cpus_per_worker"],
                       values["gpus_per_worker"], engine=values["engine"].value, shard=parse_shard(values["shard"]))


distributed_options = _bundle("dist", DISTRIBUTED_OPTIONS, _distributed)


def path_stdin(paths: list[str]):
    """What ``-`` stands for: audio (a ``PipedAudio``) when stdin begins like an audio file (``sox ... -t wav - |``),
    else a list of paths, decoded as the file system decodes names: a latin-1 name is kept byte for byte (as
    surrogate escapes) instead of failing the run. None when ``-`` is not among ``paths``."""
    import io
    import sys

    if "-" not in paths:
        return None
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        return sys.stdin
    from ..audio.sources import PipedAudio, sniff
    from ..errors import UsageError

    kind, stream = sniff(buffer)
    if kind == "audio":
        return PipedAudio(stream, "-")
    if kind == "binary":  # read as lines, binary data can hold "/" and walk the whole file system
        raise UsageError("standard input is binary data but no audio format this tool recognizes, and not a "
                         "list of paths",
                         hint="pipe WAV, FLAC, Ogg, MP3, AIFF, AU, CAF or W64 audio, or one path per line")
    # newline="\n": a path may hold a carriage return; only a line feed ends one (CRLF lists lose the \r below)
    return io.TextIOWrapper(stream, encoding=sys.getfilesystemencoding(), errors="surrogateescape", newline="\n")


def refuse_piped_audio_on_ray(items, settings) -> None:
    """Audio on stdin is read by this process: Ray workers cannot read it. A usage error before anything starts."""
    from ..errors import UsageError

    if settings.ray and any(getattr(item, "source", None) is not None for item in items):
        raise UsageError("audio on stdin is read by this process, not by Ray workers", option="engine",
                         hint="leave out --engine ray for audio piped in, or give its file")


def label_list(values: list[str] | None) -> list[str]:
    """``--include`` values, where ``@FILE`` stands for the labels in FILE (``_inputs.label_file``)."""
    from ._inputs import label_file

    out: list[str] = []
    for value in values or ():
        out.extend(label_file(value[1:]) if value.startswith("@") else [value])
    return out


def parse_threshold(value: str | None) -> tuple[float | None, bool]:
    """``--threshold``: ``P``, ``calibrated`` or ``calibrated:P`` -> (the number P or None, calibrated or not)."""
    from ..errors import UsageError

    if value is None:
        return None, False
    text = value.strip().lower()
    calibrated = text == "calibrated" or text.startswith("calibrated:")
    number = text.partition(":")[2] if calibrated else text
    try:
        return (float(number) if number else None), calibrated
    except ValueError:
        raise UsageError(f"must be a score P, calibrated, or calibrated:P, not {value!r}", option="threshold") from None


def read_calibration(model: str, thresholds: str | None, calibrated: bool):
    """The ``Calibration`` that ``--threshold calibrated`` applies (None without it), read and checked before any
    work: ``--thresholds`` FILE, else thresholds.json in the model's folder."""
    import os

    from ..errors import UsageError
    from ..run.thresholds import FILE_NAME, beside_model, read_thresholds

    if not calibrated:
        if thresholds is not None:
            raise UsageError("--thresholds is read by --threshold calibrated", suggest={"threshold": "calibrated"})
        return None
    path = thresholds or beside_model(model)
    if path is None or (thresholds is None and not os.path.exists(path)):
        where = f"{model} has no {FILE_NAME}" if path else f"{model} is not a local model folder"
        raise UsageError(f"{where}: nothing to read calibrated thresholds from", option="threshold",
                         hint="write them with `ast evaluate MODEL DATA --calibrate precision=0.9` (with "
                              "--thresholds-out FILE for a hub model), then give --thresholds FILE if not in the "
                              "model's folder")
    return read_thresholds(path)


def calibrations_of(model: str, thresholds: str | None, calibrated: bool, heads=(), base_head: bool = True
                    ) -> dict | None:
    """``--threshold calibrated``: each head's ``Calibration`` by head (None: the model's own labels; a head's name),
    read and checked before any work (None without it). Without ``heads`` the model's file is required
    (``read_calibration``); with them, the model's (``--thresholds`` FILE, or its folder's) and each head folder's
    thresholds.json where there is one, and at least one; all chosen on one aggregate. Without ``base_head`` (the
    model's labels left out) only the heads' count."""
    import os

    from ..errors import UsageError
    from ..run.thresholds import FILE_NAME, beside_model, read_thresholds

    if not calibrated or not heads:
        own = read_calibration(model, thresholds, calibrated)
        return None if own is None else {None: own}
    found = {}
    if thresholds is not None and not base_head:
        raise UsageError("--thresholds is for the model's own labels, which --no-base-head leaves out",
                         hint="a head's thresholds are the thresholds.json in its folder")
    base = (thresholds or beside_model(model)) if base_head else None
    if base is not None and (thresholds is not None or os.path.exists(base)):
        found[None] = read_thresholds(base)
    for head in heads:
        if os.path.exists(os.path.join(head.path, FILE_NAME)):
            found[head.name] = read_thresholds(os.path.join(head.path, FILE_NAME))
    if not found:  # --no-base-head: the model's file would have applied to nothing, and silently
        where = f"neither {model} nor any --head folder" if base_head else "no --head folder"
        raise UsageError(f"{where} has a {FILE_NAME}: nothing to read calibrated thresholds from", option="threshold",
                         hint="write them with `ast evaluate HEAD_DIR DATA --calibrate precision=0.9`")
    first = {}  # aggregate -> the first file chosen on it
    for calibration in found.values():
        first.setdefault(calibration.aggregate, calibration.path)
    if len(first) > 1:
        (one, one_path), (other, other_path) = first.items()
        raise UsageError(f"the thresholds in {one_path} were chosen on {one} scores and those in {other_path} on "
                         f"{other}: one run scores each file one way", option="aggregate",
                         hint="apply them in separate runs (a head without a thresholds.json, or the model without "
                              "one, goes by --top)")
    return found


def apply_calibrations(selection, parts, calibrations: dict, activation, heads=()):
    """``selection`` with each part's calibrated thresholds (``calibrations_of``), each checked against the scores
    that part gives (``activation``, else its own: softmax for a single-label head); a label without one goes by
    ``--top``/``--threshold``."""
    from ..run.options import Activation

    names = {head.name for head in heads}
    chosen = [calibrations.get(part.name if part.name in names else None) for part in parts]
    owners = [part.name if part.name in names else None for part in parts]
    # labels first: a file made for another model is that, whatever its activation (a hint to change the
    # activation would only lead to this refusal)
    calibrated = selection.calibrated_parts(parts, [c.thresholds if c is not None else None for c in chosen], owners,
                                            [c.path if c is not None else None for c in chosen])
    for part, calibration in zip(parts, chosen):
        if calibration is not None:
            own = activation or (Activation.softmax if part.single_label else Activation.sigmoid)
            calibration.check(Activation(own).value)
    return calibrated


def stderr_console():
    from ..run.files import console

    return console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # a name's ":x:" stays as it is


def report_failure(console, name: str, error: str) -> None:
    """The one stderr line of a file that failed."""
    from ._errors import say

    say(console, f"error: {name}: {error}")


__all__ = ["DEFAULT_MODEL", "ModelOpt", "PathsArg", "ExtOpt", "QuietOpt", "DebugOpt", "OfflineOpt", "CacheDirOpt",
           "run_options", "stderr_console", "report_failure"]


def warn_if_slow_bf16(dtypes, device: str, console) -> None:
    """bf16 on a CPU without bf16 hardware is emulated: slower than fp32. Say so on stderr, then do it anyway."""
    from ._errors import say

    if "bf16" not in [getattr(d, "value", d) for d in dtypes]:
        return
    from ..run.backends import pick_device
    from ..checkpoint.speed import cpu_has_native_bf16

    if pick_device(device) == "cpu" and not cpu_has_native_bf16():
        say(console, "warning: this CPU has no bf16 hardware (AVX512-BF16, AMX or ARM BF16): bf16 runs slower "
                     "than fp32 here; --quantize int8 is the fast CPU mode")


def warn_if_gaps(run: RunOptions, features, console) -> None:
    """A --hop longer than the model's window leaves audio that no window sees: say how much, then go on (a
    sparse sample of a long archive can be what the user wants)."""
    from ..run.options import unscored_seconds
    from ._errors import say

    gap = unscored_seconds(run.hop_seconds, features.max_length)
    if gap > 0:
        say(console, f"warning: --hop {run.hop_seconds:g} s is longer than the model's {features.window_seconds:g} s "
                     f"window: {gap:.2f} s after every window ({gap / run.hop_seconds:.0%} of the audio) is never "
                     f"scored; a --hop of at most {features.window_seconds:g} s scores all of it")


def fetch_model(model: str, run: RunOptions, console, quiet: bool):
    """Local path of ``model``, downloading a missing hub model first (a bar on a terminal, else one line)."""
    from ..checkpoint.hub import resolve_model
    from ._progress import download_progress

    return resolve_model(model, offline=run.offline, cache_dir=run.cache_dir,
                         progress=download_progress(console, quiet))


def model_labels(model: str, run: RunOptions, console, quiet: bool) -> tuple[str, ...]:
    """A model's labels without loading its weights: the bundled lists of the published checkpoints (no
    download), else its config.json (a bare weights file: inferred from its tensors)."""
    from ..checkpoint.names import bundled_labels

    bundled = bundled_labels(model)
    if bundled is not None:
        return bundled
    return model_config(fetch_model(model, run, console, quiet))[0].id2label


def model_config(path):
    """(ASTConfig, FeatureConfig) of the checkpoint at ``path`` without loading its weights (a bare weights
    file: inferred from its tensors)."""
    from ..checkpoint.weights import load_checkpoint, read_configs

    if path.is_dir():
        return read_configs(path)
    checkpoint = load_checkpoint(path)
    return checkpoint.config, checkpoint.features


def compute_name(run: RunOptions, cluster, *, probe: bool = True) -> str | None:
    """The precision the model runs in, as records name it: fast, int8, or the dtype (auto: fp16 on CUDA, fp32
    elsewhere; a Ray worker is on CUDA when it takes GPUs). Not ``probe``: None where that needs torch to look
    for a GPU (a run that loads no model does not import it)."""
    from ..run.options import DType, Quantize

    if run.fast:
        return "fast"
    if run.quantize is Quantize.int8:
        return "int8"
    if run.dtype is not DType.auto:
        return run.dtype.value
    if cluster.ray:
        device = run.device if run.device != "auto" else "cuda" if cluster.gpus_per_worker else "cpu"
    elif not probe:  # a named device needs no torch to ask; auto does
        if run.device == "auto":
            return None
        device = run.device
    else:
        from ..run.backends import pick_device

        device = pick_device(run.device)
    return "fp16" if device.startswith("cuda") else "fp32"


def load_tagger(model: str, run: RunOptions, console, quiet: bool, resolved=None, *, heads=(),
                base_head: bool = True, embeddings: bool = False):
    """``Tagger.load`` with the CLI's manners: a download shows its progress, loading shows a spinner.
    ``resolved``: ``model``'s local path when the command resolved it already (no second lookup)."""
    import contextlib

    from ..run.tagger import Tagger
    from ._progress import download_progress

    warn_if_slow_bf16([run.dtype], run.device, console)
    spinner = console.status(f"loading {model}") if not quiet and console.is_terminal else contextlib.nullcontext()
    tagger = Tagger.load(str(resolved or model), run, progress=download_progress(console, quiet), loading=spinner,
                         heads=heads, base_head=base_head, embeddings=embeddings)
    tagger.name = model
    announce_fast(tagger.backend.fast_choice, console, quiet)
    warn_if_gaps(run, tagger.features, console)
    return tagger


def announce_fast(choice, console, quiet: bool) -> None:
    """The one stderr line saying what ``--fast`` runs, how much faster than fp32 and how close to it."""
    from ._errors import say

    if choice is None or quiet:
        return
    how = ("cached calibration" if choice.cached else f"calibrated now, not cached: {choice.not_cached}"
           if choice.not_cached else "calibrated now on a busy machine; again when it is quiet"
           if choice.busy else "calibrated now, cached for later runs")
    say(console, f"fast: {choice.mode}, {choice.speedup:.2f}x fp32's speed, {choice.describe()} ({how})")
