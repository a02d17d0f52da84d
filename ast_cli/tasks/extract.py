"""Feature extraction: the model input (normalized log-mel) or the pooled embedding of every window of every
file, written as one file per input under an output directory that mirrors the input tree.

    >>> jobs = plan_outputs(expand_inputs(["recordings/"]), "features/")   # checks collisions, finds done files
    >>> extractor = FeatureExtractor.embeddings(Tagger.load())
    >>> for result in extractor.extract(jobs):
    ...     print(result.status, result.output)

Output files (``fmt``):

- ``safetensors``: ``<out>/<relative path>.safetensors`` holding one float32 tensor named after the kind
  (``fbank`` (windows, max_length, num_mel_bins) or ``embedding`` (windows, hidden_size)); the metadata in
  its header are strings, JSON-encoded where they are not strings already (numbers, lists).
- ``npy``: ``<out>/<relative path>.npy`` holding the same array, and its metadata as JSON in ``<...>.json``.

Every file is written to a temporary file in the same directory and renamed into place, so an interrupted run
never leaves a partial output; an existing output counts as done (skipped unless ``overwrite``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Callable, Iterable, Iterator, Literal

import numpy as np

from .. import __version__
from ..constants import FRAME_SECONDS
from ..errors import UsageError
from ..audio.inputs import InputFile, claim_outputs, mirrored_path
from ..run.options import RunOptions
from ..run.files import atomic_write, check_writable_dir

if TYPE_CHECKING:  # torch comes with these; planning (what is done already) must not wait for it
    from ..run.engine import FileOutput
    from ..audio.features import FeatureConfig

Kind = Literal["fbank", "embedding"]
Format = Literal["safetensors", "npy"]
Status = Literal["written", "skipped", "failed"]
KINDS: tuple[str, ...] = ("fbank", "embedding")
FORMATS: tuple[str, ...] = ("safetensors", "npy")
SUFFIXES = {"safetensors": ".safetensors", "npy": ".npy"}
SIDECAR_SUFFIX = ".json"  # metadata beside a .npy file


# -- where outputs go ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One input and the file its features go to. ``exists``: that file was already there when planned."""

    item: InputFile
    output: str
    exists: bool = False


def output_path(item: InputFile, out_dir: str, fmt: Format = "safetensors") -> str:
    """Where ``item``'s features go: ``inputs.mirrored_path`` with the format's suffix."""
    return mirrored_path(item, out_dir, SUFFIXES[fmt])


def _sidecar(path: str) -> str:
    return os.path.splitext(path)[0] + SIDECAR_SUFFIX


def is_done(output: str, fmt: Format) -> bool:
    """The output of a finished file is there (for npy: the array and its metadata)."""
    return os.path.isfile(output) and (fmt != "npy" or os.path.isfile(_sidecar(output)))


