"""Timing the model and the whole ``classify`` path; typed rows for ``ast benchmark`` to render.

``benchmark_model`` times the forward pass on random inputs of the checkpoint's shape (B, max_length,
num_mel_bins) for every mode (dtype or int8), batch size and attention implementation, after warm-up passes
(by default until two in a row agree within 5%: bf16 on an AMX CPU needs several before its kernels settle),
``torch.inference_mode()`` and device synchronisation around each timed pass. Eager and SDPA passes of one
(mode, batch size) alternate, so that noise from other processes hits both alike.

``run_benchmark`` also calibrates every ``--fast`` candidate (``fast.calibrate``: timings in turns, scores against
fp32) and names the one ``--fast`` would pick on this machine.

``benchmark_end_to_end`` (``end_to_end.py``) times real files, stage by stage and pipelined.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from ..errors import UsageError
from ..audio.features import FeatureConfig
from ..checkpoint.model import AST, ASTConfig, count_parameters, flops_per_clip
from ..checkpoint.timing import synchronizer, warm_up
from ..run.options import MAX_BATCH_SIZE, Attn, Quantize
from .end_to_end import EndToEndRow, benchmark_end_to_end

if TYPE_CHECKING:
    from ..run.fast import FastChoice

ATTNS = tuple(sorted(a.value for a in Attn))  # eager first: the reference
QUANTIZE_CHOICES = tuple(q.value for q in Quantize)


# What ``--random-weights`` builds: the default AudioSet AST. None = ASTConfig() with the 527 AudioSet labels.
# (Tests set a tiny config here.)
RANDOM_CONFIG: ASTConfig | None = None


@dataclass(frozen=True)
class Mode:
    """How the model computes: a float dtype, or int8 dynamic Linear layers around float32."""

    dtype: str  # fp32, fp16 or bf16
    quantize: str | None = None  # int8

    @property
    def name(self) -> str:
        return self.quantize or self.dtype


@dataclass(frozen=True)
class Environment:
    torch: str
    python: str
    device: str
    device_name: str
    threads: int
    model: str
    parameters: int
    input_frames: int  # model input: frames of 10 ms ...
    input_mel_bins: int  # ... by mel bins
    window_seconds: float  # audio per model input (10.24 s for AudioSet checkpoints)
    gflop_per_clip: float
    native_bf16: bool | None  # CPU only: bf16 matmuls in hardware
    int8_kernel: str | None  # CPU only: the dynamic int8 Linear kernel
    bf16_attention: str | None = None  # CPU only: what runs the packed bf16 model's attention (amx.describe)
    int8_attention: str | None = None  # CPU only: what runs an int8 model's attention (int16.describe)


@dataclass(frozen=True)
class ModelRow:
    """One (attn, batch size, mode) forward-pass timing."""

    attn: str
    batch_size: int
    dtype: str
    quantize: str | None
    device: str
    iters: int
    ms_per_batch: float  # mean
    ms_per_batch_median: float
    ms_per_clip: float  # median / batch size
    clips_per_s: float
    x_realtime: float  # seconds of audio per second
    gflops: float  # achieved, from flops_per_clip
    warmup: int = 0  # untimed passes before the timed ones


@dataclass
class BenchmarkReport:
    environment: Environment
    rows: list[ModelRow] = field(default_factory=list)
    end_to_end: list[EndToEndRow] = field(default_factory=list)
    fast: FastChoice | None = None  # every --fast candidate as measured, and the one it picks

    def to_dict(self) -> dict:
        return {
            "environment": asdict(self.environment),
            "rows": [_named_quantize(asdict(row)) for row in self.rows],
            "end_to_end": [_named_quantize(asdict(row)) for row in self.end_to_end],
            "fast": None if self.fast is None else {
                "pick": self.fast.mode, "speedup": self.fast.speedup, "max_diff": self.fast.max_diff,
                "measure": self.fast.measure,
                "candidates": [asdict(c) for c in self.fast.candidates]},
        }

    def speedups(self) -> dict[tuple[str, int], float]:
        """SDPA-over-eager speedup (eager median / SDPA median) per (mode name, batch size)."""
        medians = {(r.quantize or r.dtype, r.batch_size, r.attn): r.ms_per_batch_median for r in self.rows}
        return {
            (mode, batch): medians[(mode, batch, "eager")] / medians[(mode, batch, "sdpa")]
            for mode, batch, attn in medians
            if attn == "sdpa" and (mode, batch, "eager") in medians
        }


def _named_quantize(row: dict) -> dict:
    """JSON says ``"quantize": "none"``, the value ``--quantize`` takes, rather than null."""
    return dict(row, quantize=row["quantize"] or "none")


# -- option parsing (shared by the CLI and library callers) -------------------------------------------


def parse_list(value: str | Iterable, option: str, choices: Iterable[str] | None = None) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> distinct lower-case items; each one of ``choices`` if given."""
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out = []
    for item in (i.strip().lower() for i in items):
        if item and item not in out:
            out.append(item)
    if not out:
        raise UsageError("needs at least one value", option=option)
    allowed = tuple(choices or ())
    for item in out if allowed else ():
        if item not in allowed:
            raise UsageError(f"takes {' and/or '.join(allowed)}, not {item!r}", option=option)
    return out


