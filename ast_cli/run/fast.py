"""``--fast``: the fastest mode whose scores stay within ``FIDELITY`` of fp32, measured on this machine.

Candidates (those the hardware supports): fp32 (the reference), bf16 (native bf16 or AMX only), int8 with
FBGEMM's dynamic Linear, int8 with oneDNN's int8 GEMM (AMX-INT8/VNNI; ``torch._int_mm`` where oneDNN's op is
missing), and on CUDA fp16 and bf16.
``calibrate`` runs each on the loaded model: what the run reports on ``FIDELITY_WINDOWS`` fixed random windows
against fp32's (the model's sigmoid scores and each head's probabilities; the pooled embeddings, as their
relative L2 error, where the run reports them or the model is a bare encoder), then timed forwards after
warm-up. ``pick`` takes the fastest faithful one, and never one slower than fp32. ``choose`` caches the choice
per (CPU model and flags, torch version, weights fingerprint, threads, device, heads, attention) in
``fast_cache_path()`` (``fastcache``), so later runs pay nothing; an unreadable, corrupt or foreign cache is
ignored and rewritten, a cache folder that others could write is neither read nor written. The library never
prints: the choice comes back as a ``FastChoice``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

from .fastcache import cached_timings, fast_cache_path, machine_busy, read_cache, untrusted, write_cache

FIDELITY = 0.02  # the most a sigmoid score may move from fp32's (the issue's bound); for a bare encoder's
# embeddings, the most their L2 distance from fp32's may be, relative to fp32's norm (bf16 moves them ~0.01 on a
# random full-size AST, int8 ~0.03 while its scores move ~0.015: scores forgive more than the embedding does)
# A candidate must beat fp32 by this much: timings on a shared machine wander by a few percent, and a tie
# is better served exact.
MIN_SPEEDUP = 1.05
FIDELITY_WINDOWS = 2  # random windows scored by every candidate (the first also times the forward)
# Timing, after one pass of each candidate: WARMUP_ROUNDS untimed rounds of every candidate in turns, then at
# least TIMED_ROUNDS timed ones, more (up to MAX_TIMED_ROUNDS) until they took TIMED_SECONDS; each candidate's
# fastest pass counts. A full-size model (~1.7 s a round of four candidates at 2 threads) gets 2 + 4 passes of
# each, as the warm-up until two passes agree (2-4) and a median of 3 cost before; a tiny one (~4 ms a round)
# gets 40 rounds, where 3 passes of under a millisecond picked bf16 at 4.8x while bf16 was slower than fp32.
WARMUP_ROUNDS = 1
TIMED_ROUNDS = 4
MAX_TIMED_ROUNDS = 40
TIMED_SECONDS = 1.0

CPU_CANDIDATES = ("fp32", "bf16", "int8-fbgemm", "int8-onednn", "int8-int_mm")
CUDA_CANDIDATES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Candidate:
    """One mode as measured: ``ms`` per forward (the fastest of its timed passes), its ``max_diff`` from fp32's
    sigmoid scores."""

    name: str
    ms: float | None = None
    max_diff: float | None = None
    skipped: str | None = None  # why it was not run on this machine
    measure: str = "scores"  # what max_diff compares: "scores" (probabilities) or "embeddings" (relative L2)

    def speedup(self, reference: "Candidate") -> float | None:
        return reference.ms / self.ms if self.ms and reference.ms else None

    @property
    def faithful(self) -> bool:
        return self.max_diff is not None and math.isfinite(self.max_diff) and self.max_diff <= FIDELITY


@dataclass(frozen=True)
class FastChoice:
    """What ``--fast`` runs: ``mode`` (a candidate name), its measured speed-up over fp32 and fidelity."""

    mode: str
    speedup: float
    max_diff: float
    candidates: tuple[Candidate, ...] = ()
    cached: bool = False
    measure: str = "scores"  # as in Candidate
    busy: bool = False  # calibrated while other jobs loaded the machine (``machine_busy``): taken again when quiet
    not_cached: str | None = None  # why a choice calibrated now was not cached (an untrusted or unwritable cache)

    def describe(self) -> str:
        """``scores within 0.0043 of fp32`` (or the embeddings' relative distance, for a bare encoder)."""
        if self.measure == "embeddings":
            return f"embeddings within a relative L2 distance of {self.max_diff:.4f} from fp32's"
        return f"scores within {self.max_diff:.4f} of fp32"

    @property
    def dtype(self) -> str:
        return "fp32" if self.mode.startswith("int8") else self.mode

    @property
    def int8_kernel(self) -> str | None:
        return self.mode.partition("-")[2] or None if self.mode.startswith("int8") else None


def pick(candidates: list[Candidate] | tuple[Candidate, ...]) -> FastChoice:
    """The fastest faithful candidate at least ``MIN_SPEEDUP`` times faster than fp32; else fp32."""
    reference = next(c for c in candidates if c.name == "fp32")
    best = replace(reference, max_diff=0.0)
    for candidate in candidates:
        speedup = candidate.speedup(reference)
        if candidate.faithful and speedup is not None and speedup >= MIN_SPEEDUP and candidate.ms < best.ms:
            best = candidate
    return FastChoice(best.name, round(best.speedup(reference) or 1.0, 3), round(best.max_diff, 5), tuple(candidates),
                      measure=reference.measure)


# -- what this machine supports -----------------------------------------------------------------------


def candidate_names(device: str) -> list[tuple[str, str | None]]:
    """(name, why it is skipped or None) for every candidate of ``device``'s kind."""
    import torch

    from ..checkpoint.speed import _fbgemm_works, _int_mm_works, _onednn_works, cpu_has_native_bf16

    if device.startswith("cuda"):
        bf16 = torch.cuda.is_bf16_supported()
        return [("fp32", None), ("fp16", None), ("bf16", None if bf16 else "this GPU has no bf16")]
    if device != "cpu":
        return [("fp32", None)]
    return [("fp32", None),
            ("bf16", None if cpu_has_native_bf16() else "no bf16 hardware (AVX512-BF16, AMX or ARM BF16)"),
            ("int8-fbgemm", None if _fbgemm_works() else "this torch has no quantized engine"),
            ("int8-onednn", None if _onednn_works() else "this torch has no oneDNN int8 linear"),
            ("int8-int_mm", ONEDNN_FASTER if _onednn_works() else
             None if _int_mm_works() else "this torch has no CPU torch._int_mm")]


ONEDNN_FASTER = "int8-onednn computes the same products faster"


def _int_mm_instead(names: list[tuple[str, str | None]], failed: dict[str, str]) -> list[tuple[str, str | None]]:
    """``names`` with int8-int_mm taken back where oneDNN's int8 has no fast kernel on this CPU (the probe dropped
    it): the same products on ``torch._int_mm``. With AMX refused on the Sapphire Rapids CPU, oneDNN's int8 ran
    its reference kernel (2100x fp32's probe time) while ``torch._int_mm`` took 0.49x (FBGEMM 0.54x)."""
    from ..checkpoint.speed import _int_mm_works

    if "int8-onednn" not in failed or not _int_mm_works():
        return names
    return [(name, None if name == "int8-int_mm" and skipped == ONEDNN_FASTER else skipped) for name, skipped in names]


def place(model, mode: str, device: str):
    """``model`` (float32, CPU) in ``mode`` on ``device``, changed in place: (model, input dtype)."""
    from .options import torch_dtype
    from ..checkpoint.speed import place_bf16_cpu, quantize_dynamic

    if mode.startswith("int8"):
        return quantize_dynamic(model, "int8", kernel=mode.partition("-")[2]), torch_dtype("fp32")
    dtype = torch_dtype(mode)
    if device == "cpu" and mode == "bf16":
        return place_bf16_cpu(model), dtype
    return model.to(device=device, dtype=dtype).eval(), dtype


# -- calibration ----------------------------------------------------------------------------------------


def calibration_inputs(config):
    """(FIDELITY_WINDOWS, max_length, num_mel_bins) fixed random model inputs, the scale of normalised fbanks."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(FIDELITY_WINDOWS, config.max_length, config.num_mel_bins, generator=generator) * 0.5


def _timer(model, dtype, device: str, first, attn) -> Callable[[], float]:
    """A function running one forward of ``first`` (the timing window) and returning its seconds: to the
    scores, or to the pooled embedding where the model has no classifier (a bare encoder)."""
    from ..checkpoint.timing import synchronizer

    sync = synchronizer(device)
    first = first.to(device=device, dtype=dtype)
    forward = model if getattr(model, "classifier", None) is not None else model.forward_features

    def timed_pass() -> float:
        sync()
        start = time.perf_counter()
        forward(first, attn=attn)
        sync()
        return time.perf_counter() - start

    return timed_pass


def measure_of(model, heads=(), embeddings: bool = False) -> str:
    """What ``calibrate`` compares for ``model`` run with ``heads``: scores, unless neither gives any or the run
    reports ``embeddings`` (extract-features, index, head training: then each head's probabilities as well)."""
    scored = heads or getattr(model, "classifier", None) is not None
    return "scores" if scored and not embeddings else "embeddings"


def _single_label(model) -> bool:
    """The model reports softmax probabilities (a single-label checkpoint), not sigmoid scores."""
    from .tagger import is_single_label

    return getattr(model, "classifier", None) is not None and is_single_label(model.config)


def _head_probabilities(heads, embedding) -> list:
    """Each head's softmax or sigmoid on the (B, D) float32 pooled ``embedding``, as ``HeadsBackend`` runs it."""
    import torch

    return [torch.softmax(head(embedding), dim=-1) if head.single_label else torch.sigmoid(head(embedding))
            for head in heads]


def _outputs(variant, inputs, attn, heads, embeddings: bool = False):
    """What a run of ``variant`` reports on ``inputs``, float32 on the CPU: (B, labels) probabilities (the model's
    sigmoid scores, or softmax for a single-label model, then each head's softmax or sigmoid on the float32 pooled
    embedding, as ``HeadsBackend`` runs it), or (B, D) pooled embeddings when there are no labels at all or the
    run reports ``embeddings``."""
    import torch

    pooled = variant.forward_features(inputs, attn=attn)
    if measure_of(variant, heads, embeddings) == "embeddings":
        return pooled.float().cpu()
    parts = []
    if variant.classifier is not None:
        logits = variant.forward_head(pooled).float().cpu()
        parts.append(torch.softmax(logits, dim=-1) if _single_label(variant) else torch.sigmoid(logits))
    return torch.cat(parts + _head_probabilities(heads, pooled.float().cpu()), dim=1)


def _difference(measure: str, got, reference, heads=()) -> float:
    """The largest score difference, or the largest relative L2 distance of one window's embedding (and the
    largest difference of the probabilities ``heads`` give those embeddings, when the run stores both)."""
    if measure == "embeddings":
        moved = float(((got - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-12)).max())
        return max([moved] + [float((g - r).abs().max()) for g, r in zip(_head_probabilities(heads, got),
                                                                        _head_probabilities(heads, reference))])
    return float((got - reference).abs().max())


def calibrate(model, device: str = "cpu", attn: str | None = None, heads=(), embeddings: bool = False,
              timings: dict | None = None) -> list[Candidate]:
    """Every candidate of ``device`` measured on copies of ``model`` (float32, CPU; left unchanged): what the run
    reports (``_outputs``: with ``heads``, their probabilities too; ``embeddings``: the pooled embeddings, for a
    run that reports those) against fp32's, then a pass of each (a failure there is the candidate's, too) and
    timed forwards taken in turns (``timing.interleaved_fastest``: so that noise from other processes hits every
    candidate alike; the fastest pass of each). ``timings``: ms per candidate measured before on this machine
    for the same model (another comparison: other heads, embeddings); used instead of timing when it has every
    candidate that runs."""
    import copy

    import torch

    from ..checkpoint.timing import interleaved_fastest
    from . import probe

    inputs, measure = calibration_inputs(model.config), measure_of(model, heads, embeddings)
    runs, scores, failed = {}, {}, {}
    names = candidate_names(device)
    reuse = bool(timings) and all(name in timings for name, skipped in names if skipped is None)
    if device == "cpu" and not reuse:
        failed.update(probe.slow_candidates([name for name, skipped in names if skipped is None]))
        if names != (names := _int_mm_instead(names, failed)):
            failed.update(probe.slow_candidates(["int8-int_mm"]))
    with torch.inference_mode():
        for name, skipped in names:
            if skipped is not None or name in failed:
                continue
            try:
                variant, dtype = place(copy.deepcopy(model), name, device)
                scores[name] = _outputs(variant, inputs.to(device, dtype), attn, heads, embeddings)
                runs[name] = None if reuse else _timer(variant, dtype, device, inputs[:1], attn)
                if not reuse:
                    runs[name]()  # the first pass: sets the kernels up, and fails where this shape has none
            except (RuntimeError, NotImplementedError) as exc:  # a kernel this build or shape lacks: not a candidate
                if name == "fp32":
                    raise
                runs.pop(name, None)
                failed[name] = f"failed here: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
        # speed does not depend on what is compared: with ``timings``, not timed again
        seconds = ({name: timings[name] / 1e3 for name in runs} if reuse else
                   interleaved_fastest(runs, WARMUP_ROUNDS, TIMED_ROUNDS, MAX_TIMED_ROUNDS, TIMED_SECONDS))
    out = []
    for name, skipped in names:
        skipped = skipped or failed.get(name)
        if skipped is not None:
            out.append(Candidate(name, skipped=skipped, measure=measure))
            continue
        max_diff = _difference(measure, scores[name], scores["fp32"], heads)
        out.append(Candidate(name, round(seconds[name] * 1e3, 3), round(max_diff, 6), measure=measure))
    return out


# -- the cache ------------------------------------------------------------------------------------------


def cache_key(model, device: str, heads=(), attn: str | None = None, embeddings: bool = False) -> dict:
    """What a choice depends on: the CPU (model name and feature flags), torch, the weights, threads, device, the
    heads whose probabilities were compared, the attention (eager bf16 can be slower than eager fp32 where sdpa
    bf16 is faster), what was compared when a model with labels runs for its embeddings, and softmax for a
    single-label model's scores. The last four are named only when they apply (heads, attention other than sdpa,
    embeddings of a model with labels, a single-label model): a key without them is unchanged. On the CPU with
    sdpa, also what runs bf16 attention: "amx" (the kernel) or "sdpa" (no AMX, no compiler, opted out; never the
    reason, whose words may change from run to run), and int8 attention: "int16" (VNNI) or "sdpa", so that
    installing a compiler, ``AST_AMX_ATTENTION=0`` or ``AST_INT16_ATTENTION=0`` calibrates again."""
    import torch

    from ..checkpoint import amx, int16
    from ..checkpoint.speed import _cpuinfo_flags, cpu_capabilities
    from ..checkpoint.weights import weights_fingerprint

    caps = cpu_capabilities()
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    cpu_sdpa = device == "cpu" and attn in (None, "sdpa")
    bf16_attention = ("amx" if head_size == amx.HEAD_SIZE and amx.available() else "sdpa") if cpu_sdpa else None
    int8_attention = ("int16" if head_size == int16.HEAD_SIZE and int16.available() else "sdpa") if cpu_sdpa else None
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"cpu": str(caps.get("cpu_name", "")), "cpu_flags": sorted(_cpuinfo_flags()) or sorted(
            k for k, v in caps.items() if v is True), "torch": torch.__version__,
            "weights": weights_fingerprint(model.state_dict()), "threads": torch.get_num_threads(), "device": device,
            "gpu": gpu, **({"heads": [_head_key(head) for head in heads]} if heads else {}), **({"attn": attn} if attn not in (None, "sdpa") else {}),
            **({"measure": "embeddings"} if embeddings and measure_of(model, heads) == "scores" else {}),
            **({"activation": "softmax"} if _single_label(model) and measure_of(model, heads, embeddings) == "scores"
               else {}), **({"bf16_attention": bf16_attention, "int8_attention": int8_attention} if cpu_sdpa else {})}


def _head_key(head) -> list:
    """A head as the cache key names it: softmax or not, its tensors' fingerprint, and its LayerNorm eps where
    that is not the default (so that keys of heads with the default stay as they were)."""
    from ..checkpoint.heads import Head
    from ..checkpoint.weights import weights_fingerprint

    return [head.single_label, weights_fingerprint(head.tensors)] + ([head.eps] if head.eps != Head.eps else [])


def _cached_choice(entries: list, key: dict, names: list[str]) -> FastChoice | None:
    """The entry for ``key`` if it is well formed and names a mode this machine still supports."""
    for entry in entries:
        choice = entry.get("choice")
        if entry.get("key") != key or not isinstance(choice, dict):
            continue
        mode, speedup, max_diff = choice.get("mode"), choice.get("speedup"), choice.get("max_diff")
        measure = choice.get("measure", "scores")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      for v in (speedup, max_diff))
        if (mode in names and numbers and 0 <= max_diff <= FIDELITY and measure in ("scores", "embeddings")
                and (speedup >= MIN_SPEEDUP or mode == "fp32")):
            return FastChoice(mode, float(speedup), float(max_diff), cached=True, measure=measure,
                              busy=choice.get("busy") is True)
    return None


