"""Past one machine: ``--engine ray`` runs the tagging on a Ray cluster, and ``--shard K/N`` splits the input list
for job arrays without Ray.

The Ray engine is Ray Data's batch inference: a dataset of the input items (index and path), ``map_batches``
over a pool of actors that each load the model once (``TaggerActor``) and run the whole local pipeline for
their items (decode, features, model: the same ``Tagger.classify`` as the local engine, so the records are the
same), with CPUs and GPUs as Ray resources. A per-file error is a record like any other, never a failed task.
Ray's retries redo a batch whose worker died; its records reach the driver only once a batch is complete, so
none is lost or written twice. Order is preserved (``preserve_order``), and records stream to the driver as
they finish, so a million-file run never holds all results in the driver's memory.

Every node needs the model: in the Hugging Face cache (``ast download`` there, or a shared ``HF_HOME``), hub
access, or a path that exists on every node.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..errors import UsageError


MAX_BLOCKS = 10_000  # past it, a block holds several batches (a million files: 100 per block)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1 <= K <= N) -> (K, N); None stays None."""
    if text is None:
        return None
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit()) or not 1 <= int(k) <= int(n):
        raise UsageError(f"must be K/N with 1 <= K <= N, like 2/8, not {text!r}", option="shard")
    return int(k), int(n)


def take_shard(items: list, shard: tuple[int, int] | None,
               key: Callable[[Any], str] = lambda item: item.path) -> list:
    """The items of shard K of N, in order: those whose ``key`` (the path the run records) hashes to K. Every
    item is in exactly one shard, and a file added or removed between the shards' runs moves no other one
    (a position in the sorted list would shift them: some files in no shard, some in two); balanced on average."""
    if shard is None:
        return items
    k, n = shard
    return [item for item in items if shard_of(key(item), n) == k]


def shard_of(name: str, count: int) -> int:
    """1 to ``count``: the shard of the file named ``name``, from its sha256 (the same on every machine and
    Python, unlike ``hash``)."""
    import hashlib

    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def require_ray() -> None:
    """A UsageError, saying what to install, without Ray Data."""
    if not ray_available():
        raise UsageError("--engine ray needs Ray Data", hint='pip install "ast-cli[ray]"')


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide ``--engine ray`` runs (``engine``: local or ray; ``shard``: (K, N) or None)."""

    address: str | None = None  # "auto", "ray://host:10001", an IP:port; None: RAY_ADDRESS, else a local Ray
    workers: int | None = None  # actors in the pool (None: ``default_workers``)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    engine: str = "local"
    shard: tuple[int, int] | None = None

    @property
    def ray(self) -> bool:
        return self.engine == "ray"

    def files_per_task(self, batch_size: int) -> int:
        """Files per actor task (the unit redone when a worker dies): one on CPUs, where a file's windows already
        make a batch and the last tasks balance best; ``--batch-size`` on GPUs, to batch windows across files."""
        return max(1, batch_size) if self.gpus_per_worker else 1


class TaggerActor:
    """One Ray actor: loads the model once, then tags batches of items with the local engine."""

    def __init__(self, model: str, options: dict, job: dict):
        from ..run.options import RunOptions
        from ..run.tagger import LabelSelection, Tagger

        self.tagger = Tagger.load(model, RunOptions(**options))
        self.job = job
        self.selection = LabelSelection(**job["selection"])

    def __call__(self, batch: dict) -> dict:
        from ..run.records import to_record

        paths = [str(p) for p in batch["path"]]
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]]
        from ..audio.sources import FileSource

        sources = [FileSource(p, error=e) for p, e in zip(paths, errors)]
        records = []
        for result in self.tagger.classify(sources, selection=self.selection, activation=self.job["activation"],
                                           aggregate=self.job["aggregate"], segments=self.job["segments"]):
            records.append(to_record(result))
        import json

        return {"index": list(batch["index"]), "record": [json.dumps(r, allow_nan=False) for r in records]}


class ExtractActor:
    """One Ray actor for ``extract-features``: loads the model (or only its configuration, for fbank) once and
    writes each item's features where the driver planned them (a file system every node shares)."""

    def __init__(self, model: str, options: dict, kind: str, fmt: str, recorded: tuple = (None, None)):
        from .extract import FeatureExtractor, load_feature_config
        from ..run.options import RunOptions
        from ..run.tagger import Tagger

        run = RunOptions(**options)
        name, weights = recorded[0] or model, recorded[1]  # what the outputs record: the driver's identity, stamp
        if kind == "embedding":
            self.extractor = FeatureExtractor.embeddings(Tagger.load(model, run), name, weights)
        else:
            self.extractor = FeatureExtractor.fbank(name, load_feature_config(model, offline=run.offline,
                                                                              cache_dir=run.cache_dir), run, weights)
        self.fmt = fmt

    def __call__(self, batch: dict) -> dict:
        import json

        from .extract import Job, extract_features
        from ..audio.inputs import InputFile

        jobs = [Job(InputFile(str(p), root=str(r) or None, error=str(e) or None), str(o))
                for p, r, e, o in zip(batch["path"], batch["root"], batch["error"], batch["output"])]
        results = [{"path": r.path, "output": r.output, "status": r.status, "error": r.error,
                    "duration": r.duration, "windows": r.windows}
                   for r in extract_features(jobs, self.extractor, fmt=self.fmt, overwrite=True)]
        return {"index": list(batch["index"]), "record": [json.dumps(r) for r in results]}