def parse_batch_sizes(value: str | Iterable) -> list[int]:
    sizes = []
    for item in parse_list(value, "batch_sizes"):
        if not item.isdigit() or not 1 <= int(item) <= MAX_BATCH_SIZE:
            raise UsageError(f"takes whole numbers from 1 to {MAX_BATCH_SIZE}, not {item!r}", option="batch_sizes")
        sizes.append(int(item))
    return sizes


def parse_attns(value: str | Iterable) -> list[str]:
    return parse_list(value, "attn", ATTNS)


def resolve_modes(dtypes: str | Iterable, quantize: str | Iterable, device: str) -> tuple[list[Mode], list[str]]:
    """``dtype`` x ``quantize`` lists -> (modes, the combinations left out). int8 pairs with float32 only, on
    the CPU only, so e.g. bf16 x int8 is left out (and named, so that a front end can say so)."""
    from ..run.backends import check_quantize, resolve_dtype
    from ..run.options import DType, dtype_name, torch_dtype

    resolved = []
    for name in parse_list(dtypes, "dtype", [d.value for d in DType]):
        dtype = dtype_name(resolve_dtype(name, device))
        if dtype not in resolved:
            resolved.append(dtype)
    quantizes = parse_list(quantize, "quantize", QUANTIZE_CHOICES)
    modes, skipped = [], []
    for dtype in resolved:
        for q in quantizes:
            if q == "none":
                modes.append(Mode(dtype))
            elif dtype == "fp32":
                check_quantize(q, device, torch_dtype("fp32"))
                modes.append(Mode("fp32", q))
            else:
                skipped.append(f"{dtype}+{q}")
    if not modes:
        raise UsageError("int8 computes in float32 around its int8 layers", option="quantize",
                         suggest={"dtype": "fp32"})
    return modes, skipped


# -- models ---------------------------------------------------------------------------------------------


def random_model(config: ASTConfig | None = None, seed: int = 0) -> AST:
    """The default-shape AST (or ``config``) with random weights, float32, eval mode: nothing is downloaded."""
    import torch

    from ..checkpoint.weights import load_labels

    config = config or RANDOM_CONFIG or ASTConfig(id2label=load_labels("audioset"))
    torch.manual_seed(seed)
    model = AST(config).eval()
    with torch.no_grad():  # tokens are zeros at init; make them count like trained ones do
        for param in model.audio_spectrogram_transformer.embeddings.parameters():
            if param.dim() == 3:
                param.normal_(0.0, 0.02)
    return model


def variant(master: AST, mode: Mode, device: str, share: bool = False) -> AST:
    """``master`` (float32, CPU) in ``mode`` on ``device``. ``share``: the float32 CPU case may reuse master
    (nothing here changes a model: attention is chosen per call)."""
    from ..run.options import torch_dtype
    from ..checkpoint.speed import place_bf16_cpu, quantize_dynamic

    if mode.quantize:
        return quantize_dynamic(copy.deepcopy(master), mode.quantize)
    if share and device == "cpu" and mode.dtype == "fp32":
        return master
    if device == "cpu" and mode.dtype == "bf16":
        return place_bf16_cpu(copy.deepcopy(master))
    return copy.deepcopy(master).to(device=device, dtype=torch_dtype(mode.dtype)).eval()


