"""What a person sees: tables for ``ast models`` and ``ast benchmark``."""

from __future__ import annotations

import sys

from ._errors import counted


def print_models(rows: list[dict]) -> None:
    from ..run.files import console as make_console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column, justify in (("alias", "left"), ("hub id", "left"), ("labels", "right"), ("input", "right"),
                            ("strides", "right"), ("cached", "left")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row["alias"] + (" (default)" if row["default"] else ""), row["repo_id"],
                      str(row["num_labels"]), f"{row['input_seconds']:.2f} s",
                      f"{row['frequency_stride']}/{row['time_stride']}", "yes" if row["cached"] else "no")
    # Not a terminal: rich would squeeze the table into 80 columns and cut the hub ids.
    make_console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)


def print_cached(rows: list[dict], cache) -> None:
    from ..run.files import console as make_console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, title=f"AST checkpoints in {cache}", title_justify="left")
    for column, justify in (("hub id", "left"), ("alias", "left"), ("revision", "left"), ("refs", "left"),
                            ("size", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row["repo_id"], row["alias"] or "", row["revision"][:12] or "damaged", ",".join(row["refs"]),
                      f"{row['size_on_disk'] / 1e6:.1f} MB")
    console = make_console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(table if rows else f"no AST checkpoints in {cache}")


def print_benchmark(report) -> None:
    from ..run.files import console as make_console
    from rich.table import Table

    env = report.environment
    console = make_console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(f"{env.model}: {env.parameters / 1e6:.1f} M parameters, input {env.input_frames} x "
                  f"{env.input_mel_bins} ({env.window_seconds:.2f} s of audio, {env.gflop_per_clip:g} GFLOP); "
                  f"{env.device} ({env.device_name}), {env.threads} threads, torch {env.torch}"
                  + (f"; bf16 attention: {env.bf16_attention}" if env.bf16_attention else "")
                  + (f"; int8 attention: {env.int8_attention}" if env.int8_attention else ""), markup=False,
                  soft_wrap=True)  # one line, however long: a reason stays whole for grep
    speedups = report.speedups()
    if speedups:
        table = Table(title="SDPA vs eager (median ms per batch)", title_justify="left")
        for column in ("mode", "batch size", "eager ms", "sdpa ms", "speedup"):
            table.add_column(column, justify="left" if column == "mode" else "right")
        medians = {(r.quantize or r.dtype, r.batch_size, r.attn): r.ms_per_batch_median for r in report.rows}
        for (mode, batch), speedup in speedups.items():
            table.add_row(mode, str(batch), f"{medians[(mode, batch, 'eager')]:.1f}",
                          f"{medians[(mode, batch, 'sdpa')]:.1f}", f"{speedup:.2f}x")
        console.print(table)
    table = Table(title="Model forward", title_justify="left")
    for column in ("mode", "attn", "batch size", "warm-up", "mean ms", "median ms", "ms/clip", "clips/s",
                   "x real-time"):
        table.add_column(column, justify="left" if column in ("mode", "attn") else "right")
    for r in report.rows:
        table.add_row(r.quantize or r.dtype, r.attn, str(r.batch_size), str(r.warmup), f"{r.ms_per_batch:.1f}",
                      f"{r.ms_per_batch_median:.1f}", f"{r.ms_per_clip:.1f}", f"{r.clips_per_s:.2f}",
                      f"{r.x_realtime:.1f}")
    console.print(table)
    if report.fast is not None:
        print_fast_candidates(console, report.fast)
    if report.end_to_end:
        table = Table(title="End to end (stage seconds from a sequential pass; files/s from the pipelined one)",
                      title_justify="left")
        columns = ("mode", "attn", "files", "audio s", "decode s", "resample s", "features s", "model s",
                   "pipelined s", "files/s", "x real-time")
        for column in columns:
            table.add_column(column, justify="left" if column in ("mode", "attn") else "right")
        for r in report.end_to_end:
            table.add_row(r.quantize or r.dtype, r.attn, f"{r.files - r.failed}/{r.files}", f"{r.audio_seconds:.1f}",
                          f"{r.decode_s:.2f}", f"{r.resample_s:.2f}", f"{r.features_s:.2f}", f"{r.model_s:.2f}",
                          f"{r.pipelined_s:.2f}", f"{r.files_per_s:.2f}", f"{r.x_realtime:.1f}")
        console.print(table)


def print_fast_candidates(console, choice) -> None:
    """Every ``--fast`` candidate: fastest ms of one forward, speed-up over fp32, largest score difference."""
    from rich.table import Table

    from ..run.fast import FIDELITY

    faithful = (f"embeddings within {FIDELITY} of fp32, relative L2" if choice.measure == "embeddings" else
                f"scores within {FIDELITY} of fp32")  # sigmoid, or softmax for a single-label model
    table = Table(title=f"--fast candidates (batch size 1; faithful: {faithful})", title_justify="left")
    for column in ("mode", "ms", "speed-up", "max diff", "--fast"):
        table.add_column(column, justify="left" if column in ("mode", "--fast") else "right")
    reference = next(c for c in choice.candidates if c.name == "fp32")
    for c in choice.candidates:
        if c.skipped:
            table.add_row(c.name, "", "", "", f"skipped: {c.skipped}")
            continue
        verdict = "picked" if c.name == choice.mode else "" if c.faithful else "unfaithful"
        table.add_row(c.name, f"{c.ms:.1f}", f"{c.speedup(reference):.2f}x", f"{c.max_diff:.4f}", verdict)
    console.print(table)


class LiveView:
    """``ast listen`` on a terminal: the current window's top labels as bars, redrawn in place."""

    def __enter__(self) -> "LiveView":
        from ..run.files import console as make_console
        from rich.live import Live

        self._live = Live(console=make_console(highlight=False), refresh_per_second=8, transient=False)
        self._live.__enter__()
        return self

    def update(self, window, dropped: int) -> None:
        from rich.table import Table
        from rich.text import Text

        from ..run.writers import qualified

        table = Table(title=f"{window.start:8.2f} - {window.end:8.2f} s   (latency {window.latency * 1000:.0f} ms"
                            + (f", {dropped} windows dropped)" if dropped else ")"), title_justify="left",
                      show_edge=False, pad_edge=False)
        table.add_column("label")
        table.add_column("score", justify="right")
        table.add_column("", min_width=30)
        for x in window.labels:
            table.add_row(Text(qualified(x)), f"{x.score:.3f}", "█" * max(0, min(30, round(x.score * 30))))
        self._live.update(table)

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)


