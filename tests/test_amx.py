"""Issue 26: bf16 attention on AMX tiles (``ast_cli/checkpoint/amx.py`` and ``amx_attention.c``).

The kernel's tests run where this CPU has AMX-BF16 and a C compiler builds it; elsewhere they skip and say why.
The tests of what happens without it (no compiler, a CPU without AMX, a cached library others may write, a
damaged one, the opt-out) run everywhere: none of them loads a library that could run AMX code.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat

import pytest
import torch
import torch.nn.functional as F

from ast_cli.checkpoint import amx
from ast_cli.checkpoint.model import ASTConfig
from ast_cli.checkpoint.speed import PackedLayerBF16, _bf16_packing_works, place_bf16_cpu
from ast_cli.tasks.benchmark import random_model

# A model small enough for the quick loop whose heads have the kernel's size, 64: 62 tokens, two heads.
HEAD64 = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, max_length=64,
              num_mel_bins=128, frequency_stride=10, time_stride=10)


def needs_kernel():
    if not amx.available():
        pytest.skip(f"bf16 attention here: {amx.status()}")


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A kernel cache of this test's own, and a CPU that claims AMX: for the tests of what is refused before any
    library runs (safe on any CPU: nothing they reach loads a working library)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(amx, "_cpu_flags", lambda: set(amx.CPU_FLAGS))
    monkeypatch.setattr(amx.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(amx.sys, "platform", "linux")
    monkeypatch.delenv(amx.ENV, raising=False)
    return amx.kernel_dir()


def sdpa(qkv: torch.Tensor, heads: int, queries: int, scale: float) -> torch.Tensor:
    windows, tokens, _ = qkv.shape
    q, k, v = qkv.view(windows, tokens, 3, heads, 64).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q[:, :, :queries], k, v, scale=scale)
    return out.transpose(1, 2).reshape(windows, queries, -1)


# -- the kernel ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("windows,tokens,heads,queries", [
    (1, 1, 1, 1), (1, 15, 2, 15), (2, 16, 3, 7), (1, 17, 1, 17), (3, 33, 2, 33), (1, 100, 4, 2),
    (1, 1214, 12, 1214), (2, 1214, 12, 2)])
@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_26_12_amx_attention_is_as_close_to_float32_as_sdpa(windows, tokens, heads, queries, spread):
    """Against float32 attention of the same bf16 inputs, the kernel's error is SDPA's (the same bf16 roundings:
    P before P V, the output), at every size a tile leaves partly empty: one token, 15-17 and 33 keys, a partial
    block of queries, the two queries of the last layer, a full 10.24 s window; wide scores (spread 4) too."""
    needs_kernel()
    generator = torch.Generator().manual_seed(tokens * 31 + heads)
    with torch.inference_mode():
        qkv = (torch.randn(windows, tokens, 3 * heads * 64, generator=generator) * spread).bfloat16()
        want = amx._reference(qkv, heads, queries, 0.125)
        got = amx.attention(qkv, heads, queries, 0.125)
        theirs = sdpa(qkv, heads, queries, 0.125).float()
    assert got is not None and got.shape == (windows, queries, heads * 64) and got.dtype == torch.bfloat16
    ours, reference = (got.float() - want).abs(), (theirs - want).abs()
    assert ours.max() <= 1.1 * reference.max() + 1e-6, (ours.max(), reference.max())
    assert ours.mean() <= 1.1 * reference.mean() + 1e-6, (ours.mean(), reference.mean())


def test_26_12_a_window_s_attention_depends_on_that_window_alone():
    """Bit for bit the same whatever the batch around a window, and whatever the threads: a resumed run, a batch
    of another size or ``--threads`` never changes a window's scores. Also on the kernel's own threads (the
    fallback where PyTorch's OpenMP runtime is not found) as on PyTorch's."""
    needs_kernel()
    generator = torch.Generator().manual_seed(1)
    lib = amx._library()
    with torch.inference_mode():
        qkv = torch.randn(3, 300, 3 * 4 * 64, generator=generator).bfloat16()
        batch = amx._call(lib, qkv, 4, 300, 0.125, 2)
        alone = torch.cat([amx._call(lib, window.contiguous(), 4, 300, 0.125, 2) for window in qkv.split(1)])
        one_thread = amx._call(lib, qkv, 4, 300, 0.125, 1)
        many = amx._call(lib, qkv, 4, 300, 0.125, 7)
        lib.ast_amx_use_openmp(None)
        try:
            own_threads = amx._call(lib, qkv, 4, 300, 0.125, 2)
        finally:
            lib.ast_amx_use_openmp(amx._openmp_parallel())
    for other in (alone, one_thread, many, own_threads):
        assert torch.equal(batch, other)


def test_26_12_the_kernel_runs_on_pytorch_s_threads():
    """Threads of the kernel's own competed with PyTorch's OpenMP threads, which spin after each GEMM: the forward
    was slower than with SDPA (212 against 202 ms on the 2-core Sapphire Rapids CPU). The kernel finds the
    runtime PyTorch uses in this process."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch does not run on OpenMP")
    address = amx._openmp_parallel()
    assert isinstance(address, int) and address > 0
    with open("/proc/self/maps", encoding="utf-8") as maps:  # PyTorch's own runtime where it ships one
        own = sorted({line.split()[-1] for line in maps if os.path.dirname(torch.__file__) in line
                      and os.path.basename(line.split()[-1]).startswith(amx.OPENMP_NAMES)})
    if own:
        runtime = ctypes.CDLL(own[0], mode=os.RTLD_NOLOAD)
        assert address == ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value