def choose(model, device: str = "cpu", attn: str | None = None, heads=(), embeddings: bool = False) -> FastChoice:
    """The ``--fast`` mode for ``model`` (float32, CPU; unchanged) on ``device``, run with ``heads``
    (``checkpoint.heads.Head``), for a run that reports ``embeddings`` or scores: cached, else calibrated (its
    fidelity only, where the same model was timed before for another comparison). A choice calibrated while the
    machine was busy is calibrated again by the first run that finds it quiet."""
    path = fast_cache_path()
    key = cache_key(model, device, heads, attn, embeddings)
    distrust = untrusted(os.path.dirname(path))
    entries = read_cache(path) if distrust is None else []
    names = [name for name, skipped in candidate_names(device) if not skipped or skipped == ONEDNN_FASTER]
    cached, busy = _cached_choice(entries, key, names), machine_busy()
    if cached is not None and not (cached.busy and not busy):  # a busy machine's choice is taken again when quiet
        return cached
    choice = pick(calibrate(model, device, attn, heads, embeddings, timings=cached_timings(entries, key)))
    choice = replace(choice, busy=busy)
    return replace(choice, not_cached=distrust or write_cache(path, key, choice))


__all__ = ["Candidate", "FIDELITY", "FastChoice", "calibrate", "choose", "fast_cache_path", "pick", "place"]
