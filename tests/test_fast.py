"""`--fast` (issue 26): the selection never picks a slower or unfaithful mode, the cache is keyed by what the choice
depends on and never trusted blindly, and every command runs with --fast on a tiny model. Selection tests use
fake timings and fidelities; the real candidates run on a tiny model, so their timings say nothing about speed."""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import stat
import subprocess
import sys
import threading

import pytest
import torch
from typer.testing import CliRunner

from ast_cli.run import fast, fastcache
from ast_cli.tasks.benchmark import random_model
from ast_cli.cli import app
from ast_cli.run import probe
from ast_cli.run.fast import Candidate, FastChoice, choose, fast_cache_path, pick
from ast_cli.checkpoint.model import ASTConfig
from ast_cli.checkpoint.speed import (Int8LinearIntMM, PackedLayerBF16, Int8LinearOneDNN, _bf16_packing_works, _fbgemm_works, _int_mm_works,
                           _onednn_works, cpu_has_native_bf16)
from conftest import TINY, write_audio
from tolerances import FAST_MODE_SCORES

runner = CliRunner()


def fp32(ms: float = 100.0) -> Candidate:
    return Candidate("fp32", ms, 0.0)


# -- selection ---------------------------------------------------------------------------------------------


def test_26_1_never_slower_and_never_unfaithful():
    choice = pick([fp32(), Candidate("bf16", 40.0, 0.03), Candidate("int8-fbgemm", 120.0, 0.001),
                   Candidate("int8-int_mm", 99.0, 0.001), Candidate("fp16", 10.0, math.nan),
                   Candidate("bf16", skipped="no bf16 hardware")])
    assert (choice.mode, choice.speedup, choice.max_diff) == ("fp32", 1.0, 0.0)


def test_26_1_the_fastest_faithful_candidate_wins():
    choice = pick([fp32(), Candidate("bf16", 40.0, 0.01), Candidate("int8-int_mm", 30.0, FAST_MODE_SCORES),
                   Candidate("int8-fbgemm", 20.0, 0.021)])
    assert (choice.mode, choice.speedup, choice.max_diff) == ("int8-int_mm", pytest.approx(100 / 30, abs=1e-3), 0.02)
    assert (choice.dtype, choice.int8_kernel) == ("fp32", "int_mm")
    assert (FastChoice("bf16", 2, 0).dtype, FastChoice("bf16", 2, 0).int8_kernel) == ("bf16", None)


# -- the cache ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_model():
    return random_model(ASTConfig(**TINY, id2label=tuple(f"c{i}" for i in range(5))))