@pytest.mark.skipif(not _bf16_packing_works(), reason="this torch has no oneDNN bf16 linear to pack")
def test_26_12_the_packed_bf16_model_attends_with_the_kernel(monkeypatch):
    """``--dtype bf16`` and ``--fast``'s bf16 (``place_bf16_cpu``) run every layer's attention on the kernel (the
    last layer's two queries too), with the scores SDPA gives within bf16's rounding; eager attention stays the
    reference's matmul-softmax."""
    needs_kernel()
    torch.manual_seed(0)
    model = place_bf16_cpu(random_model(ASTConfig(**HEAD64, id2label=("a", "b", "c"))))
    assert all(isinstance(layer, PackedLayerBF16) for layer in model.audio_spectrogram_transformer.encoder.layer)
    calls, call = [], amx._call
    monkeypatch.setattr(amx, "_call", lambda lib, qkv, heads, queries, *rest: calls.append(queries)
                        or call(lib, qkv, heads, queries, *rest))
    inputs = torch.randn(2, model.config.max_length, model.config.num_mel_bins).bfloat16()
    with torch.inference_mode():
        kernel = model(inputs).float()
        # every token's queries in the first layer; the pooled two in the last, which runs a window at a time
        assert calls == [62, 2, 2]
        with amx.turned_off():
            plain = model(inputs).float()
        eager = model(inputs, attn="eager")
    assert len(calls) == 3  # neither SDPA's run nor eager's reached the kernel
    assert not torch.equal(kernel, plain)  # another implementation ...
    assert (torch.sigmoid(kernel) - torch.sigmoid(plain)).abs().max() < 0.02  # ... of the same attention
    assert eager.shape == kernel.shape


