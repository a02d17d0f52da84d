"""``ast download``, ``ast models`` and ``ast labels``: the models, the hub cache and label lists."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from ..constants import DEFAULT_MODEL
from ..run.options import ListFormat, RunOptions
from ._app import app
from ._common import CacheDirOpt, DebugOpt, ModelOpt, OfflineOpt, QuietOpt, model_labels, stderr_console
from ._errors import cli_errors, debug_enabled, print_error, say
from ._progress import download_progress, megabytes


ListFormatOpt = Annotated[ListFormat, typer.Option("--format", "-f", help="table or json.")]


@app.command()
def download(
    models: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="MODEL...", show_default=False,
                       help="Aliases or hub ids (ORG/NAME[@REV]); default: the default model of classify "
                            "(AST_MODEL, else MIT/ast-finetuned-audioset-10-10-0.4593)."),
    ] = None,
    revision: Annotated[Optional[str], typer.Option(metavar="REV", help="Branch, tag or commit (default: main).")] = None,
    cache_dir: CacheDirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if cached (repairs a corrupt file).")] = False,
    list_models: Annotated[bool, typer.Option("--list", help="List the model aliases instead (as `ast models`).")] = False,
    format: ListFormatOpt = ListFormat.table,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Download models into the Hugging Face cache, so that they work offline; print each local path.

    Fetches config.json, preprocessor_config.json and model.safetensors (pytorch_model.bin only when a
    repo has no safetensors) from HF_ENDPOINT (default huggingface.co), with HF_TOKEN for private repos,
    into HF_HUB_CACHE (default HF_HOME/hub), where every Hugging Face tool looks. Files already cached
    are not downloaded again; all files come from one commit.

    Examples:

      ast download

      ast download speech-commands-v2 audioset-16-16-0.442

      HF_ENDPOINT=https://hf-mirror.example ast download MIT/ast-finetuned-audioset-10-10-0.4593@main
    """
    if list_models:
        _list_models(format, cache_dir, debug)
        return
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        from ..checkpoint import hub
        from ..checkpoint.names import looks_local

        default = os.environ.get("AST_MODEL") or DEFAULT_MODEL  # classify's default, as --model's
        if not models and looks_local(default):
            return say(stderr, f"nothing to download: AST_MODEL names a local model ({default})")
        failed_code = 0
        for name in models or [default]:
            try:
                result = hub.download(name, revision=revision, cache_dir=cache_dir, force=force,
                                      progress=download_progress(stderr, quiet))
            except Exception as exc:
                if debug_enabled(debug) or len(models or ()) <= 1:
                    raise  # one model: cli_errors reports it
                failed_code = max(failed_code, print_error(stderr, exc))  # a bad name never sinks the rest
                continue
            typer.echo(str(result.path))
            if not quiet:
                how = "downloaded" if result.fetched else "already in the cache"
                say(stderr, f"{name}: {', '.join(result.files)} ({megabytes(result.size)}) {how}")
        if failed_code:
            raise typer.Exit(failed_code)


@app.command()
def models(
    format: ListFormatOpt = ListFormat.table,
    cached: Annotated[bool, typer.Option("--cached", help="List every AST checkpoint in the cache (any repo), with its size.")] = False,
    remove: Annotated[Optional[list[str]], typer.Option(
        "--rm", metavar="MODEL",
        help="Remove a model from the cache: all its revisions, or only REV with ORG/NAME@REV (repeatable).")] = None,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y",
        help="With --rm: do not ask first (needed without a terminal); also removes a repo that is not an AST "
             "checkpoint, named by its hub id.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="With --rm: print what would be removed, remove nothing.")] = False,
    cache_dir: CacheDirOpt = None,
    debug: DebugOpt = False,
) -> None:
    """List the model aliases: hub id, labels, input length, strides, and whether each is in the cache.

    Any alias works wherever a model is named (--model, ast download); so does a hub id (ORG/NAME[@REV]),
    a local directory in hub layout, or a weights file. --cached lists what the cache holds, fine-tuned
    checkpoints included; --rm removes models from it, after showing what goes and asking (--yes: without
    asking; --dry-run: only show).

    Examples:

      ast models

      ast models --cached --format json | jq -r '.[].repo_id'

      ast models --rm acme/my-ast@v1 --dry-run
    """
    if remove:
        _remove(remove, cache_dir, debug, yes=yes, dry_run=dry_run)
    elif cached:
        _list_cached(format, cache_dir, debug)
    else:
        _list_models(format, cache_dir, debug)