def environment(master: AST, features: FeatureConfig, device: str, name: str) -> Environment:
    import torch

    from ..checkpoint import amx, int16
    from ..checkpoint.speed import cpu_capabilities, cpu_has_native_bf16, int8_kernel

    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(torch.device(device))
    elif device == "mps":
        device_name = "Apple MPS"
    else:
        device_name = cpu_capabilities().get("cpu_name") or platform.processor() or platform.machine()
    cpu = device == "cpu"
    cfg = master.config
    return Environment(
        torch=torch.__version__,
        python=platform.python_version(),
        device=device,
        device_name=str(device_name),
        threads=torch.get_num_threads(),
        model=name,
        parameters=count_parameters(master),
        input_frames=cfg.max_length,
        input_mel_bins=cfg.num_mel_bins,
        window_seconds=features.window_seconds,
        gflop_per_clip=round(flops_per_clip(cfg) / 1e9, 1),
        native_bf16=cpu_has_native_bf16() if cpu else None,
        int8_kernel=int8_kernel() if cpu else None,
        bf16_attention=amx.describe(cfg.hidden_size // cfg.num_attention_heads) if cpu else None,
        int8_attention=int16.describe(cfg.hidden_size // cfg.num_attention_heads) if cpu else None,
    )


# -- model forward ---------------------------------------------------------------------------------------


def benchmark_model(
    master: AST,
    features: FeatureConfig,
    *,
    device: str = "cpu",
    modes: Sequence[Mode] = (Mode("fp32"),),
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    attns: Sequence[str] = ATTNS,
    iters: int = 3,
    warmup: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> list[ModelRow]:
    """Forward-pass timings, one row per (mode, batch size, attn), in that order of nesting. ``warmup``: untimed
    passes first (None: until two agree, see ``warm_up``)."""
    import torch

    sync = synchronizer(device)
    flops = flops_per_clip(master.config)
    shape = (master.config.max_length, master.config.num_mel_bins)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for mode in modes:
        model = variant(master, mode, device, share=True)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        forward = model if model.classifier is not None else model.forward_features  # a bare encoder: embeddings
        for batch in batch_sizes:
            inputs = torch.randn(batch, *shape, generator=generator).to(device=device, dtype=dtype)
            times: dict[str, list[float]] = {attn: [] for attn in attns}
            warmups: dict[str, int] = {}

            def timed_pass(attn: str) -> float:
                sync()
                start = time.perf_counter()
                forward(inputs, attn=attn)
                sync()
                return time.perf_counter() - start

            with torch.inference_mode():
                for attn in attns:
                    if on_step is not None:
                        on_step(f"warming up {mode.name} {attn}, batch size {batch}")
                    warmups[attn] = warm_up(lambda: timed_pass(attn), warmup)
                for i in range(iters):
                    for attn in attns:  # alternate, so that noise hits each alike
                        if on_step is not None:
                            on_step(f"timing {mode.name} {attn}, batch size {batch} ({i + 1}/{iters})")
                        times[attn].append(timed_pass(attn))
            for attn in attns:
                mean, median = statistics.fmean(times[attn]), statistics.median(times[attn])
                rows.append(ModelRow(
                    attn=attn, batch_size=batch, dtype=mode.dtype, quantize=mode.quantize, device=device,
                    iters=iters, ms_per_batch=round(mean * 1e3, 3), ms_per_batch_median=round(median * 1e3, 3),
                    ms_per_clip=round(median * 1e3 / batch, 3), clips_per_s=round(batch / median, 4),
                    x_realtime=round(batch * features.window_seconds / median, 3),
                    gflops=round(batch * flops / median / 1e9, 2), warmup=warmups[attn],
                ))
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def run_benchmark(master: AST, features: FeatureConfig, name: str, *, device: str, modes: Sequence[Mode],
                  batch_sizes: Sequence[int], attns: Sequence[str], iters: int, warmup: int | None,
                  paths: Sequence[str] = (), batch_size: int = 4, workers: int = 2,
                  on_step: Callable[[str], None] | None = None) -> BenchmarkReport:
    """The whole benchmark: forward timings for every mode, and end to end on ``paths`` if any."""
    from ..run.backends import LocalBackend
    from ..run.fast import calibrate, pick
    from ..run.options import RunOptions, torch_dtype
    from ..run.tagger import Tagger

    report = BenchmarkReport(environment(master, features, device, name))
    report.rows = benchmark_model(master, features, device=device, modes=modes, batch_sizes=batch_sizes,
                                  attns=attns, iters=iters, warmup=warmup, on_step=on_step)
    if on_step is not None:
        on_step("calibrating the --fast candidates")
    report.fast = pick(calibrate(master, device, "sdpa" if "sdpa" in attns else attns[0]))
    for mode in modes if paths else ():
        backend = LocalBackend(variant(master, mode, device, share=True), features, device=device,
                               dtype=torch_dtype(mode.dtype))
        tagger = Tagger(backend, master.config.id2label, name=name,
                        options=RunOptions(batch_size=batch_size, workers=workers))
        for attn in attns:
            if on_step is not None:
                on_step(f"end to end: {mode.name} {attn}, {len(paths)} file{'s' if len(paths) != 1 else ''}")
            report.end_to_end.append(benchmark_end_to_end(tagger, paths, attn=attn, mode=mode,
                                                          batch_size=batch_size, workers=workers))
    return report


__all__ = [
    "ATTNS", "BenchmarkReport", "EndToEndRow", "Environment", "Mode", "ModelRow", "benchmark_end_to_end",
    "benchmark_model", "environment", "parse_attns", "parse_batch_sizes", "random_model", "resolve_modes",
    "run_benchmark", "variant",
]