def test_26_12_the_kernel_is_not_asked_for_what_it_does_not_do(monkeypatch):
    """Another head size, dtype or device, a scale outside (0, 1], or a gradient to track: SDPA (None), without
    loading anything."""
    monkeypatch.setattr(amx, "_library", lambda: pytest.fail("the kernel was looked up"))
    bf16 = torch.zeros(1, 4, 3 * 2 * 64, dtype=torch.bfloat16)
    assert amx.attention(torch.zeros(1, 4, 3 * 2 * 32, dtype=torch.bfloat16), 2, 4, 0.1) is None  # head size 32
    assert amx.attention(bf16.float(), 2, 4, 0.125) is None
    assert amx.attention(bf16.requires_grad_(), 2, 4, 0.125) is None
    assert amx.attention(torch.zeros(1, 4, 3 * 2 * 64, dtype=torch.bfloat16), 2, 5, 0.125) is None  # 5 > 4 tokens
    for scale in (0.0, -0.125, 1e9, float("nan")):  # the softmax's maximum and padding assume 0 < scale <= 1
        assert amx.attention(torch.zeros(1, 4, 3 * 2 * 64, dtype=torch.bfloat16), 2, 4, scale) is None
    assert amx.describe(32) == "SDPA (the AMX kernel handles head size 64 only)"


# -- building, caching, refusing --------------------------------------------------------------------------------


