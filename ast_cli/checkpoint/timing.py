"""Timing helpers shared by ``ast benchmark`` and ``--fast``'s calibration: waiting for a device, and warm-up
passes until the kernels have settled."""

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