@dataclass(frozen=True)
class Settings:
    """What an output was computed with; an existing output made otherwise is not this run's to skip (or, for
    ``classify --resume``, to append to: there ``kind`` is None and ``activation`` counts)."""

    kind: str | None
    model: str
    hop_seconds: float | None = None  # as asked; None: the window length
    compute: str | None = "fp32"  # fp32, fp16, bf16, int8 or fast (not for fbank); None: not checked
    activation: str | None = None  # classify's scores: sigmoid, softmax or none
    heads: tuple[str, ...] = ()  # classify --head: the heads whose labels the records carry, in order
    aggregate: str = "max"  # classify: window scores -> a file's (recorded when not max, as earlier records are)
    weights: str | None = None  # a local model: its weights' (and classify's heads') files, as size:mtime (stamp)
    given_as: str | None = None  # extract-features: the model as typed, which earlier versions recorded instead

    @classmethod
    def of(cls, kind: str | None, model: str, options: RunOptions, activation: str | None = None) -> "Settings":
        # fast: whatever this machine's calibration picked (bf16, int8 or fp32), kept apart from exact fp32
        compute = "fast" if options.fast else "int8" if options.quantize.value == "int8" else options.dtype.value
        return cls(kind, model, options.hop_seconds, "fp32" if compute == "auto" else compute, activation)

    def hop(self, window_seconds: float) -> float:
        """The hop in seconds, as recorded: whole 10 ms frames; the window when none was asked for."""
        if self.hop_seconds is None:
            return window_seconds
        return round(round(self.hop_seconds / FRAME_SECONDS) * FRAME_SECONDS, 6)

    def record(self, window_seconds: float) -> dict:
        """The settings as ``classify`` records them (what ``mismatch`` reads back)."""
        window = round(window_seconds, 6)
        heads = {"heads": list(self.heads)} if self.heads else {}
        aggregate = {"aggregate": self.aggregate} if self.aggregate != "max" else {}
        return {"activation": self.activation, "hop_seconds": self.hop(window), "window_seconds": window,
                "compute": self.compute, **heads, **aggregate, **({"weights": self.weights} if self.weights else {})}

    def mismatch(self, metadata: dict) -> str | None:
        """How ``metadata`` (of an existing output) differs from these settings, or None."""
        if not metadata:
            return "unreadable, or not written by ast-cli"
        if self.kind is not None and metadata.get("kind") != self.kind:
            return f"kind {metadata.get('kind')!r}, not {self.kind!r}"
        earlier = self.given_as is not None and "weights" not in metadata and metadata.get("model") == self.given_as
        if metadata.get("model") != self.model and not earlier:  # an earlier version's output, of the same name
            return f"model {metadata.get('model')!r}, not {self.model!r}"
        hop, window = metadata.get("hop_seconds"), metadata.get("window_seconds")
        wanted = self.hop(window)
        if hop != wanted:
            return f"hop {hop} s, not {wanted} s"
        if self.kind != "fbank" and self.compute is not None and metadata.get("compute", "fp32") != self.compute:
            return f"computed in {metadata.get('compute', 'fp32')}, not {self.compute}"
        if self.activation is not None and metadata.get("activation") != self.activation:
            return f"activation {metadata.get('activation')!r}, not {self.activation!r}"
        if self.kind is None and metadata.get("heads", []) != list(self.heads):
            return f"heads {metadata.get('heads', [])}, not {list(self.heads)}"
        if self.kind is None and metadata.get("aggregate", "max") != self.aggregate:  # e.g. calibrated's mean
            return f"aggregate {metadata.get('aggregate', 'max')}, not {self.aggregate}"
        recorded = metadata.get("weights")  # older records: none, or no configs' stamps at its end (a prefix)
        if self.weights and recorded not in (None, self.weights) and not self.weights.startswith(f"{recorded} "):
            return "the model's or a head's weights changed since (or its configs: their files' size or time)"
        return None