def test_26_12_the_opt_out_and_a_cpu_without_amx_mean_sdpa(kernel_cache, monkeypatch):
    monkeypatch.setenv(amx.ENV, "0")
    with pytest.raises(amx.Unavailable, match="AST_AMX_ATTENTION=0"):
        amx._load()
    monkeypatch.delenv(amx.ENV)
    monkeypatch.setattr(amx, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_bf16"})
    with pytest.raises(amx.Unavailable, match="the CPU lacks amx_bf16, amx_tile"):
        amx._load()
    assert not kernel_cache.exists()  # nothing was built


def test_26_12_no_compiler_means_sdpa(kernel_cache, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(amx.shutil, "which", lambda name: None)
    with pytest.raises(amx.Unavailable, match="no C compiler"):
        amx._load()
    assert not any(kernel_cache.glob("*.so"))


def test_26_12_the_library_is_built_once_atomically_and_privately(kernel_cache, monkeypatch):
    """Built into the user cache under a name that hashes the source and flags, readable by this user only; no
    build folder is left; a build that fails leaves nothing, and says the compiler's last line."""
    if shutil.which(os.environ.get("CC") or "cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    source = amx._source()
    target = amx._library_path(source)
    try:
        amx._build(source, target)
    except amx.Unavailable as exc:  # a compiler too old for the AMX flags (gcc < 11)
        pytest.skip(str(exc))
    assert target.parent == kernel_cache and target.exists()
    assert [p.name for p in kernel_cache.iterdir()] == [target.name]
    assert stat.S_IMODE(target.stat().st_mode) == 0o700 and stat.S_IMODE(kernel_cache.stat().st_mode) == 0o700
    other = amx._library_path(source + b"\n")
    with pytest.raises(amx.Unavailable, match="could not build amx_attention.c: amx_attention.c:1:[0-9]+: error"):
        amx._build(b"this is not C", other)  # the message names no build folder: it reads the same every run
    assert sorted(p.name for p in kernel_cache.iterdir()) == sorted([target.name, other.stem + ".failed"])
    with pytest.raises(amx.Unavailable, match=r"\(an earlier run; "):  # remembered for this compiler: not rerun
        amx._build(b"this is not C", other)


@pytest.mark.parametrize("damage", ["others may write it", "others may write its folder",
                                    "others may write the folder above", "not a library"])
def test_26_12_a_cached_library_is_loaded_only_if_sound_and_private(kernel_cache, damage, monkeypatch):
    """A shared object runs as the user: one that another user may have replaced is never loaded, nor touched;
    one of ours cut short is removed before dlopen (which dies of SIGBUS on it) and built again."""
    target = amx._library_path(amx._source())
    kernel_cache.mkdir(parents=True, mode=0o700)
    target.write_bytes(b"\x7fELF truncated")
    target.chmod(0o600)
    if damage == "others may write it":
        target.chmod(0o622)
    elif damage == "others may write its folder":
        kernel_cache.chmod(0o777)
    elif damage == "others may write the folder above":  # who may write ast-cli/ may swap kernels/ itself
        kernel_cache.parent.chmod(0o777)
    builds = []
    monkeypatch.setattr(amx, "_build", lambda source, path: builds.append(path) or (_ for _ in ()).throw(
        amx.Unavailable("no compiler in this test")))  # never a working library on a CPU that may lack AMX
    message = "no compiler in this test" if damage == "not a library" else "is not private"
    with pytest.raises(amx.Unavailable, match=message):
        amx._load()
    if damage == "not a library":  # ours and cut short: removed before any dlopen, and built again in this run
        assert not target.exists() and builds == [target]
    else:  # not ours to touch
        assert target.read_bytes() == b"\x7fELF truncated" and not builds


def test_26_12_status_says_what_runs_bf16_attention():
    said = amx.status()
    assert said == "AMX kernel" or said.startswith("SDPA (AMX attention unavailable: ")
    assert amx.available() == (said == "AMX kernel")


def test_26_12_an_amx_cpu_with_a_compiler_uses_the_kernel():
    """Where everything the kernel needs is here, a kernel that fails its self-test (or does not build) is a
    failure, not a quiet fall back to SDPA that would skip the tests above."""
    missing = amx.CPU_FLAGS - amx._cpu_flags()
    if missing or amx.sys.platform != "linux":
        pytest.skip(f"the CPU lacks {', '.join(sorted(missing))}" if missing else "not Linux")
    if shutil.which(os.environ.get("CC") or "cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    if os.environ.get(amx.ENV, "").strip() == "0":
        pytest.skip(f"{amx.ENV}=0")
    assert amx.available(), amx.status()


@pytest.mark.parametrize("expected", [False, True])
def test_26_12_a_cpu_that_could_run_the_kernel_but_does_not_warns(monkeypatch, expected):
    """No compiler, a failed build or self-test on an AMX CPU: a RuntimeWarning at the first forward, inside the
    run (``ast`` shows it with ``--debug``; before, ``--fast``'s cache key looked the kernel up outside the run,
    and the warning reached users without it); a CPU without AMX or the opt-out: nothing to warn about."""
    import warnings

    def refuse():
        raise amx.Unavailable("no C compiler (set CC, or install gcc)", expected=expected)

    monkeypatch.setattr(amx, "_load", refuse)
    amx._library.cache_clear()
    qkv = torch.zeros(1, 4, 3 * 2 * 64, dtype=torch.bfloat16)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert amx.status() == "SDPA (AMX attention unavailable: no C compiler (set CC, or install gcc))"
            assert caught == []  # status, describe, --fast's cache key: never a warning (not inside a run)
            assert amx.attention(qkv, 2, 4, 0.125) is None and amx.attention(qkv, 2, 4, 0.125) is None
        assert [str(w.message) for w in caught] == ([] if expected else [  # once, at the first forward
            "bf16 attention runs on PyTorch's SDPA, not the AMX kernel: no C compiler (set CC, or install gcc)"])
    finally:
        amx._library.cache_clear()  # the next test loads the real kernel again


FAKES = {  # libraries that load but are not the kernel: C source of each
    "without our symbols": "int unrelated = 1;\n",
    "failing every call": ("int ast_amx_init(void) { return 0; }\nvoid ast_amx_use_openmp(void *p) { (void)p; }\n"
                           "int ast_amx_attention(const void *a, void *b, int c, int d, int e, int f, float g, int h)"
                           " { return 3; }\n"),
}


def _compile_fake(source: str, target) -> None:
    import subprocess

    compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler here")
    src = target.parent / "fake.c"
    src.write_text(source)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(target), str(src)], check=True, capture_output=True)
    src.unlink()
    target.chmod(0o700)


@pytest.mark.parametrize("case", ["cache folder is a file", *FAKES])
def test_26_12_whatever_goes_wrong_with_the_kernel_sdpa_runs(kernel_cache, tmp_path, monkeypatch, case):
    """Found by a hostile run: a cache folder that is a file (NotADirectoryError), a cached library without our
    symbols (AttributeError) or one whose calls fail (its self-test raised RuntimeError) failed every file of a
    bf16 run. Now each means SDPA, with the reason in ``status()`` and a warning (``--debug``)."""
    import warnings

    if case == "cache folder is a file":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
        expected = "NotADirectoryError"
    else:
        kernel_cache.mkdir(parents=True, mode=0o700)
        _compile_fake(FAKES[case], amx._library_path(amx._source()))
        expected = "undefined symbol: ast_amx_init" if case == "without our symbols" else "failed (status 3)"
    amx._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert amx.attention(torch.zeros(1, 4, 3 * 2 * 64, dtype=torch.bfloat16), 2, 4, 0.125) is None
        assert expected in amx.status() and len(caught) == 1, amx.status()
        assert not amx._library_path(amx._source()).exists()  # a broken library of ours is removed
    finally:
        amx._library.cache_clear()


def test_26_12_a_call_that_fails_runs_on_sdpa(monkeypatch):
    """The kernel out of memory for its buffers (status 3) in the middle of a run: that call returns None, the
    layer runs SDPA, and the run goes on."""
    import warnings

    class Failing:
        @staticmethod
        def ast_amx_attention(*args):
            return 3

    monkeypatch.setattr(amx, "_library", lambda: Failing())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert amx.attention(torch.zeros(1, 4, 3 * 2 * 64, dtype=torch.bfloat16), 2, 4, 0.125) is None
    assert [str(w.message) for w in caught] == [
        "bf16 attention falls back to SDPA for one call: AMX attention failed (status 3)"]


@pytest.mark.slow
def test_26_12_ast_classify_builds_the_kernel_once_and_says_why_not_only_with_debug(tmp_path):
    """Whole processes on an AMX CPU: the first bf16 run builds the kernel into the cache and the next reuses it,
    silently; with a compiler that fails, bf16 still runs (SDPA), silently, and ``--debug`` says why."""
    import json
    import subprocess
    import sys

    from conftest import make_reference, write_audio

    missing = amx.CPU_FLAGS - amx._cpu_flags()
    if missing or shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip(f"the CPU lacks {', '.join(sorted(missing))}" if missing else "no C compiler here")
    model = make_reference(tmp_path, "tiny-head64", hidden_size=128, num_attention_heads=2,
                           intermediate_size=256)[0]
    clip = write_audio(tmp_path / "a.wav", 2.0)

    def classify(cache: str, *extra: str, **env: str) -> subprocess.CompletedProcess:
        environment = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / cache), **env)
        environment.pop("AST_DEBUG", None)
        environment.pop(amx.ENV, None)
        return subprocess.run([sys.executable, "-m", "ast_cli", "classify", str(clip), "--model", str(model),
                               "--device", "cpu", *([] if "--fast" in extra else ["--dtype", "bf16"]), "-q", "-f",
                               "jsonl", *extra],
                              capture_output=True, text=True, env=environment, timeout=300)

    kernels = tmp_path / "built" / "ast-cli" / "kernels"
    built = None
    for _ in range(2):
        done = classify("built")
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert json.loads(done.stdout.splitlines()[0])["labels"]
        assert [p.suffix for p in kernels.iterdir()] == [".so"]
        mtime = next(kernels.iterdir()).stat().st_mtime_ns
        assert built in (None, mtime)  # the second run reused the first's library
        built = mtime
    failing = classify("failing", CC="/bin/false")
    assert failing.returncode == 0 and failing.stderr == "", failing.stderr
    assert json.loads(failing.stdout.splitlines()[0])["labels"]
    told = classify("failing", "--debug", CC="/bin/false")
    assert told.returncode == 0 and "not the AMX kernel: false could not build amx_attention.c" in told.stderr
    fast = classify("failing", "--fast", CC="/bin/false")  # --fast's cache key asks what runs bf16 attention
    assert fast.returncode == 0 and fast.stderr == "", fast.stderr
    (tmp_path / "a file").write_text("")  # a cache "folder" that is a file: every file used to fail
    blocked = classify("a file")
    assert blocked.returncode == 0 and blocked.stderr == "", blocked.stderr