def print_evaluation(report: dict, multi_label: bool) -> None:
    """``ast evaluate``'s table: the headline metric, then a confusion table or per-label AP and F1."""
    from ..run.files import console as make_console
    from rich.table import Table
    from rich.text import Text

    console = make_console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if not multi_label:
        console.print(f"{counted(report['files'], 'file')}: accuracy {report['accuracy']:.4f}, "
                      f"macro-F1 {report['macro_f1']:.4f}")
        # A line of its own: as a table title it would wrap to the width of a table of few, short labels.
        console.print("confusion (rows: true label, columns: predicted)")
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("")
        labels = report["labels"]
        for name in labels:
            table.add_column(Text(name[:12]), justify="right")
        for name, row in zip(labels, report["confusion"]):
            table.add_row(Text(name), *map(str, row))
        console.print(table)
        return
    map_ = report["map"]
    console.print(f"{counted(report['files'], 'file')}: mAP {map_:.4f}" if map_ is not None
                  else "no label has positives")
    table = Table(show_edge=False, pad_edge=False)
    for column in ("label", "AP", f"F1 @ {report['threshold']:g}", "positives"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for name, row in report["per_label"].items():
        table.add_row(Text(name), "-" if row["ap"] is None else f"{row['ap']:.4f}",
                      "-" if row["f1"] is None else f"{row['f1']:.4f}", str(row["positives"]))
    console.print(table)


def print_calibration(calibration: dict) -> None:
    """``ast evaluate --calibrate``'s table: per label the chosen threshold and the metrics at it on the data, or
    why it has none; then where the thresholds went."""
    from ..run.files import console as make_console
    from rich.table import Table
    from rich.text import Text

    console = make_console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 160)
    metric = calibration["target"].split("=")[0]
    console.print(f"thresholds for {calibration['target']} (labels with at least {calibration['min_positives']} "
                  "positive files)", soft_wrap=True)
    table = Table(show_edge=False, pad_edge=False)
    for column in ("label", "threshold", "precision", "recall", "F1", "positives", "note"):
        table.add_column(column, justify="left" if column in ("label", "note") else "right")
    absent = [row["label"] for row in calibration["labels"] if row["status"] == "no positives"]
    for row in calibration["labels"]:
        if row["status"] == "no positives":
            continue  # one line below: a model of 527 labels calibrated for 3 would drown the table
        numbers = [f"{row[k]:.4f}" if row[k] is not None else "-" for k in ("threshold", "precision", "recall", "f1")]
        note = {"calibrated": "", "unreachable": f"unreachable: best {metric} {row['best']:.4f}" if row["best"]
                is not None else "unreachable"}.get(row["status"], row["status"])
        table.add_row(Text(row["label"]), *numbers, str(row["positives"]), note)
    console.print(table)
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        console.print(f"no positive file in DATA, so no threshold: {shown}", markup=False, soft_wrap=True)
    done = sum(row["status"] == "calibrated" for row in calibration["labels"])
    console.print(f"{done} of {counted(len(calibration['labels']), 'label')} calibrated: "
                  f"{calibration['thresholds_file'] or 'nothing written'}", markup=False, soft_wrap=True)
