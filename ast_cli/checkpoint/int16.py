"""float32 attention on int16 dot products (AVX512-VNNI), for int8 models: ``--quantize int8`` and ``--fast``'s
int8 candidates.

An int8 model runs its Linear layers on int8 GEMMs; attention stayed float32 SDPA, 40% of its forward on a CPU
without AMX (197 of 490 ms on the 2-core Sapphire Rapids CPU with AMX refused, ``benchmarks/without_amx.py``).
bf16 does not help there: without AMX, bf16 SDPA took 25 ms of one 1214-token window's 12 heads against 17-19 ms
for float32 (vdpbf16ps runs at half the rate of float32 FMAs on that CPU). AVX512-VNNI's vpdpwssd does 32
int16 multiply-adds an instruction at the rate of 16-wide float32 FMAs: ``ast_int16_attention`` in
``amx_attention.c`` rounds each query and key to int16 with a scale of its own, the values with one per
channel, and the softmax weights to 15 bits per block of 32 keys, then sums in int32 (see there for the bounds
that keep it from overflowing). One window: 11 ms against 17.5-19 ms for SDPA, 2 threads. Its error against
float64 attention is 5-10x smaller than bf16 SDPA's (2.2e-4 against 1.6e-3 at most on unit-variance inputs,
1214 tokens), also for a row of many small weights behind one large one: small beside int8's own (the model's
scores move ~0.015 with int8 Linear layers).

It builds and loads with the AMX kernel's machinery (``amx.py``: the same library, the same cache, the same
checks), on any Linux x86-64 CPU with AVX512-F/BW/DQ/VL and VNNI (its code runs no AMX or bf16 instruction).
Where anything is missing, or ``AST_INT16_ATTENTION=0``, or an input is not finite or too extreme for its
scales, the int8 model runs float32 SDPA as before.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch

from . import amx

ENV = "AST_INT16_ATTENTION"  # "0": never use the kernel
CPU_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}  # the library is built with all of them
HEAD_SIZE = amx.HEAD_SIZE
SELF_TEST_ERROR = 2e-3  # unit-variance inputs: the kernel's error is ~1e-4, a broken one's ~1


def _open(path: Path) -> ctypes.CDLL:
    lib = amx.open_library(path, "ast_int16_attention")
    lib.ast_int16_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int]
    _self_test(lib)
    return lib


def _call(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
          threads: int) -> torch.Tensor | None:
    """None where the kernel refused the call (an input not finite, or too extreme for its scales)."""
    windows, tokens, width = k.shape
    out = torch.empty(windows, q.shape[1], width)
    status = lib.ast_int16_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), windows, tokens,
                                     heads, q.shape[1], scale, threads)
    if status == 2:  # AST_AMX_BAD_ARGS: the shapes were checked here, so an input not finite or too extreme
        return None
    if status != 0:
        raise RuntimeError(f"int16 attention failed (status {status})")
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """float64 attention of (B, Q, D), (B, N, D), (B, N, D) -> (B, Q, D) float32."""
    def split(t):
        return t.double().view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) * scale, dim=-1)
    return (probs @ split(v)).transpose(1, 2).reshape(q.shape).float()


def _self_test(lib: ctypes.CDLL) -> None:
    """Two windows, a partial block of keys and of queries, against float64."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3 * HEAD_SIZE, generator=generator) for n in (37, 45, 45))
    try:
        got = _call(lib, q, k, v, 3, 0.125, torch.get_num_threads())
    except RuntimeError as exc:
        raise amx.Broken(f"self-test failed: {exc}") from None
    error = float("nan") if got is None else (got - reference(q, k, v, 3, 0.125)).abs().max().item()
    if not error <= SELF_TEST_ERROR:  # also NaN
        raise amx.Broken(f"self-test failed (max error {error:.3g})")


def _load() -> ctypes.CDLL:
    amx.check_machine(ENV, CPU_FLAGS)
    return amx.load_built(_open)


_SLOT = amx.Slot(lambda: _load(), "int16 kernel (AVX512-VNNI)", "SDPA (int16 attention unavailable: {})",
                 "int8 models' attention runs on float32 SDPA, not the int16 kernel: {}")


def _library() -> ctypes.CDLL | None:
    return _SLOT.library()


_forget = _SLOT.forget


def available() -> bool:
    return _library() is not None


def status() -> str:
    """What runs an int8 model's attention on the CPU: 'int16 kernel (AVX512-VNNI)' or 'SDPA (... why)'."""
    return _SLOT.status(lambda: _library())


def describe(head_size: int) -> str:
    return status() if head_size == HEAD_SIZE else f"SDPA (the int16 kernel handles head size {HEAD_SIZE} only)"


def turned_off():
    """float32 SDPA in place of the kernel inside the block (benchmarks and tests compare the two)."""
    return _SLOT.turned_off()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor | None:
    """softmax(Q K^T scale) V for float32 CPU ``q`` (B, Q, heads * 64), ``k`` and ``v`` (B, N, heads * 64), the Q
    queries being the first Q tokens' -> (B, Q, heads * 64) float32. None where the kernel does not apply (not
    here, another dtype, device or head size, a gradient to track, a scale outside (0, 1], an input that is not
    finite): the caller runs SDPA."""
    if q.dim() != 3 or k.dim() != 3:
        return None
    windows, tokens, width = k.shape
    if (any(t.dtype != torch.float32 or t.device.type != "cpu" or t.requires_grad for t in (q, k, v))
            or width != heads * HEAD_SIZE or v.shape != k.shape or q.shape[0] != windows or q.shape[2] != width
            or not 0 < q.shape[1] <= tokens <= amx.MAX_TOKENS or not 0 < scale <= 1):
        return None
    lib = None if _SLOT.off else _library()
    if lib is None:
        _SLOT.fell_back()
        return None
    try:
        return _call(lib, q.contiguous(), k.contiguous(), v.contiguous(), heads, scale, torch.get_num_threads())
    except RuntimeError as exc:
        warnings.warn(f"int8 attention falls back to float32 SDPA for one call: {exc}", RuntimeWarning, stacklevel=2)
        return None


__all__ = ["ENV", "attention", "available", "describe", "status", "turned_off"]
