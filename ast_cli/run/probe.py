"""``--fast``'s probe: one GEMM per CPU candidate, timed before any model is placed in it, so that a kernel
with no fast implementation on this CPU (oneDNN's reference code: 1000x fp32's time and more) is not calibrated
at all. Part of ``fast.calibrate``."""

from __future__ import annotations

import math

PROBE_SHAPE = (128, 768, 768)  # rows, in, out: a full-size model's attention output GEMM on 128 tokens
# A CPU candidate whose probe GEMM takes this many times fp32's is not calibrated: a reference kernel takes 1000x
# and more; a fast kernel on a busy machine has taken 4x and more when every call of it stalled
PROBE_SLOWER = 10.0
PROBE_CALLS = 5  # timed calls at most: the fastest counts (~0.2 ms each for a fast kernel)
# Tries at most, each with fp32 timed again, before a candidate 10x slower is dropped; a reference kernel takes
# 1000x and more (oneDNN's int8 with AMX refused: 2100x), load alone has made a fast one take 98x
PROBE_TRIES = 3
PROBE_SURE = 500.0  # a try this many times slower than fp32: a reference kernel, no need to try again


def probe_seconds(name: str, below: float = 0.0) -> float:
    """Seconds of one GEMM of ``PROBE_SHAPE`` in candidate ``name``'s kernel: the fastest of ``PROBE_CALLS`` calls
    after the first (which sets it up), or of fewer once one took under ``below`` seconds. One call alone once
    measured FBGEMM's int8 10x slower than fp32 on the Sapphire Rapids CPU (a stall of the machine; 0.3 ms
    against fp32's 0.7 ms in three runs after), which would have dropped the fastest mode of a VNNI CPU. Where a
    kernel has no fast implementation for this CPU, oneDNN falls back to its reference code: with
    oneDNN's ISA capped below AMX on the Sapphire Rapids CPU (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``), int8 oneDNN
    took 8.5 s per 1214x768x768 GEMM (``ref_int8``), and calibrating it would have taken the better part of an
    hour. A fixed shape: a tiny model's GEMMs would measure call overheads, not the kernel."""
    import torch
    from torch import nn

    from ..checkpoint.speed import PackedLinearBF16, quantize_dynamic
    from ..checkpoint.timing import best_seconds

    rows, inputs, outputs = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(inputs, outputs)
    x = torch.randn(rows, inputs, generator=generator)
    if name == "bf16":
        layer, x = PackedLinearBF16(linear, rows), x.to(torch.bfloat16)
    elif name.startswith("int8"):
        layer = quantize_dynamic(nn.Sequential(linear), "int8", kernel=name.partition("-")[2])
    else:
        layer = linear
    with torch.inference_mode():
        layer(x)
        return best_seconds(lambda: layer(x), PROBE_CALLS, below)  # a reference kernel: 0.5 s a call


def slow_candidates(names: list[str]) -> dict[str, str]:
    """{candidate: why it is not calibrated} for the CPU candidates among ``names`` whose probe GEMM takes
    ``PROBE_SLOWER`` times fp32's or more, measured with fp32's again just before it, in each of ``PROBE_TRIES``
    tries (one where it takes ``PROBE_SURE`` times or more: a reference kernel, never the fastest mode; only then
    does the reason say so without doubt). One try alone dropped FBGEMM's int8 as "98x slower (no fast kernel for
    this CPU)" in 6 of 15 probes on the 2-core Sapphire Rapids CPU at a load average of 3; quiet, it takes half
    fp32's time there. Calibrating a kernel 10x slower would cost minutes on a full-size model: a run on a busy
    machine leaves it out, and its choice, marked busy, is taken again when the machine is quiet."""
    out = {}
    for name in names:
        if name == "fp32":
            continue
        try:
            ratio = _slowdown(name)
        except (RuntimeError, NotImplementedError):  # calibrate() says what failed when it places the model
            continue
        if ratio >= PROBE_SURE:
            out[name] = f"its GEMM ran {ratio:.0f}x slower than fp32's here (no fast kernel for this CPU)"
        elif ratio >= PROBE_SLOWER:  # FBGEMM's int8 took 11-20x in every try at a load average of 3.5
            out[name] = (f"its GEMM ran {ratio:.0f}x slower than fp32's here in {PROBE_TRIES} tries (a busy machine, "
                         "or no fast kernel for this CPU)")
    return out


def _slowdown(name: str) -> float:
    """How many times fp32's probe GEMM candidate ``name``'s takes: the least of up to ``PROBE_TRIES`` tries, each
    timing fp32 right before it, so that load which comes and goes hits both; it stops at a try under
    ``PROBE_SLOWER`` (a fast kernel costs one), or at one of ``PROBE_SURE`` or more (a reference kernel costs one
    too: its calls take seconds)."""
    least = math.inf
    for _ in range(PROBE_TRIES):
        reference = probe_seconds("fp32")
        least = min(least, probe_seconds(name, PROBE_SLOWER * reference) / max(reference, 1e-9))
        if least < PROBE_SLOWER or least >= PROBE_SURE:
            break
    return least
