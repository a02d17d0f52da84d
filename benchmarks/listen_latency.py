"""Latency of ``ast listen``: a WAV stream written into its stdin at real time, per mode.

Latency is what each record's ``latency_s`` says: from the moment a window's last audio has arrived (and its
frames are computed) to its scores being ready, i.e. just before its line is written. Also counts the windows
dropped because the model is slower than real time. Nothing is downloaded: a random full-size AudioSet AST is
saved with transformers' ``save_pretrained`` first (or pass ``--model``).

    python benchmarks/listen_latency.py --seconds 30 --modes fp32,int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def random_checkpoint(directory: str) -> str:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from ast_cli.checkpoint.names import load_labels

    labels = load_labels("audioset")
    config = ASTConfig(num_labels=527, id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    ASTForAudioClassification(config).save_pretrained(directory)
    ASTFeatureExtractor().save_pretrained(directory)
    return directory


def wav_header(rate: int) -> bytes:
    import struct

    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


def run(model: str, seconds: float, hop: float, extra: list[str]) -> dict:
    rate = 16000
    rng = np.random.default_rng(0)
    pcm = (rng.uniform(-0.3, 0.3, int(seconds * rate)) * 32767).astype("<i2")
    proc = subprocess.Popen([sys.executable, "-m", "ast_cli", "listen", "-", "--model", model, "-f", "jsonl",
                             "--hop", str(hop), "--device", "cpu", *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def writer():
        proc.stdin.write(wav_header(rate))
        step = rate // 10
        start = time.monotonic()
        for i in range(0, pcm.shape[0], step):  # 0.1 s of audio every 0.1 s: real time
            proc.stdin.write(pcm[i : i + step].tobytes())
            proc.stdin.flush()
            time.sleep(max(0.0, start + (i + step) / rate - time.monotonic()))
        proc.stdin.close()

    thread = threading.Thread(target=writer)
    thread.start()
    records = [json.loads(line) for line in proc.stdout]
    thread.join()
    stderr = proc.stderr.read().decode()
    proc.wait()
    latencies = sorted(r["latency_s"] for r in records)
    dropped = int(stderr.rsplit("dropped ", 1)[1].split()[0]) if "dropped " in stderr else 0  # the final count
    return {"windows": len(records), "dropped": dropped,
            "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 3) if latencies else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--hop", type=float, default=1.0)
    parser.add_argument("--modes", default="fp32,int8")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_checkpoint(os.path.join(tmp, "ast"))
        import torch

        from ast_cli.checkpoint.speed import cpu_capabilities

        print(f"machine: {cpu_capabilities().get('cpu_name') or platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores; torch {torch.__version__}; {args.seconds:g} s streamed at real time, "
              f"hop {args.hop:g} s")
        for mode in args.modes.split(","):
            extra = ["--quantize", "int8"] if mode == "int8" else ["--dtype", mode]
            print(mode, json.dumps(run(model, args.seconds, args.hop, extra)))


if __name__ == "__main__":
    main()
