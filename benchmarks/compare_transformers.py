"""Speed and fidelity of ``ast classify`` against the transformers reference path, on the same random weights.

Builds a full-size AST with random weights (``ASTForAudioClassification(ASTConfig())``, 527 AudioSet labels,
saved with ``save_pretrained``) and a few 10 s stereo 44.1 kHz clips, then times, in ONE process, rounds of:

- transformers: soundfile -> mean downmix -> resample -> ``ASTFeatureExtractor`` -> ``ASTForAudioClassification``
  (float32, SDPA) -> sigmoid, one clip at a time (as the HF pipeline does). The resampler is
  ``torchaudio.functional.resample`` where torchaudio imports, else ``ast_cli.audio.resample.resample`` (the same
  algorithm and cost; torchaudio 2.11 does not import next to torch 2.15). The extractor takes whichever path
  transformers picks (kaldi with torchaudio, numpy without): fidelity against it is then within ~1e-4;
- the same transformers path in bf16 (``model.to(torch.bfloat16)``), the reference's own fast CPU mode;
- ``Tagger.classify`` (what ``ast classify`` runs) in float32, in each fast mode and with ``--fast`` (the mode
  calibrated on this machine).

It prints clips/s, the ratios to transformers fp32 and to transformers bf16 (median wall time, fastest round, and CPU seconds of all threads,
which other jobs on a shared machine disturb less) and the fidelity of each mode (max |sigmoid difference|
against our float32 and against transformers, top-5 agreement). ``--process`` also times whole processes,
start-up included: ``ast classify`` over the clips against Python processes running the transformers path in
fp32 and in bf16.

Nothing is downloaded. Run from the repository root:

    python benchmarks/compare_transformers.py                 # ~3 minutes on 2 cores
    python benchmarks/compare_transformers.py --process --rounds 1
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

import numpy as np

SAMPLE_RATE = 44100  # Hz of the generated clips, so that both paths resample as they would for real files


# -- inputs ------------------------------------------------------------------------------------------


def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A random full-size AudioSet AST checkpoint in hub layout (the same weights for both paths)."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    from ast_cli.checkpoint.weights import load_labels

    if (directory / "model.safetensors").is_file():
        return directory
    labels = load_labels("audioset")
    config = ASTConfig(num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(seed)
    model = ASTForAudioClassification(config).eval()
    model.save_pretrained(directory)
    ASTFeatureExtractor().save_pretrained(directory)
    return directory


def make_clips(directory: Path, count: int, seconds: float) -> list[str]:
    """``count`` different stereo clips: tones, chirps and noise bursts, 16-bit WAV at 44.1 kHz."""
    import soundfile as sf

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"clip{i}.wav"
        paths.append(str(path))
        if path.is_file():
            continue
        rng = np.random.default_rng(i)
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        base = 110 * (i + 2)
        chirp = np.sin(2 * np.pi * (base + 200 * t) * t)
        bursts = rng.standard_normal(t.shape) * (np.sin(2 * np.pi * (0.3 + 0.2 * i) * t) > 0.6)
        left = 0.3 * chirp + 0.1 * bursts + 0.2 * np.sin(2 * np.pi * 3 * base * t)
        right = 0.3 * chirp + 0.1 * rng.standard_normal(t.shape)
        sf.write(str(path), (0.8 * np.stack([left, right], axis=1)).clip(-1, 1), SAMPLE_RATE, subtype="PCM_16")
    return paths


# -- the two paths ------------------------------------------------------------------------------------


def load_transformers(model_dir: str, mode: str = "fp32"):
    import torch
    from transformers import ASTFeatureExtractor, ASTForAudioClassification

    model = ASTForAudioClassification.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    elif mode == "int8":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model, ASTFeatureExtractor.from_pretrained(model_dir)


def transformers_scores(model, extractor, paths: list[str]) -> np.ndarray:
    """(clips, 527) sigmoid scores by the reference path, one clip at a time."""
    import soundfile as sf
    import torch

    try:
        from torchaudio.functional import resample
    except (ImportError, OSError, RuntimeError):  # absent, or broken next to this torch
        from ast_cli.audio.resample import resample
    dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32
    rows = []
    for path in paths:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        mono = torch.from_numpy(data.mean(axis=1).astype(np.float32))
        if sr != 16000:
            mono = resample(mono, sr, 16000)
        inputs = extractor(mono.numpy(), sampling_rate=16000, return_tensors="pt")
        with torch.inference_mode():
            logits = model(inputs["input_values"].to(dtype)).logits
        rows.append(torch.sigmoid(logits[0].float()).numpy())
    return np.stack(rows)


def mode_options(mode: str) -> dict:
    """Our mode name -> ``RunOptions`` fields: fp32, bf16, int8, or fast (calibrated on this machine)."""
    return {"int8": {"quantize": "int8"}, "fast": {"fast": True}}.get(mode, {"dtype": mode})


def load_ours(model_dir: str, mode: str, batch_size: int = 4):
    from ast_cli.run.options import RunOptions
    from ast_cli.run.tagger import Tagger

    return Tagger.load(model_dir, RunOptions(device="cpu", batch_size=batch_size, **mode_options(mode)))


def our_scores(tagger, paths: list[str]) -> np.ndarray:
    """(clips, labels) sigmoid scores through ``Tagger.classify`` (parallel decode, batched windows)."""
    from ast_cli.audio.inputs import expand_inputs
    from ast_cli.run.tagger import LabelSelection

    rows = []
    for result in tagger.classify(expand_inputs(paths), selection=LabelSelection(top=None)):
        if result.error:
            raise RuntimeError(f"{result.path}: {result.error}")
        row = np.zeros(len(tagger.labels))
        for label in result.labels:
            row[label.index] = label.score
        rows.append(row)
    return np.stack(rows)


# -- fidelity ------------------------------------------------------------------------------------------


def fidelity(scores: np.ndarray, reference: np.ndarray, k: int = 5) -> dict:
    """Max |difference| of scores, and how the top-k label sets agree (mean overlap, clips identical)."""
    top = np.argsort(-scores, axis=1)[:, :k]
    ref_top = np.argsort(-reference, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top, ref_top)]
    return {
        "max_abs_diff": float(np.abs(scores - reference).max()),
        "top5_overlap": float(np.mean(overlap)),
        "top5_identical": int(sum(o == 1.0 for o in overlap)),
        "top1_identical": int(sum(a[0] == b[0] for a, b in zip(top, ref_top))),
    }


# -- timing in one process ---------------------------------------------------------------------------------


def in_process(model_dir: str, paths: list[str], modes: list[str], reference_modes: list[str], rounds: int,
               batch_size: int = 4):
    """Interleaved rounds (A, B, C, A, B, C...) so that machine noise hits every path alike."""
    import torch

    runners = {}
    load_s = {}
    for mode in reference_modes:
        t0 = time.perf_counter()
        model, extractor = load_transformers(model_dir, mode)
        load_s[f"transformers {mode}"] = time.perf_counter() - t0
        runners[f"transformers {mode}"] = lambda m=model, e=extractor: transformers_scores(m, e, paths)
    for mode in modes:
        t0 = time.perf_counter()
        tagger = load_ours(model_dir, mode, batch_size)
        load_s[f"ast {mode}"] = time.perf_counter() - t0  # --fast: its first calibration included
        runners[f"ast {mode}"] = lambda t=tagger: our_scores(t, paths)
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}  # all threads: less sensitive to other jobs
    scores: dict[str, np.ndarray] = {}
    for name, run in runners.items():  # warm-up: first-call allocations, lazy kernels
        print(f"  warm-up {name}", file=sys.stderr, flush=True)
        scores[name] = run()
    for r in range(rounds):
        for name, run in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"  round {r + 1}/{rounds} {name}: {times[name][-1]:.2f} s, cpu {cpu[name][-1]:.2f} s",
                  file=sys.stderr, flush=True)
    return {"times": times, "cpu": cpu, "scores": scores, "load_s": load_s, "threads": torch.get_num_threads()}


# -- timing whole processes ------------------------------------------------------------------------------


def process_commands(model_dir: str, paths: list[str], modes: list[str], batch_size: int = 4,
                     threads: int | None = None) -> dict[str, list[str]]:
    """Each whole process's command line; ``threads``: its torch threads, as in the in-process rounds."""
    threading = ["--threads", str(threads)] if threads else []
    commands = {f"transformers {mode}": [sys.executable, __file__, *threading, "--run-transformers", mode, model_dir,
                                         *paths] for mode in ("fp32", "bf16")}
    for mode in modes:
        extra = {"int8": ["--quantize", "int8"], "fast": ["--fast"]}.get(mode, ["--dtype", mode])
        commands[f"ast {mode}"] = [sys.executable, "-m", "ast_cli", "classify", "--model", model_dir, "--device", "cpu",
                                   *extra, *threading, "--batch-size", str(batch_size), "--format", "json", "--top",
                                   "0", "--quiet", *paths]
    return commands