def read_metadata(output: str, fmt: Format) -> dict:
    """The metadata of an existing output (values decoded from the safetensors header); {} if unreadable."""
    try:
        if fmt == "npy":
            with open(_sidecar(output), encoding="utf-8") as handle:
                data = json.load(handle)
            return data if isinstance(data, dict) else {}
        from safetensors import safe_open

        with safe_open(output, framework="np") as handle:
            raw = handle.metadata() or {}
    except Exception:  # unreadable or corrupt (safetensors raises its own kinds): not a finished output
        return {}
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def plan_outputs(items: Iterable[InputFile], out_dir: str, fmt: Format = "safetensors",
                 settings: Settings | None = None) -> list[Job]:
    """Map every input to its output file, before any work.

    Two inputs that would write the same file are a ``UsageError`` naming both (typically two files with the
    same name given directly, or a folder given twice under different names). Inputs that are already
    unusable (``item.error``) take no part: they fail without writing anything. Audio piped on stdin is never
    done already (nothing ties it to an earlier ``-``). With ``settings``, an existing
    output made with other settings (another kind, model, hop or precision) is a ``UsageError`` too, unless
    ``overwrite`` is meant: callers that overwrite pass no settings.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} ({', '.join(FORMATS)})", option="format")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir} exists and is not a directory", option="out")
    check_writable_dir(out_dir)
    jobs = [Job(item, output, exists=item.error is None and item.source is None and is_done(output, fmt))
            for item, output in claim_outputs(items, out_dir, SUFFIXES[fmt])]
    if settings is not None:
        refuse_other_settings(jobs, out_dir, fmt, settings)
    return jobs


def refuse_other_settings(jobs: list[Job], out_dir: str, fmt: Format, settings: Settings) -> None:
    """A ``UsageError`` when an existing output of ``jobs`` was made otherwise than ``settings`` say."""
    stale = [(job, settings.mismatch(read_metadata(job.output, fmt))) for job in jobs if job.exists]
    stale = [(job, why) for job, why in stale if why]
    if stale:
        job, why = stale[0]
        raise UsageError(f"{len(stale)} existing output(s) in {out_dir} were made with other settings or are not "
                         f"ours ({job.output}: {why})",
                         option="out", hint="extract into another --out, or replace them with --overwrite")


# -- writing -----------------------------------------------------------------------------------------


def _header_strings(metadata: dict) -> dict[str, str]:
    """safetensors metadata must be str -> str, valid UTF-8: strings stay, anything else is JSON, and so is a
    name that is not UTF-8 (its \\udcXX escapes, which ``read_metadata`` turns back into the same name)."""
    from ..run.records import has_surrogates

    return {k: v if isinstance(v, str) and not has_surrogates(v) else json.dumps(v) for k, v in metadata.items()}


def _serialize(handle: IO[bytes], fmt: Format, name: str, array: np.ndarray, metadata: dict) -> None:
    """Write the array file's bytes to ``handle``."""
    if fmt == "safetensors":
        from safetensors.numpy import save

        handle.write(save({name: array}, metadata=_header_strings(metadata)))
    else:
        np.save(handle, array, allow_pickle=False)


def write_features(output: str, name: str, array: np.ndarray, metadata: dict, fmt: Format = "safetensors") -> None:
    """Write ``array`` (float32) as tensor ``name`` with ``metadata`` to ``output``, atomically.

    For npy the array goes to its temporary file first, then the JSON sidecar is written and renamed into
    place, then the ``.npy``: the ``.npy`` existing means both are there. A failure leaves any previous
    output as it was and no temporary file.
    """
    from ..run.records import dumps

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    array = np.ascontiguousarray(array, dtype=np.float32)
    with atomic_write(output, "wb") as handle:
        _serialize(handle, fmt, name, array, metadata)
        if fmt == "npy":
            with atomic_write(_sidecar(output)) as sidecar:
                sidecar.write(dumps(metadata) + "\n")  # a name that is not UTF-8: \\udcXX escapes


# -- running -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureExtractor:
    """What to compute per window and how: ``backend`` maps (B, T, F) model inputs to (B, ...) float32 rows.

    ``kind`` names the tensor; ``model`` is the model id recorded in the metadata (the CLI's: ``model_identity``),
    with ``weights`` (``heads.weights_stamp``); ``options`` give the hop, batch size and workers.
    """

    kind: Kind
    model: str
    backend: Callable
    options: RunOptions = RunOptions()
    weights: str | None = None

    @property
    def compute(self) -> str:
        """The precision recorded with the output (see ``Settings``)."""
        return Settings.of(self.kind, self.model, self.options).compute

    @property
    def features(self) -> FeatureConfig:
        return self.backend.features

    @classmethod
    def fbank(cls, model: str, features: FeatureConfig, options: RunOptions = RunOptions(),
              weights: str | None = None) -> "FeatureExtractor":
        """The model input itself: no weights needed, only the model's feature configuration."""
        from ..run.backends import InputsBackend

        return cls("fbank", model, InputsBackend(features), options, weights)  # (B, max_length, num_mel_bins)

    @classmethod
    def embeddings(cls, tagger, model: str | None = None, weights: str | None = None) -> "FeatureExtractor":
        """Pooled embeddings (B, hidden_size) of a loaded ``Tagger``, with its options."""
        return cls("embedding", model or tagger.name, tagger.backend.with_output("embedding"), tagger.options, weights)

    def extract(self, jobs: Iterable[Job], *, fmt: Format = "safetensors", overwrite: bool = False,
                on_progress: Callable[[FileOutput], None] | None = None) -> Iterator[ExtractResult]:
        """``extract_features(jobs, self, ...)``."""
        return extract_features(jobs, self, fmt=fmt, overwrite=overwrite, on_progress=on_progress)


