"""bf16 attention on Intel AMX tiles, for the packed bf16 CPU model (``PackedLayerBF16``), and the build and load
of the kernels' library (``int16.py`` shares it).

PyTorch's CPU flash attention runs bf16 through its generic GEMM call (its AMX packing is for fp16 only): ~94 ms
of a 223 ms forward on the 2-core Sapphire Rapids CPU. ``amx_attention.c`` does the same arithmetic on AMX tiles:
3.7-4.0 ms against 6.6-7.5 ms for SDPA on one 1214-token window, 12 heads, 2 threads.

The C file is compiled once per machine with the system's C compiler (~0.3 s) into the user cache
(``$XDG_CACHE_HOME/ast-cli/kernels``, named by a hash of the source and flags), written atomically, and loaded
with ctypes: no build step at install time, no torch headers. Anything missing means SDPA, as before: the CPU's
AMX-BF16 and AVX512-BF16 on Linux x86-64 (the kernel asks Linux for the tile state); a C compiler (``$CC``, else
``cc``, ``gcc``) that builds it; ``AST_AMX_ATTENTION`` not ``0``; agreement with float32 attention on a small case
(a miscompile never reaches a forward). A library is loaded only when this user owns it and its folders and
nobody else may write them: a shared object runs as the user, as this package's own code does.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import torch

from .names import ast_cache_dir, read_regular

SOURCE = "amx_attention.c"
ENV = "AST_AMX_ATTENTION"  # "0": never use the kernel
FLAGS = ("-O2", "-std=gnu11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni",
         "-mamx-tile", "-mamx-bf16", "-fPIC", "-shared", "-pthread")
CPU_FLAGS = {"amx_bf16", "amx_tile", "avx512_bf16", "avx512bw", "avx512f"}
HEAD_SIZE = 64  # the only head size the kernel handles (AST: 768 / 12)
COMPILE_SECONDS = 20  # gcc takes ~0.3 s; a compiler that hangs must not hold a run up for long
FAILURE_MEMORY = 24 * 3600  # seconds a failed build is remembered for its compiler (a full disk passes)
MAX_TOKENS = 1 << 20  # the C side refuses more (and a window never has this many)


class Unavailable(Exception):
    """Why the kernel is not used on this machine (``status()`` says it). ``expected``: the machine or the user
    rules it out (no AMX, the opt-out); otherwise a CPU that could run it cannot (no compiler, a failed build or
    self-test), and a warning says so, which ``ast`` shows with ``--debug``."""

    def __init__(self, reason: str, expected: bool = False):
        super().__init__(reason)
        self.expected = expected


class Broken(Unavailable):
    """The cached library itself does not work (does not load, lacks our symbols, fails its self-test)."""


def _cpu_flags() -> set[str]:
    from .speed import _cpuinfo_flags

    return _cpuinfo_flags()


def kernel_dir() -> Path:
    """``$XDG_CACHE_HOME/ast-cli/kernels`` (``ast_cache_dir``)."""
    return ast_cache_dir() / "kernels"


def _source() -> bytes:
    return resources.files("ast_cli.checkpoint").joinpath(SOURCE).read_bytes()


def _library_path(source: bytes) -> Path:
    digest = hashlib.sha256(source + "\0".join(FLAGS).encode()).hexdigest()[:16]
    return kernel_dir() / f"amx_attention-{digest}.so"


def _private(path: Path) -> bool:
    """Owned by this user and writable by nobody else."""
    try:
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _check_private(folder: Path) -> None:
    """The kernels folder and ``ast-cli`` above it must be ours alone: another user who could write either could
    swap the library between this check and the load."""
    for path in (folder, folder.parent):
        if not _private(path):
            raise Unavailable(f"{path} is not private (another user owns it or may write it): no kernel loaded")


def _compiler() -> list[str]:
    """The compiler's command: ``$CC`` (words, as make splits it: ``gcc -m64``), else ``cc``, else ``gcc``."""
    chosen = os.environ.get("CC", "").strip()
    if chosen:
        words = shlex.split(chosen)
        found = shutil.which(words[0])
        if not found:
            raise Unavailable(f"CC={chosen} is not a program")
        return [found, *words[1:]]
    for name in ("cc", "gcc"):
        found = shutil.which(name)
        if found:
            return [found]
    raise Unavailable("no C compiler (set CC, or install gcc)")


def _compiler_identity(command: list[str]) -> str:
    """What a remembered build failure is tied to: the compiler's command, size and modification time."""
    info = os.stat(command[0])
    return json.dumps([command, info.st_size, info.st_mtime_ns])