class EmbedActor:
    """One Ray actor for ``ast index``: loads the model once and returns each file's window embeddings to the
    driver, which stores them (one writer for the database)."""

    def __init__(self, model: str, options: dict):
        from ..run.options import RunOptions
        from ..run.tagger import Tagger

        self.tagger = Tagger.load(model, RunOptions(**options))

    def __call__(self, batch: dict) -> dict:
        import base64
        import json

        import numpy as np

        from .index import embed_files
        from ..audio.inputs import InputFile

        items = [InputFile(str(p), error=str(e) or None) for p, e in zip(batch["path"], batch["error"])]
        records = [{"path": r.path, "size": r.size, "mtime_ns": r.mtime_ns, "duration": r.duration, "error": r.error,
                    "windows": r.windows, "vectors": None if r.vectors is None else
                    base64.b64encode(np.ascontiguousarray(r.vectors, "<f4").tobytes()).decode()}
                   for r, _ in embed_files(items, self.tagger)]
        return {"index": list(batch["index"]), "record": [json.dumps(r) for r in records]}


def _probe(address: str, option: str) -> None:
    """A cluster address (``host:port``, ``ray://host:port``) that nothing answers at fails in seconds, in one
    line, where ``ray.init`` would retry for minutes. ``auto`` is left to Ray, which fails fast by itself."""
    import socket

    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"{address!r} is not a Ray address: give auto, HOST:PORT or ray://HOST:PORT",
                         option=option)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as connection:
            speaks_grpc = _answers_http2(connection)
    except OSError as exc:
        raise UsageError(f"no Ray cluster answers at {address} ({exc.strerror or exc})", option=option,
                         hint="start one with `ray start --head`, check the address, or leave out --ray-address "
                              "and RAY_ADDRESS for a Ray of this run's own") from None
    if not speaks_grpc:  # ray.init would retry it for a minute and more, printing Ray's errors
        raise UsageError(f"what answers at {address} is not Ray (it does not speak gRPC)", option=option,
                         hint="give the port of the Ray head (`ray start --head` prints it; 6379 by default), "
                              "or ray://HOST:10001 for Ray Client")


def _answers_http2(connection, timeout: float = 5.0) -> bool:
    """Whether the server on ``connection`` speaks HTTP/2, as Ray's GCS and Ray Client (gRPC) do: sent the client
    preface and an empty SETTINGS frame, an HTTP/2 server's first frame is SETTINGS (RFC 9113, 3.4). With TLS
    (RAY_USE_TLS) nothing is checked here."""
    import os

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    connection.settimeout(timeout)
    connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    header = b""
    try:
        while len(header) < 9:
            chunk = connection.recv(9 - len(header))
            if not chunk:
                break
            header += chunk
    except OSError:  # silence (a timeout) or a reset: not Ray either
        return False
    return len(header) == 9 and header[3] == 4  # frame type 4: SETTINGS


def _ray_reason(exc: BaseException) -> str:
    """The first line of Ray's error, less the sentences that advise Ray's own command-line flags (``Please
    specify ... the `--address` flag``): ours are named in the hint."""
    import re

    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    sentences = re.split(r"(?<=\.)\s+", text.splitlines()[0])
    kept = [s for s in sentences if "--" not in s] or sentences[:1]
    return " ".join(kept).rstrip(".")


