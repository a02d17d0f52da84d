"""The Ray engine against the local engine on the same machine: wall time, and throughput per actor.

Builds a full-size AST with random weights (the compute of the published checkpoints) and ``--clips`` clips of
``--seconds`` s (44.1 kHz stereo WAV), then times whole ``ast classify`` processes, exactly as a user runs them,
over the same clips, in rounds, the local engine in every round as the reference:

1. before any cluster runs: the local engine, and ``--engine ray`` with no address (the run starts a local
   Ray with this machine's CPUs and ends it: the cold start a one-off user pays);
2. with a cluster already running (``ray start --head --num-cpus <cores>``, as on a real cluster), joined with
   ``--ray-address auto``: 2 actors x 1 CPU, 1 actor x 1 CPU, and 1 actor x <cores> CPUs.

Each configuration runs on the first half of the clips and on all of them. It prints the median wall time on
all clips and its ratio to the local engine's in the same phase; the fixed cost (start-up and model loading:
the wall time's intercept, 2 x half - full); and the marginal throughput, (full - half) clips over the
difference of the two wall times, overall and per actor: how throughput scales with actors. Records reach the
driver a batch at a time, so the time between records says little; the two sizes don't depend on it.
Every process runs in a loopback-only network namespace (tests/raynet.py), so Ray's traffic stays on this
machine's loopback; that needs root and iproute2.

    python benchmarks/ray_vs_local.py                       # 20 ten-second clips, 2 rounds: ~20 minutes on 2 cores
    python benchmarks/ray_vs_local.py --clips 8 --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from compare_transformers import environment, make_checkpoint, make_clips  # noqa: E402

import raynet  # noqa: E402


def run_once(space: "raynet.RayNamespace", args: list[str], expected: int) -> float:
    """One ``ast classify`` process, start to exit: its wall time (and a check that every record came)."""
    start = time.perf_counter()
    proc = space.popen_ast(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    got = sum(1 for line in out.splitlines() if line.strip())
    if proc.returncode != 0 or got != expected:
        raise SystemExit(f"`ast {' '.join(args)}` exited {proc.returncode} with {got} of {expected} records:\n"
                         + err[-2000:])
    return wall


def summarize(name: str, actors: int, half: list[float], full: list[float], clips: int,
              reference: list[float] | None) -> dict:
    """Median wall times on half and all of the clips -> the row printed."""
    h, f = statistics.median(half), statistics.median(full)
    marginal = (clips - clips // 2) / (f - h) if f > h else float("nan")
    row = {"config": name, "actors": actors, "rounds": len(full), "wall_s": round(f, 2),
           "half_wall_s": round(h, 2), "fixed_s": round(2 * h - f, 2), "marginal_clips_per_s": round(marginal, 3),
           "per_actor_clips_per_s": round(marginal / actors, 3) if actors else None,
           "walls": [round(x, 2) for x in full], "half_walls": [round(x, 2) for x in half]}
    if reference:
        row["vs_local"] = round(f / statistics.median(reference), 3)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="Keep the checkpoint and clips here (default: a temp dir).")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    reason = raynet.reason_unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        model = str(make_checkpoint(work / "checkpoint"))
        paths = make_clips(work / "clips", args.clips, args.seconds)
        sizes = {"half": paths[: args.clips // 2], "full": paths}
        base = ["classify", "--model", model, "-f", "jsonl", "--top", "5", "--quiet"]
        ray = ["--engine", "ray"]
        joined = [*ray, "--ray-address", "auto"]
        cold_phase = {"local engine": (0, base), "ray, a local Ray started by the run": (cores, [*base, *ray])}
        warm_phase = {"local engine": (0, base),
                      "ray, running cluster, 2 actors x 1 CPU": (2, [*base, *joined, "--ray-workers", "2"]),
                      "ray, running cluster, 1 actor x 1 CPU": (1, [*base, *joined, "--ray-workers", "1"]),
                      f"ray, running cluster, 1 actor x {cores} CPUs":
                          (1, [*base, *joined, "--ray-workers", "1", "--cpus-per-worker", str(cores)])}
        rows = []
        space = raynet.RayNamespace()
        try:
            for phase, configs in (("cold", cold_phase), ("cluster", warm_phase)):
                if phase == "cluster":
                    space.start_cluster((cores,))
                runs = {(name, size): [] for name in configs for size in sizes}
                for round_ in range(args.rounds):
                    for name, (_, command) in configs.items():
                        for size, inputs in sizes.items():
                            runs[name, size].append(run_once(space, [*command, *inputs], len(inputs)))
                            print(f"[{phase} round {round_ + 1}] {name}, {len(inputs)} clips: "
                                  f"{runs[name, size][-1]:.1f} s", file=sys.stderr)
                for name, (actors, _) in configs.items():
                    reference = runs["local engine", "full"] if name != "local engine" else None
                    rows.append({"phase": phase, **summarize(name, actors, runs[name, "half"], runs[name, "full"],
                                                             args.clips, reference)})
        finally:
            space.close()
    out = {"environment": environment(), "clips": args.clips, "clip_seconds": args.seconds, "rows": rows}
    print(f"{args.clips} clips of {args.seconds:g} s, random full-size weights, float32; "
          f"{out['environment'].get('cpu', '?')}, {cores} cores")
    print(f"{'phase':<8} {'config':<40} {'wall s':>7} {'vs local':>8} {'fixed s':>7} {'clips/s':>7} {'/actor':>6}")
    for row in rows:
        ratio = f"{row['vs_local']:.2f}" if "vs_local" in row else "1"
        per = f"{row['per_actor_clips_per_s']:.3f}" if row["per_actor_clips_per_s"] else ""
        print(f"{row['phase']:<8} {row['config']:<40} {row['wall_s']:>7.1f} {ratio:>8} {row['fixed_s']:>7.1f} "
              f"{row['marginal_clips_per_s']:>7.3f} {per:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