def _build(source: bytes, target: Path) -> None:
    """Compiles ``source`` into ``target``, atomically: a temporary folder beside it, then a rename (two processes
    building at once each rename a whole library). A failure is remembered beside it (``.failed``) for this
    compiler, so that a compiler that fails or hangs costs one run, not every run."""
    command = _compiler()
    target.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    target.parent.mkdir(exist_ok=True, mode=0o700)
    _check_private(target.parent)
    failed, identity = target.with_suffix(".failed"), _compiler_identity(command)
    try:
        remembered = json.loads(read_regular(failed, 1 << 16))  # a line of JSON; a FIFO, a device: no memory
    except (OSError, ValueError):
        remembered = None
    at = remembered.get("at") if isinstance(remembered, dict) else None
    if (isinstance(remembered, dict) and remembered.get("compiler") == identity and isinstance(at, (int, float))
            and 0 <= time.time() - at < FAILURE_MEMORY):
        raise Unavailable(f"{remembered.get('reason')} (an earlier run; {failed.name} in {failed.parent})")
    _remove_stale_builds(target.parent)
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as work:
        src, out = Path(work) / SOURCE, Path(work) / target.name
        src.write_bytes(source)
        reason = _compile([*command, *FLAGS, "-o", str(out), str(src)], work)
        if reason is not None:
            _write_private(failed, json.dumps({"compiler": identity, "reason": reason, "at": time.time()}))
            raise Unavailable(reason)
        os.chmod(out, 0o700)
        with open(out, "rb") as handle:  # on disk before its name: a crash never leaves a partial library there
            os.fsync(handle.fileno())
        os.replace(out, target)
    failed.unlink(missing_ok=True)