@pytest.fixture
def fake_calibration(monkeypatch, tmp_path):
    """``fast.calibrate`` replaced by fake timings (bf16 twice as fast, faithful); the calls are counted (and the
    timings each was given, in ``calls.timings``)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    class Calls(list):
        timings: list = []

    calls = Calls()
    calls.timings = []

    def calibrate(model, device="cpu", attn=None, heads=(), embeddings=False, timings=None):
        calls.append(device)
        calls.timings.append(timings)
        return [fp32(), Candidate("bf16", 50.0, 0.004)]

    monkeypatch.setattr(fast, "calibrate", calibrate)
    monkeypatch.setattr(fast, "candidate_names", lambda device: [("fp32", None), ("bf16", None)])
    return calls


def test_26_1_a_cache_hit_pays_nothing(tiny_model, fake_calibration, tmp_path):
    first = choose(tiny_model)
    assert fast_cache_path() == str(tmp_path / "xdg" / "ast-cli" / "fast-v4.json")
    second = choose(tiny_model)
    assert fake_calibration == ["cpu"]
    assert (first.mode, first.cached, second.mode, second.cached, second.speedup) == ("bf16", False, "bf16", True, 2.0)


def test_26_1_the_cache_is_keyed_by_weights_threads_and_torch(tiny_model, fake_calibration, monkeypatch):
    choose(tiny_model)
    with torch.no_grad():
        tiny_model.classifier.dense.weight.add_(0.01)  # another checkpoint
    choose(tiny_model)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    choose(tiny_model)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    choose(tiny_model)
    assert len(fake_calibration) == 4
    choose(tiny_model)  # each key was kept
    assert len(fake_calibration) == 4
    assert len(json.loads(open(fast_cache_path()).read())["entries"]) == 4


@pytest.mark.parametrize("content", [
    "{not json", json.dumps({"version": 99, "entries": []}), json.dumps([1, 2]),
    "x" * (fastcache.MAX_CACHE_BYTES + 1),
])
def test_26_1_a_corrupt_or_foreign_cache_is_ignored_and_rewritten(tiny_model, fake_calibration, content):
    os.makedirs(os.path.dirname(fast_cache_path()))
    with open(fast_cache_path(), "w") as handle:
        handle.write(content)
    assert choose(tiny_model).mode == "bf16" and fake_calibration == ["cpu"]
    assert json.loads(open(fast_cache_path()).read())["version"] == fastcache.CACHE_VERSION


@pytest.mark.parametrize("bad", [
    {"mode": "int8-evil", "speedup": 9.0, "max_diff": 0.0},  # no such candidate here
    {"mode": "bf16", "speedup": 2.0, "max_diff": 0.5},  # unfaithful
    {"mode": "bf16", "speedup": 0.5, "max_diff": 0.0},  # slower than fp32
    {"mode": "bf16", "speedup": "fast", "max_diff": 0.0},
    {"mode": "bf16", "speedup": math.inf, "max_diff": 0.0},
])
def test_26_1_a_cached_choice_is_never_trusted_blindly(tiny_model, fake_calibration, bad):
    key = fast.cache_key(tiny_model, "cpu")
    os.makedirs(os.path.dirname(fast_cache_path()))
    with open(fast_cache_path(), "w") as handle:
        json.dump({"version": fastcache.CACHE_VERSION, "entries": [{"key": key, "choice": bad}]}, handle)
    choice = choose(tiny_model)
    assert (choice.mode, choice.cached, fake_calibration) == ("bf16", False, ["cpu"])


def test_26_12_a_fast_choice_names_what_ran_bf16_attention(fake_calibration, monkeypatch):
    """The AMX attention kernel makes bf16 faster: a choice timed with it is not reused where SDPA runs instead
    (``AST_AMX_ATTENTION=0``, no compiler any more), nor the other way round; eager attention never runs it."""
    from ast_cli.checkpoint import amx

    model = random_model(ASTConfig(**dict(TINY, hidden_size=128, num_attention_heads=2), id2label=("a", "b")))
    runs = [True]
    monkeypatch.setattr(amx, "available", lambda: runs[0])
    assert fast.cache_key(model, "cpu")["bf16_attention"] == "amx"
    assert "bf16_attention" not in fast.cache_key(model, "cpu", attn="eager")
    fast.choose(model, "cpu")
    fast.choose(model, "cpu")
    runs[0] = False  # AST_AMX_ATTENTION=0, the compiler gone: whatever the reason, the key says "sdpa"
    fast.choose(model, "cpu")
    assert fake_calibration == ["cpu", "cpu"]
    assert fast.cache_key(model, "cpu")["bf16_attention"] == "sdpa"
    tiny = random_model(ASTConfig(**TINY, id2label=("a", "b")))  # head size 8: never the kernel
    runs[0] = True
    assert fast.cache_key(tiny, "cpu")["bf16_attention"] == "sdpa"


def test_26_4_a_fast_choice_made_with_sdpa_is_not_reused_with_eager_attention(fake_calibration):
    """Before, the cache key left the attention out: a bf16 pick calibrated with sdpa ran with --attn eager, where
    bf16 can be slower than fp32 (the tiny model here: eager bf16 10.1 ms, eager fp32 7.8 ms, sdpa bf16 1.7 ms)."""
    model = random_model(ASTConfig(**TINY, id2label=("a", "b")))
    for attn in ("sdpa", "eager", "eager", "sdpa", None):
        fast.choose(model, "cpu", attn)
    assert fake_calibration == ["cpu", "cpu"]  # once per attention (None: the model's default, sdpa), then cached
    assert fast.cache_key(model, "cpu", attn="sdpa") == fast.cache_key(model, "cpu")  # earlier entries stay valid


def test_26_1_an_unwritable_cache_costs_only_a_calibration(tiny_model, fake_calibration, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the folder would go
    assert choose(tiny_model).mode == "bf16" and choose(tiny_model).mode == "bf16"
    assert len(fake_calibration) == 2 and blocker.read_text() == ""


# -- the real candidates -----------------------------------------------------------------------------------


def _real(name: str) -> Candidate:
    model = random_model(ASTConfig(**TINY, id2label=tuple(f"c{i}" for i in range(5))))
    return next(c for c in fast.calibrate(model, "cpu", "sdpa") if c.name == name)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 is a --fast candidate only where the CPU multiplies "
                                                       "bf16 in hardware (AVX512-BF16, AMX or ARM BF16); this one does not")
def test_26_1_bf16_candidate_runs_and_is_faithful():
    candidate = _real("bf16")
    assert candidate.skipped is None and candidate.ms > 0 and candidate.faithful


@pytest.mark.skipif(not _onednn_works(), reason="this torch build has no oneDNN int8 linear (torch.ops.onednn)")
def test_26_2_onednn_candidate_runs_and_is_faithful():
    candidate = _real("int8-onednn")
    assert candidate.skipped is None and candidate.ms > 0 and candidate.faithful


@pytest.mark.skipif(not (_onednn_works() and _int_mm_works()), reason="needs both oneDNN's int8 linear and CPU "
                                                                       "torch._int_mm in this torch build")
def test_26_2_onednn_and_int_mm_compute_the_same_products():
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 50, 96) * torch.linspace(0.01, 10, 50)[:, None]  # per-token ranges that differ a lot
    with torch.inference_mode():
        fast_out, portable, exact = Int8LinearOneDNN(linear)(x), Int8LinearIntMM(linear)(x), linear(x)
    # same int32 products; only the order of two float32 scalings differs (a few ulps of the output)
    torch.testing.assert_close(fast_out, portable, rtol=1e-5, atol=1e-5)
    assert (fast_out - exact).abs().max() <= 0.02 * exact.abs().max()  # int8's 1/127 steps, summed over 96


@pytest.mark.skipif(not _fbgemm_works(), reason="this torch build has no quantized engine (FBGEMM/QNNPACK)")
def test_26_1_fbgemm_candidate_runs_and_is_faithful():
    candidate = _real("int8-fbgemm")
    assert candidate.skipped is None and candidate.ms > 0 and candidate.faithful


def test_26_1_a_missing_feature_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr("ast_cli.checkpoint.speed.cpu_has_native_bf16", lambda: False)
    names = dict(fast.candidate_names("cpu"))
    assert names["fp32"] is None and "bf16 hardware" in names["bf16"]


# -- every command -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_audio")
    for kind, seed in (("a", 1), ("b", 2)):
        (root / kind).mkdir()
        for i in range(2):
            write_audio(root / kind / f"{kind}{i}.wav", 0.8, 16000, 1, seed=seed * 10 + i)
    return root


def _fast_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fast: ")]


def test_26_1_classify_and_extract_features_with_fast(tiny_checkpoint, audio, tmp_path):
    model = str(tiny_checkpoint[0])
    result = runner.invoke(app, ["classify", str(audio / "a"), "--model", model, "--fast", "-f", "json"])
    assert result.exit_code == 0, result.stderr
    assert len(_fast_lines(result.stderr)) == 1, result.stderr
    assert json.loads(result.stdout)[0]["settings"]["compute"] == "fast"
    again = runner.invoke(app, ["classify", str(audio / "a"), "--model", model, "--fast", "-f", "json"])
    assert "cached calibration" in _fast_lines(again.stderr)[0]
    quiet = runner.invoke(app, ["classify", str(audio / "a"), "--model", model, "--fast", "-q"])
    assert quiet.exit_code == 0 and not _fast_lines(quiet.stderr)
    out = tmp_path / "features"
    extracted = runner.invoke(app, ["extract-features", str(audio / "a"), "--model", model, "--fast",
                                    "--out", str(out)])
    assert extracted.exit_code == 0, extracted.stderr
    assert len(_fast_lines(extracted.stderr)) == 1 and len(list(out.rglob("*.safetensors"))) == 2


def test_26_1_listen_with_fast(tiny_checkpoint, audio):
    data = (audio / "a" / "a0.wav").read_bytes()
    result = runner.invoke(app, ["listen", "-", "--model", str(tiny_checkpoint[0]), "--fast", "-f", "jsonl"],
                           input=data)
    assert result.exit_code == 0, result.stderr
    assert len(_fast_lines(result.stderr)) == 1 and result.stdout.strip()


def test_26_1_train_and_evaluate_with_fast(tiny_checkpoint, audio, tmp_path):
    out = tmp_path / "trained"
    trained = runner.invoke(app, ["train", str(audio), "--out", str(out), "--model", str(tiny_checkpoint[0]),
                                  "--fast", "--epochs", "2", "--val-split", "0.5"])
    assert trained.exit_code == 0, trained.stderr
    assert len(_fast_lines(trained.stderr)) == 1, trained.stderr
    report = runner.invoke(app, ["evaluate", str(out), str(audio), "--fast", "-f", "json"])
    assert report.exit_code == 0, report.stderr
    assert len(_fast_lines(report.stderr)) == 1 and json.loads(report.stdout)["files"] == 4


@pytest.mark.parametrize("args", [["--dtype", "bf16"], ["--quantize", "int8"]])
def test_26_1_fast_picks_the_dtype_itself(tiny_checkpoint, audio, args):
    result = runner.invoke(app, ["classify", str(audio / "a"), "--model", str(tiny_checkpoint[0]), "--fast", *args])
    assert result.exit_code == 2 and "Error: --fast: the fast mode picks the dtype" in result.stderr
    assert f"drop {args[0]}" in result.stderr and "Traceback" not in result.stderr


def test_26_1_fast_finetune_is_refused_before_anything_loads(tiny_checkpoint, audio, tmp_path):
    result = runner.invoke(app, ["train", str(audio), "--out", str(tmp_path / "o"), "--model",
                                 str(tiny_checkpoint[0]), "--fast", "--mode", "finetune"])
    assert result.exit_code == 2 and "drop --fast" in result.stderr and not (tmp_path / "o").exists()


def test_26_1_benchmark_shows_every_candidate_and_the_pick(tiny_checkpoint):
    args = ["benchmark", "--model", str(tiny_checkpoint[0]), "--device", "cpu", "--iters", "1", "--warmup", "0",
            "--batch-sizes", "1", "--attn", "sdpa"]
    report = json.loads(runner.invoke(app, [*args, "-f", "json"], catch_exceptions=False).stdout)["fast"]
    assert [c["name"] for c in report["candidates"]] == list(fast.CPU_CANDIDATES)
    assert report["pick"] in [c["name"] for c in report["candidates"] if c["skipped"] is None]
    table = runner.invoke(app, args, catch_exceptions=False).stdout
    assert "--fast candidates" in table and "picked" in table


@pytest.mark.skipif(not (cpu_has_native_bf16() and _bf16_packing_works()),
                    reason="packed bf16 Linear layers need bf16 hardware and oneDNN's bf16 linear in this torch")
def test_26_2_cpu_bf16_runs_packed_linears_with_the_gelu_fused(tiny_checkpoint):
    from ast_cli.checkpoint import speed
    from ast_cli.run.backends import LocalBackend
    from ast_cli.run.options import RunOptions
    from ast_cli.checkpoint.weights import build_model, load_checkpoint

    checkpoint = load_checkpoint(tiny_checkpoint[0])
    backend = LocalBackend.build(build_model(checkpoint), checkpoint.features, RunOptions(device="cpu", dtype="bf16"))
    modules = list(backend.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in modules)
    assert sum(getattr(m, "post_op", None) == "gelu" for m in modules) == (checkpoint.config.num_hidden_layers
                                                                          * speed.MLP_PARTS)
    packed = [m for m in modules if isinstance(m, PackedLayerBF16)]  # QKV in one GEMM, residual adds fused
    assert len(packed) == checkpoint.config.num_hidden_layers
    assert all(m.qkv.out_features == 3 * checkpoint.config.hidden_size for m in packed)
    inputs = fast.calibration_inputs(checkpoint.config)
    with torch.inference_mode():
        reference = build_model(checkpoint)
        for attn in ("sdpa", "eager"):  # both attention paths of the packed blocks
            scores = torch.sigmoid(backend.with_attn(attn).tensor(inputs))
            assert (scores - torch.sigmoid(reference(inputs, attn=attn))).abs().max() <= FAST_MODE_SCORES
            embedding = backend.with_output("embedding").with_attn(attn).tensor(inputs)
            assert torch.nn.functional.cosine_similarity(embedding, reference.forward_features(inputs)).min() > 0.999


def test_26_1_a_candidate_that_fails_here_is_skipped_with_its_reason(monkeypatch):
    real_place = fast.place

    def place(model, mode, device):
        if mode == "bf16":
            raise RuntimeError("no kernel for this shape\nmore detail")
        return real_place(model, mode, device)

    monkeypatch.setattr(fast, "place", place)
    monkeypatch.setattr(fast, "candidate_names", lambda device: [("fp32", None), ("bf16", None)])
    model = random_model(ASTConfig(**TINY, id2label=tuple(f"c{i}" for i in range(5))))
    candidates = fast.calibrate(model, "cpu", "sdpa")
    assert candidates[1] == Candidate("bf16", skipped="failed here: no kernel for this shape")
    assert pick(candidates).mode == "fp32"


@pytest.mark.parametrize("command", ["classify", "extract-features"])
def test_26_1_fast_on_ray_is_refused_before_anything_loads(tiny_checkpoint, audio, tmp_path, command):
    out = ["--out", str(tmp_path / "o")] if command == "extract-features" else []
    result = runner.invoke(app, [command, str(audio / "a"), "--model", str(tiny_checkpoint[0]), "--fast",
                                 "--engine", "ray", *out])
    assert result.exit_code == 2 and "calibrated on this machine, not on Ray workers" in result.stderr
    assert "use --engine local" in result.stderr and not (tmp_path / "o").exists()


def test_26_1_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert fast_cache_path() == str(tmp_path / ".cache" / "ast-cli" / "fast-v4.json")


@pytest.mark.skipif(not (cpu_has_native_bf16() and _bf16_packing_works()),
                    reason="packed bf16 Linear layers need bf16 hardware and oneDNN's bf16 linear in this torch")
def test_26_2_the_mlp_in_parts_scores_as_the_whole(tiny_checkpoint, monkeypatch):
    """The packed bf16 block runs its MLP's hidden units in MLP_PARTS parts (a faster GEMM shape on AMX): every
    part runs, and the sum of the parts scores as the MLP in one piece and as fp32."""
    from ast_cli.checkpoint import speed
    from ast_cli.checkpoint.weights import build_model, load_checkpoint

    checkpoint = load_checkpoint(tiny_checkpoint[0])
    inputs = fast.calibration_inputs(checkpoint.config)
    hidden = checkpoint.config.intermediate_size
    with torch.inference_mode():
        monkeypatch.setattr(speed, "MLP_PARTS", 1)
        whole = torch.sigmoid(speed.place_bf16_cpu(build_model(checkpoint))(inputs.bfloat16()).float())
        monkeypatch.setattr(speed, "MLP_PARTS", 3)  # no divisor of the hidden size: the last part is smaller
        parted_model = speed.place_bf16_cpu(build_model(checkpoint))
        calls = []
        monkeypatch.setattr(speed.PackedLinearBF16, "add", lambda self, x, residual: calls.append(x.shape[-1]) or
                            torch.ops.mkldnn._linear_pointwise.binary(x, residual, self._packed, self.bias, "add"))
        parted = torch.sigmoid(parted_model(inputs.bfloat16()).float())
        reference = torch.sigmoid(build_model(checkpoint)(inputs))
    size = -(-hidden // 3)
    mlp_calls = sorted(width for width in calls if width != checkpoint.config.hidden_size)
    assert hidden % 3 and sorted(set(mlp_calls)) == sorted({size, hidden - 2 * size})
    assert len(mlp_calls) == 3 * (checkpoint.config.num_hidden_layers - 1 + len(inputs))  # the last layer: per window
    assert (parted - whole).abs().max() <= 1e-2 and (parted - reference).abs().max() <= FAST_MODE_SCORES


COMPILER_STACK = ("sympy", "torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes")


@pytest.mark.parametrize("args", [[], ["--dtype", "bf16"], ["--quantize", "int8"], ["--fast"]])
def test_26_3_classify_never_imports_torchs_compiler_stack(tiny_checkpoint, audio, tmp_path, args):
    """sympy and the compiler stack cost ~0.4 s of start-up (2-core Sapphire Rapids): a process must not pay it.
    ``skip_init`` (meta tensors -> ``torch._refs.empty_like``) pulled sympy into every packed bf16 load."""
    import subprocess
    import sys

    probe = ("import atexit, sys\n"
             f"atexit.register(lambda: print('LOADED:' + ','.join(m for m in {COMPILER_STACK!r} if m in sys.modules),"
             " file=sys.stderr))\n"
             "from ast_cli.cli import main\nsys.argv[0] = 'ast'\nmain()\n")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", probe, "classify", str(audio / "a"), "--model",
                           str(tiny_checkpoint[0]), "--device", "cpu", "-q", "-f", "json", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = [line for line in proc.stderr.splitlines() if line.startswith("LOADED:")][-1][len("LOADED:"):]
    assert loaded == "", f"{args}: {loaded}"


# -- what the fidelity is measured on: heads, bare encoders ---------------------------------------------------


def _magnifying_head(model, single_label: bool = False):
    """A head whose standardization magnifies every change of the pooled embedding: centred on fp32's embedding
    of the first calibration window, so that its LayerNorm scales whatever a fast mode's rounding leaves there up
    to unit size. What a real head's standardization does to a backbone's rounding, exaggerated so that every
    fast candidate moves its probabilities far beyond the bound."""
    from ast_cli.checkpoint.heads import Head

    with torch.inference_mode():
        pooled = model.forward_features(fast.calibration_inputs(model.config), attn="sdpa")
    hidden, labels = pooled.shape[1], ("x", "y", "z")
    generator = torch.Generator().manual_seed(1)
    tensors = {"standardize.mean": pooled[0].clone(), "standardize.std": torch.ones(hidden),
               "classifier.layernorm.weight": torch.ones(hidden), "classifier.layernorm.bias": torch.zeros(hidden),
               "classifier.dense.weight": torch.randn(len(labels), hidden, generator=generator),
               "classifier.dense.bias": torch.zeros(len(labels))}
    return Head("magnify", "/nowhere", labels, single_label, "tiny", "0" * 64, 1e-12, tensors)


def test_26_3_fast_with_heads_keeps_each_heads_probabilities_within_the_bound():
    """--fast with --head: a candidate that keeps the model's scores within 0.02 but moves a head's probabilities
    beyond it is unfaithful (before, only the model's own scores were compared)."""
    model = random_model(ASTConfig(**TINY, id2label=tuple(f"c{i}" for i in range(5))))
    alone = {c.name: c for c in fast.calibrate(model, "cpu", "sdpa") if c.skipped is None}
    if len(alone) < 2:
        pytest.skip("no fast candidate besides fp32 runs on this machine")
    for single in (False, True):
        joint = {c.name: c for c in fast.calibrate(model, "cpu", "sdpa", heads=[_magnifying_head(model, single)])}
        for name in alone:
            if name != "fp32":
                assert alone[name].faithful and not joint[name].faithful, (name, alone[name], joint[name])
        assert pick(list(joint.values())).mode == "fp32"


def test_26_3_fast_compares_what_the_heads_backend_reports():
    model = random_model(ASTConfig(**TINY, id2label=tuple(f"c{i}" for i in range(5))))
    head, x = _magnifying_head(model, single_label=True), fast.calibration_inputs(model.config)
    with torch.inference_mode():
        pooled = model.forward_features(x, attn="sdpa")
        want = torch.cat([torch.sigmoid(model.forward_head(pooled)), torch.softmax(head(pooled), dim=-1)], dim=1)
        torch.testing.assert_close(fast._outputs(model, x, "sdpa", [head]), want, rtol=0, atol=0)


def test_26_3_the_cache_key_names_the_heads_only_when_there_are_heads(tiny_model, fake_calibration):
    head = _magnifying_head(tiny_model)
    assert "heads" not in fast.cache_key(tiny_model, "cpu")  # earlier runs' entries stay valid
    choose(tiny_model)
    choose(tiny_model, heads=[head])
    choose(tiny_model, heads=[head])
    assert fake_calibration == ["cpu", "cpu"]  # one calibration without the head, one with it, then cached


def test_26_3_the_cache_key_names_a_heads_layer_norm_eps(tiny_model, fake_calibration):
    """Two heads that differ only in ``layer_norm_eps`` give other probabilities: each has its own choice."""
    import dataclasses

    head = _magnifying_head(tiny_model)
    assert fast.cache_key(tiny_model, "cpu", heads=[head])["heads"][0][2:] == []  # the default: keys as before
    choose(tiny_model, heads=[head])
    choose(tiny_model, heads=[dataclasses.replace(head, eps=1e-3)])
    assert fake_calibration == ["cpu", "cpu"]


def test_26_3_fast_on_a_bare_encoder_compares_embeddings(encoder, audio, tmp_path, monkeypatch):
    """A bare encoder has no scores: --fast compares its pooled embeddings (relative L2) instead of failing with
    'this checkpoint has no classification head' (what it did before, in every command)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "features"
    result = runner.invoke(app, ["extract-features", str(audio / "a"), "--model", str(encoder), "--fast",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "embeddings within a relative L2 distance of" in _fast_lines(result.stderr)[0]
    assert len(list(out.rglob("*.safetensors"))) == 2
    report = runner.invoke(app, ["benchmark", "--model", str(encoder), "--device", "cpu", "--iters", "1",
                                 "--warmup", "0", "--batch-sizes", "1", "--attn", "sdpa", "-f", "json"])
    assert report.exit_code == 0, report.stderr
    assert json.loads(report.stdout)["fast"]["measure"] == "embeddings"


def test_26_3_an_encoders_embedding_fidelity_is_relative_l2():
    model = random_model(ASTConfig(**TINY))
    assert model.classifier is None and fast.measure_of(model) == "embeddings"
    reference = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    got = reference + torch.tensor([[0.0, 0.05], [0.0, 0.001]])
    assert fast._difference("embeddings", got, reference) == pytest.approx(0.01, rel=1e-5)  # 0.05/5 beats 0.001/1
    candidates = fast.calibrate(model, "cpu", "sdpa")
    assert {c.measure for c in candidates} == {"embeddings"} and pick(candidates).measure == "embeddings"


@pytest.mark.parametrize("command", ["classify", "listen"])
def test_26_3_a_bare_encoder_without_heads_is_refused_before_it_loads(encoder, audio, tmp_path, command,
                                                                     monkeypatch):
    """Before, classify failed every file with 'model failed: ValueError' (exit 1) and listen crashed with an
    unexpected error and an abort."""
    from ast_cli.checkpoint import weights

    monkeypatch.setattr(weights, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out.jsonl"
    source = str(audio / "a") if command == "classify" else str(audio / "a" / "a0.wav")
    args = [command, source, "--model", str(encoder), "-f", "jsonl"]
    result = runner.invoke(app, args + (["-o", str(out)] if command == "classify" else []))
    assert result.exit_code == 2, result.stderr
    assert "has no labels of its own (a bare encoder)" in result.stderr
    assert "Hint: use --head HEAD_DIR" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
    timed = runner.invoke(app, ["benchmark", str(audio / "a"), "--end-to-end", "--model", str(encoder),
                                "--device", "cpu"])
    assert timed.exit_code == 2 and "a bare encoder" in timed.stderr


def test_26_4_a_run_that_reports_embeddings_keeps_them_within_the_bound():
    """extract-features, index and head training report a labelled model's pooled embeddings, not its scores: a
    mode is faithful there when the embeddings (and any head's probabilities) stay within the bound (before, only
    the scores were compared, and int8 moves a full-size model's embeddings ~0.03 while its scores move ~0.015)."""
    model = random_model(ASTConfig(**TINY, id2label=tuple(f"c{i}" for i in range(5))))
    head, x = _magnifying_head(model), fast.calibration_inputs(model.config)
    assert fast.measure_of(model) == "scores" and fast.measure_of(model, embeddings=True) == "embeddings"
    alone = {c.name: c for c in fast.calibrate(model, "cpu", "sdpa", embeddings=True)}
    joint = {c.name: c for c in fast.calibrate(model, "cpu", "sdpa", heads=[head], embeddings=True)}
    with torch.inference_mode():
        reference = model.forward_features(x, attn="sdpa")
        for name, candidate in alone.items():
            assert candidate.measure == joint[name].measure == "embeddings"
            if candidate.skipped is None:
                variant, dtype = fast.place(copy.deepcopy(model), name, "cpu")
                got = variant.forward_features(x.to(dtype=dtype), attn="sdpa").float()
                moved = ((got - reference).norm(dim=1) / reference.norm(dim=1)).max()
                assert candidate.max_diff == pytest.approx(float(moved), abs=1e-5), name
                assert joint[name].max_diff >= candidate.max_diff  # the head's probabilities count as well
    assert "measure" not in fast.cache_key(model, "cpu") and "measure" not in fast.cache_key(
        random_model(ASTConfig(**TINY)), "cpu", embeddings=True)  # a bare encoder's key is unchanged


def test_26_4_extract_features_fast_on_a_labelled_model_compares_embeddings(tiny_checkpoint, audio, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = str(tiny_checkpoint[0])
    result = runner.invoke(app, ["extract-features", str(audio / "a"), "--model", model, "--fast",
                                 "--out", str(tmp_path / "features")])
    assert result.exit_code == 0, result.stderr
    assert "embeddings within a relative L2 distance of" in _fast_lines(result.stderr)[0]
    scored = runner.invoke(app, ["classify", str(audio / "a"), "--model", model, "--fast", "-f", "json"])
    assert scored.exit_code == 0 and "calibrated now" in _fast_lines(scored.stderr)[0]  # not the embeddings' entry
    assert "scores within" in _fast_lines(scored.stderr)[0]


def test_26_4_evaluate_fast_chooses_as_train_does_for_the_embeddings_they_share(tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    """evaluate and head-mode train share cached window embeddings (keyed 'fast', not by the mode): evaluate must
    choose for them as train does, or one could reuse embeddings made in a mode the other found unfaithful."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "data"
    for label, seed in (("Speech", 1), ("Music", 2)):  # two of the base's own labels: evaluate measures the base
        for i in range(3):
            write_audio(data / label / f"{label}{i}.wav", 0.8, seed=seed * 10 + i)
    model, features = str(tiny_checkpoint[0]), str(tmp_path / "features")
    trained = runner.invoke(app, ["train", str(data), "--model", model, "--out", str(tmp_path / "head"), "--fast",
                                  "--epochs", "2", "--features-dir", features])
    assert trained.exit_code == 0, trained.stderr
    measured = runner.invoke(app, ["evaluate", model, str(data), "--fast", "--features-dir", features])
    assert measured.exit_code == 0, measured.stderr
    line = _fast_lines(measured.stderr)[0]
    assert "embeddings within a relative L2 distance" in line and "cached calibration" in line  # train's choice


def test_26_3_a_single_label_models_softmax_is_what_fast_compares():
    """A single-label model reports softmax probabilities: --fast compares those, not sigmoid scores (which
    saturate where softmax does not), and keys its cache by it."""
    labels = tuple(f"c{i}" for i in range(5))
    single = random_model(ASTConfig(**TINY, id2label=labels, problem_type="single_label_classification"))
    multi = random_model(ASTConfig(**TINY, id2label=labels, problem_type="multi_label_classification"))
    x = fast.calibration_inputs(single.config)
    with torch.inference_mode():
        got = fast._outputs(single, x, "sdpa", ())
        torch.testing.assert_close(got, torch.softmax(single(x, attn="sdpa"), dim=-1), rtol=0, atol=0)
        torch.testing.assert_close(got.sum(dim=1), torch.ones(len(x)))
        torch.testing.assert_close(fast._outputs(multi, x, "sdpa", ()), torch.sigmoid(multi(x, attn="sdpa")),
                                   rtol=0, atol=0)
    assert fast.cache_key(single, "cpu")["activation"] == "softmax" and "activation" not in fast.cache_key(multi, "cpu")


def test_26_3_a_new_comparison_reuses_the_timings_of_the_same_model(tiny_model, fake_calibration):
    """Adding a head (or asking for embeddings) changes what --fast compares, not how fast each mode runs: the
    next calibration reuses the timings cached for the same model, machine, torch, threads and attention."""
    head = _magnifying_head(tiny_model)
    choose(tiny_model)
    choose(tiny_model, heads=[head])
    choose(tiny_model, embeddings=True)
    choose(tiny_model, attn="eager")  # another attention runs at another speed: timed again
    assert fake_calibration.timings == [{}, {"fp32": 100.0, "bf16": 50.0}, {"fp32": 100.0, "bf16": 50.0}, {}]


def test_26_3_calibrate_with_timings_only_compares(monkeypatch):
    """Given every candidate's timing, calibrate runs no timed pass and no warm-up, and reports those timings
    with the fidelity it measured now."""
    model = random_model(ASTConfig(**TINY, id2label=tuple(f"c{i}" for i in range(5))))
    names = [name for name, skipped in fast.candidate_names("cpu") if skipped is None]
    monkeypatch.setattr(fast, "_timer", lambda *a, **k: pytest.fail("timed again"))
    got = fast.calibrate(model, "cpu", "sdpa", timings={name: 10.0 + i for i, name in enumerate(names)})
    measured = {c.name: c for c in got if c.skipped is None}
    assert {name: c.ms for name, c in measured.items()} == {name: 10.0 + i for i, name in enumerate(names)}
    assert measured["fp32"].max_diff == 0.0 and all(c.max_diff is not None for c in measured.values())


_EXIT_PROBE = """
import atexit, os, sys, threading, time
if sys.argv[2] == "torch":
    import torch
from ast_cli.cli import _signals

class Teardown:
    def __del__(self, write=os.write):
        write(2, b"TEARDOWN\\n")

keep = Teardown()  # a module global: only the interpreter's teardown collects it
atexit.register(lambda: sys.stderr.write("ATEXIT\\n"))

def late(path=sys.argv[1]):
    time.sleep(0.3)
    with open(path, "w") as f:
        f.write("done")

threading.Thread(target=late).start()
sys.stdout.write("buffered, not flushed")
_signals.end_process(3)
"""


@pytest.mark.parametrize("torch_loaded", [True, False])
def test_26_6_a_finished_run_skips_the_teardown_and_nothing_else(tmp_path, torch_loaded):
    """Once torch is loaded, CPython's teardown (freeing its modules and libraries) costs ~0.4 s per process on
    the 2-core Sapphire Rapids CPU, a tenth of a six-clip ``classify --fast``: ``ast`` ends with ``os._exit``
    after the steps of an exit that something waits for (threads still working, ``atexit`` handlers, stdout
    and stderr flushed), with the exit code the run chose. Without torch the ordinary exit stays."""
    import subprocess
    import sys

    marker = tmp_path / "thread-finished"
    proc = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(marker), "torch" if torch_loaded else "none"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, not flushed"
    assert marker.read_text() == "done"  # the non-daemon thread finished before the process ended
    assert "ATEXIT" in proc.stderr.splitlines()
    assert ("TEARDOWN" in proc.stderr.splitlines()) is not torch_loaded, proc.stderr


def _mallinfo2():
    """glibc's ``mallinfo2`` (2.33 and later), or None."""
    import ctypes

    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        return ctypes.CDLL(None).mallinfo2
    except (ValueError, OSError, AttributeError):
        return None


_HAVE_MALLINFO2 = _mallinfo2() is not None
# An atexit handler (it runs before the fast exit): how many mmapped blocks one 16 MB malloc adds (glibc's default
# maps any block over 128 kB on its own pages; with keep_freed_memory, blocks under 32 MB come from the heap).
_MMAPPED_AT_EXIT = """
import atexit, ctypes, sys

def _mmapped_blocks_added():
    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
    except (OSError, AttributeError):
        return
    before = libc.mallinfo2().hblks
    block = libc.malloc(16 << 20)
    added = libc.mallinfo2().hblks - before
    libc.free(block)
    sys.stderr.write(f"MMAPPED_BLOCKS_ADDED {added}\\n")

atexit.register(_mmapped_blocks_added)
"""


@pytest.mark.skipif(not _HAVE_MALLINFO2, reason="needs glibc 2.33+ (mallinfo2) to see where malloc puts a block")
@pytest.mark.parametrize("keep", [True, False])
def test_26_9_the_ast_process_keeps_freed_memory_for_reuse(keep):
    """glibc's default gives every block over its moving mmap threshold fresh pages (and hands freed heap back),
    which cost 5-17 k page faults per bf16 forward; ``keep_freed_memory`` serves blocks under 32 MB from the heap
    and keeps what is freed. A user's own malloc settings win."""
    import subprocess
    import sys

    probe = ("import sys\nfrom ast_cli.cli import _signals\n"
             "print('SET', _signals.keep_freed_memory() if sys.argv[1] == 'keep' else None)\n" + _MMAPPED_AT_EXIT)
    proc = subprocess.run([sys.executable, "-c", probe, "keep" if keep else "default"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ("SET True" if keep else "SET None") in proc.stdout
    assert f"MMAPPED_BLOCKS_ADDED {0 if keep else 1}" in proc.stderr.splitlines(), proc.stderr
    tuned = subprocess.run([sys.executable, "-c", probe, "keep"], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))
    assert "SET False" in tuned.stdout and "MMAPPED_BLOCKS_ADDED 1" in tuned.stderr.splitlines(), tuned.stderr


def test_26_6_the_ast_executable_ends_without_the_teardown(tiny_checkpoint, audio, tmp_path):
    """``python -m ast_cli`` and the ``ast`` script run ``main_process``: a classify run's records all reach
    stdout, its exit code stays, and the interpreter's teardown (which a module global's ``__del__`` would
    report through this sitecustomize) never runs. ``main()`` itself still ends in ``SystemExit``."""
    import importlib.metadata
    import subprocess
    import sys

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n\nclass Teardown:\n    def __del__(self, write=os.write):\n        write(2, b'TEARDOWN\\n')\n\n"
        "keep = Teardown()\n" + _MMAPPED_AT_EXIT)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "ast_cli", "classify", "--model", str(tiny_checkpoint[0]), "--device", "cpu",
            "-q", "-f", "jsonl"]
    proc = subprocess.run([*base, str(audio / "a")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) >= 2 and all(r["error"] is None for r in records), proc.stdout
    assert "TEARDOWN" not in proc.stderr
    if _HAVE_MALLINFO2:  # main_process told glibc to keep freed memory: a 16 MB block comes from the heap
        assert "MMAPPED_BLOCKS_ADDED 0" in proc.stderr.splitlines(), proc.stderr
    failed = subprocess.run([*base, str(audio / "a"), str(tmp_path / "missing.wav")], capture_output=True,
                            text=True, env=env, timeout=300)
    errors = [json.loads(line)["error"] for line in failed.stdout.splitlines()]
    assert failed.returncode == 1 and len(errors) == len(records) + 1 and errors[-1], failed.stderr
    assert "TEARDOWN" not in failed.stderr
    helped = subprocess.run([sys.executable, "-m", "ast_cli", "--version"], capture_output=True, text=True,
                            env=env, timeout=120)  # torch never loads: the ordinary exit
    assert helped.returncode == 0 and "TEARDOWN" in helped.stderr
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("ast") == "ast_cli.cli:main_process"


def _ast_process(*args, **kwargs):
    """A real ``ast`` process (``python -m ast_cli``, the executable's entry point, fast exit included)."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "ast_cli", *map(str, args)], text=True, **kwargs)


@pytest.fixture(scope="module")
def thirty_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("thirty")
    return [write_audio(root / f"c{i:02d}.wav", 1.0, seed=i) for i in range(30)]


@pytest.mark.parametrize("failing", [True, False])
def test_26_10_a_broken_stderr_pipe_never_stops_a_run(tiny_checkpoint, thirty_clips, tmp_path, failing):
    """stderr a pipe whose reader went away (a log collector that died): every write to it fails with EPIPE.
    Messages are best effort, data is not: every record still reaches stdout and the exit code is the run's.
    (rich's default for a broken pipe pointed stdout at /dev/null and raised SystemExit(1): a run stopped at
    its first failure line, or lost its exit code 0 at its summary line.)"""
    import subprocess

    bad = tmp_path / "a-bad.wav"  # first: its failure line is the first message
    bad.write_bytes(b"junk" * 50)
    inputs = ([bad] if failing else []) + thirty_clips[:6]
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read stderr
    try:
        proc = _ast_process("classify", *inputs, "--model", tiny_checkpoint[0], "--device", "cpu", "-f", "jsonl",
                            stdout=subprocess.PIPE, stderr=write_end,
                            env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
    finally:
        os.close(write_end)
    out, _ = proc.communicate(timeout=300)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in inputs]
    assert proc.returncode == (1 if failing else 0)


def test_26_10_a_table_whose_reader_went_away_ends_with_141(tiny_checkpoint, thirty_clips, tmp_path):
    """``ast classify -f table ... | head -1`` ends as every other format does (README: exit 141, quietly), not
    with rich's SystemExit(1). Every label of 30 files: far more than a pipe holds, so the run is still writing
    when its reader goes away."""
    import subprocess

    proc = _ast_process("classify", *thirty_clips, "--model", tiny_checkpoint[0], "--device", "cpu", "-f", "table",
                        "--top", "0", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    stderr = proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == 141, stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr


def _every_token_pooled(model, inputs, attn="sdpa"):
    """The pooled embedding with every token through every layer, as the reference computes it."""
    backbone = model.audio_spectrogram_transformer
    x = backbone.embeddings(inputs)
    for layer in backbone.encoder.layer:
        x = layer(x, attn)
    x = backbone.layernorm(x)
    return (x[:, 0] + x[:, 1]) / 2


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8-onednn"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_26_7_the_last_layer_computes_only_the_pooled_tokens(mode, attn):
    """The pooled embedding reads two tokens of the last layer: that layer computes only their outputs (every
    token's key and value, two queries, two rows of the MLP), 8% off a packed bf16 forward on the 2-core
    Sapphire Rapids CPU, with the same result as every token through it, and bit for bit the same whatever the
    batch. Fails if the last layer runs on all tokens (its MLP sees them), if its two rows differ from the whole
    computation's, or if a batch changes them."""
    if mode == "bf16" and not _bf16_packing_works():
        pytest.skip("this torch has no oneDNN bf16 linear to pack")
    if mode == "int8-onednn" and not _onednn_works():
        pytest.skip("this torch has no oneDNN int8 linear")
    torch.manual_seed(0)
    model = random_model(ASTConfig(**TINY, id2label=("a", "b", "c")))
    model, dtype = fast.place(model, mode, "cpu")
    last = model.audio_spectrogram_transformer.encoder.layer[-1]
    mlp = last.mlp_in[0] if isinstance(last, PackedLayerBF16) else last.intermediate.dense
    seen = []
    hook = mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    inputs = torch.randn(3, model.config.max_length, model.config.num_mel_bins).to(dtype)
    with torch.inference_mode():
        pooled = model.forward_features(inputs, attn=attn)
        hook.remove()
        alone = torch.cat([model.forward_features(window, attn=attn) for window in inputs.split(1)])
        whole = _every_token_pooled(model, inputs, attn)
    assert seen[:3] == [2, 2, 2]
    assert torch.equal(pooled, alone)  # a window's bits never depend on the batch it came in
    # The same arithmetic for those rows; a GEMM of 2 rows may sum in another order than one of all rows.
    tolerance = {"fp32": 1e-5, "bf16": 2e-2, "int8-onednn": 1e-5}[mode]
    assert torch.allclose(pooled.float(), whole.float(), rtol=tolerance, atol=tolerance), (
        (pooled.float() - whole.float()).abs().max())


@pytest.mark.parametrize("value", ["onednnn", "fbgem", "amx"])
def test_26_8_an_int8_kernel_that_does_not_exist_is_refused_before_the_model_loads(tiny_checkpoint, audio,
                                                                                   monkeypatch, value):
    """``AST_INT8_KERNEL`` with a typo used to run FBGEMM as if it were the kernel asked for: now a usage error
    (exit 2) naming the variable and the kernels, before the model loads; case and spaces stay forgiven."""
    from ast_cli.checkpoint import speed
    from ast_cli.errors import UsageError

    monkeypatch.setenv("AST_INT8_KERNEL", value)
    loads = []
    monkeypatch.setattr("ast_cli.checkpoint.weights.load_checkpoint", lambda *a, **k: loads.append(a))
    result = CliRunner().invoke(app, ["classify", str(audio / "a"), "--model", str(tiny_checkpoint[0]), "--device",
                                      "cpu", "--quantize", "int8", "-q"])
    assert result.exit_code == 2 and "AST_INT8_KERNEL" in result.output and "onednn" in result.output, result.output
    assert loads == []
    with pytest.raises(UsageError):
        speed.int8_kernel()
    monkeypatch.setenv("AST_INT8_KERNEL", " Int_MM ")
    assert speed.int8_kernel() == "int_mm"
    monkeypatch.setenv("AST_INT8_KERNEL", "")
    assert speed.int8_kernel() in ("fbgemm", "int_mm")


def test_26_11_bf16_packs_from_the_float32_weights_into_the_same_model(monkeypatch):
    """``place_bf16_cpu`` packs each Linear weight straight from float32 (no whole-model bf16 copy first, which
    packing only copied again: 99 k -> 58 k fresh pages of a full-size load on the 2-core Sapphire Rapids CPU), and
    the model is the one packing a bf16 copy gives, bit for bit: the same roundings."""
    from ast_cli.checkpoint import speed

    if not _bf16_packing_works():
        pytest.skip("this torch has no oneDNN bf16 linear to pack")
    torch.manual_seed(0)
    model = random_model(ASTConfig(**TINY, id2label=("a", "b", "c")))
    reference = speed.pack_bf16(copy.deepcopy(model).to(torch.bfloat16).eval())
    arriving = []
    pack = speed.PackedLinearBF16._pack
    monkeypatch.setattr(speed.PackedLinearBF16, "_pack",
                        lambda self, weight, *rest: arriving.append(weight.dtype) or pack(self, weight, *rest))
    placed = speed.place_bf16_cpu(copy.deepcopy(model))
    assert arriving and set(arriving) == {torch.float32}
    assert {p.dtype for p in placed.parameters()} == {torch.bfloat16}
    inputs = torch.randn(2, model.config.max_length, model.config.num_mel_bins).bfloat16()
    with torch.inference_mode():
        assert torch.equal(placed(inputs), reference(inputs))


def test_26_12_a_candidate_without_a_fast_kernel_here_is_not_calibrated(tiny_model, monkeypatch):
    """With oneDNN's ISA capped below AMX on the Sapphire Rapids CPU, oneDNN ran int8 on its reference kernel,
    8.5 s per GEMM: calibrating it would have taken most of an hour. One probe GEMM per candidate first; a
    candidate 10x slower than fp32 or worse is skipped, with the reason, before any model is placed in it."""
    seconds = {"fp32": 0.004, "bf16": 0.001, "int8-fbgemm": 0.002, "int8-onednn": 0.17, "int8-int_mm": 0.002}
    monkeypatch.setattr(probe, "probe_seconds", lambda name, below=0.0: seconds[name])
    placed, place = [], fast.place
    monkeypatch.setattr(fast, "place", lambda model, name, device: placed.append(name) or place(model, name, device))
    candidates = {c.name: c for c in fast.calibrate(tiny_model, "cpu")}
    if candidates["int8-onednn"].skipped and "this torch" in candidates["int8-onednn"].skipped:
        pytest.skip(candidates["int8-onednn"].skipped)
    assert candidates["int8-onednn"].skipped == ("its GEMM ran 42x slower than fp32's here in 3 tries (a busy "
                                                 "machine, or no fast kernel for this CPU)")
    assert "int8-onednn" not in placed and "fp32" in placed and "int8-fbgemm" in placed


def test_26_12_the_probe_keeps_the_kernels_that_have_one_everywhere():
    """The real probe on this machine keeps FBGEMM's int8 (AVX2 and up) and, where the CPU has AMX, bf16: the
    kernels with a fast path on every CPU the suite runs on. (oneDNN's int8 may rightly be dropped on a CPU it
    has no fast path for.)"""
    from ast_cli.checkpoint.speed import _cpuinfo_flags

    names = [name for name, skipped in fast.candidate_names("cpu") if skipped is None]
    dropped = probe.slow_candidates(names)
    assert "int8-fbgemm" not in dropped, dropped
    if "amx_bf16" in _cpuinfo_flags():
        assert "bf16" not in dropped, dropped


def test_26_13_one_stalled_probe_call_does_not_drop_a_candidate():
    """One probe call once measured FBGEMM's int8 10x slower than fp32 (a stall of the machine): the probe takes
    the best of a few calls, and stops as soon as one is fast enough, so a slow kernel costs few calls."""
    import time as clock

    durations = iter([0.05, 0.001, 0.001])

    def stalls_once():
        clock.sleep(next(durations))

    from ast_cli.checkpoint.timing import best_seconds

    assert best_seconds(stalls_once, probe.PROBE_CALLS, below=0.02) < 0.02
    assert next(durations) == 0.001  # stopped after the first fast call
    calls = []
    assert best_seconds(lambda: calls.append(clock.sleep(0.002)), probe.PROBE_CALLS) >= 0.002
    assert len(calls) == probe.PROBE_CALLS


@pytest.mark.skipif(not (_onednn_works() and _int_mm_works()), reason="needs both oneDNN's int8 linear and CPU "
                                                                       "torch._int_mm in this torch build")
def test_26_13_int_mm_stands_in_where_onednn_has_no_fast_kernel(tiny_model, monkeypatch, tmp_path):
    """int8-int_mm was never calibrated where oneDNN's int8 exists ("computes the same products faster"), even
    where the probe found oneDNN on its reference kernel (AMX refused: 2100x fp32; torch._int_mm 0.49x). It is
    calibrated then, and a choice of it is taken from the cache as any other."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    seconds = {"fp32": 0.004, "bf16": 0.001, "int8-fbgemm": 0.002, "int8-onednn": 8.5, "int8-int_mm": 0.002}
    monkeypatch.setattr(probe, "probe_seconds", lambda name, below=0.0: seconds[name])
    candidates = {c.name: c for c in fast.calibrate(tiny_model, "cpu")}
    assert candidates["int8-onednn"].skipped.startswith("its GEMM ran 2125x slower")
    assert candidates["int8-int_mm"].skipped is None and candidates["int8-int_mm"].ms > 0
    seconds["int8-onednn"] = 0.001  # oneDNN fast again: int_mm stays out, as before
    assert fast.calibrate(tiny_model, "cpu")[-1].skipped == fast.ONEDNN_FASTER
    calls = []
    monkeypatch.setattr(fast, "calibrate", lambda *a, **k: calls.append(1) or [
        Candidate("fp32", 100.0, 0.0), Candidate("int8-int_mm", 40.0, 0.01)])
    assert fast.choose(tiny_model).mode == fast.choose(tiny_model).mode == "int8-int_mm"
    assert calls == [1]  # the second run read the cache


def test_26_13_a_choice_calibrated_on_a_busy_machine_is_taken_again_when_it_is_quiet(fake_calibration, tiny_model,
                                                                                      monkeypatch):
    """A calibration taken while the test suite ran beside it timed int8 at 1522 ms against fp32's 774 (quiet: 362
    against 754) and cached fp32 for good. Now a choice made while the load average is at half the CPUs or more is
    marked busy: used while the machine stays busy, calibrated again (once) by the first run that finds it quiet;
    its timings are never reused for another comparison. A quiet choice is never taken again."""
    busy = [True]
    monkeypatch.setattr(fast, "machine_busy", lambda: busy[0])
    first = choose(tiny_model)
    assert first.busy and not first.cached
    assert choose(tiny_model).cached and fake_calibration == ["cpu"]  # still busy: the cached choice
    busy[0] = False
    again = choose(tiny_model)
    assert not again.cached and not again.busy and fake_calibration == ["cpu", "cpu"]
    assert fake_calibration.timings[-1] in ({}, None)  # the busy entry's timings were not reused
    assert choose(tiny_model).cached and fake_calibration == ["cpu", "cpu"]
    busy[0] = True
    assert choose(tiny_model).cached and fake_calibration == ["cpu", "cpu"]  # a quiet choice stays


def test_26_13_busy_means_a_load_average_of_half_the_cpus():
    busy = fastcache.is_busy
    assert busy(1.0, 2) and busy(40.0, 64) and not busy(0.6, 2) and not busy(0, 1)


def test_26_13_the_fast_line_says_a_busy_calibration_will_be_taken_again():
    import io

    from rich.console import Console

    from ast_cli.cli._common import announce_fast

    out = io.StringIO()
    announce_fast(FastChoice("int8-fbgemm", 2.08, 0.016, busy=True), Console(file=out, width=200), quiet=False)
    assert out.getvalue().strip() == ("fast: int8-fbgemm, 2.08x fp32's speed, scores within 0.0160 of fp32 "
                                      "(calibrated now on a busy machine; again when it is quiet)")


def test_26_13_the_cache_folder_is_private_whatever_the_umask(fake_calibration, tiny_model, tmp_path):
    """Under umask 002 (common on Ubuntu) the --fast cache made ``ast-cli`` group-writable, and the attention
    kernels in it were refused from then on as "not private" (said only with --debug)."""
    old = os.umask(0o002)
    try:
        choose(tiny_model)
    finally:
        os.umask(old)
    folder = os.path.dirname(fast_cache_path())
    assert os.path.isfile(fast_cache_path()) and stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def _in_time(call, seconds: float = 20.0) -> list:
    """``[call()]``, or [] when it has not returned after ``seconds`` (it goes on in a daemon thread)."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    return out


def test_s8_15_a_fifo_as_the_cache_file_is_no_cache(tiny_model, fake_calibration):
    path = fast_cache_path()
    os.makedirs(os.path.dirname(path))
    os.mkfifo(path)
    try:
        chosen = _in_time(lambda: choose(tiny_model))
    finally:
        if stat.S_ISFIFO(os.lstat(path).st_mode):  # a reader still blocked there: a writer lets it go
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert chosen and chosen[0].mode == "bf16", "the run waited on the FIFO"
    assert json.loads(open(path).read())["version"] == fastcache.CACHE_VERSION  # replaced by a regular file


def test_s8_15_a_link_to_a_device_is_read_with_a_bound(tmp_path):
    """A link to /dev/zero was read without end: in a process with 1 GiB of address space, so that a failure is
    a MemoryError there, not memory taken from the machine."""
    link = tmp_path / "fast-v4.json"
    link.symlink_to("/dev/zero")
    code = "import sys; from ast_cli.run import fastcache; print(fastcache.read_cache(sys.argv[1]))"
    limit = (1 << 30, 1 << 30)
    done = subprocess.run([sys.executable, "-c", code, str(link)], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, limit))
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr[-500:]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_s8_review_a_cache_file_linked_to_a_device_is_never_replaced(tiny_model, fake_calibration, tmp_path):
    """A ``fast-v4.json`` planted as a link to /dev/zero: the cache's atomic rename went through the link and
    replaced /dev/zero itself with a regular file holding the cache (found on this machine after a hostile
    test). A target that is not a regular file is never replaced; here a FIFO stands for the device."""
    import stat

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cache = tmp_path / "xdg" / "ast-cli" / "fast-v4.json"
    cache.parent.mkdir(parents=True, mode=0o700)
    cache.symlink_to(fifo)
    assert choose(tiny_model).mode == "bf16"  # calibrated; the link itself was replaced, never what it points to
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and not cache.is_symlink()



def test_s9_the_fast_cache_never_writes_through_a_link(tiny_model, fake_calibration, tmp_path):
    """A ``fast-v4.json`` planted as a link to a file of the user's was overwritten with the cache, and one to a
    name that did not exist created it, outside the cache folder. A link is neither read nor written through:
    the write replaces the link itself."""
    victim, elsewhere = tmp_path / "victim.txt", tmp_path / "elsewhere.json"
    victim.write_text("precious\n")
    cache = tmp_path / "xdg" / "ast-cli" / "fast-v4.json"
    cache.parent.mkdir(parents=True, mode=0o700)
    for target in (victim, elsewhere):
        cache.symlink_to(target)
        assert not choose(tiny_model).cached
        assert not cache.is_symlink() and json.loads(cache.read_text())["version"] == fastcache.CACHE_VERSION
        cache.unlink()
    assert victim.read_text() == "precious\n" and not elsewhere.exists()
    assert len(fake_calibration) == 2


def test_s9_a_cache_folder_others_may_write_is_neither_read_nor_written(tiny_model, fake_calibration, tmp_path):
    """Under umask 002 an older version left ``ast-cli`` group-writable: a member of the group could plant links or
    choices there. Such a folder, another user's, or a link in its place, is checked as the AMX kernels' folder is:
    the run calibrates, caches nothing, and its fast line says why."""
    import io

    from rich.console import Console

    from ast_cli.cli._common import announce_fast

    folder = tmp_path / "xdg" / "ast-cli"
    folder.mkdir(parents=True, mode=0o700)
    planted = {"key": fast.cache_key(tiny_model, "cpu"), "choice": {"mode": "fp32", "speedup": 1.0, "max_diff": 0.0}}
    (folder / "fast-v4.json").write_text(json.dumps({"version": fastcache.CACHE_VERSION, "entries": [planted]}))
    before = (folder / "fast-v4.json").read_bytes()
    folder.chmod(0o770)
    choice = choose(tiny_model)
    assert (choice.mode, choice.cached, fake_calibration) == ("bf16", False, ["cpu"])  # the planted fp32 unread
    assert (folder / "fast-v4.json").read_bytes() == before and sorted(os.listdir(folder)) == ["fast-v4.json"]
    out = io.StringIO()
    announce_fast(choice, Console(file=out, width=400), quiet=False)
    assert out.getvalue().strip().endswith(f"(calibrated now, not cached: {folder} is not private (a link, another "
                                           "user's, or writable by others: chmod 700 it))")
    folder.chmod(0o700)
    folder.rename(tmp_path / "real")
    folder.symlink_to(tmp_path / "real")  # a link in the folder's place: it could lead anywhere
    assert choose(tiny_model).not_cached and (tmp_path / "real" / "fast-v4.json").read_bytes() == before
    folder.unlink()
    (tmp_path / "real").rename(folder)
    assert choose(tiny_model).cached and choose(tiny_model).mode == "fp32"  # ours alone again: read as before


def test_s9_two_runs_calibrating_at_once_both_keep_their_choice(tiny_model, fake_calibration, monkeypatch):
    """Two ``--fast`` runs of two models calibrating at once kept only the choice of the one that wrote last: each
    wrote the entries it had read before calibrating. Now the writer merges with what is there under a lock."""
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.classifier.dense.weight.add_(0.01)
    calibrate = fast.calibrate
    monkeypatch.setattr(fast, "calibrate", lambda model, *a, **k: (
        choose(other) if model is tiny_model else None, calibrate(model, *a, **k))[1])
    choose(tiny_model)  # read the cache (empty), then the other run calibrated and wrote meanwhile
    assert len(json.loads(open(fast_cache_path()).read())["entries"]) == 2
    assert choose(tiny_model).cached and choose(other).cached and len(fake_calibration) == 2


def test_s9_a_cache_writer_waits_for_the_lock_and_gives_up_in_bounded_time(tmp_path):
    import fcntl

    lock = str(tmp_path / ".fast-v4.json.lock")
    now, naps = [0.0], []

    def sleep(seconds):
        naps.append(seconds)
        now[0] += seconds

    with fastcache._locked(lock, 1.0, clock=lambda: now[0], sleep=sleep) as held:
        assert held
        fd = os.open(lock, os.O_RDWR)
        with pytest.raises(BlockingIOError):  # held: nobody else has it meanwhile
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with fastcache._locked(lock, 1.0, clock=lambda: now[0], sleep=sleep) as second:
            assert not second and 1.0 <= now[0] < 1.2  # waited its time, then gave up
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the block ended
    os.close(fd)


@pytest.mark.parametrize("command", ["classify", "listen"])
def test_s9_fast_refuses_raw_logits_before_the_model_loads(tiny_checkpoint, audio, tmp_path, monkeypatch, command):
    """``--fast --activation none`` said "scores within 0.0059 of fp32" while the raw logits it reported moved
    0.0247: the calibration compares scores. Refused (exit 2) before the model loads and before any output."""
    from ast_cli.run.tagger import Tagger

    monkeypatch.setattr(Tagger, "load", classmethod(lambda *a, **k: pytest.fail("the model loaded")))
    out = tmp_path / "tags.json"
    args = [str(audio / "a"), "-o", str(out)] if command == "classify" else [str(audio / "a" / "a0.wav")]
    result = runner.invoke(app, [command, *args, "--model", str(tiny_checkpoint[0]), "--fast", "--activation", "none"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "Error: --activation: raw logits go with no fast mode: it keeps scores within 0.02 of fp32's, and logits "
        "move more; choose the mode by hand instead (bf16, or int8)", "Hint: drop --fast and use --dtype bf16"]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_s9_timing_runs_candidates_in_turns_and_keeps_each_ones_fastest_pass():
    from ast_cli.checkpoint.timing import interleaved_fastest

    order = []

    def run(name, seconds):
        return lambda: order.append(name) or next(seconds)

    fastest = interleaved_fastest({"fp32": run("fp32", iter([9.0, 3.0, 1.0, 3.0, 2.0, 3.0])),
                                   "bf16": run("bf16", iter([9.0, 1.5, 1.4, 1.6, 1.5, 1.5]))},
                                  warmup_rounds=1, least=2, most=5, seconds=7.0)
    assert fastest == {"fp32": 1.0, "bf16": 1.4}  # the warm-up round's 9 s never counts
    # in turns, the order reversed every other round; rounds past the least until 7 s were timed
    assert order == ["fp32", "bf16", "bf16", "fp32", "fp32", "bf16", "bf16", "fp32"]
    endless = interleaved_fastest({"a": lambda: 0.001}, warmup_rounds=0, least=2, most=5, seconds=60.0)
    assert endless == {"a": 0.001}


def test_s9_a_calibration_on_a_busy_machine_never_shows_a_slower_mode_faster(tiny_model, monkeypatch):
    """Load that hit fp32's passes (its warm-up stopped at two slow passes that agreed, then 2 of its 3 timed
    passes were slow) made int8 look 2.3x faster where it is slower: passes taken in turns, the fastest of each
    candidate counts."""
    import itertools

    fp32_passes = itertools.chain([0.003] * 4, itertools.repeat(0.001))  # a burst of load, then quiet
    runs = iter([lambda: next(fp32_passes), lambda: 0.0013])
    monkeypatch.setattr(fast, "candidate_names", lambda device: [("fp32", None), ("int8-fbgemm", None)])
    monkeypatch.setattr(probe, "slow_candidates", lambda names: {})
    monkeypatch.setattr(fast, "_timer", lambda *args: next(runs))
    candidates = fast.calibrate(tiny_model, "cpu")
    assert [(c.name, c.ms) for c in candidates] == [("fp32", 1.0), ("int8-fbgemm", 1.3)]
    assert pick(candidates).mode == "fp32"


def test_s9_the_probe_tries_again_with_fp32_before_it_drops_a_kernel(monkeypatch):
    """FBGEMM's int8 was dropped as "98x slower (no fast kernel for this CPU)" from one try in 6 of 15 probes
    on a busy machine. Each try times fp32 again just before; a kernel is dropped when every try is 10x slower,
    and said to have no fast kernel only from a try 500x slower (a reference kernel: one try is enough)."""
    calls, seconds = [], {"fp32": iter([0.001] * 9), "int8-fbgemm": iter([0.098, 0.0005]),
                          "int8-onednn": iter([2.1])}
    monkeypatch.setattr(probe, "probe_seconds", lambda name, below=0.0: calls.append(name) or next(seconds[name]))
    dropped = probe.slow_candidates(["fp32", "int8-fbgemm", "int8-onednn"])
    assert list(dropped) == ["int8-onednn"] and dropped["int8-onednn"].endswith("(no fast kernel for this CPU)")
    assert calls == ["fp32", "int8-fbgemm", "fp32", "int8-fbgemm", "fp32", "int8-onednn"]


def test_s9_a_lock_that_cannot_be_made_is_not_called_another_runs(tmp_path):
    """A read-only cache folder, or a directory where the lock file goes, said "another run held its lock"."""
    from types import SimpleNamespace

    from ast_cli.run import fastcache

    folder = tmp_path / "ast-cli"
    folder.mkdir(mode=0o700)
    (folder / ".fast-v4.json.lock").mkdir()  # stands for any lock file that cannot be opened
    choice = SimpleNamespace(mode="fp32", speedup=1.0, max_diff=0.0, measure="sigmoid", candidates=[], busy=False)
    why = fastcache.write_cache(str(folder / "fast-v4.json"), {"k": 1}, choice)
    assert why is not None and why.startswith("cannot write") and "lock" in why, why
