"""Is ``ast index`` as fast as ``ast extract-features --kind embedding`` on the same folder? (Issue #27: within 10%.)

Builds the random full-size AudioSet checkpoint and clips of ``compare_transformers.py`` (nothing is downloaded),
then runs, as whole processes, alternately, ``--rounds`` times each: ``ast extract-features DIR --out OUT --kind
embedding`` (OUT fresh each round) and ``ast index DIR --db DB`` (DB fresh each round). Both embed the same windows
with the same engine; the index also writes SQLite rows. Prints the median wall seconds of each and the ratio.

    python benchmarks/index_speed.py                  # 6 clips of 30 s, 3 rounds: ~5 minutes on 2 cores
    python benchmarks/index_speed.py --clips 4 --seconds 20 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_transformers import make_checkpoint, make_clips  # noqa: E402


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ast-index-speed"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    model = str(make_checkpoint(work / "model"))
    make_clips(work / "clips", args.clips, args.seconds)
    common = ["--model", model, "--device", "cpu", "--dtype", "fp32", "--quiet"]
    ast = [sys.executable, "-m", "ast_cli"]
    times: dict[str, list[float]] = {"extract-features": [], "index": []}
    for _ in range(args.rounds):
        shutil.rmtree(work / "emb", ignore_errors=True)
        shutil.rmtree(work / "db", ignore_errors=True)
        times["extract-features"].append(timed([*ast, "extract-features", str(work / "clips"), "--out",
                                                str(work / "emb"), "--kind", "embedding", *common]))
        times["index"].append(timed([*ast, "index", str(work / "clips"), "--db", str(work / "db"), *common]))
    extract, index = (statistics.median(times[k]) for k in ("extract-features", "index"))
    print(f"{args.clips} clips of {args.seconds:g} s, random full-size weights, fp32, {os.cpu_count()} CPUs "
          f"({cpu_name()}), median of {args.rounds} whole processes")
    print(f"extract-features --kind embedding: {extract:.2f} s")
    print(f"index:                             {index:.2f} s")
    print(f"index / extract-features:          {index / extract:.3f}")


if __name__ == "__main__":
    main()
