"""torchaudio is never imported: not when it is absent, not when it is installed and broken (as torchaudio 2.11
is next to torch 2.15, where importing it raises RuntimeError), and not when it works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import write_audio

BROKEN_MESSAGE = ("Detected that PyTorch and TorchAudio were compiled with different CUDA versions. "
                  "PyTorch has CUDA version 13.2 whereas TorchAudio has CUDA version 13.0.")

# Runs one command of the CLI in this process, then reports the exit code and whether torchaudio was imported.
RUNNER = textwrap.dedent("""
    import json, sys
    from ast_cli.cli import main
    sys.argv = ["ast"] + json.loads(sys.argv[1])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    print("RESULT " + json.dumps({"code": code, "torchaudio": sorted(m for m in sys.modules if m.startswith("torchaudio"))}))
""")


@pytest.fixture(scope="module")
def broken_torchaudio(tmp_path_factory):
    """A site directory with an installed-looking torchaudio whose import raises, as the real one does."""
    site = tmp_path_factory.mktemp("broken_site")
    (site / "torchaudio").mkdir()
    (site / "torchaudio" / "__init__.py").write_text(f"raise RuntimeError({BROKEN_MESSAGE!r})\n")
    info = site / "torchaudio-2.11.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchaudio\nVersion: 2.11.0\n")
    return site


def run_ast(args, extra_path=None):
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([str(a) for a in args])],
                          capture_output=True, text=True, env=env, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout + proc.stderr
    return json.loads(line[-1][len("RESULT "):]), proc


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return [write_audio(root / "a.flac", 1.0, 44100, 2, seed=1), write_audio(root / "b.wav", 0.7, 8000, 1, seed=2)]


def test_the_fake_torchaudio_really_is_broken(broken_torchaudio):
    proc = subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(broken_torchaudio)))
    assert proc.returncode != 0 and "RuntimeError" in proc.stderr and "CUDA version" in proc.stderr


@pytest.mark.slow  # a whole process (or several): seconds each
@pytest.mark.parametrize("with_broken", [False, True], ids=["as-installed", "broken-torchaudio-installed"])
def test_classify_never_imports_torchaudio(tiny_checkpoint, clips, broken_torchaudio, with_broken):
    result, proc = run_ast(["classify", *clips, "--model", tiny_checkpoint[0], "-f", "jsonl", "--top", "3"],
                           broken_torchaudio if with_broken else None)
    assert result == {"code": 0, "torchaudio": []}, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["error"] for r in records] == [None, None] and all(len(r["labels"]) == 3 for r in records)
    assert "TorchAudio" not in proc.stderr


@pytest.mark.slow  # a whole process (or several): seconds each
def test_extract_features_never_imports_torchaudio(tiny_checkpoint, clips, broken_torchaudio, tmp_path):
    result, proc = run_ast(["extract-features", *clips, "--model", tiny_checkpoint[0], "--out", tmp_path / "f",
                            "--quiet"], broken_torchaudio)
    assert result == {"code": 0, "torchaudio": []}, proc.stderr
    assert len(list((tmp_path / "f").rglob("*.safetensors"))) == 2


@pytest.mark.slow  # a whole process (or several): seconds each
def test_benchmark_never_imports_torchaudio(tiny_checkpoint, clips, broken_torchaudio):
    result, proc = run_ast(["benchmark", "--model", tiny_checkpoint[0], "--batch-sizes", "1", "--iters", "1",
                            "--warmup", "0", "--end-to-end", *clips, "-f", "json"], broken_torchaudio)
    assert result == {"code": 0, "torchaudio": []}, proc.stderr
