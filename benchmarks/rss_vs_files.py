"""Peak memory of ``ast classify`` against the number of files: 1, 10,000 and 100,000 by default.

The files are hard links of one short clip (1 s, 44.1 kHz, so every file is decoded and resampled) in one folder,
tagged by a tiny random AST (the engine's per-file cost, not the model's, is what grows with the count). Each count
is one whole ``ast classify DIR -f jsonl`` process, as a user runs it, records to /dev/null; its peak RSS is the
kernel's (``ru_maxrss`` from ``wait4``). Prints one JSON line per count, and the CPU.

    python benchmarks/rss_vs_files.py                      # 1, 10,000, 100,000 files: ~10 minutes on 2 cores
    python benchmarks/rss_vs_files.py --counts 1 2000      # a quick look
    PYTHONPATH=/path/to/other/checkout python benchmarks/rss_vs_files.py   # the same for another version
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]


def cpu_name() -> str:
    """``lscpu``'s model name (what the README quotes next to the numbers)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def tiny_model(directory: Path) -> Path:
    """The tests' tiny random AST with AudioSet's 527 labels (0.64 s windows)."""
    from conftest import make_reference

    if not (directory / "tiny" / "model.safetensors").is_file():
        make_reference(directory, "tiny")
    return directory / "tiny"


def peak_rss(args: list[str]) -> tuple[float, float, int]:
    """Run ``python -m ast_cli ARGS`` (stdout to /dev/null): (peak RSS in MB, wall seconds, exit code)."""
    start = time.perf_counter()
    with open(os.devnull, "w") as null:
        # Started outside any checkout: ``-m`` puts the working directory first on sys.path, ahead of PYTHONPATH.
        proc = subprocess.Popen([sys.executable, "-m", "ast_cli", *args], stdout=null, stderr=subprocess.PIPE,
                                text=True, cwd=tempfile.gettempdir())
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"`ast {' '.join(args)}` exited {code}:\n{proc.stderr.read()[-2000:]}")
    return usage.ru_maxrss / 1024, wall, code


def linked_folder(work: Path, clip: Path, count: int) -> Path:
    """``count`` hard links of ``clip`` (of a copy of it for every 50,000: ext4 allows 65,000 links a file)."""
    import shutil

    folder = work / f"files-{count}"
    folder.mkdir(exist_ok=True)
    for i in range(count):
        path = folder / f"{i:06d}.wav"
        source = work / f"clip-{i // 50_000}.wav"
        if not source.exists():
            shutil.copyfile(clip, source)
        if not path.exists():
            os.link(source, path)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10_000, 100_000])
    parser.add_argument("--workdir", default=None, help="Keep the model and the links here (default: a temp dir).")
    args = parser.parse_args(argv)
    import numpy as np
    import soundfile as sf

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model = tiny_model(work)
        clip = work / "clip.wav"
        t = np.arange(44100) / 44100
        sf.write(clip, 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.shape),
                 44100, subtype="PCM_16")
        print(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count()}), flush=True)
        for count in args.counts:
            folder = linked_folder(work, clip, count)
            rss, wall, _ = peak_rss(["classify", str(folder), "--model", str(model), "-f", "jsonl", "-q"])
            print(json.dumps({"files": count, "peak_rss_mb": round(rss, 1), "wall_s": round(wall, 1),
                              "files_per_s": round(count / wall, 1)}), flush=True)


if __name__ == "__main__":
    main()