def processes(model_dir: str, paths: list[str], modes: list[str], rounds: int, batch_size: int = 4,
              threads: int | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds and CPU seconds (user + system, all threads) of each whole process."""
    commands = process_commands(model_dir, paths, modes, batch_size, threads)
    times: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    for r in range(rounds):
        for name, command in commands.items():
            t0 = time.perf_counter()
            with tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(usage.ru_utime + usage.ru_stime)
                if proc.returncode != 0:
                    err.seek(0)
                    tail = err.read().decode("utf-8", "replace").strip()[-500:]
                    raise RuntimeError(f"{name} failed ({proc.returncode}): {tail}")
            print(f"  process round {r + 1}/{rounds} {name}: {times[name][-1]:.2f} s, cpu {cpu[name][-1]:.2f} s",
                  file=sys.stderr, flush=True)
    return times, cpu


# -- report -----------------------------------------------------------------------------------------------


def environment() -> dict:
    import platform

    import torch
    import transformers

    from ast_cli.checkpoint.speed import cpu_has_native_bf16, int8_kernel

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return {
        "cpu": caps.get("cpu_name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "native_bf16": cpu_has_native_bf16(),
        "int8_kernel": int8_kernel(),
    }


def report(result: dict, paths: list[str], seconds: float, proc: tuple | None, batch_size: int = 4) -> dict:
    times, cpu, scores = result["times"], result["cpu"], result["scores"]
    reference = "transformers fp32"
    ours_fp32 = scores.get("ast fp32")
    base, best = statistics.median(times[reference]), min(times[reference])
    bf16 = statistics.median(times["transformers bf16"]) if "transformers bf16" in times else None
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        row = {
            "path": name,
            "load_s": round(result["load_s"][name], 2),
            "seconds_median": round(median, 2),
            "seconds_min": round(min(values), 2),
            "clips_per_s": round(len(paths) / median, 3),
            "x_realtime": round(len(paths) * seconds / median, 2),
            "speedup_vs_transformers_fp32": round(base / median, 2),
            "speedup_vs_transformers_fp32_best": round(best / min(values), 2),
            "speedup_vs_transformers_bf16": round(bf16 / median, 2) if bf16 else None,
            "cpu_seconds_median": round(statistics.median(cpu[name]), 2),
            "cpu_speedup_vs_transformers_fp32": round(statistics.median(cpu[reference]) / statistics.median(cpu[name]),
                                                      2),
            "vs_transformers_fp32": fidelity(scores[name], scores[reference]),
        }
        if ours_fp32 is not None:
            row["vs_ast_fp32"] = fidelity(scores[name], ours_fp32)
        rows.append(row)
    out = {"environment": environment(), "clips": len(paths), "clip_seconds": seconds, "rounds": len(times[reference]),
           "batch_size": batch_size, "in_process": rows}
    if proc:
        proc_times, proc_cpu = proc
        base, best = statistics.median(proc_times[reference]), min(proc_times[reference])
        cpu_base = statistics.median(proc_cpu[reference])
        bf16 = statistics.median(proc_times["transformers bf16"])
        out["processes"] = [
            {"path": name, "seconds_median": round(statistics.median(v), 2), "seconds_all": [round(x, 2) for x in v],
             "speedup_vs_transformers_fp32": round(base / statistics.median(v), 2),
             "speedup_vs_transformers_bf16": round(bf16 / statistics.median(v), 2),
             "speedup_vs_transformers_fp32_best": round(best / min(v), 2),
             "cpu_seconds_median": round(statistics.median(proc_cpu[name]), 2),
             "cpu_speedup_vs_transformers_fp32": round(cpu_base / statistics.median(proc_cpu[name]), 2)}
            for name, v in proc_times.items()
        ]
    return out


def print_report(out: dict) -> None:
    env = out["environment"]
    print(f"machine: {env['cpu']}, {env['cores']} cores, {env['threads']} torch threads; torch {env['torch']}, "
          f"transformers {env['transformers']}; native bf16: {'yes' if env['native_bf16'] else 'no'}; "
          f"int8 kernel: {env['int8_kernel']}")
    print(f"{out['clips']} clips of {out['clip_seconds']:g} s (44.1 kHz stereo WAV), random full-size weights, "
          f"ast --batch-size {out['batch_size']}; median of {out['rounds']} interleaved rounds after a warm-up "
          f"(best: fastest round of each; cpu s: ratio of CPU seconds, all threads, which other jobs on the machine "
          f"disturb less)\n")
    print(f"{'path':<18} {'s/' + str(out['clips']) + ' clips':>9} {'clips/s':>7} {'x RT':>5} {'vs tf fp32':>10} "
          f"{'(best)':>6} {'(cpu s)':>7} {'vs tf bf16':>10}  "
          f"{'max|d| vs ast fp32':>18} {'max|d| vs tf fp32':>17}  {'top-5 = ast fp32':>16}  {'top-5 = tf fp32':>15}")
    for row in out["in_process"]:
        ours = row.get("vs_ast_fp32", {})
        theirs = row["vs_transformers_fp32"]
        print(f"{row['path']:<18} {row['seconds_median']:>9.2f} {row['clips_per_s']:>7.3f} {row['x_realtime']:>5.2f} "
              f"{row['speedup_vs_transformers_fp32']:>9.2f}x {row['speedup_vs_transformers_fp32_best']:>5.2f}x "
              f"{row['cpu_speedup_vs_transformers_fp32']:>6.2f}x "
              f"{row['speedup_vs_transformers_bf16'] or float('nan'):>9.2f}x  "
              f"{ours.get('max_abs_diff', float('nan')):>18.5f} "
              f"{theirs['max_abs_diff']:>17.5f}  "
              f"{ours.get('top5_identical', 0):>8}/{out['clips']} {ours.get('top5_overlap', 0):>5.0%}  "
              f"{theirs['top5_identical']:>7}/{out['clips']} {theirs['top5_overlap']:>5.0%}")
    if "processes" in out:
        print(f"\nwhole processes (interpreter start, imports, model load, {out['clips']} clips):")
        for row in out["processes"]:
            print(f"{row['path']:<18} {row['seconds_median']:>7.2f} s  {row['speedup_vs_transformers_fp32']:>5.2f}x "
                  f"tf fp32, {row['speedup_vs_transformers_bf16']:>5.2f}x tf bf16 (best {row['speedup_vs_transformers_fp32_best']:.2f}x, cpu s "
                  f"{row['cpu_speedup_vs_transformers_fp32']:.2f}x; runs: "
                  f"{', '.join(f'{s:.2f}' for s in row['seconds_all'])} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved timing rounds after one warm-up round.")
    parser.add_argument("--modes", default=None,
                        help="Our modes, comma-separated: fp32, int8, bf16, fast (default: fp32,int8,fast, + bf16 on "
                             "CPUs with native bf16).")
    parser.add_argument("--transformers-modes", default="fp32,bf16",
                        help="Reference modes to time: fp32 (always), int8 (torch.ao dynamic), bf16.")
    parser.add_argument("--process", action="store_true", help="Also time whole processes (start-up included).")
    parser.add_argument("--process-rounds", type=int, default=2)
    parser.add_argument("--process-modes", default="fp32,fast", help="Our modes timed as whole processes.")
    parser.add_argument("--batch-size", type=int, default=4, help="Windows per model call for ast (classify's default).")
    parser.add_argument("--workdir", default=None, help="Keep the checkpoint and clips here (default: a temp dir).")
    parser.add_argument("--threads", type=int, default=None,
                        help="Torch threads, in this process and in every --process run (default: torch's).")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--run-transformers", nargs="+", metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_transformers:  # the child process of --process: the reference path, start to end
        mode, model_dir, *paths = args.run_transformers
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        model, extractor = load_transformers(model_dir, mode)
        json.dump(transformers_scores(model, extractor, paths).round(6).tolist(), sys.stdout)
        return

    import torch

    from ast_cli.checkpoint.speed import cpu_has_native_bf16

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.modes.split(",") if args.modes else ["fp32", "int8"] + (["bf16"] if cpu_has_native_bf16() else []) + [
        "fast"]
    if "fp32" not in modes:
        modes.insert(0, "fp32")
    reference_modes = ["fp32"] + [m for m in args.transformers_modes.split(",") if m and m != "fp32"]
    with tempfile.TemporaryDirectory(prefix="ast-compare-") as tmp:
        work = Path(args.workdir or tmp)
        print(f"checkpoint and clips in {work}", file=sys.stderr)
        model_dir = str(make_checkpoint(work / "model"))
        paths = make_clips(work / "clips", args.clips, args.seconds)
        result = in_process(model_dir, paths, modes, reference_modes, args.rounds, args.batch_size)
        proc_modes = [m for m in args.process_modes.split(",") if m]
        proc = (processes(model_dir, paths, proc_modes, args.process_rounds, args.batch_size, args.threads)
                if args.process else None)
        out = report(result, paths, args.seconds, proc, args.batch_size)
    print_report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