def load_feature_config(model: str, *, offline: bool | None = None, cache_dir: str | None = None) -> FeatureConfig:
    """A model's input format from its configuration files, without reading its weights (except for a bare
    weights file with no ``config.json`` beside it, whose input shape is inferred from its tensors)."""
    from ..checkpoint.hub import resolve_model
    from ..checkpoint.weights import CONFIG_NAME, load_checkpoint, read_configs

    path = resolve_model(model, offline=offline, cache_dir=cache_dir)
    if path.is_dir():
        return read_configs(path)[1]
    if (path.parent / CONFIG_NAME).is_file():
        return read_configs(path.parent)[1]
    return load_checkpoint(path).features


@dataclass
class ExtractResult:
    """What happened to one input: ``written`` to ``output``, ``skipped`` (already there) or ``failed``."""

    path: str  # the input, as named
    output: str
    status: Status
    error: str | None = None
    duration: float | None = None  # seconds
    windows: int = 0
    exception: BaseException | None = None  # behind ``error``


def metadata_for(out: FileOutput, extractor: FeatureExtractor) -> dict:
    """The metadata of one output file (JSON values; strings in a safetensors header)."""
    features = extractor.features
    hop_seconds = (extractor.options.hop_frames or features.max_length) * FRAME_SECONDS
    return {
        "kind": extractor.kind,
        "model": extractor.model,
        "sample_rate": features.sampling_rate,
        "window_seconds": round(features.window_seconds, 6),
        "hop_seconds": round(hop_seconds, 6),
        "window_starts": [round(start, 6) for start, _ in out.windows],
        "window_ends": [round(end, 6) for _, end in out.windows],
        "source": out.name,
        "duration": None if out.duration is None else round(out.duration, 6),
        "compute": extractor.compute,
        **({"weights": extractor.weights} if extractor.weights else {}),
        "ast_cli_version": __version__,
    }