def _script(path, body: str):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_26_12_a_compiler_that_hangs_is_stopped_with_what_it_started(kernel_cache, tmp_path, monkeypatch):
    """A compiler that never finishes costs one run COMPILE_SECONDS (it was 120 s on every run): it and what it
    started are killed, and the failure is remembered for that compiler."""
    import time

    marker = tmp_path / "child-still-running"
    cc = _script(tmp_path / "hangcc", f"(sleep 3; touch {marker}) &\nsleep 60\n")
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(amx, "COMPILE_SECONDS", 1)
    start = time.monotonic()
    with pytest.raises(amx.Unavailable, match="hangcc took over 1 s"):
        amx._build(amx._source(), amx._library_path(amx._source()))
    with pytest.raises(amx.Unavailable, match="an earlier run"):
        amx._build(amx._source(), amx._library_path(amx._source()))
    assert time.monotonic() - start < 3
    time.sleep(3)
    assert not marker.exists()  # its background child was killed too
    assert not list(kernel_cache.glob("build-*"))


def test_26_12_cc_is_taken_as_make_takes_it(kernel_cache, tmp_path, monkeypatch):
    """``CC="gcc -m64"`` runs gcc with -m64; a CC that is not a program is said, not silently replaced by cc."""
    seen = tmp_path / "args"
    cc = _script(tmp_path / "mycc", f'echo "$@" > {seen}\nexit 1\n')
    monkeypatch.setenv("CC", f"{cc} -m64")
    with pytest.raises(amx.Unavailable, match="mycc could not build"):
        amx._build(amx._source(), amx._library_path(amx._source()))
    assert seen.read_text().startswith("-m64 -O2 ")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(amx.Unavailable, match="is not a program"):
        amx._compiler()


