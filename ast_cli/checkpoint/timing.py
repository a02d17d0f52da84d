"""Timing helpers shared by ``ast benchmark`` and ``--fast``'s calibration: waiting for a device, warm-up passes
until the kernels have settled, and passes of several modes timed in turns."""

from __future__ import annotations

import math
import time
from typing import Callable

WARMUP_AGREE = 0.05  # two warm-up passes in a row this close (relative): the kernels have settled
MAX_WARMUP = 20  # at most this many warm-up passes, however noisy the machine


def synchronizer(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(torch.device(device))
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None


def warm_up(run_pass: Callable[[], float], passes: int | None = None, most: int = MAX_WARMUP) -> int:
    """Untimed passes before timing; returns how many ran. ``run_pass`` runs one and returns its seconds.
    ``passes``: exactly that many; None: until two in a row agree within ``WARMUP_AGREE``, at most ``most``
    (a fixed count is too few for kernels that settle late, and wasted where they settle at once)."""
    if passes is not None:
        for _ in range(passes):
            run_pass()
        return passes
    previous = run_pass()
    for count in range(2, most + 1):
        current = run_pass()
        if abs(current - previous) <= WARMUP_AGREE * min(current, previous):
            return count
        previous = current
    return max(1, most)


def best_seconds(call: Callable[[], object], calls: int, below: float = 0.0) -> float:
    """The fastest of ``calls`` timed ``call()``s, stopping at the first under ``below`` seconds."""
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
        if best < below:
            break
    return best


def interleaved_fastest(runs: dict[str, Callable[[], float]], warmup_rounds: int, least: int, most: int,
                        seconds: float) -> dict[str, float]:
    """The fastest seconds of each of ``runs`` (each runs one pass and returns its seconds), timed in rounds that
    run each once, in turns, the order reversed every other round (none always follows the same one):
    ``warmup_rounds`` untimed, then at least ``least`` timed rounds and more, up to ``most``, until those took
    ``seconds``. Load that comes and goes then hits every run alike, and the fastest of a run's passes is the one
    least disturbed: ratios of these minima hold on a busy machine where medians of 3 passes, each run timed in a
    block of its own, had fp32 3228 ms against bf16's 196 (16x; 2x in whole runs)."""
    names = list(runs)
    best = dict.fromkeys(names, math.inf)
    spent, rounds = 0.0, 0
    while rounds < warmup_rounds + most and (rounds < warmup_rounds + least or spent < seconds):
        for name in names if rounds % 2 == 0 else names[::-1]:
            elapsed = runs[name]()
            if rounds >= warmup_rounds:
                best[name], spent = min(best[name], elapsed), spent + elapsed
        rounds += 1
    return best