def extract_features(
    jobs: Iterable[Job],
    extractor: FeatureExtractor | None,
    *,
    fmt: Format = "safetensors",
    overwrite: bool = False,
    on_progress: Callable[[FileOutput], None] | None = None,
) -> Iterator[ExtractResult]:
    """Compute and write each job's features; one ``ExtractResult`` per job, in order.

    Jobs whose output existed when planned are skipped without decoding (unless ``overwrite``). Decoding,
    windowing and batching are the engine's, exactly as for ``classify``; a file that fails there, or whose
    output cannot be written, is a ``failed`` result and the others go on. ``extractor`` may be None when every
    job is skipped (a rerun with nothing left to do needs no model).
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} ({', '.join(FORMATS)})", option="format")
    jobs = list(jobs)
    todo = [job for job in jobs if overwrite or not job.exists]
    outputs: Iterator[FileOutput] = iter(())
    if todo:
        if extractor is None:
            raise ValueError("a FeatureExtractor is needed: some jobs have no output yet")
        from ..run.engine import Engine

        options = extractor.options
        engine = Engine(extractor.features, extractor.backend, batch_size=options.batch_size,
                        workers=options.workers, hop_frames=options.hop_frames)
        outputs = engine.run([job.item for job in todo], on_progress=on_progress)
    try:
        for job in jobs:
            if not overwrite and job.exists:
                yield ExtractResult(job.item.path, job.output, "skipped")
                continue
            out = next(outputs)  # the engine yields in the order given, so this is job's file
            yield _finish(job, out, extractor, fmt)
    finally:
        if hasattr(outputs, "close"):
            outputs.close()  # stops the decoding threads if we are stopped early


def _finish(job: Job, out: FileOutput, extractor: FeatureExtractor, fmt: Format) -> ExtractResult:
    result = ExtractResult(job.item.path, job.output, "failed", duration=out.duration, exception=out.exception)
    if out.error is not None or out.outputs is None or len(out.outputs) == 0:
        result.error = out.error or "no audio windows"
        return result
    try:
        write_features(job.output, extractor.kind, out.outputs, metadata_for(out, extractor), fmt)
    except OSError as exc:
        result.error, result.exception = f"cannot write {job.output}: {exc.strerror or exc}", exc
        return result
    result.status, result.windows = "written", len(out.outputs)
    return result


# -- the embedding cache ------------------------------------------------------------------------------
#
# Window embeddings keyed by what they depend on: the model (its weights file, resolved, with size and mtime; its
# input format), the window settings (hop, precision) and the audio file (resolved path, size, mtime). A replaced
# file, or another file of the same name elsewhere, is embedded again; any other rerun (another output folder,
# other training settings) reads them back.


def embedding_cache_dir() -> str:
    """The shared embedding cache, in huggingface_hub's assets folder beside the hub cache: ``HF_ASSETS_CACHE``
    (default ``HF_HOME/assets``) ``/ast-cli/embeddings/v1``; the environment is read at call time."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    assets = env.get("HF_ASSETS_CACHE") or os.path.join(home, "assets")
    return os.path.join(os.path.expanduser(os.path.expandvars(assets)), "ast-cli", "embeddings", "v1")


def _digest(identity: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _file_identity(path: str) -> dict | None:
    """The resolved path, size and mtime of ``path``; None when it cannot be found."""
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except OSError:
        return None
    return {"path": real, "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def cache_key(weights: str, features: FeatureConfig, options: RunOptions) -> str:
    """The model (its ``weights`` file and input format) and window settings part of the cache key."""
    from dataclasses import asdict

    return _digest({"weights": _file_identity(weights), "features": asdict(features),
                    "hop_frames": options.hop_frames,
                    "compute": Settings.of("embedding", "", options).compute})[:24]


def cached_embeddings(paths: list[str], weights: str, features: FeatureConfig, options: RunOptions,
                      make_extractor: Callable[[], FeatureExtractor], cache_dir: str | None = None
                      ) -> Iterator[tuple[str | None, np.ndarray | None, BaseException | None]]:
    """(error, (windows, hidden_size) embeddings, the exception behind the error) for each of ``paths``, in
    order, for the model whose weights file is ``weights``: read from the cache, or computed with
    ``make_extractor()`` (called only when some are missing) and stored there."""
    from safetensors.numpy import load_file

    model_dir = os.path.join(cache_dir or embedding_cache_dir(), cache_key(weights, features, options))
    jobs = []
    for path in paths:
        identity = _file_identity(path)
        output = os.path.join(model_dir, _digest(identity)[:40] + ".safetensors") if identity else ""
        jobs.append(Job(InputFile(path), output, exists=bool(output) and bool(read_metadata(output, "safetensors"))))
    todo = [job for job in jobs if not job.exists]
    failed: dict[str, ExtractResult] = {}
    if todo:
        for job, result in zip(todo, extract_features(todo, make_extractor())):
            if result.error:
                failed[job.output or job.item.path] = result
    for job in jobs:
        bad = failed.get(job.output or job.item.path)
        yield (bad.error, None, bad.exception) if bad else (None, load_file(job.output)["embedding"], None)


__all__ = [
    "ExtractResult", "FeatureExtractor", "Job", "KINDS", "FORMATS", "cached_embeddings", "embedding_cache_dir",
    "extract_features", "load_feature_config", "metadata_for", "output_path", "plan_outputs", "refuse_other_settings",
    "write_features",
]