def _remove(names: list[str], cache_dir: str | None, debug: bool, *, yes: bool, dry_run: bool) -> None:
    """Print what would go (--dry-run), or show it and ask on a terminal (unless --yes), then remove it."""
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        from ..checkpoint import cache as hub_cache
        from ..errors import UsageError

        plans = [hub_cache.plan_removal(name, cache_dir, allow_other=yes) for name in names]
        lines = [f"{_removal_text(plan)} ({megabytes(plan.size)}): {plan.repo_path}" for plan in plans]
        if dry_run:
            typer.echo("\n".join(f"would remove {line}" for line in lines))
            return
        if not yes:
            if not _can_ask():
                raise UsageError("not removing anything without a confirmation, and there is no terminal to ask on",
                                 suggest={"yes": True})
            for line in lines:
                say(stderr, f"to remove: {line}")
            if not typer.confirm("Remove?", default=False, err=True):
                say(stderr, "nothing removed")
                raise typer.Exit(1)
        for plan in plans:
            freed = hub_cache.remove_cached(plan, cache_dir)
            say(stderr, f"removed {_removal_text(plan)} from the cache ({megabytes(freed)} freed)")


def _can_ask() -> bool:
    """A person can answer: stdin is a terminal."""
    import sys

    return sys.stdin is not None and sys.stdin.isatty()


def _removal_text(plan) -> str:
    """``acme/x`` (the whole repo) or ``acme/x@1a2b3c4d5e6f (refs v1)`` (one snapshot)."""
    if plan.whole_repo:
        return plan.repo_id
    refs = f" (refs {', '.join(plan.refs)})" if plan.refs else ""
    return ", ".join(f"{plan.repo_id}@{commit[:12]}" for commit in plan.commits) + refs


def _list_cached(fmt: ListFormat, cache_dir: str | None, debug: bool) -> None:
    with cli_errors(stderr_console(), debug):
        import json

        from ..checkpoint import cache as hub_cache
        from ..checkpoint.names import hub_cache_dir

        rows = [{"repo_id": m.repo_id, "alias": m.alias, "revision": m.commit_hash, "refs": list(m.refs),
                 "size_on_disk": m.size_on_disk, "path": str(m.path), "damaged": m.damaged}
                for m in hub_cache.cached_checkpoints(cache_dir)]
        if fmt is ListFormat.json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from ._render import print_cached

        print_cached(rows, hub_cache_dir(cache_dir))


def _list_models(fmt: ListFormat, cache_dir: str | None, debug: bool) -> None:
    with cli_errors(stderr_console(), debug):
        import json

        from ..checkpoint import cache as hub_cache
        from ..checkpoint.names import REGISTRY

        cached = hub_cache.cached_models(cache_dir)
        rows = [
            {
                "alias": spec.alias, "repo_id": spec.repo_id, "num_labels": spec.num_labels,
                "max_length": spec.max_length, "input_seconds": spec.input_seconds,
                "frequency_stride": spec.frequency_stride, "time_stride": spec.time_stride,
                "mean": spec.mean, "std": spec.std, "default": spec.repo_id == DEFAULT_MODEL,
                "cached": spec.repo_id in cached,
                "path": str(cached[spec.repo_id]) if spec.repo_id in cached else None,
            }
            for spec in REGISTRY
        ]
        if fmt is ListFormat.json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from ._render import print_models

        print_models(rows)


@app.command()
def labels(
    model: ModelOpt = DEFAULT_MODEL,
    offline: OfflineOpt = False,
    cache_dir: CacheDirOpt = None,
    debug: DebugOpt = False,
) -> None:
    """List a model's labels, one per line: index, tab, name.

    Examples:

      ast labels

      ast labels --model speech-commands-v2 | grep -i yes
    """
    stderr = stderr_console()
    with cli_errors(stderr, debug):
        run = RunOptions(offline=offline or None, cache_dir=cache_dir)
        from ..errors import UsageError

        names = model_labels(model, run, stderr, quiet=False)  # published ones: no download
        if not names:  # an empty list with exit 0 would read as a model with nothing to recognise
            raise UsageError(f"{model} has no labels of its own (a bare encoder)", option="model",
                             hint="a head trained on it has labels: ast labels --model HEAD_DIR")
        for index, name in enumerate(names):
            typer.echo(f"{index}\t{name}")