def _compile(command: list[str], work: str) -> str | None:
    """Runs the compiler in a session of its own (a timeout kills everything it started); None, or why it failed.
    Its messages name the build folder: the reason says the compiler's last line with that folder left out, so
    that it reads the same every time (``--fast``'s cache key must not change with it)."""
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        return f"{os.path.basename(command[0])} failed to start: {exc.strerror}"
    try:
        _, err = proc.communicate(timeout=COMPILE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"{os.path.basename(command[0])} took over {COMPILE_SECONDS} s"
    except BaseException:  # Ctrl-C, a signal: the compiler and what it started go too, not on in the background
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode == 0:
        return None
    last = (err.strip().splitlines() or ["no message"])[-1].replace(work + os.sep, "")
    return f"{os.path.basename(command[0])} could not build {SOURCE}: {last[:200]}"


def _write_private(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def _remove_stale_builds(folder: Path) -> None:
    """Build folders an hour old: left by a process killed while it compiled."""
    for stale in folder.glob("build-*"):
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale)
        except OSError:
            pass


def check_machine(env: str, cpu_flags: set[str]) -> None:
    """Unavailable (expected) where the user opted out with ``env``, or this is not Linux on x86-64, or the CPU
    lacks one of ``cpu_flags``."""
    if os.environ.get(env, "").strip().lower() in ("0", "false", "no", "off"):
        raise Unavailable(f"{env}=0", expected=True)
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise Unavailable("not Linux on x86-64", expected=True)
    missing = cpu_flags - _cpu_flags()
    if missing:
        raise Unavailable(f"the CPU lacks {', '.join(sorted(missing))}", expected=True)


def _load() -> ctypes.CDLL:
    check_machine(ENV, CPU_FLAGS)
    return load_built(_open)


def load_built(opener: Callable[[Path], ctypes.CDLL]) -> ctypes.CDLL:
    """The kernels' library, built first where it is not in the cache, and opened with ``opener`` (which sets up
    and self-tests what it needs; ``int16.py`` shares the library). A broken library is removed."""
    source = _source()
    path = _library_path(source)
    if path.exists():
        _check_private(path.parent)
        if _private(path) and not _whole_elf(path):  # ours, cut short or not ELF: built again, never opened
            path.unlink()
    if not path.exists():
        _build(source, path)
    _check_private(path.parent)
    if not _private(path):
        raise Unavailable(f"{path} is not private (another user owns it or may write it): not loaded")
    try:
        return opener(path)
    except (Broken, AttributeError) as exc:
        # Ours, and broken (truncated, not our code, failing its self-test): removed, so that the next process
        # builds it again. Not rebuilt in this one: the loader would hand back the broken library by its name.
        path.unlink(missing_ok=True)
        raise Unavailable(f"{path.name} did not work and was removed (the next run builds it again): {exc}") from None


def _whole_elf(path: Path) -> bool:
    """A 64-bit little-endian ELF file as long as its header says (the section headers, written last, end in it):
    dlopen of a library cut short (an interrupted copy of ~/.cache) kills the process with SIGBUS."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(64)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return False
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
        return False
    shoff, = struct.unpack_from("<Q", header, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
    return shoff + shentsize * shnum <= size


def open_library(path: Path, *entry: str) -> ctypes.CDLL:
    """The kernels' library with its ``entry`` points, put on PyTorch's OpenMP threads (both kernels' first step)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise Broken(f"cannot load it: {exc}") from None
    for name in entry:  # not our library: AttributeError, then removed (load_built)
        getattr(lib, name).restype = ctypes.c_int
    lib.ast_amx_use_openmp.restype, lib.ast_amx_use_openmp.argtypes = None, [ctypes.c_void_p]
    parallel = _openmp_parallel()
    if parallel is None:
        raise Unavailable("PyTorch's OpenMP runtime was not found in this process")
    lib.ast_amx_use_openmp(parallel)
    return lib


def _open(path: Path) -> ctypes.CDLL:
    lib = open_library(path, "ast_amx_init", "ast_amx_attention")
    lib.ast_amx_attention.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_float,
                                                                                                   ctypes.c_int]
    if lib.ast_amx_init() != 0:
        raise Unavailable("Linux refused the AMX tile state (arch_prctl)")
    _self_test(lib)
    return lib


OPENMP_NAMES = ("libgomp", "libiomp5", "libomp")  # GNU, Intel, LLVM: each has the GNU entry point GOMP_parallel


def _openmp_parallel() -> int | None:
    """The address of ``GOMP_parallel`` in the OpenMP runtime PyTorch runs on (found among this process's mapped
    files, opened RTLD_NOLOAD: never a second copy), so that the kernel runs on PyTorch's own threads. Threads of
    our own competed with them (they spin after each GEMM): 212 ms per forward against 202 with SDPA."""
    if torch.__config__.parallel_info().find("parallel backend: OpenMP") < 0:
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    except OSError:
        return None
    home = os.path.dirname(torch.__file__) + os.sep  # torch's own runtime first (faiss, say, may bring another)
    for path in sorted(paths, key=lambda p: (not p.startswith(home), p)):
        if os.path.basename(path).startswith(OPENMP_NAMES) and ".so" in os.path.basename(path):
            try:
                runtime = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
                return ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value
            except (OSError, AttributeError):
                continue
    return None


def _call(lib: ctypes.CDLL, qkv: torch.Tensor, heads: int, queries: int, scale: float, threads: int) -> torch.Tensor:
    windows, tokens, _ = qkv.shape
    out = torch.empty(windows, queries, heads * HEAD_SIZE, dtype=torch.bfloat16)
    status = lib.ast_amx_attention(qkv.data_ptr(), out.data_ptr(), windows, tokens, heads, queries, scale, threads)
    if status != 0:
        raise RuntimeError(f"AMX attention failed (status {status})")
    return out


def _reference(qkv: torch.Tensor, heads: int, queries: int, scale: float) -> torch.Tensor:
    """float32 attention of the same inputs, (B, queries, heads * 64)."""
    windows, tokens, _ = qkv.shape
    q, k, v = qkv.float().view(windows, tokens, 3, heads, HEAD_SIZE).permute(2, 0, 3, 1, 4).unbind(0)
    probs = torch.softmax(q[:, :, :queries] @ k.transpose(-1, -2) * scale, dim=-1)
    return (probs @ v).transpose(1, 2).reshape(windows, queries, -1)


def _self_test(lib: ctypes.CDLL) -> None:
    """A small case against float32 (two windows, a partial block of keys and of queries, torch's threads): within
    the bf16 roundings (inputs, P, output: a few 2^-8 relative), or the kernel is not used."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        qkv = torch.randn(2, 45, 3 * 3 * HEAD_SIZE, generator=generator).to(torch.bfloat16)
        try:
            got = _call(lib, qkv, 3, 37, 0.125, torch.get_num_threads()).float()
        except RuntimeError as exc:
            raise Broken(f"self-test failed: {exc}") from None
        want = _reference(qkv, 3, 37, 0.125)
    error = (got - want).abs().max().item()
    if not error <= 0.02:  # also NaN
        raise Broken(f"self-test failed (max error {error:.3g})")


_LOCK = threading.RLock()  # one build and load per process, whichever thread and kernel asks first
_UNSET = object()


class Slot:
    """One kernel's state in this process (here and in ``int16.py``): loaded once, what ``status()`` says, the
    warning owed where the CPU could have run it (at the first forward that falls back), ``turned_off()``."""

    def __init__(self, load: Callable[[], ctypes.CDLL], ready: str, unavailable: str, owed: str):
        self._load, self.ready, self.unavailable, self.owed_text = load, ready, unavailable, owed
        self.said: list[str] = []
        self.owed: list[str] = []
        self.off: list[bool] = []  # non-empty inside ``turned_off()``
        self._lib: object = _UNSET

    def library(self) -> ctypes.CDLL | None:
        with _LOCK:
            if self._lib is _UNSET:
                self._lib = self._find()
            return self._lib  # type: ignore[return-value]

    def _find(self) -> ctypes.CDLL | None:
        try:
            lib = self._load()
        except Exception as exc:  # an optimization: whatever goes wrong (a cache folder that is a file, a library
            # without our symbols, one that fails its self-test), SDPA runs, as without the kernel
            if not isinstance(exc, Unavailable):
                exc = Unavailable(f"{type(exc).__name__}: {exc}")
            self.said.append(self.unavailable.format(exc))
            if not exc.expected:
                self.owed.append(self.owed_text.format(exc))
            return None
        self.said.append(self.ready)
        return lib

    def forget(self) -> None:
        """The next ``library()`` builds and loads afresh (tests)."""
        with _LOCK:
            self._lib = _UNSET
            self.owed.clear()

    def status(self, library: Callable[[], object]) -> str:
        library()
        return self.said[-1]

    @contextmanager
    def turned_off(self) -> Iterator[None]:
        self.off.append(True)
        try:
            yield
        finally:
            self.off.pop()

    def fell_back(self) -> None:
        """A forward runs SDPA: the owed warning, once, unless the kernel was turned off on purpose."""
        if self.owed and not self.off:
            warnings.warn(self.owed.pop(), RuntimeWarning, stacklevel=3)  # the layer whose forward fell back


_SLOT = Slot(lambda: _load(), "AMX kernel", "SDPA (AMX attention unavailable: {})",
             "bf16 attention runs on PyTorch's SDPA, not the AMX kernel: {}")


def _library() -> ctypes.CDLL | None:
    return _SLOT.library()


_library.cache_clear = _SLOT.forget  # type: ignore[attr-defined]


def available() -> bool:
    """Whether this process uses the kernel (the first call compiles or loads it)."""
    return _library() is not None


def status() -> str:
    """What runs bf16 attention on the CPU here, and why: 'AMX kernel' or 'SDPA (AMX attention unavailable: ...)'."""
    return _SLOT.status(lambda: _library())


def describe(head_size: int) -> str:
    """``status()`` for a model with this head size (the kernel handles 64 only)."""
    return status() if head_size == HEAD_SIZE else f"SDPA (the AMX kernel handles head size {HEAD_SIZE} only)"


def turned_off():
    """SDPA in place of the kernel inside the block (benchmarks and tests compare the two in one process)."""
    return _SLOT.turned_off()


def attention(qkv: torch.Tensor, heads: int, queries: int, scale: float) -> torch.Tensor | None:
    """softmax(Q K^T scale) V for a fused projection's output ``qkv`` (B, N, 3 * heads * 64) bf16 on the CPU ->
    (B, queries, heads * 64) bf16, the first ``queries`` tokens attending to all N. None where the kernel does not
    apply (no kernel here, another dtype, device or head size, a scale outside (0, 1], or a gradient to track):
    the caller runs SDPA."""
    windows, tokens, width = qkv.shape
    if (qkv.dtype != torch.bfloat16 or qkv.device.type != "cpu" or width != 3 * heads * HEAD_SIZE
            or not 0 < queries <= tokens <= MAX_TOKENS or not 0 < scale <= 1 or qkv.requires_grad):
        return None
    lib = None if _SLOT.off else _library()
    if lib is None:
        _SLOT.fell_back()
        return None
    try:
        return _call(lib, qkv.contiguous(), heads, queries, scale, torch.get_num_threads())
    except RuntimeError as exc:  # out of memory for its buffers, no thread: this call runs on SDPA
        warnings.warn(f"bf16 attention falls back to SDPA for one call: {exc}", RuntimeWarning, stacklevel=2)
        return None


__all__ = ["ENV", "attention", "available", "describe", "kernel_dir", "status", "turned_off"]
