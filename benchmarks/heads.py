"""Many heads, one pass (#28): classify with the base head plus three trained heads against the base alone.

Builds the random full-size AudioSet AST of ``compare_transformers.py`` and its 10 s clips (20 by default), trains
three heads on it with ``ast train --mode head`` (2, 3 and 4 labels, the clips' embeddings computed once and
shared through ``--features-dir``), then times, in one process and alternating, rounds of ``Tagger.classify``
over the clips with the base alone and with the base plus the three heads (median wall seconds and CPU seconds
of all threads). Target: the heads cost <= 1.05x (the backbone runs once). Then each head is classified alone
(its standalone checkpoint as the model) and its scores compared with its scores in the joint run: target
max |difference| <= 1e-5.

Nothing is downloaded. Run from the repository root:

    python benchmarks/heads.py               # ~27 minutes on 2 shared cores, nearly all of it the base model
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_transformers import make_checkpoint, make_clips  # noqa: E402


def train_heads(base: Path, clips: list[str], work: Path) -> list[Path]:
    """Three heads on ``base``: the clips sorted into 2, 3 and 4 labels by their index."""
    from typer.testing import CliRunner

    from ast_cli.cli import app

    heads = []
    for labels in (2, 3, 4):
        data = work / f"data{labels}"
        for i, clip in enumerate(clips):
            (data / f"label{i % labels}").mkdir(parents=True, exist_ok=True)
            shutil.copy(clip, data / f"label{i % labels}" / Path(clip).name)
        out = work / f"head{labels}"
        result = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "--model", str(base), "--epochs", "20",
                                          "--val-split", "0.25", "--features-dir", str(work / "features"), "--quiet"])
        if result.exit_code != 0:
            raise SystemExit(f"training head{labels} failed: {result.stderr}")
        heads.append(out)
    return heads


def run(tagger, clips: list[str]) -> tuple[float, float, list]:
    """(wall seconds, CPU seconds, results) of one classify pass over ``clips``, every label kept."""
    from ast_cli.run.tagger import LabelSelection

    wall, cpu = time.perf_counter(), time.process_time()
    results = list(tagger.classify(clips, selection=LabelSelection(top=None)))
    return time.perf_counter() - wall, time.process_time() - cpu, results


def scores(result, head: str | None) -> dict[str, float]:
    return {x.label: x.score for x in result.labels if x.head == head}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from ast_cli import RunOptions, Tagger

    with tempfile.TemporaryDirectory(prefix="ast-heads-") as tmp:
        work = Path(tmp)
        base = make_checkpoint(work / "base")
        clips = make_clips(work / "clips", args.clips, args.seconds)
        heads = train_heads(base, clips, work)
        options = RunOptions(device="cpu")
        alone = Tagger.load(str(base), options)
        joint = Tagger.load(str(base), options, heads=[str(h) for h in heads])
        run(alone, clips[:2]), run(joint, clips[:2])  # warm-up
        timings = {"base": [], "base+3 heads": []}
        for _ in range(args.rounds):
            for name, tagger in (("base", alone), ("base+3 heads", joint)):
                wall, cpu, results = run(tagger, clips)
                timings[name].append((wall, cpu))
        for name, rows in timings.items():
            print(f"{name:>13}: {statistics.median(w for w, _ in rows):7.2f} s wall, "
                  f"{statistics.median(c for _, c in rows):7.2f} s CPU (median of {len(rows)})")
        ratio = [statistics.median(r[k] for r in timings["base+3 heads"]) / statistics.median(r[k] for r in timings["base"])
                 for k in (0, 1)]
        print(f"ratio: {ratio[0]:.3f}x wall, {ratio[1]:.3f}x CPU (target <= 1.05x)")
        for head in heads:
            single = run(Tagger.load(str(head), options), clips)[2]
            diff = max(abs(scores(j, head.name)[k] - v) for j, s in zip(results, single) for k, v in scores(s, None).items())
            print(f"{head.name}: max |score difference| to the head alone {diff:.2e} (target <= 1e-5)")


if __name__ == "__main__":
    main()