def test_26_12_a_build_folder_left_by_a_killed_process_is_removed_later(kernel_cache, tmp_path, monkeypatch):
    kernel_cache.mkdir(parents=True, mode=0o700)
    stale, fresh = kernel_cache / "build-old", kernel_cache / "build-new"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "amx_attention.c").write_text("")
    os.utime(stale, (0, 0))
    monkeypatch.setenv("CC", str(_script(tmp_path / "failcc", "exit 1\n")))
    with pytest.raises(amx.Unavailable):
        amx._build(amx._source(), amx._library_path(amx._source()))
    assert not stale.exists() and fresh.exists()  # an hour old: gone; a build under way elsewhere: kept


def test_26_12_the_kernel_masks_padded_keys_at_any_scale():
    """Padded keys get probability 0 by a mask, not by a huge negative score times the scale (a tiny scale made
    them count: the output shrank by tokens / padded tokens)."""
    needs_kernel()
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        qkv = torch.randn(1, 100, 3 * 2 * 64, generator=generator).bfloat16()
        for scale in (1e-30, 1e-3, 1.0):
            got, want = amx.attention(qkv, 2, 100, scale).float(), amx._reference(qkv, 2, 100, scale)
            theirs = sdpa(qkv, 2, 100, scale).float()
            assert (got - want).abs().max() <= 1.1 * (theirs - want).abs().max() + 1e-6, scale


