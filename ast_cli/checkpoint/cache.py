"""The Hugging Face cache as far as AST checkpoints go: the cached snapshot of a model, the listing of every
cached checkpoint, planning and doing a removal, and checking a cached weights file's header. Never touches the
network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AstError, CheckpointError, ModelNotFoundError, UsageError
from .names import (AST_MODEL_TYPE, CONFIG_NAME, DEFAULT_REVISION, _alias_of, _cache, _model_type, _one_line,
                    _weights_in, check_revision, parse_model_name)


def cached_snapshot(repo_id: str, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default main) if it holds a config and
    weights; None otherwise. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    revision = check_revision(revision or DEFAULT_REVISION, repo_id)  # read as refs/<revision>
    config = try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=str(_cache(cache_dir)), revision=revision)
    if not isinstance(config, str):  # None, or the "known not to exist" marker
        return None
    snapshot = Path(config).parent
    return snapshot if _weights_in(snapshot) else None


def damaged_snapshot(repo_id: str, revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The snapshot folder ``revision`` (default main: its ref, or a commit hash) names in the cache when it is
    there but lacks its config or weights (a blob deleted, a link broken); None otherwise."""
    repo = _cache(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    revision = revision or DEFAULT_REVISION
    try:
        ref = repo / "refs" / revision
        referred = ref.is_file()
        commit = ref.read_text().strip() if referred else revision
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = repo / "snapshots" / commit
    if "/" in commit or commit in ("", ".", "..") or not (snapshot.is_dir() or referred):
        return None  # (a ref to a snapshot that is gone: damaged too)
    return None if (snapshot / CONFIG_NAME).is_file() and _weights_in(snapshot) else snapshot


@dataclass(frozen=True)
class CachedModel:
    """One cached snapshot of an AST checkpoint (a row of ``cached_checkpoints``).

    ``path``: the snapshot folder; ``commit_hash``: the commit it holds; ``refs``: the branches and tags that
    point at it (``("main",)``), possibly none; ``size_on_disk``: bytes of its files (blobs shared with another
    snapshot of the repo count in each); ``last_modified``: newest file, as a POSIX timestamp. ``damaged``: why
    huggingface_hub's scan refused the repo (a missing blob, a ref to a missing snapshot), None for a sound one;
    a damaged repo is one row for its folder (no commit, no refs), whose only use is to be removed whole.
    """

    repo_id: str
    path: Path
    commit_hash: str
    refs: tuple[str, ...]
    size_on_disk: int
    last_modified: float
    damaged: str | None = None

    @property
    def alias(self) -> str | None:
        """The registry alias of ``repo_id``, if it is one of the published checkpoints."""
        return _alias_of(self.repo_id)


def _scan(cache_dir: str | os.PathLike | None):
    """huggingface_hub's scan of the cache: the sound model repos, or () when there is no cache yet."""
    return _scan_all(cache_dir)[0]


def _scan_all(cache_dir: str | os.PathLike | None) -> tuple[list, list[CachedModel]]:
    """(sound model repos, damaged ones): repos huggingface_hub finds corrupt (a ref to a missing snapshot, a
    broken symlink) are only in its warnings; each model folder of the cache among them (a real folder, not a
    link) is a ``CachedModel`` with ``damaged`` set."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        info = scan_cache_dir(_cache(cache_dir))
    except CacheNotFound:
        return [], []
    repos = sorted((repo for repo in info.repos if repo.repo_type == "model"), key=lambda repo: repo.repo_id)
    sound = {Path(repo.repo_path).name for repo in info.repos}
    damaged = []
    for folder in sorted(Path(_cache(cache_dir)).glob("models--*")):
        if folder.name in sound or folder.is_symlink() or not folder.is_dir():
            continue
        why = next((_one_line(w) for w in info.warnings if str(folder) in str(w)), "damaged")
        files = [os.lstat(os.path.join(top, name)) for top, _, names in os.walk(folder) for name in names]
        damaged.append(CachedModel(repo_id=folder.name[len("models--"):].replace("--", "/"), path=folder,
                                   commit_hash="", refs=(), size_on_disk=sum(st.st_size for st in files),
                                   last_modified=folder.stat().st_mtime, damaged=why))
    return repos, damaged


def _by_preference(revisions) -> list:
    """A repo's cached revisions, the one ``main`` points at first, then others with a ref, newest first."""
    return sorted(revisions, key=lambda rev: (DEFAULT_REVISION not in rev.refs, not rev.refs, -rev.last_modified,
                                              rev.commit_hash))


def cached_models(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Hub id -> cached snapshot folder for every complete model in the cache (config.json and weights): the
    snapshot ``main`` points at, else one another ref points at, else the newest. Never touches the network."""
    found: dict[str, Path] = {}
    for repo in _scan(cache_dir):
        for revision in _by_preference(repo.revisions):
            path = Path(revision.snapshot_path)
            if (path / CONFIG_NAME).is_file() and _weights_in(path):
                found[repo.repo_id] = path
                break
    return found


def cached_checkpoints(cache_dir: str | os.PathLike | None = None) -> list[CachedModel]:
    """Every cached snapshot that holds an AST checkpoint, of any repo (not only the registry's): a config.json
    whose ``model_type`` is the AST's (or absent) and weights. Sorted by hub id, then as ``cached_models``
    prefers them; a damaged repo (``CachedModel.damaged``) unless a config in it describes another model. Never
    touches the network."""
    rows: list[CachedModel] = []
    repos, damaged = _scan_all(cache_dir)
    for repo in repos:
        for revision in _by_preference(repo.revisions):
            path = Path(revision.snapshot_path)
            if not _is_ast_snapshot(path):
                continue
            rows.append(CachedModel(repo_id=repo.repo_id, path=path, commit_hash=revision.commit_hash,
                                    refs=tuple(sorted(revision.refs)), size_on_disk=revision.size_on_disk,
                                    last_modified=revision.last_modified))
    rows += [row for row in damaged if _may_be_ast(row.path)]
    return sorted(rows, key=lambda row: row.repo_id)  # stable: each repo's rows keep their order


def _may_be_ast(repo: Path) -> bool:
    """No readable config in the repo's snapshots describes a model other than the AST."""
    for config in repo.glob(f"snapshots/*/{CONFIG_NAME}"):
        readable, model_type = _model_type(config)
        if readable and model_type not in (None, AST_MODEL_TYPE):
            return False
    return True


@dataclass(frozen=True)
class Removal:
    """What removing a cached model deletes (``plan_removal``), all inside one repo folder of the cache.

    ``commits``: the snapshots that go; ``refs``: the branches and tags that point at them and go with them;
    ``whole_repo``: the repo folder goes (no ``@REV``); ``blobs``: with ``@REV``, the files no other snapshot of
    the repo shares; ``size``: bytes freed.
    """

    repo_id: str
    repo_path: Path
    commits: tuple[str, ...]
    refs: tuple[str, ...]
    whole_repo: bool
    blobs: tuple[Path, ...]
    size: int


def _is_ast_snapshot(path: Path) -> bool:
    readable, model_type = _model_type(path / CONFIG_NAME)
    return readable and model_type in (None, AST_MODEL_TYPE) and _weights_in(path) is not None


def plan_removal(name: str, cache_dir: str | os.PathLike | None = None, *, allow_other: bool = False) -> Removal:
    """What removing ``name`` (alias or ``ORG/NAME``: every cached revision; ``ORG/NAME@REV``: the snapshot REV
    names, a ref or a commit hash or its first 7 or more digits, and the refs pointing at it) would delete.
    Deletes nothing.

    Raises ``ModelNotFoundError(problem="not_cached")`` when the cache has no such repo or revision, and
    ``UsageError`` for a repo that holds no AST checkpoint unless ``allow_other`` and ``name`` spells its hub id
    exactly (not an alias)."""
    repo_id, revision = parse_model_name(name)
    repos, damaged = _scan_all(cache_dir)
    repo = next((repo for repo in repos if repo.repo_id == repo_id), None)
    broken = next((row for row in damaged if row.repo_id == repo_id), None)
    if broken is not None:
        return _plan_damaged(broken, name, revision, allow_other)
    revisions = [rev for rev in (repo.revisions if repo else ()) if revision in (None, rev.commit_hash, *rev.refs)]
    if not revisions and revision and re.fullmatch(r"[0-9a-f]{7,39}", revision):  # as --cached shows it: 12
        revisions = [rev for rev in repo.revisions if rev.commit_hash.startswith(revision)] if repo else []
        if len(revisions) > 1:
            raise UsageError(f"{revision} is the start of {len(revisions)} cached commits of {repo_id}",
                             hint="give more of the commit hash")
    if not revisions:
        what = f"{repo_id!r}" + (f" at revision {revision!r}" if revision and repo else "")
        raise ModelNotFoundError(f"model {what} is not in the Hugging Face cache ({_cache(cache_dir)})",
                                 model=name, problem="not_cached", hint="nothing to remove")
    is_ast = any(_is_ast_snapshot(Path(rev.snapshot_path)) for rev in revisions)
    if not (is_ast or allow_other and name.partition("@")[0] == repo_id):
        raise UsageError(f"{repo_id} in the cache holds no AST checkpoint: not removing it unless named by its hub "
                         "id and confirmed", suggest={"allow_other": True})
    kept = {f.blob_path for rev in repo.revisions if rev not in revisions for f in rev.files}
    blobs = {f.blob_path: f.size_on_disk for rev in revisions for f in rev.files if f.blob_path not in kept}
    whole = revision is None
    return Removal(repo_id=repo_id, repo_path=Path(repo.repo_path), commits=tuple(r.commit_hash for r in revisions),
                   refs=tuple(sorted(ref for r in revisions for ref in r.refs)), whole_repo=whole,
                   blobs=() if whole else tuple(sorted(blobs)),
                   size=repo.size_on_disk if whole else sum(blobs.values()))


def _plan_damaged(row: CachedModel, name: str, revision: str | None, allow_other: bool) -> Removal:
    """Removing a damaged repo (``CachedModel.damaged``): the whole folder, as ``plan_removal`` checks it."""
    if revision is not None:
        raise UsageError(f"{row.repo_id} in the cache is damaged ({row.damaged}): only the whole repo can be removed",
                         hint=f"name it without @{revision}")
    if not (_may_be_ast(row.path) or allow_other and name == row.repo_id):
        raise UsageError(f"{row.repo_id} in the cache holds no AST checkpoint: not removing it unless named by its "
                         "hub id and confirmed", suggest={"allow_other": True})
    return Removal(repo_id=row.repo_id, repo_path=row.path, commits=(), refs=(), whole_repo=True, blobs=(),
                   size=row.size_on_disk)


def remove_cached(plan: Removal, cache_dir: str | os.PathLike | None = None) -> int:
    """Delete what ``plan`` names (nothing outside its repo folder), then check in a new scan of the cache
    that exactly that went: every other snapshot of every repo is still there. Returns the bytes freed.
    Raises ``AstError`` if the cache is not as planned afterwards."""
    import shutil

    before = _snapshots(cache_dir)
    repo = plan.repo_path
    doomed = [repo / "snapshots" / commit for commit in plan.commits] + [repo / "refs" / ref for ref in plan.refs]
    doomed += [Path(blob) for blob in plan.blobs]
    if repo.parent != _cache(cache_dir) or not repo.name.startswith("models--") or any(
            repo not in Path(os.path.abspath(path)).parents for path in doomed):
        raise AstError(f"{repo} is not a model folder of the cache {_cache(cache_dir)}: not removing it")
    try:
        if plan.whole_repo:
            shutil.rmtree(repo)
        for path in [] if plan.whole_repo else doomed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    except OSError as exc:
        where = os.fsdecode(exc.filename) if exc.filename else str(repo)
        raise AstError(f"cannot remove {where} from the cache: {exc.strerror or exc}",
                       hint=f"the cache folder {repo.parent} must be writable by you; what was removed stays "
                            "removed, run again to remove the rest") from None
    expected = {key for key in before if key[0] != plan.repo_id or (not plan.whole_repo
                                                                      and key[1] not in plan.commits)}
    after = _snapshots(cache_dir)
    if after != expected:
        changed = sorted(f"{repo_id}@{commit[:12]}" for repo_id, commit in after ^ expected)
        raise AstError(f"removing {plan.repo_id} left the cache other than planned ({', '.join(changed)})")
    return plan.size


def _snapshots(cache_dir) -> set[tuple[str, str]]:
    """(hub id, commit) of every cached model snapshot."""
    return {(repo.repo_id, rev.commit_hash) for repo in _scan(cache_dir) for rev in repo.revisions}


def verify_weights(path: Path, name: str | None = None) -> None:
    """Raise ``CheckpointError(corrupt=True)``, naming the file, if a safetensors header is unreadable (truncated
    or corrupt download). Reads the header only. ``name``: the model as given, when the file came from the cache
    (a forced download repairs it)."""
    if path.suffix != ".safetensors":
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"corrupt or truncated weights file {path} ({_one_line(exc)})", path=str(path), model=name,
            corrupt=True,
            hint="a forced download replaces it" if name else None,
        ) from None