def connect(settings: "RaySettings", silence_native: bool = True) -> None:
    """Join the cluster ``settings`` names, or start a Ray of this run's own; a UsageError, in one line, when
    there is none to join. Called before any output is opened; does nothing once connected. ``silence_native``:
    what Ray prints while it starts is kept off stderr: its C++ core's notes on file descriptor 2
    (``files.native_stderr_silenced``) and its loggers' warnings ("Token authentication is enabled for this Ray
    cluster ..."); its errors still show."""
    import os

    from ..run.files import native_stderr_silenced

    require_ray()
    import ray

    if ray.is_initialized():
        return
    address = settings.address or os.environ.get("RAY_ADDRESS") or None
    option = "ray_address" if settings.address else "RAY_ADDRESS"
    if address:
        _probe(address, option)
    # Without an address, a new local Ray ("local": never one that happens to run here already), its node
    # address loopback (some of Ray's processes still use the machine's own address besides).
    local = {} if address else {"num_cpus": os.cpu_count(), "_node_ip_address": "127.0.0.1"}
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        init = functools.partial(ray.init, address=address or "local", include_dashboard=False, log_to_driver=False,
                                 configure_logging=False, **local)
        with native_stderr_silenced(silence_native), _log_level("ray", silence_native):
            init() if not address else _interruptible(init)  # a Ray of our own must start from the main thread
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot join the Ray cluster at {address or 'a local Ray'}: {_ray_reason(exc)}",
                         option=option, hint="start one with `ray start --head`, or leave out --ray-address and "
                                             "RAY_ADDRESS for a Ray of this run's own") from None
    finally:
        # ray.init installs its own SIGTERM handler (sys.exit(15)): keep the caller's, so that SIGTERM ends a run
        # as the local engine's does.
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    check_resources(ray.nodes(), settings)