def test_26_13_without_amx_py_refuses_amx_to_a_command(tmp_path):
    """``benchmarks/without_amx.py``, the stand-in for a CPU without AMX that the VNNI figures rest on: the
    command and its children get EPERM for AMX's tile state, so the AMX kernel says Linux refused it, while the
    int16 kernel (no AMX in it) still runs where the CPU has VNNI."""
    import subprocess
    import sys
    from pathlib import Path

    from ast_cli.checkpoint import int16

    missing = amx.CPU_FLAGS - amx._cpu_flags()
    if missing or amx.sys.platform != "linux" or amx.platform.machine() != "x86_64":
        pytest.skip(f"the CPU lacks {', '.join(sorted(missing))}" if missing else "not Linux on x86-64")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "without_amx.py"
    code = "from ast_cli.checkpoint import amx, int16; print(amx.status()); print(int16.status())"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop(amx.ENV, None)
    proc = subprocess.run([sys.executable, str(script), sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    said = proc.stdout.splitlines()
    assert proc.returncode == 0 and said[0] == "SDPA (AMX attention unavailable: Linux refused the AMX tile state " \
                                               "(arch_prctl))", proc.stderr
    assert said[1] == int16.status()  # as without the filter: "int16 kernel (AVX512-VNNI)" or why not


def test_26_13_ctrl_c_during_the_build_stops_the_compiler(kernel_cache, tmp_path, monkeypatch):
    """Ctrl-C while the compiler ran left it running (and what it started), into a build folder already gone;
    a compiler that hangs outlived the 20 s limit. Now the interrupt kills the compiler's session first."""
    import subprocess
    import time

    pid_file = tmp_path / "pid"
    hang = tmp_path / "hangcc"
    hang.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    hang.chmod(0o755)
    monkeypatch.setenv("CC", str(hang))

    class Interrupted(subprocess.Popen):
        def communicate(self, input=None, timeout=None):
            if timeout is not None:  # the build's wait: Ctrl-C arrives once the compiler runs
                while not pid_file.exists() or not pid_file.read_text().strip():
                    time.sleep(0.01)
                raise KeyboardInterrupt
            return super().communicate(input, timeout)

    monkeypatch.setattr(amx.subprocess, "Popen", Interrupted)
    source = amx._source()
    with pytest.raises(KeyboardInterrupt):
        amx._build(source, amx._library_path(source))
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # gone (and reaped), not sleeping on
        os.kill(pid, 0)
    assert not list(kernel_cache.glob("build-*"))


def _failing_compiler(kernel_cache, monkeypatch):
    """(source, library path) with ``CC`` a compiler that fails as on a full disk."""
    failing = kernel_cache.parent.parent / "failcc"
    failing.parent.mkdir(parents=True, exist_ok=True)
    failing.write_text("#!/bin/sh\necho 'No space left on device' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    source = amx._source()
    return source, amx._library_path(source)


def test_26_13_a_failed_build_is_tried_again_a_day_later(kernel_cache, monkeypatch):
    """A failed build was remembered for good for its compiler, though its cause may pass (a full disk, a machine
    too loaded for 20 s): now for a day."""
    import json
    import time

    source, target = _failing_compiler(kernel_cache, monkeypatch)
    with pytest.raises(amx.Unavailable, match="No space left on device"):
        amx._build(source, target)
    with pytest.raises(amx.Unavailable, match="an earlier run"):
        amx._build(source, target)
    record = target.with_suffix(".failed")
    remembered = json.loads(record.read_text())
    remembered["at"] = time.time() - amx.FAILURE_MEMORY - 1
    record.write_text(json.dumps(remembered))
    with pytest.raises(amx.Unavailable) as tried:  # run again: its own message, not the remembered one
        amx._build(source, target)
    assert "an earlier run" not in str(tried.value) and "No space left on device" in str(tried.value)


def test_s8_15_a_fifo_as_the_failure_memory_is_no_memory(kernel_cache, monkeypatch):
    """A FIFO where a failed build is remembered blocked the first forward for good; now it is no memory."""
    import threading

    source, target = _failing_compiler(kernel_cache, monkeypatch)
    kernel_cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.mkfifo(target.with_suffix(".failed"))
    raised = []

    def build() -> None:
        try:
            amx._build(source, target)
        except amx.Unavailable as exc:
            raised.append(exc)

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(20)
    hung = worker.is_alive()
    if hung:  # still blocked on the FIFO: a writer lets it go
        os.close(os.open(target.with_suffix(".failed"), os.O_WRONLY | os.O_NONBLOCK))
        worker.join(20)
    assert not hung, "the build waited on the FIFO"
    assert raised and "an earlier run" not in str(raised[0]) and "No space left on device" in str(raised[0])
