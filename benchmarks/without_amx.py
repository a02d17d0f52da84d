"""Run a command as it would run on a CPU without AMX: Linux refuses AMX's tile state to it and to every process
it starts. Linux on x86-64 hands the tile state out only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``); a seccomp filter answers that request with EPERM, so oneDNN, PyTorch's CPU GEMMs and
ast-cli's AMX attention kernel all see a CPU they cannot use AMX on, and take their AVX-512 paths.

Why not ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``: it caps oneDNN's primitives only. PyTorch's bf16 SDPA (its GEMM
calls) kept using AMX under it on the Sapphire Rapids CPU: bf16 attention of one 1214-token window took 8.0 ms
under the cap (7.5 ms uncapped) and 25 ms here, against 17-19 ms for float32. On a CPU with AVX512-BF16 and
AVX512-VNNI, this is the stand-in for one without AMX (Cooper Lake, Zen 4) that this machine can give.

    python benchmarks/without_amx.py python benchmarks/compare_transformers.py --process ...
    python benchmarks/without_amx.py ast benchmark --random-weights ...

Linux x86-64 only. What remains different from such a CPU: the clock, the caches, and the CPU flags a program
reads (``/proc/cpuinfo`` still lists amx_*; ast-cli then says the AMX kernel is unavailable because Linux refused
the tile state, and calibrates ``--fast`` without it).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

ARCH_PRCTL = 158  # x86-64 syscall number
ARCH_REQ_XCOMP_PERM = 0x1023
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, EPERM = 0x7FFF0000, 0x00050000, 1
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
AUDIT_ARCH_X86_64 = 0xC000003E


def refuse_amx() -> None:
    """This process and its children get EPERM for ARCH_REQ_XCOMP_PERM; every other system call is untouched."""
    program = [
        (BPF_LD_W_ABS, 0, 0, 4),                      # the caller's architecture
        (BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),         # x86-64: go on; else allow
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (BPF_LD_W_ABS, 0, 0, 0),                      # the system call's number
        (BPF_JEQ_K, 0, 3, ARCH_PRCTL),                # arch_prctl: go on; else allow
        (BPF_LD_W_ABS, 0, 0, 16),                     # its first argument (low 32 bits)
        (BPF_JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),       # a request for more state: refuse; else allow
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(program), ctypes.addressof(code)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} COMMAND [ARG...]")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        sys.exit("Linux on x86-64 only")
    refuse_amx()
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