@contextlib.contextmanager
def _log_level(name: str, quiet: bool = True) -> Iterator[None]:
    """Logger ``name`` (and those below it that set no level) says only errors while this lasts, when ``quiet``."""
    import logging

    log = logging.getLogger(name)
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _interruptible(call):
    """``call()`` in a thread of its own while this one waits for it: Ray's client can block a thread in C++ for a
    minute waiting for a GCS, and Ctrl-C and SIGTERM, whose handlers run in the main thread, would wait with it."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="ast-ray-init", daemon=True)
    with _log_level("ray._private.worker"):  # not "SIGTERM handler is not set ...": ours stays, as we want
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def default_workers(resources: dict, settings: "RaySettings") -> int:
    """As many workers as the cluster's CPUs (and GPUs, when each takes some) hold, at least one."""
    fits = resources.get("CPU", 1) // settings.cpus_per_worker
    if settings.gpus_per_worker:
        fits = min(fits, resources.get("GPU", 0) // settings.gpus_per_worker)
    return max(1, int(fits))


def check_resources(nodes: list[dict], settings: "RaySettings") -> None:
    """A UsageError, before any work, when no live node has the CPUs and GPUs one worker asks for: Ray would
    wait for such a node forever, saying nothing. (An autoscaling cluster must have one such node up.)"""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    if any(r.get("CPU", 0) >= settings.cpus_per_worker and r.get("GPU", 0) >= settings.gpus_per_worker
           for r in alive):
        return
    cpus = max((r.get("CPU", 0) for r in alive), default=0)
    gpus = max((r.get("GPU", 0) for r in alive), default=0)
    asked = f"{settings.cpus_per_worker:g} CPUs" + (f" and {settings.gpus_per_worker:g} GPUs"
                                                    if settings.gpus_per_worker else "")
    option = "gpus_per_worker" if settings.gpus_per_worker > gpus else "cpus_per_worker"
    raise UsageError(f"no node of the Ray cluster has {asked} for one worker (the most on one node: "
                     f"{cpus:g} CPUs, {gpus:g} GPUs)", option=option,
                     hint="ask for less per worker, or add such a node to the cluster")


def _ray_map(rows: list[dict], actor, args: tuple, settings: "RaySettings", per_task: int) -> Iterator[dict]:
    """Ray Data's map_batches of ``rows`` over a pool of ``actor``s; yields the records, in order."""
    import json

    import ray

    connect(settings)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # records in input order, as with the local engine
    context.enable_progress_bars = False
    workers = settings.workers or default_workers(ray.cluster_resources(), settings)
    # One block per batch of files (up to MAX_BLOCKS): a block is what one actor task takes, so fewer blocks than
    # actors would leave actors idle. One task in flight per actor: an actor that is ready first must not queue
    # up the blocks that the others, still loading the model, should take.
    blocks = min(MAX_BLOCKS, max(1, -(-len(rows) // per_task)))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        actor, fn_constructor_args=args, batch_size=per_task,
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker or None, batch_format="numpy")
    # Ray Data's actors restart when they die (max_restarts=-1) and their tasks are redone (max_task_retries=-1)
    # by default; tests/test_distributed.py kills one mid-run to hold Ray to it.
    for row in dataset.iter_rows():
        yield json.loads(row["record"])


def _options_dict(options, settings: "RaySettings") -> dict:
    """RunOptions for an actor: one decoding thread and torch threads for its CPUs."""
    return {"device": options.device, "dtype": options.dtype.value, "attn": options.attn.value,
            "quantize": options.quantize.value, "threads": options.threads or int(max(1, settings.cpus_per_worker)),
            "batch_size": options.batch_size, "workers": 1, "hop_seconds": options.hop_seconds,
            "offline": options.offline, "cache_dir": options.cache_dir}


def run_ray_extract(jobs: list, model: str, kind: str, fmt: str, options, settings: "RaySettings",
                    recorded: tuple = (None, None)) -> Iterator[dict]:
    """``extract-features`` on Ray: ``jobs`` (``extract.Job``s still to do) -> result dicts, in order.
    ``recorded``: the model's identity and weights stamp, as the outputs' metadata name them."""
    rows = [{"index": i, "path": job.item.path, "root": job.item.root or "", "error": job.item.error or "",
             "output": job.output} for i, job in enumerate(jobs)]
    return _ray_map(rows, ExtractActor, (model, _options_dict(options, settings), kind, fmt, recorded), settings,
                    settings.files_per_task(options.batch_size))


def run_ray_embed(items: list, model: str, options, settings: "RaySettings") -> Iterator:
    """``ast index`` on Ray: ``items`` (``InputFile``s) -> their ``vectordb.FileRecord``s, in order."""
    import base64

    import numpy as np

    from ..run.vectordb import FileRecord

    from .index import file_key

    rows = [{"index": i, "path": file_key(item.path), "error": item.error or ""} for i, item in enumerate(items)]
    for r in _ray_map(rows, EmbedActor, (model, _options_dict(options, settings)), settings,
                      settings.files_per_task(options.batch_size)):
        vectors = None if r["vectors"] is None else np.frombuffer(base64.b64decode(r["vectors"]), "<f4").reshape(
            len(r["windows"]), -1)
        yield FileRecord(r["path"], r["size"], r["mtime_ns"], r["duration"], r["error"],
                         [tuple(w) for w in r["windows"]], vectors)


def run_ray(sources: list, model: str, options, settings: RaySettings, *, selection, activation, aggregate,
            segments: bool) -> Iterator[dict]:
    """Tag ``sources`` (``sources.FileSource``s: a path, and an error already known) on Ray; yields their
    records (dicts, as ``records.to_record`` makes them) in input order, as they finish."""
    job = {"selection": {"top": selection.top, "threshold": selection.threshold, "include": selection.include,
                         "exclude": selection.exclude, "thresholds": selection.thresholds},
           "activation": activation.value if activation is not None else None,
           "aggregate": aggregate.value, "segments": segments}
    rows = [{"index": i, "path": source.path, "error": source.error or ""} for i, source in enumerate(sources)]
    return _ray_map(rows, TaggerActor, (model, _options_dict(options, settings), job), settings,
                    settings.files_per_task(options.batch_size))


def record_to_result(record: dict):
    """A record (from a worker) back into the ``FileResult`` the writers take."""
    from ..run.tagger import FileResult, LabelScore, Segment

    def labels(items) -> list:
        return [LabelScore(x["label"], x["index"], x["score"]) for x in items]

    segments = None
    if record.get("segments") is not None:
        segments = [Segment(s["start"], s["end"], labels(s["labels"])) for s in record["segments"]]
    return FileResult(record["path"], record["duration"], labels(record["labels"]), record["error"], segments,
                      record.get("size"), record.get("mtime"), none_of=record.get("none_of", False))
