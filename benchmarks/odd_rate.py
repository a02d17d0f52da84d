"""An odd sample rate against its neighbour: peak memory and throughput of one long file at 22051 Hz vs 22050 Hz.

22050 Hz reduces to 441/320 against 16 kHz (torchaudio's kernel: 147,000 taps); 22051 Hz has no common factor with
16000, so torchaudio's kernel would hold 353 million taps (6.4 GB for 2 s of audio before #23); ``ast`` evaluates
the same filter directly instead. Writes one ``--minutes`` mono 16-bit WAV at each rate (the same signal) and a
1-second clip, then times whole ``ast classify FILE`` processes (tiny random AST, as benchmarks/rss_vs_files.py)
and reads their peak RSS. Prints one JSON line per file, then the ratios: the targets are peak(22051) <= peak(1 s
clip) + 200 MB and throughput(22051) >= 0.8 x throughput(22050).

    python benchmarks/odd_rate.py                # 10 minutes of audio per file
    python benchmarks/odd_rate.py --minutes 2    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rss_vs_files import cpu_name, peak_rss, tiny_model  # noqa: E402


def write_tone(path: Path, rate: int, seconds: float) -> Path:
    """Tones and noise at ``rate``, written a minute at a time."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        for start in range(0, int(seconds * rate), 60 * rate):
            t = np.arange(start, min(int(seconds * rate), start + 60 * rate)) / rate
            f.write(0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)
                    + 0.05 * rng.standard_normal(t.shape))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="Runs per file (the median wall time is kept).")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model = tiny_model(work)
        print(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count()}), flush=True)
        rows = {}
        for name, rate, seconds in (("clip", 22050, 1.0), ("22050", 22050, 60 * args.minutes),
                                    ("22051", 22051, 60 * args.minutes)):
            path = write_tone(work / f"{name}.wav", rate, seconds)
            runs = [peak_rss(["classify", str(path), "--model", str(model), "-f", "jsonl", "-q"])
                    for _ in range(args.rounds)]
            rss, wall = max(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows[name] = {"file": name, "rate": rate, "seconds": seconds, "peak_rss_mb": round(rss, 1),
                          "wall_s": round(wall, 2), "audio_s_per_s": round(seconds / wall, 1)}
            print(json.dumps(rows[name]), flush=True)
        print(json.dumps({"rss_22051_minus_clip_mb": round(rows["22051"]["peak_rss_mb"] - rows["clip"]["peak_rss_mb"], 1),
                          "rss_22051_minus_22050_mb": round(rows["22051"]["peak_rss_mb"]
                                                            - rows["22050"]["peak_rss_mb"], 1),
                          "throughput_22051_over_22050": round(rows["22050"]["wall_s"] / rows["22051"]["wall_s"], 3)}))


if __name__ == "__main__":
    main()
