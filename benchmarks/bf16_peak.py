"""The bf16 forward against the machine's own bf16 GEMM rate, measured in turns in one process (issue 26).

Each round times twenty 1214x768 @ 768x3072 bf16 GEMMs (the MLP's first GEMM of a 10.24 s clip: the rate the
hardware gives this shape), one forward of the packed bf16 model ``--dtype bf16`` runs (``place_bf16_cpu``),
one of the same packed model with PyTorch's SDPA in place of the AMX attention kernel (``amx.turned_off()``: the
same as the first where the kernel is unavailable) and one of the plain ``model.to(bfloat16)``; the medians of
the rounds give ms per clip and the share of the GEMM rate each forward reaches. Random full-size weights; nothing is downloaded. Run from the repository root:

    python benchmarks/bf16_peak.py --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ast_cli.checkpoint import amx
from ast_cli.checkpoint.model import AST, ASTConfig, flops_per_clip
from ast_cli.checkpoint.names import load_labels
from ast_cli.checkpoint.speed import cpu_has_native_bf16, place_bf16_cpu


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def gemms(a: torch.Tensor, b: torch.Tensor, count: int) -> None:
    """``count`` GEMMs, each result freed before the next, as a forward frees its layers' outputs (keeping all
    twenty, 150 MB of fresh pages, halved the rate measured here)."""
    for _ in range(count):
        a @ b


def forward(name: str, model, x: torch.Tensor) -> None:
    if name.endswith("+SDPA"):
        with amx.turned_off():
            model(x)
    else:
        model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ASTConfig(id2label=tuple(load_labels("audioset")))
    torch.manual_seed(0)
    master = AST(config).eval()
    packed = place_bf16_cpu(copy.deepcopy(master))
    models = {"packed bf16": packed, "packed+SDPA": packed, "plain bf16": copy.deepcopy(master).bfloat16()}
    x = torch.randn(1, config.max_length, config.num_mel_bins).bfloat16()
    a, b = torch.randn(1214, 768).bfloat16(), torch.randn(768, 3072).bfloat16()
    flop, gemm = flops_per_clip(config), 2 * 1214 * 768 * 3072
    rates, times = [], {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(3):  # warm-up: oneDNN picks and caches its kernels
            a @ b
            for name, model in models.items():
                forward(name, model, x)
        for _ in range(args.rounds):
            rates.append(gemm / (seconds(lambda: gemms(a, b, 20)) / 20) / 1e9)
            for name, model in models.items():
                times[name].append(seconds(lambda: forward(name, model, x)) * 1e3)
    peak = statistics.median(rates)
    print(f"native bf16: {cpu_has_native_bf16()}; {args.threads} threads; torch {torch.__version__}; "
          f"bf16 attention: {amx.status()}")
    print(f"bf16 GEMM 1214x768 @ 768x3072: {peak:.0f} GFLOP/s (median of {args.rounds} rounds); "
          f"{flop / 1e9:.0f} GFLOP per 10.24 s clip")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:12s} {ms:7.0f} ms/clip (fastest {min(values):.0f}), {flop / ms / 1e6:5.0f} GFLOP/s = "
              f"{flop / ms / 1e6 / peak:.0%} of the GEMM rate")


if __name__ == "__main__":
    main()
