"""`ast benchmark` and the fast modes: JSON shape and row set, end-to-end stages, int8/bf16 fidelity against
fp32 on a tiny model, and CUDA paths that skip cleanly without a GPU. Timings here are 1 pass of a tiny model:
the tests check shapes and bookkeeping, never speed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ast_cli.tasks import benchmark as bench
from ast_cli.cli import app
from ast_cli.errors import UsageError
from ast_cli.audio.features import FeatureConfig, extract
from ast_cli.checkpoint.model import ASTConfig, count_parameters
from ast_cli.checkpoint.speed import (Int8LinearFbgemm, Int8LinearIntMM, cpu_has_vnni, int8_kernel,
                           is_quantized, quantize_dynamic)
from ast_cli.run.options import RunOptions
from ast_cli.run.tagger import Tagger
from ast_cli.checkpoint.weights import build_model, load_checkpoint
from conftest import TINY, tone, write_audio
from tolerances import FAST_MODE_SCORES, SAME_MACHINE_BATCHING

runner = CliRunner()
ROW_KEYS = {"attn", "batch_size", "dtype", "device", "ms_per_batch", "ms_per_batch_median", "clips_per_s"}
no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(*args: str):
    return runner.invoke(app, ["benchmark", *map(str, args)], catch_exceptions=False)


def quick(*args: str):
    return run("--device", "cpu", "--iters", "1", "--warmup", "0", *args)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_clips")
    return [write_audio(root / "a.wav", 1.5, 16000, 1, seed=1), write_audio(root / "b.flac", 2.0, 44100, 2, seed=2)]


@pytest.fixture(scope="module")
def tiny_features(tiny_checkpoint):
    """(3, 64, 128) model inputs from three different signals."""
    cfg = FeatureConfig(max_length=TINY["max_length"])
    return torch.stack([extract(torch.from_numpy(tone(0.6, seed=s)[:, 0] * (s + 1) / 3), cfg) for s in range(3)])


# -- JSON and table --------------------------------------------------------------------------------------


def test_json_has_one_row_per_attn_and_batch_size(tiny_checkpoint):
    result = quick("--model", tiny_checkpoint[0], "--batch-sizes", "1,2", "--attn", "eager,sdpa", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["rows"]
    assert {(r["attn"], r["batch_size"]) for r in rows} == {("eager", 1), ("sdpa", 1), ("eager", 2), ("sdpa", 2)}
    assert len(rows) == 4
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["dtype"] == "fp32" and row["device"] == "cpu" and row["quantize"] == "none" and row["iters"] == 1
        assert row["ms_per_batch"] > 0 and row["ms_per_batch_median"] > 0 and row["clips_per_s"] > 0
        # Both are rounded to 1 us (3 decimals of ms), so they can differ by 0.5 us + 0.5 us / batch size: on a
        # fast processor a tiny model's 0.48 ms is past rel=1e-3.
        assert row["ms_per_clip"] == pytest.approx(row["ms_per_batch_median"] / row["batch_size"], abs=1e-3)
        assert row["x_realtime"] == pytest.approx(row["clips_per_s"] * 0.64, rel=1e-3)  # 64 frames = 0.64 s
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["device_name"]
    assert env["threads"] == torch.get_num_threads() and env["input_frames"] == 64 and env["window_seconds"] == 0.64
    assert data["end_to_end"] == []


def test_table_has_the_speedup_columns(tiny_checkpoint):
    result = quick("--model", tiny_checkpoint[0], "--batch-sizes", "1,2")
    assert result.exit_code == 0, result.output
    for text in ("batch size", "eager ms", "sdpa ms", "speedup", "clips/s", "x real-time", "median ms"):
        assert text in result.stdout
    assert result.stdout.count("fp32") >= 6  # 2 speedup rows + 4 forward rows


def test_quantize_and_dtype_lists_multiply(tiny_checkpoint):
    result = quick("--model", tiny_checkpoint[0], "--batch-sizes", "2", "--attn", "sdpa", "--dtype", "fp32,bf16",
                   "--quantize", "none,int8", "--format", "json")
    assert result.exit_code == 0, result.output
    modes = [(r["dtype"], r["quantize"]) for r in json.loads(result.stdout)["rows"]]
    assert modes == [("fp32", "none"), ("fp32", "int8"), ("bf16", "none")]  # int8 pairs with fp32 only


def test_random_weights_builds_a_model_without_a_checkpoint(monkeypatch):
    tiny = ASTConfig(**TINY, id2label=tuple(f"c{i}" for i in range(5)))
    monkeypatch.setattr(bench, "RANDOM_CONFIG", tiny)  # the full default shape takes seconds per pass
    result = quick("--random-weights", "--batch-sizes", "1", "--attn", "sdpa", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["environment"]["model"] == "random weights" and data["environment"]["input_frames"] == 64
    assert len(data["rows"]) == 1


def test_random_model_default_is_the_audioset_ast():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = bench.random_model()
    assert model.config.num_labels == 527 and model.config.num_tokens == 1214
    assert count_parameters(model) == 86_594_063  # the published checkpoint's count


def test_end_to_end_reports_every_stage(tiny_checkpoint, clips):
    result = quick("--model", tiny_checkpoint[0], "--batch-sizes", "1", "--attn", "sdpa", "--end-to-end",
                   "--format", "json", *clips)
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["end_to_end"]
    assert row["files"] == 2 and row["failed"] == 0
    assert row["audio_seconds"] == pytest.approx(3.5, abs=1e-3)
    assert row["windows"] == 3 + 4  # ceil over 0.64 s windows: 1.5 s -> 3, 2.0 s -> 4
    for stage in ("decode_s", "resample_s", "features_s", "model_s", "pipelined_s"):
        assert row[stage] > 0, stage  # every stage is timed: each took some time
    assert row["files_per_s"] == pytest.approx(2 / row["pipelined_s"], rel=1e-2)
    assert row["x_realtime"] == pytest.approx(3.5 / row["pipelined_s"], rel=1e-2)


def test_end_to_end_library_counts_bad_files(tiny_checkpoint, clips, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 10)
    tagger = Tagger.load(str(tiny_checkpoint[0]), RunOptions(device="cpu"))
    row = bench.benchmark_end_to_end(tagger, [str(clips[0]), str(bad)], attn="eager", mode=bench.Mode("fp32"),
                                     batch_size=2, workers=1)
    assert (row.files, row.failed, row.windows, row.attn) == (2, 1, 3, "eager")
    assert row.audio_seconds == pytest.approx(1.5, abs=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--batch-sizes", "0"), "--batch-sizes: takes whole numbers from 1 to 65536"),
        (("--batch-sizes", "two"), "whole numbers"),
        (("--attn", "flash"), "eager and/or sdpa"),
        (("--quantize", "int4"), "none and/or int8"),
        (("--dtype", "bf16", "--quantize", "int8"), "float32"),
        (("--dtype", "fp16"), "fp16 is slow"),
        (("some.wav",), "--end-to-end"),
        (("--end-to-end",), "--end-to-end needs audio files"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tiny_checkpoint, args, message):
    result = quick("--model", tiny_checkpoint[0], *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr.splitlines()[0]
    assert result.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_device_cuda_without_cuda_is_one_line_and_exit_2(tiny_checkpoint):
    result = run("--model", tiny_checkpoint[0], "--device", "cuda", "--iters", "1")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "Error: --device: CUDA was asked for, but no CUDA device is available"
    assert lines[1] == "Hint: use --device cpu"
    assert all(line.startswith(("Error:", "Hint:")) for line in lines) and len(lines) <= 2


def test_bf16_on_a_cpu_without_bf16_hardware_warns(tiny_checkpoint, monkeypatch):
    import ast_cli.checkpoint.speed as speed

    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: False)
    result = quick("--model", tiny_checkpoint[0], "--batch-sizes", "1", "--attn", "sdpa", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert "no bf16 hardware" in result.stderr


# -- fast modes: fidelity against fp32 ------------------------------------------------------------------


def _scores(model, inputs, dtype=torch.float32) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(model(inputs.to(dtype)).float()).numpy()


def _top5(scores: np.ndarray) -> list[set]:
    return [set(np.argsort(-row)[:5]) for row in scores]


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm"])
def test_int8_scores_are_close_to_fp32(tiny_checkpoint, tiny_features, kernel):
    if kernel == "fbgemm" and int8_kernel() != "fbgemm":
        pytest.skip("this torch build has no quantized engine")
    checkpoint = load_checkpoint(tiny_checkpoint[0])
    reference = _scores(build_model(checkpoint), tiny_features)
    model = quantize_dynamic(build_model(checkpoint), "int8", kernel=kernel)
    assert is_quantized(model)
    assert not any(type(m) is nn.Linear for m in model.modules())  # every Linear, the classifier included
    kind = Int8LinearFbgemm if kernel == "fbgemm" else Int8LinearIntMM
    assert sum(isinstance(m, kind) for m in model.modules()) == 2 * 6 + 1
    scores = _scores(model, tiny_features)
    assert np.abs(scores - reference).max() < FAST_MODE_SCORES
    assert np.abs(scores - reference).max() > 0  # it is really quantized
    overlap = [len(a & b) for a, b in zip(_top5(scores), _top5(reference))]
    assert sum(overlap) >= 13  # of 15: at most a near-tie at the 5th place swaps


@pytest.mark.parametrize("kernel", ["fbgemm", "onednn", "int_mm"])
def test_s8_N15_an_int8_windows_numbers_never_depend_on_its_batch(tiny_checkpoint, kernel):
    """FBGEMM's activation scale spans its whole input, so with --batch-size (or an index's batches) a window's
    int8 scores and embedding moved with the windows beside it (0.46-0.55 for one head score). Every int8 kernel
    now gives a window the same bits alone or in a batch."""
    from ast_cli.checkpoint.speed import _fbgemm_works, _onednn_works

    if not {"fbgemm": _fbgemm_works, "onednn": _onednn_works, "int_mm": lambda: True}[kernel]():
        pytest.skip(f"this torch build or CPU has no {kernel} int8 kernel")
    model = quantize_dynamic(build_model(load_checkpoint(tiny_checkpoint[0])), "int8", kernel=kernel)
    batch = torch.randn(5, *tiny_features_shape(model), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for forward in (model, model.forward_features):
            alone = torch.cat([forward(window) for window in batch.split(1)])
            assert torch.equal(forward(batch), alone)


def tiny_features_shape(model) -> tuple[int, int]:
    return model.config.max_length, model.config.num_mel_bins


def test_int8_linear_kernels_agree_with_float_on_random_data():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    expected = linear(x).detach()
    # Without VNNI, FBGEMM's AVX2 kernel saturates int16 sums unless the range is reduced, as quantize_dynamic does.
    fbgemm = [Int8LinearFbgemm(linear, not cpu_has_vnni())] if int8_kernel() == "fbgemm" else []
    for module in [Int8LinearIntMM(linear)] + fbgemm:
        out = module(x)
        assert out.shape == (3, 7, 40) and out.dtype == torch.float32
        # int8 rounds weights per row and activations per token to 1/127 of their range: 96-term sums of such
        # errors stay within 3% of the output's range (measured ~1%).
        assert (out - expected).abs().max() < 0.03 * expected.abs().max()


@pytest.mark.parametrize("kernel", ["fbgemm", "onednn", "int_mm"])
def test_26_12_layers_quantized_on_several_threads_are_the_layers_one_thread_gives(kernel, warm_threads):
    """``quantize_dynamic`` builds the layers on as many threads as torch has (the packing runs on one core):
    the same model, bit for bit, as one thread building them in turn, and the warning filters as they were."""
    import copy
    import warnings

    from ast_cli.checkpoint import speed
    from ast_cli.tasks.benchmark import random_model

    if kernel == "fbgemm" and not speed._fbgemm_works() or kernel == "onednn" and not speed._onednn_works():
        pytest.skip(f"this torch has no {kernel} int8 linear")
    torch.manual_seed(0)
    model = random_model(ASTConfig(**TINY, id2label=("a", "b", "c")))
    x = torch.randn(2, model.config.max_length, model.config.num_mel_bins)
    filters = list(warnings.filters)
    torch.set_num_threads(1)
    alone = quantize_dynamic(copy.deepcopy(model), "int8", kernel=kernel)
    torch.set_num_threads(3)
    together = quantize_dynamic(copy.deepcopy(model), "int8", kernel=kernel)
    assert warnings.filters == filters
    with torch.inference_mode():
        assert torch.equal(alone(x), together(x))


@pytest.fixture
def warm_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_int8_kernel_can_be_forced(monkeypatch):
    monkeypatch.setenv("AST_INT8_KERNEL", "int_mm")
    assert int8_kernel() == "int_mm"
    with pytest.raises(UsageError):
        quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), "int4")


def test_bf16_scores_are_close_to_fp32(tiny_checkpoint, tiny_features):
    checkpoint = load_checkpoint(tiny_checkpoint[0])
    reference = _scores(build_model(checkpoint), tiny_features)
    scores = _scores(build_model(checkpoint).to(torch.bfloat16), tiny_features, torch.bfloat16)
    assert np.abs(scores - reference).max() < FAST_MODE_SCORES


def test_tagger_int8_classify_matches_fp32(tiny_checkpoint, clips):
    from ast_cli.audio.inputs import expand_inputs
    from ast_cli.run.tagger import LabelSelection

    def scores(tagger):
        out = []
        for result in tagger.classify(expand_inputs(map(str, clips)), selection=LabelSelection(top=None)):
            row = np.zeros(len(tagger.labels))
            for label in result.labels:
                row[label.index] = label.score
            out.append(row)
        return np.stack(out)

    fp32 = Tagger.load(str(tiny_checkpoint[0]), RunOptions(device="cpu"))
    int8 = Tagger.load(str(tiny_checkpoint[0]), RunOptions(device="cpu", quantize="int8"))
    assert is_quantized(int8.model) and not is_quantized(fp32.model)
    assert np.abs(scores(int8) - scores(fp32)).max() < FAST_MODE_SCORES


def test_cpu_batches_run_in_cache_sized_pieces_with_the_same_results(tiny_checkpoint, tiny_features):
    from ast_cli.checkpoint.speed import CPU_TOKENS_PER_CALL, cpu_windows_per_call

    assert cpu_windows_per_call(1214) == 1  # one 10.24 s AudioSet window per call
    assert cpu_windows_per_call(62) == CPU_TOKENS_PER_CALL // 62
    tagger = Tagger.load(str(tiny_checkpoint[0]), RunOptions(device="cpu"))
    whole = tagger.logits(tiny_features)
    tagger.backend.windows_per_call = 2
    pieces = tagger.logits(tiny_features)
    assert pieces.shape == whole.shape and torch.allclose(pieces, whole, atol=SAME_MACHINE_BATCHING)
    assert torch.allclose(tagger.embed(tiny_features), Tagger.load(str(tiny_checkpoint[0]), RunOptions(device="cpu")).embed(tiny_features),
                          atol=SAME_MACHINE_BATCHING)


def test_quantize_needs_float32(tiny_checkpoint):
    with pytest.raises(UsageError, match="float32"):
        Tagger.load(str(tiny_checkpoint[0]), RunOptions(device="cpu", dtype="bf16", quantize="int8"))


def test_classify_accepts_the_fast_modes(tiny_checkpoint, clips):
    for extra in (["--quantize", "int8"], ["--dtype", "bf16"], ["--threads", "1"]):
        result = runner.invoke(app, ["classify", str(clips[0]), "--model", str(tiny_checkpoint[0]), "--device", "cpu",
                                     "--format", "json", *extra])
        assert result.exit_code == 0, (extra, result.output)
        assert len(json.loads(result.stdout)[0]["labels"]) == 5


@pytest.mark.parametrize("caps, flags, expected", [
    ({"avx512_bf16": True}, set(), True),
    ({}, {"fpu", "amx_bf16"}, True),
    ({}, {"asimd", "bf16"}, True),  # an ARMv8.6 "Features" line
    ({"avx512_vnni": True}, {"avx2", "avx512f"}, False),
    ({}, set(), False),
])
def test_native_bf16_detection(monkeypatch, caps, flags, expected):
    import ast_cli.checkpoint.speed as speed

    monkeypatch.setattr(speed, "cpu_capabilities", lambda: caps)
    monkeypatch.setattr(speed, "_cpuinfo_flags", lambda: flags)
    monkeypatch.setattr("platform.system", lambda: "Linux")
    speed.cpu_has_native_bf16.cache_clear()
    try:
        assert speed.cpu_has_native_bf16() is expected
    finally:
        speed.cpu_has_native_bf16.cache_clear()


# -- CUDA: run only with a GPU ---------------------------------------------------------------------------


@no_cuda
@pytest.mark.cuda
def test_cuda_rows_in_fp16_and_bf16(tiny_checkpoint):
    result = run("--model", tiny_checkpoint[0], "--device", "cuda", "--batch-sizes", "1,2", "--dtype", "fp16,bf16",
                 "--iters", "1", "--warmup", "1", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {(r["dtype"], r["attn"], r["batch_size"]) for r in data["rows"]} == {
        (d, a, b) for d in ("fp16", "bf16") for a in ("eager", "sdpa") for b in (1, 2)}
    assert data["environment"]["device"] == "cuda" and data["environment"]["device_name"]


@no_cuda
@pytest.mark.cuda
def test_cuda_fp16_scores_are_close_to_fp32(tiny_checkpoint, tiny_features):
    checkpoint = load_checkpoint(tiny_checkpoint[0])
    reference = _scores(build_model(checkpoint), tiny_features)
    for dtype in (torch.float16, torch.bfloat16):
        model = build_model(checkpoint).to("cuda", dtype)
        with torch.inference_mode():
            scores = torch.sigmoid(model(tiny_features.to("cuda", dtype)).float()).cpu().numpy()
        assert np.abs(scores - reference).max() < 0.02


@no_cuda
@pytest.mark.cuda
def test_quantize_on_cuda_is_a_usage_error(tiny_checkpoint):
    result = run("--model", tiny_checkpoint[0], "--device", "cuda", "--quantize", "int8", "--iters", "1")
    assert result.exit_code == 2 and "CPU only" in result.stderr


@pytest.mark.parametrize("args, message", [
    (("--batch-sizes", "100000000"), "--batch-sizes: takes whole numbers from 1 to 65536, not '100000000'"),
    (("--end-to-end", "/nonexistent"), "/nonexistent: no such file"),
])
def test_s8_19_absurd_batch_sizes_and_missing_paths_are_usage_errors(tiny_checkpoint, args, message):
    """--batch-sizes 100000000 was "unexpected error: RuntimeError"; a missing path "needs audio files"."""
    test_usage_errors_are_one_line_and_exit_2(tiny_checkpoint, args, message)


def test_s8_19_the_cpu_allocators_refusal_is_out_of_memory(tiny_checkpoint, monkeypatch):
    """A batch within the bound that the CPU cannot hold was "unexpected error: RuntimeError"."""
    from ast_cli.errors import is_out_of_memory

    refusal = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 3276800000000 bytes. Error code 12")
    assert is_out_of_memory(refusal)

    def refuse(*args, **kwargs):
        raise refusal

    monkeypatch.setattr(bench, "benchmark_model", refuse)
    result = quick("--model", tiny_checkpoint[0], "--batch-sizes", "65536")
    assert result.exit_code == 1 and result.stderr.startswith("Error: out of memory"), result.stderr
