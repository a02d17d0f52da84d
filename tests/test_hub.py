"""Model management: aliases, downloads, the HF cache, offline use, and the errors when a model cannot be had.

Downloads go through huggingface_hub to ``FakeHub``, a threaded HTTP server on 127.0.0.1 that serves tiny model
repos in the hub's URL layout; ``HF_ENDPOINT`` points at it. Nothing here touches the real hub.

Most tests call the library (``ast_cli.checkpoint.hub``) and check the exception class and its structured fields. The few
marked ``# CLI`` go through ``ast ...`` and check only exit codes and the ``Error:`` line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

import pytest
from typer.testing import CliRunner

from ast_cli import DEFAULT_MODEL
from ast_cli.checkpoint import cache as hub_cache
from ast_cli.checkpoint import hub, names
from ast_cli.errors import AstError, CheckpointError, HubError, ModelNotFoundError, UsageError
from conftest import write_audio

REPO = "acme/tiny-ast"
TOKEN = "hf_secret_test_token"
SNAPSHOT_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]


# -- a tiny hub ------------------------------------------------------------------------------------


class FakeHub:
    """Serves repos as huggingface_hub expects: ``/api/models/{repo}[/revision/{rev}]`` (model info, with the
    commit ``sha`` and ``siblings``), ``/api/models/{repo}/tree/{rev}`` (the file listing) and
    ``/{repo}/resolve/{rev}/{file}`` (HEAD and GET, with ``ETag``, ``X-Repo-Commit``, ``Content-Length``, byte
    ranges). A repo is a set of commits and refs (branches, tags) pointing at them; a revision is a ref or a
    full commit hash, and every answer is about the commit it resolves to *at that moment*, like the hub's.
    Unknown repos answer 404 ``X-Error-Code: RepoNotFound``.

    ``drop``: a file name whose GET is cut off half-way, after which the whole server stops (connection refused).
    ``trickle``: (a file name, an Event): its GET body comes a byte every 0.1 s until the event is set.
    ``requests``: (method, path) of every request, to count downloads.
    ``on_request``: called with (method, path) after each request is answered, e.g. to push a commit.
    """

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.drop: str | None = None
        self.trickle: tuple[str, threading.Event] | None = None
        self.on_request: Callable[[str, str], None] | None = None
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub_._handle(self, body=False)

            def do_GET(self):
                hub_._handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # a client that gave up (a stalled trickle) resets the connection: socketserver would print that on the
        # stderr the CLI tests read
        self.server.handle_error = lambda request, client_address: None
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.running = True

    def add(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False,
            refs=("main",)) -> str:
        """Publish ``files`` as a new commit of ``repo_id`` (creating the repo, or pushing to it) and point
        ``refs`` at it; return the commit hash. ``repos[repo_id]["commit"]`` is the latest such commit."""
        repo = self.repos.setdefault(repo_id, {"commits": {}, "refs": {}})
        digest = hashlib.sha1(repo_id.encode() + repo.get("commit", "").encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        commit = digest.hexdigest()
        repo["commits"][commit] = dict(files)
        repo["refs"].update({ref: commit for ref in refs})
        repo.update(commit=commit, files=dict(files), private=private, gated=gated)
        return commit

    def downloads(self, filename: str) -> int:
        """How many GETs of ``filename`` (file bodies) were served."""
        return sum(1 for method, path in self.requests if method == "GET" and "/resolve/" in path
                   and path.endswith("/" + filename))

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.socket.close()

    # -- request handling

    def _handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = urlsplit(request.path).path
        self.requests.append((request.command, path))
        try:
            self._route(request, path, body)
        finally:
            if self.on_request is not None:
                self.on_request(request.command, path)

    def _route(self, request: BaseHTTPRequestHandler, path: str, body: bool) -> None:
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._model_info(request, match[1], unquote(match[2] or "main"))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)/?", path):
            return self._tree(request, match[1], unquote(match[2]))
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(request, match[1], unquote(match[2]), unquote(match[3]), body)
        self._send(request, 404, {"error": "not found"})

    def _commit(self, request, repo_id: str, revision: str) -> tuple[str, dict] | None:
        """(commit, files) that ``revision`` names now, or None after answering the error the hub would."""
        repo = self.repos.get(repo_id)
        if repo is not None and repo["private"] and request.headers.get("authorization") != f"Bearer {TOKEN}":
            repo = None  # like the hub: a private repo looks missing without the right token
        if repo is None:
            self._send(request, 401 if repo_id in self.repos else 404, {"error": "Repository not found"},
                       {"X-Error-Code": "RepoNotFound"})
            return None
        if repo["gated"]:
            self._send(request, 403, {"error": "Access to this model is restricted"}, {"X-Error-Code": "GatedRepo"})
            return None
        commit = repo["refs"].get(revision) or (revision if revision in repo["commits"] else None)
        if commit is None:
            self._send(request, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return None
        return commit, repo["commits"][commit]

    def _model_info(self, request, repo_id: str, revision: str) -> None:
        if found := self._commit(request, repo_id, revision):
            commit, files = found
            self._send(request, 200, {"id": repo_id, "modelId": repo_id, "sha": commit,
                                      "private": self.repos[repo_id]["private"],
                                      "siblings": [{"rfilename": name, "size": len(files[name])}
                                                   for name in sorted(files)]})

    def _tree(self, request, repo_id: str, revision: str) -> None:
        if found := self._commit(request, repo_id, revision):
            entries = []
            for name, data in sorted(found[1].items()):
                entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                if name.endswith((".safetensors", ".bin")):  # the hub stores weights in LFS
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self._send(request, 200, entries)

    def _resolve(self, request, repo_id: str, revision: str, filename: str, body: bool) -> None:
        found = self._commit(request, repo_id, revision)
        if found is None:
            return
        commit, files = found
        data = files.get(filename)
        if data is None:
            self._send(request, 404, {"error": "Entry not found"},
                       {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            return
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": commit,
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status, start = 200, 0
        if body and (match := re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))):
            status, start = 206, int(match[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data) - start))
        request.end_headers()
        if not body:
            return
        if filename == self.drop:
            # Half the body, then the server goes away: the client sees a cut connection, then refusals.
            request.wfile.write(data[start:start + (len(data) - start) // 2])
            request.wfile.flush()
            self.stop()
            return
        if self.trickle is not None and filename == self.trickle[0]:
            for at in range(start, len(data)):
                if self.trickle[1].wait(0.1):
                    start = at
                    break
                try:
                    request.wfile.write(data[at:at + 1])
                    request.wfile.flush()
                except OSError:  # the client gave up
                    return
            else:
                return
        request.wfile.write(data[start:])

    @staticmethod
    def _send(request, status: int, payload, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo_files(tiny_checkpoint, tmp_path_factory) -> dict[str, bytes]:
    """A tiny AST checkpoint in exact hub format (saved by transformers), plus files inference does not need."""
    import torch

    directory, model, _ = tiny_checkpoint
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    bin_path = tmp_path_factory.mktemp("hubrepo") / "pytorch_model.bin"
    torch.save(model.state_dict(), bin_path)
    files["pytorch_model.bin"] = bin_path.read_bytes()  # published repos hold both weights files
    files["README.md"] = b"# tiny AST\n"
    return files


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Online, with a fresh HF_HOME per test.

    huggingface_hub fixed its own offline switch from HF_HUB_OFFLINE when this process first imported it (the
    autouse fixture in conftest sets HF_HUB_OFFLINE=1 for every test): set it as a process started online
    would have it. The library never changes it; see test_library_never_flips_huggingface_hubs_offline_switch.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Its user agent names a detected "AI agent" harness, from a registry fetched once a day from the endpoint
    # it read at import (not the one passed per call): with telemetry off it asks nothing of the real hub.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def fake_hub(env, monkeypatch, repo_files):
    server = FakeHub()
    server.add(REPO, repo_files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


@pytest.fixture
def clip(tmp_path) -> Path:
    return write_audio(tmp_path / "x.wav", 1.0)


def cache_root(env_dir: Path) -> Path:
    return env_dir / "hf_home" / "hub"


def run_cli(*args: str):
    from ast_cli.cli import app  # here, not at the top: the library tests do not depend on the CLI

    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.stderr, result.stderr
    return result


def assert_clean_error(result, *fragments: str, code: int = 1) -> None:
    """Non-zero exit, at most three lines on stderr, no traceback, and the ``Error:`` line names the problem.
    (The ``Hint:`` wording belongs to the CLI's error table and is not checked here.)"""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, result.stderr)


CLI_WORDS = re.compile(r"(?<![\w-])--[a-z]|\bast (download|models|classify)\b")  # a flag, or a command


def speaks_no_cli(exc: AstError) -> AstError:
    """The library's errors name no command-line option or command, in the message or the hint."""
    for text in (str(exc), exc.hint or ""):
        assert not CLI_WORDS.search(text), text
    return exc


def raised(excinfo) -> AstError:
    return speaks_no_cli(excinfo.value)


# -- aliases and the registry ----------------------------------------------------------------------


def test_registry_has_the_eight_published_checkpoints():
    assert len(names.REGISTRY) == 8
    assert len({spec.alias for spec in names.REGISTRY}) == 8
    assert all(spec.repo_id.startswith("MIT/ast-finetuned-") for spec in names.REGISTRY)
    assert names.find_alias("audioset-10-10-0.4593").repo_id == DEFAULT_MODEL
    speech = names.find_alias("speech-commands-v2")
    assert (speech.num_labels, speech.max_length, speech.input_seconds) == (35, 128, 1.28)
    assert (speech.mean, speech.std) == (-6.845978, 5.5654526)
    assert names.find_alias("audioset-16-16-0.442").frequency_stride == 16


def test_aliases_and_hub_ids_resolve_to_repo_and_revision():
    assert names.parse_model_name("audioset-16-16-0.442") == ("MIT/ast-finetuned-audioset-16-16-0.442", None)
    assert names.parse_model_name("Speech-Commands-V2") == ("MIT/ast-finetuned-speech-commands-v2", None)
    assert names.parse_model_name("speech-commands-v2@v1") == ("MIT/ast-finetuned-speech-commands-v2", "v1")
    assert names.parse_model_name("acme/tiny-ast") == ("acme/tiny-ast", None)
    assert names.parse_model_name("acme/tiny-ast@refs/pr/1") == ("acme/tiny-ast", "refs/pr/1")
    with pytest.raises(ModelNotFoundError, match="unknown model") as info:
        names.parse_model_name("audioset-16-16-0.44")
    exc = raised(info)
    assert (exc.model, exc.problem, exc.suggestion) == ("audioset-16-16-0.44", "unknown_name", "audioset-16-16-0.442")
    # huggingface_hub's validate_repo_id decides what a hub id may be; a bare word must be an alias.
    for bad in ("nonsense", "a--b/c", "acme/x@", "acme/x.git", "-acme/x", "acme/ti ny", "acme/a..b"):
        with pytest.raises(ModelNotFoundError) as info:
            names.parse_model_name(bad)
        assert (raised(info).problem, info.value.model, info.value.suggestion) == ("unknown_name", bad, None), bad


def test_looks_local():
    assert names.looks_local("./model") and names.looks_local("/x/y") and names.looks_local("ckpt.pth")
    assert names.looks_local("a/b/c")
    assert not names.looks_local("acme/tiny-ast") and not names.looks_local("acme/tiny-ast@refs/pr/1")
    assert not names.looks_local("speech-commands-v2")



def test_models_list_shows_what_is_cached(fake_hub, env, repo_files):
    spec = names.find_alias("speech-commands-v2")
    fake_hub.add(spec.repo_id, repo_files)
    path = hub.download("speech-commands-v2").path
    assert hub_cache.cached_models() == {spec.repo_id: path}


# -- the cache -------------------------------------------------------------------------------------


def _fake_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs=("main",)) -> Path:
    """A snapshot written the way huggingface_hub lays it out: blobs, symlinks from the snapshot, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def test_cached_checkpoints_lists_every_cached_ast_repo(fake_hub, env, repo_files):
    assert hub_cache.cached_checkpoints() == [] and hub_cache.cached_models() == {}  # no cache folder yet: CacheNotFound
    spec = names.find_alias("speech-commands-v2")
    fake_hub.add(spec.repo_id, repo_files)
    mine, published = hub.download(REPO), hub.download(spec.alias)
    cache = cache_root(env)
    weights = repo_files["model.safetensors"]
    # Not AST checkpoints: a BERT, a config-only repo; and one with no model_type, which counts as an AST.
    bert = {"config.json": b'{"model_type": "bert"}', "model.safetensors": weights}
    _fake_snapshot(cache, "acme/bert", "b" * 40, bert)
    _fake_snapshot(cache, "acme/no-weights", "c" * 40, {"config.json": repo_files["config.json"]})
    bare = _fake_snapshot(cache, "acme/bare", "d" * 40, {"config.json": b"{}", "pytorch_model.bin": b"x" * 10},
                          refs=())

    rows = hub_cache.cached_checkpoints()
    assert [row.repo_id for row in rows] == ["MIT/ast-finetuned-speech-commands-v2", "acme/bare", REPO]
    by_id = {row.repo_id: row for row in rows}
    row = by_id[REPO]
    assert (row.path, row.commit_hash, row.refs, row.alias) == (mine.path, fake_hub.repos[REPO]["commit"], ("main",),
                                                                None)
    assert row.size_on_disk == mine.size == sum(len(repo_files[f]) for f in SNAPSHOT_FILES)
    assert by_id[spec.repo_id].alias == "speech-commands-v2" and by_id[spec.repo_id].path == published.path
    assert (by_id["acme/bare"].path, by_id["acme/bare"].refs, by_id["acme/bare"].size_on_disk) == (bare, (), 12)
    # cached_models: every complete model (config and weights), whatever it is.
    assert set(hub_cache.cached_models()) == {REPO, spec.repo_id, "acme/bert", "acme/bare"}
    assert hub_cache.cached_checkpoints(cache_dir=str(env / "nowhere")) == []


def test_cached_models_prefers_the_snapshot_main_points_at(env, repo_files):
    cache = cache_root(env)
    files = {name: repo_files[name] for name in SNAPSHOT_FILES}
    old = _fake_snapshot(cache, REPO, "1" * 40, files, refs=("v1",))
    # A second snapshot of the same repo, main pointing at it (blobs already there: shared).
    new = cache / "models--acme--tiny-ast" / "snapshots" / ("2" * 40)
    new.mkdir()
    for name in files:
        (new / name).symlink_to(os.readlink(old / name))
    (cache / "models--acme--tiny-ast" / "refs" / "main").write_text("2" * 40)
    assert hub_cache.cached_models() == {REPO: new}
    assert [(row.commit_hash, row.refs) for row in hub_cache.cached_checkpoints()] == [("2" * 40, ("main",)),
                                                                                ("1" * 40, ("v1",))]
    (cache / "models--acme--tiny-ast" / "refs" / "main").unlink()
    assert hub_cache.cached_models() == {REPO: old}  # no main: the snapshot another ref points at
    assert hub_cache.cached_snapshot(REPO, "v1") == old and hub_cache.cached_snapshot(REPO) is None


# -- downloading -----------------------------------------------------------------------------------


def test_download_fetches_only_inference_files_and_is_idempotent(fake_hub, env, repo_files):
    result = hub.download(REPO)
    commit = fake_hub.repos[REPO]["commit"]
    assert result.path == cache_root(env) / "models--acme--tiny-ast" / "snapshots" / commit
    assert sorted(p.name for p in result.path.iterdir()) == SNAPSHOT_FILES
    assert result.files == ("config.json", "preprocessor_config.json", "model.safetensors")
    assert result.fetched is True and result.size == sum(len(repo_files[f]) for f in result.files)
    assert (cache_root(env) / "models--acme--tiny-ast" / "refs" / "main").read_text() == commit
    gets = {name: fake_hub.downloads(name) for name in ("config.json", "model.safetensors", "pytorch_model.bin")}
    assert gets == {"config.json": 1, "model.safetensors": 1, "pytorch_model.bin": 0}

    requests_before = len(fake_hub.requests)
    again = hub.download(REPO)
    assert again == hub.DownloadResult(result.path, result.files, False, result.size)
    assert fake_hub.downloads("model.safetensors") == 1 and fake_hub.downloads("config.json") == 1
    assert [path for _, path in fake_hub.requests[requests_before:]] == [f"/api/models/{REPO}"]  # model info

    forced = hub.download(REPO, force=True)
    assert forced.fetched is True and forced.path == result.path and fake_hub.downloads("model.safetensors") == 2



def test_download_is_pinned_to_one_commit(fake_hub, env, repo_files):
    """A push between resolving main and fetching the files changes nothing: every file comes from the commit
    main named when the download began, and the cache's refs/main records that commit."""
    import numpy as np
    from safetensors.numpy import save

    first = fake_hub.repos[REPO]["commit"]
    config = json.loads(repo_files["config.json"])
    pushed_files = dict(repo_files, **{"config.json": json.dumps(dict(config, pushed=True)).encode(),
                                       "model.safetensors": save({"x": np.zeros(3, np.float32)})})
    pushed: list[str] = []

    def push_after_model_info(method: str, path: str) -> None:
        if re.fullmatch(f"/api/models/{REPO}(/revision/.+)?", path) and not pushed:  # model info answered
            pushed.append(fake_hub.add(REPO, pushed_files))

    fake_hub.on_request = push_after_model_info
    result = hub.download(REPO)
    assert pushed and pushed[0] != first and fake_hub.repos[REPO]["refs"]["main"] == pushed[0]
    assert result.path.name == first
    for name in result.files:
        assert (result.path / name).read_bytes() == repo_files[name], name
    file_requests = [path for _, path in fake_hub.requests if "/resolve/" in path or "/tree/" in path]
    assert file_requests and all(f"/{first}" in path for path in file_requests), file_requests
    assert (cache_root(env) / "models--acme--tiny-ast" / "refs" / "main").read_text() == first
    assert hub_cache.cached_snapshot(REPO) == result.path

    # The next download sees the push: a new snapshot, refs/main moved; the old snapshot stays.
    latest = hub.download(REPO)
    assert latest.path.name == pushed[0] and latest.fetched
    assert json.loads((latest.path / "config.json").read_text())["pushed"] is True
    assert hub_cache.cached_snapshot(REPO) == latest.path and hub_cache.cached_models() == {REPO: latest.path}
    assert [row.commit_hash for row in hub_cache.cached_checkpoints()] == [pushed[0], first]


def test_download_sends_library_name_and_honours_hf_hub_cache(fake_hub, env, monkeypatch, tmp_path):
    seen = []
    original = fake_hub._handle
    fake_hub._handle = lambda request, body: (seen.append(request.headers.get("user-agent", "")),
                                              original(request, body))[1]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    path = hub.download(REPO).path
    assert path.is_relative_to(tmp_path / "elsewhere") and seen
    assert all("ast-cli/" in agent for agent in seen)
    other = hub.download(REPO, cache_dir=str(tmp_path / "explicit")).path
    assert other.is_relative_to(tmp_path / "explicit")
    assert hub.resolve_model(REPO, offline=True, cache_dir=str(tmp_path / "explicit")) == other


class Recorder:
    """A ``hub.DownloadProgress`` that writes down what it hears."""

    def __init__(self):
        self.calls: list = []
        self.bytes = 0

    def start(self, model, size, cache):
        self.calls.append(("start", model, size, cache))

    def advance(self, nbytes):
        self.bytes += nbytes

    def finish(self):
        self.calls.append(("finish",))


def test_progress_is_off_by_default_and_never_global(fake_hub, env, capfd):
    from huggingface_hub.utils import are_progress_bars_disabled

    enabled = not are_progress_bars_disabled()
    hub.download(REPO)
    assert capfd.readouterr().err == ""
    hub.download(REPO, force=True, progress=Recorder())
    assert capfd.readouterr().err == ""  # huggingface_hub's own bars are never drawn
    assert (not are_progress_bars_disabled()) == enabled


def test_24_8_a_download_is_one_bar_or_one_line(fake_hub, env, repo_files, capfd):
    """The library tells its caller of the weights' transfer (the bytes as they land) and prints nothing; the CLI
    draws one rich bar on a terminal, or one line without one, and nothing with -q."""
    import io

    from rich.console import Console

    from ast_cli.cli._progress import DownloadBar

    recorder = Recorder()
    result = hub.download(REPO, progress=recorder)
    size = len(repo_files["model.safetensors"])
    assert recorder.calls == [("start", REPO, size, cache_root(env)), ("finish",)]
    assert recorder.bytes == size and capfd.readouterr().err == ""
    again = Recorder()
    hub.download(REPO, progress=again)
    assert again.calls == []  # nothing to fetch: nothing said

    lines = run_cli("download", "acme/other", "-q")  # not there: the error only
    assert "downloading" not in lines.stderr
    fake_hub.add("acme/other", repo_files)
    piped = run_cli("download", "acme/other")
    assert piped.exit_code == 0, piped.stderr
    assert piped.stderr.splitlines()[0] == f"downloading acme/other (0.2 MB) to {cache_root(env)}"
    assert len(piped.stderr.splitlines()) == 2  # and the summary; no "Fetching", no "Reconstruction"
    assert run_cli("download", "acme/other", "--force", "-q").stderr == ""

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    hub.download(REPO, force=True, progress=DownloadBar(console))
    drawn = screen.getvalue()
    assert f"downloading {REPO}" in drawn and "Fetching" not in drawn and "Reconstruct" not in drawn
    assert capfd.readouterr().err == ""
    assert result.path == hub_cache.cached_snapshot(REPO)


def test_environment_is_read_at_call_time(fake_hub, env, monkeypatch):
    """HF_HUB_OFFLINE as set now decides; HF_ENDPOINT and HF_TOKEN too (see the other tests)."""
    path = hub.download(REPO).path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests_before = len(fake_hub.requests)
    with pytest.raises(ModelNotFoundError, match="offline mode is on") as info:
        hub.resolve_model("acme/other")
    assert (raised(info).problem, info.value.model) == ("not_cached", "acme/other")
    assert hub.resolve_model(REPO) == path and hub.download(REPO).path == path
    assert len(fake_hub.requests) == requests_before  # offline means no request at all


def test_library_never_flips_huggingface_hubs_offline_switch(fake_hub, env, monkeypatch):
    """huggingface_hub fixes its offline switch at import and offers no per-call override. Under a switch that
    is on (imported with HF_HUB_OFFLINE=1), the library keeps to the cache even when asked to go online, and
    says why; it never turns the switch off, which would change every thread of the process."""
    from huggingface_hub import constants

    path = hub.download(REPO).path
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as if imported under HF_HUB_OFFLINE=1
    requests_before = len(fake_hub.requests)
    assert hub.resolve_model(REPO, offline=False) == path
    assert hub.download(REPO, offline=False) == hub.DownloadResult(path, ("config.json", "preprocessor_config.json",
                                                                          "model.safetensors"), False,
                                                                   hub.download(REPO).size)
    with pytest.raises(ModelNotFoundError, match="huggingface_hub is in offline mode") as info:
        hub.resolve_model("acme/other", offline=False)
    assert raised(info).problem == "not_cached" and "HF_HUB_OFFLINE" in info.value.hint
    with pytest.raises(UsageError) as info:
        hub.download(REPO, force=True)
    assert (raised(info).option, info.value.suggest) == ("force", {"force": None})
    assert len(fake_hub.requests) == requests_before and constants.HF_HUB_OFFLINE is True


def test_repo_without_safetensors_gets_pytorch_model_bin(fake_hub, env, repo_files):
    fake_hub.add("acme/old-ast", {k: v for k, v in repo_files.items() if k != "model.safetensors"})
    result = hub.download("acme/old-ast")
    assert sorted(p.name for p in result.path.iterdir()) == ["config.json", "preprocessor_config.json",
                                                             "pytorch_model.bin"]
    assert result.files[-1] == "pytorch_model.bin"
    assert hub.download("acme/old-ast", offline=True).files == result.files


def test_revisions(fake_hub, env, repo_files):
    commit = fake_hub.add("acme/tagged", repo_files, refs=("main", "v1"))
    assert hub.download("acme/tagged@v1").path.name == commit
    assert (cache_root(env) / "models--acme--tagged" / "refs" / "v1").read_text() == commit
    assert not (cache_root(env) / "models--acme--tagged" / "refs" / "main").exists()
    assert hub.download("acme/tagged", revision="v1").fetched is False
    assert hub.resolve_model("acme/tagged@v1", offline=True).name == commit
    assert hub.download(f"acme/tagged@{commit}").path.name == commit  # a commit hash: no ref to record
    assert sorted(p.name for p in (cache_root(env) / "models--acme--tagged" / "refs").iterdir()) == ["v1"]
    with pytest.raises(ModelNotFoundError, match="has no revision 'v2'") as info:
        hub.download("acme/tagged@v2")
    assert (raised(info).problem, info.value.model) == ("no_such_revision", "acme/tagged@v2")
    with pytest.raises(ModelNotFoundError) as info:
        hub.download("acme/tagged", revision="v2")
    assert info.value.model == "acme/tagged@v2"  # the name that names what failed
    with pytest.raises(UsageError, match="different revisions") as info:
        hub.download("acme/tagged@v1", revision="v2")
    assert raised(info).option == "revision"


def test_private_repo_needs_hf_token(fake_hub, env, monkeypatch, repo_files):
    fake_hub.add("acme/private-ast", repo_files, private=True)
    with pytest.raises(ModelNotFoundError, match="no model 'acme/private-ast'") as info:
        hub.download("acme/private-ast")
    assert raised(info).problem == "no_such_repo" and "HF_TOKEN" in info.value.hint
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub.download("acme/private-ast").path.name == fake_hub.repos["acme/private-ast"]["commit"]
    fake_hub.add("acme/gated-ast", repo_files, gated=True)
    with pytest.raises(ModelNotFoundError, match="acme/gated-ast is a gated repo") as info:
        hub.download("acme/gated-ast")
    assert (raised(info).problem, info.value.model) == ("gated", "acme/gated-ast") and "HF_TOKEN" in info.value.hint



# -- first use, offline use ------------------------------------------------------------------------



def test_resolve_model_library(fake_hub, env, monkeypatch, tmp_path):
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache") as info:
        hub.resolve_model(REPO, offline=True)
    assert (raised(info).problem, info.value.model) == ("not_cached", REPO)
    assert fake_hub.requests == []  # offline means no request at all
    path = hub.resolve_model(REPO)  # online (HF_HUB_OFFLINE=0): downloaded on first use
    assert path == hub_cache.cached_snapshot(REPO)
    fake_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model(REPO) == path
    offline = hub.download(REPO)  # offline download: the complete cached snapshot
    assert (offline.path, offline.fetched) == (path, False)
    assert hub_cache.cached_snapshot(REPO) == path
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve_model(str(tmp_path / "missing"))
    assert raised(info).problem == "no_such_path"
    assert hub.resolve_model(str(path)) == path  # a directory is used as is


def test_offline_and_not_cached(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        hub.download("nobody/no-such-model")
    assert raised(info).problem == "not_cached"
    with pytest.raises(UsageError) as info:
        hub.download("nobody/no-such-model", force=True)
    assert raised(info).option == "force"



# -- errors ----------------------------------------------------------------------------------------


def test_repo_not_found(fake_hub, env):
    with pytest.raises(ModelNotFoundError, match="no model 'nobody/no-such-model'") as info:
        hub.download("nobody/no-such-model")
    assert (raised(info).problem, info.value.model) == ("no_such_repo", "nobody/no-such-model")
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve_model("no-such-alias")
    assert raised(info).problem == "unknown_name"


def test_network_unreachable(env, monkeypatch):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubError, match=f"cannot reach the hub at http://127.0.0.1:{port}") as info:
        hub.resolve_model(REPO)
    assert raised(info).model == REPO and "check the network" in info.value.hint


def test_repo_without_ast_weights_or_config(fake_hub, env, repo_files):
    fake_hub.add("acme/readme-only", {"README.md": b"hi"})
    missing = "no config.json and no model.safetensors or pytorch_model.bin"
    with pytest.raises(ModelNotFoundError, match=missing) as info:
        hub.download("acme/readme-only")
    assert (raised(info).problem, info.value.model) == ("not_ast", "acme/readme-only")
    fake_hub.add("acme/no-weights", {"config.json": repo_files["config.json"]})
    with pytest.raises(ModelNotFoundError, match="no model.safetensors or pytorch_model.bin") as info:
        hub.download("acme/no-weights")
    assert raised(info).problem == "not_ast"
    bert = json.dumps({"model_type": "bert"}).encode()
    fake_hub.add("acme/bert", {"config.json": bert, "model.safetensors": repo_files["model.safetensors"]})
    with pytest.raises(ModelNotFoundError, match="describes a 'bert' model") as info:
        hub.download("acme/bert")
    assert raised(info).problem == "not_ast"
    assert fake_hub.downloads("model.safetensors") == 0  # found out before fetching any weights
    assert hub_cache.cached_checkpoints() == []


def test_server_down_midway(fake_hub, env, monkeypatch, repo_files):
    import huggingface_hub.file_download as file_download

    monkeypatch.setattr(file_download.time, "sleep", lambda seconds: None)  # its resume retries wait 1 s each
    fake_hub.drop = "model.safetensors"
    with pytest.raises(HubError, match=f"download of {REPO} interrupted while fetching model.safetensors") as info:
        hub.download(REPO)
    assert raised(info).model == REPO and "files already complete are kept" in info.value.hint
    assert not fake_hub.running and fake_hub.downloads("config.json") == 1
    repo_cache = cache_root(env) / "models--acme--tiny-ast"
    assert not list(repo_cache.rglob("*.incomplete"))  # no partial file left behind
    assert not (repo_cache / "refs" / "main").exists()  # main is recorded once the snapshot is complete
    assert hub_cache.cached_snapshot(REPO) is None and REPO not in hub_cache.cached_models()
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve_model(REPO, offline=True)
    assert info.value.problem == "not_cached"

    # The hub comes back (elsewhere): the next run fetches only what is missing.
    again = FakeHub()
    try:
        again.add(REPO, repo_files)
        monkeypatch.setenv("HF_ENDPOINT", again.url)
        result = hub.download(REPO)
        assert again.downloads("config.json") == 0 and again.downloads("model.safetensors") == 1
        assert result.fetched and (result.path / "model.safetensors").read_bytes() == repo_files["model.safetensors"]
    finally:
        again.stop()


def test_corrupt_weights_are_named_and_a_forced_download_repairs_them(fake_hub, env, monkeypatch, repo_files):
    path = hub.download(REPO).path
    weights = path / "model.safetensors"
    with open(weights, "r+b") as handle:  # a truncated file in the cache (the snapshot entry links to the blob)
        handle.truncate(len(repo_files["model.safetensors"]) // 2)

    with pytest.raises(CheckpointError, match=f"corrupt or truncated weights file {weights}") as info:
        hub.download(REPO)
    exc = raised(info)
    assert (exc.path, exc.model, exc.corrupt) == (str(weights), REPO, True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        hub.resolve_model(REPO)
    assert (raised(info).corrupt, info.value.model) == (True, REPO)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    repaired = hub.download(REPO, force=True)
    assert repaired.fetched and weights.read_bytes() == repo_files["model.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model(REPO) == path


def test_corrupt_weights_from_the_server(fake_hub, env, repo_files):
    fake_hub.add("acme/broken", dict(repo_files, **{"model.safetensors": repo_files["model.safetensors"][:100]}))
    with pytest.raises(CheckpointError, match="corrupt or truncated weights file") as info:
        hub.download("acme/broken")
    exc = raised(info)
    assert exc.corrupt and exc.model == "acme/broken" and exc.path.endswith("model.safetensors")


def test_download_of_a_local_path_is_a_usage_error(env, tmp_path):
    with pytest.raises(UsageError, match="is a local path") as info:
        hub.download(str(tmp_path))
    assert raised(info).option == "name"


# -- the CLI on top (exit codes and the Error: line only; the CLI's own tests cover the rest) -------------


def test_cli_models_list_shows_what_is_cached(fake_hub, env, repo_files):  # CLI
    spec = names.find_alias("speech-commands-v2")
    fake_hub.add(spec.repo_id, repo_files)
    path = hub.download("speech-commands-v2").path
    rows = {row["alias"]: row for row in json.loads(run_cli("models", "-f", "json").stdout)}
    assert rows["speech-commands-v2"]["cached"] and rows["speech-commands-v2"]["path"] == str(path)
    assert not rows["audioset-10-10-0.4593"]["cached"]


def test_cli_download_revision(fake_hub, env, repo_files):  # CLI
    commit = fake_hub.add("acme/tagged", repo_files, refs=("main", "v1"))
    assert run_cli("download", "acme/tagged", "--revision", "v1", "-q").stdout.strip().endswith(commit)
    assert_clean_error(run_cli("download", "acme/tagged@v2"), "has no revision 'v2'")
    assert_clean_error(run_cli("download", "acme/tagged@v1", "--revision", "v2"), "different revisions", code=2)


def test_cli_offline_and_not_cached(env, monkeypatch, clip):  # CLI
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_clean_error(run_cli("classify", str(clip), "--model", "nobody/no-such-model"),
                       "not in the Hugging Face cache")
    assert_clean_error(run_cli("download", "nobody/no-such-model"), "offline mode is on")


def test_cli_hub_errors(fake_hub, env, repo_files, tmp_path):  # CLI
    assert_clean_error(run_cli("download", "nobody/no-such-model"), "no model 'nobody/no-such-model'")
    assert_clean_error(run_cli("download", "no-such-alias"), "unknown model 'no-such-alias'")
    fake_hub.add("acme/bert", {"config.json": b'{"model_type": "bert"}',
                               "model.safetensors": repo_files["model.safetensors"]})
    assert_clean_error(run_cli("download", "acme/bert"), "describes a 'bert' model")
    fake_hub.add("acme/broken", dict(repo_files, **{"model.safetensors": repo_files["model.safetensors"][:100]}))
    assert_clean_error(run_cli("download", "acme/broken", "-q"), "corrupt or truncated weights file")
    assert_clean_error(run_cli("download", str(tmp_path)), "is a local path", code=2)


def test_cli_network_unreachable(env, monkeypatch):  # CLI
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert_clean_error(run_cli("download", REPO), f"cannot reach the hub at http://127.0.0.1:{port}")


def test_cli_models_list_json_and_table(env):  # CLI
    rows = json.loads(run_cli("models", "--format", "json").stdout)
    assert [row["alias"] for row in rows] == [spec.alias for spec in names.REGISTRY]
    first = rows[0]
    assert first["repo_id"] == DEFAULT_MODEL and first["default"] is True
    assert (first["num_labels"], first["max_length"], first["input_seconds"]) == (527, 1024, 10.24)
    assert not any(row["cached"] for row in rows)
    assert run_cli("download", "--list", "--format", "json").stdout == run_cli("models", "-f", "json").stdout

    table = run_cli("download", "--list").stdout
    assert "MIT/ast-finetuned-speech-commands-v2" in table and "1.28 s" in table
    assert "speech-commands-v2" in table.splitlines()[-1]
    bad = run_cli("models", "--format", "yaml")  # a choice Typer itself checks: its usage error, exit 2
    assert bad.exit_code == 2 and "Error: --format: " in bad.stderr and "Traceback" not in bad.stderr


def test_cli_download(fake_hub, env):  # CLI
    result = run_cli("download", REPO)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().endswith(fake_hub.repos[REPO]["commit"])
    again = run_cli("download", REPO, "--quiet")
    assert again.exit_code == 0 and again.stdout == result.stdout
    assert fake_hub.downloads("model.safetensors") == 1


def test_cli_several_models_one_bad(fake_hub, env):  # CLI
    result = run_cli("download", REPO, "nobody/no-such-model", "-q")
    assert result.exit_code == 1
    assert result.stdout.strip().endswith(fake_hub.repos[REPO]["commit"])
    assert "Error: no model 'nobody/no-such-model'" in result.stderr and len(result.stderr.splitlines()) <= 3


def test_cli_classify_downloads_on_first_use_then_works_offline(fake_hub, env, monkeypatch, clip, repo_files,
                                                            tmp_path):  # CLI
    first = run_cli("classify", str(clip), "--model", REPO, "--format", "json")
    assert first.exit_code == 0, first.stderr
    assert f"downloading {REPO} (0.2 MB) to {cache_root(env)}\n" in first.stderr  # #24.8: not in silence
    assert fake_hub.downloads("model.safetensors") == 1
    fake_hub.stop()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = run_cli("classify", str(clip), "--model", REPO, "--format", "json")
    assert offline.exit_code == 0, offline.stderr
    assert json.loads(offline.stdout) == json.loads(first.stdout)

    # The same scores as the checkpoint loaded from a plain directory.
    local = tmp_path / "local"
    local.mkdir()
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (local / name).write_bytes(repo_files[name])
    direct = run_cli("classify", str(clip), "--model", str(local), "--format", "json")
    assert json.loads(direct.stdout)[0]["labels"] == json.loads(offline.stdout)[0]["labels"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the --offline flag alone also keeps to the cache
    assert run_cli("labels", "--model", REPO, "--offline").stdout.startswith("0\t")


def test_cli_offline_not_cached_in_a_real_process(env, clip):  # CLI
    """The acceptance check, as a user runs it: a fresh process, HF_HUB_OFFLINE=1 in its environment."""
    environ = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(env / "hf_home"))
    proc = subprocess.run([sys.executable, "-m", "ast_cli", "classify", str(clip), "--model", "nobody/no-such-model"],
                          capture_output=True, text=True, env=environ, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("Error: model 'nobody/no-such-model' is not in the Hugging Face cache")


# -- issue 22: hostile names and revisions -----------------------------------------------------------


def test_22_1_revision_is_not_a_path(fake_hub, env, repo_files, clip):  # CLI
    """A hub (or mirror) that answers for any revision must not turn it into a file write outside the cache."""
    evil = "../../../../victim.txt"  # refs/<evil> would be env/victim.txt
    fake_hub.add(REPO, repo_files, refs=("main", evil))
    victim = env / "victim.txt"
    victim.write_text("precious\n")
    for args in (("download", REPO, "--revision", evil), ("download", f"{REPO}@{evil}"),
                 ("classify", str(clip), "--model", f"{REPO}@{evil}")):
        result = run_cli(*args)
        assert_clean_error(result, "not a valid revision", code=2)
        assert victim.read_text() == "precious\n", args
    assert fake_hub.requests == []  # refused before asking the hub
    for bad in ("a/../b", ".hidden", "x.lock", "a b", "v1~1", "x@{1}", "/main", "main/"):
        with pytest.raises(UsageError, match="not a valid revision") as info:
            hub.download(REPO, revision=bad)
        assert raised(info).option == "revision"
    commit = fake_hub.repos[REPO]["commit"]
    assert names.parse_model_name(f"{REPO}@{commit}") == (REPO, commit)  # a full commit hash is a revision
    # The commit the server names becomes snapshots/<sha>: anything but a commit hash is refused.
    fake_hub.repos[REPO]["refs"]["main"] = "../../../x"
    fake_hub.repos[REPO]["commits"]["../../../x"] = repo_files
    with pytest.raises(HubError, match="no valid commit"):
        hub.download(REPO)
    assert not (env / "hf_home" / "x").exists() and not list(env.rglob("snapshots/*"))


def _cached_files(cache: Path) -> dict[str, bytes]:
    """Every file under the cache (links followed), by relative path: what a removal must leave alone."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def test_22_2_rm_deletes_exactly_the_named_repo(env, repo_files):  # CLI
    """Two repos at the same commit hash (a mirror, a duplicated repo): --rm of one leaves the other whole."""
    cache = cache_root(env)
    files = {name: repo_files[name] for name in SNAPSHOT_FILES}
    _fake_snapshot(cache, "test/ast-tiny", "a" * 40, files)
    _fake_snapshot(cache, "test/ast-16-16", "a" * 40, files)
    other = {k: v for k, v in _cached_files(cache).items() if "ast-16-16" in k}
    result = run_cli("models", "--rm", "test/ast-tiny", "--yes")
    assert result.exit_code == 0, result.stderr
    assert "removed test/ast-tiny from the cache" in result.stderr
    assert not (cache / "models--test--ast-tiny").exists()
    assert _cached_files(cache) == other
    assert [row.repo_id for row in hub_cache.cached_checkpoints()] == ["test/ast-16-16"]


def test_22_3_rm_at_rev_deletes_only_that_revision(env, repo_files):  # CLI
    cache = cache_root(env)
    files = {name: repo_files[name] for name in SNAPSHOT_FILES}
    _fake_snapshot(cache, REPO, "1" * 40, files, refs=("v1",))
    repo = cache / "models--acme--tiny-ast"
    newer = dict(files, **{"config.json": repo_files["config.json"] + b" "})  # shares the weights blob
    new = repo / "snapshots" / ("2" * 40)
    new.mkdir()
    for name, data in newer.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        new.joinpath(name).symlink_to(os.path.relpath(blob, new))
    (repo / "refs" / "main").write_text("2" * 40)
    kept = {k: v for k, v in _cached_files(cache).items() if "2" * 40 in k or k.endswith("refs/main")}

    result = run_cli("models", "--rm", f"{REPO}@v1", "--yes")
    assert result.exit_code == 0, result.stderr
    assert f"removed {REPO}@{'1' * 12} (refs v1)" in result.stderr
    assert not (repo / "snapshots" / ("1" * 40)).exists() and not (repo / "refs" / "v1").exists()
    assert {k: v for k, v in _cached_files(cache).items() if "snapshots" in k or "refs" in k} == kept
    assert len(list((repo / "blobs").iterdir())) == 3  # the old config's blob went, the shared weights stayed
    assert hub_cache.cached_snapshot(REPO) == new
    # By commit hash too; a revision that is not cached is an error and removes nothing.
    assert_clean_error(run_cli("models", "--rm", f"{REPO}@v1", "--yes"), "not in the Hugging Face cache")
    assert run_cli("models", "--rm", f"{REPO}@{'2' * 40}", "--yes").exit_code == 0
    assert not (repo / "snapshots" / ("2" * 40)).exists() and not (repo / "refs" / "main").exists()


def test_22_4_rm_asks_refuses_non_ast_and_dry_runs(env, repo_files, monkeypatch):  # CLI
    from ast_cli.cli import models as models_cli

    cache = cache_root(env)
    _fake_snapshot(cache, REPO, "1" * 40, {name: repo_files[name] for name in SNAPSHOT_FILES})
    _fake_snapshot(cache, "acme/gpt2", "2" * 40, {"config.json": b'{"model_type": "gpt2"}',
                                                 "model.safetensors": repo_files["model.safetensors"]})
    before = _cached_files(cache)

    dry = run_cli("models", "--rm", REPO, "--dry-run")
    assert dry.exit_code == 0 and dry.stdout.startswith(f"would remove {REPO} (") and _cached_files(cache) == before
    # No terminal, no --yes: refused. Not an AST: refused without --yes.
    assert_clean_error(run_cli("models", "--rm", REPO), "no terminal to ask on", code=2)
    assert_clean_error(run_cli("models", "--rm", "acme/gpt2"), "holds no AST checkpoint", code=2)
    assert_clean_error(run_cli("models", "--rm", "acme/gpt2", "--dry-run"), "holds no AST checkpoint", code=2)
    assert _cached_files(cache) == before

    monkeypatch.setattr(models_cli, "_can_ask", lambda: True)  # a terminal: show, ask
    declined = CliRunner().invoke(models_cli.app, ["models", "--rm", REPO], input="n\n")
    assert declined.exit_code == 1 and f"to remove: {REPO} (" in declined.stderr and "Remove?" in declined.stderr
    assert _cached_files(cache) == before
    accepted = CliRunner().invoke(models_cli.app, ["models", "--rm", REPO], input="y\n")
    assert accepted.exit_code == 0 and "removed acme/tiny-ast" in accepted.stderr
    assert not (cache / "models--acme--tiny-ast").exists()
    assert run_cli("models", "--rm", "acme/gpt2", "--yes").exit_code == 0  # exact name + --yes
    assert not (cache / "models--acme--gpt2").exists()


def test_22_14_a_config_too_deep_for_the_parser_is_left_out_of_the_listing(env, repo_files):  # CLI
    cache = cache_root(env)
    _fake_snapshot(cache, "acme/deep", "d" * 40, {"config.json": b"[" * 100_000 + b"]" * 100_000,
                                                  "model.safetensors": repo_files["model.safetensors"]})
    _fake_snapshot(cache, REPO, "1" * 40, {name: repo_files[name] for name in SNAPSHOT_FILES})
    result = run_cli("models", "--cached", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert [row["repo_id"] for row in json.loads(result.stdout)] == [REPO]


def test_25_classify_resolves_validates_and_loads_once(fake_hub, env, clip, monkeypatch):
    """One load path: the CLI builds RunOptions once (checked once, when built) and calls one library function
    (``Tagger.load``) that resolves, loads and places the model. A hub model is looked up once per run (the
    download included), its weights read once and placed once."""
    import ast_cli.run.tagger  # noqa: F401  (import-time defaults built before counting)
    import ast_cli.tasks.extract  # noqa: F401
    from ast_cli.checkpoint import weights
    from ast_cli.run import backends, options

    calls = {"hub lookups": 0, "loads": 0, "placements": 0, "validations": 0}

    def count(key, original):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        return wrapped

    resolve = hub.resolve_model
    monkeypatch.setattr(hub, "resolve_model", lambda name, **kw: (
        calls.__setitem__("hub lookups", calls["hub lookups"] + (not names.looks_local(name))), resolve(name, **kw))[1])
    monkeypatch.setattr(weights, "load_checkpoint", count("loads", weights.load_checkpoint))
    build = backends.LocalBackend.build.__func__
    monkeypatch.setattr(backends.LocalBackend, "build", classmethod(count("placements", build)))
    monkeypatch.setattr(options.RunOptions, "validate", count("validations", options.RunOptions.validate))
    result = run_cli("classify", str(clip), "--model", REPO, "--quiet", "--format", "jsonl", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert calls == {"hub lookups": 1, "loads": 1, "placements": 1, "validations": 1}, calls
    assert fake_hub.downloads("model.safetensors") == 1


def test_s8_3_a_hub_that_never_answers_is_one_error_line(env, monkeypatch):  # CLI
    """A hub that accepts the connection and then says nothing: the bounded wait ends in the usual error."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts the connections; nobody ever reads or answers them
    monkeypatch.setattr(hub, "HUB_TIMEOUT_SECONDS", 0.5, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    results = []
    worker = threading.Thread(target=lambda: results.append(run_cli("download", REPO)), daemon=True)
    worker.start()
    worker.join(10)
    hung = worker.is_alive()
    silent.close()  # resets the waiting connections, so a hung download ends too
    worker.join(10)
    assert not hung, "the download still waited after 10 s"
    assert_clean_error(results[0], "cannot reach the hub at http://127.0.0.1:")
    assert "Hint: " in results[0].stderr


def test_s8_15_a_config_that_is_a_fifo_is_a_checkpoint_error(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    raised = []

    def read() -> None:
        try:
            names.read_json(fifo)
        except CheckpointError as exc:
            raised.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    hung = worker.is_alive()
    if hung:  # blocked opening the FIFO: a writer lets it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not hung, "reading the config waited on the FIFO"
    assert raised and "not a regular file" in str(raised[0]) and str(fifo) in str(raised[0])


def test_s8_18_a_damaged_repo_is_listed_and_removable(env, repo_files):  # CLI
    """A missing blob (and, in another repo, a ref to a missing snapshot) made huggingface_hub's scan drop the
    repo: --cached did not list it and --rm said it was not cached."""
    cache = cache_root(env)
    files = {name: repo_files[name] for name in SNAPSHOT_FILES}
    sound = _fake_snapshot(cache, "test/sound", "a" * 40, files)
    blob = _fake_snapshot(cache, "test/no-blob", "b" * 40, files)
    (blob / "model.safetensors").resolve().unlink()
    _fake_snapshot(cache, "test/dangling-ref", "c" * 40, files)
    (cache / "models--test--dangling-ref" / "refs" / "v1").write_text("d" * 40)
    _fake_snapshot(cache, "acme/bert", "e" * 40, {"config.json": b'{"model_type": "bert"}'})
    (cache / "models--acme--bert" / "refs" / "v1").write_text("d" * 40)  # damaged, but not an AST: not listed
    rows = json.loads(run_cli("models", "--cached", "-f", "json").stdout)
    assert [(row["repo_id"], bool(row.get("damaged"))) for row in rows] == [
        ("test/dangling-ref", True), ("test/no-blob", True), ("test/sound", False)]
    assert "Blob missing" in rows[1]["damaged"] and rows[1]["path"] == str(cache / "models--test--no-blob")
    at_rev = run_cli("models", "--rm", f"test/no-blob@{'b' * 40}", "--yes")
    assert_clean_error(at_rev, "is damaged", code=2)
    for repo_id in ("test/no-blob", "test/dangling-ref"):
        result = run_cli("models", "--rm", repo_id, "--yes")
        assert result.exit_code == 0 and f"removed {repo_id} from the cache" in result.stderr, result.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["models--acme--bert", "models--test--sound"]
    assert (sound / "model.safetensors").read_bytes() == repo_files["model.safetensors"]
    assert_clean_error(run_cli("models", "--rm", "acme/bert"), "holds no AST checkpoint", code=2)


def test_s8_19_an_unwritable_cache_is_named_with_a_hint(fake_hub, env, monkeypatch):  # CLI
    import huggingface_hub

    folder = str(env / "locked" / "models--acme--tiny-ast")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    result = run_cli("download", REPO, "-q")
    assert_clean_error(result, f"cannot write into the Hugging Face cache: {folder}: Operation not permitted")
    assert "Hint: make that folder writable" in result.stderr


def test_s8_19_huggingface_hubs_warnings_stay_off_stderr_without_debug(tmp_path):
    """Its logger is set up when huggingface_hub is first imported, which happens inside the run."""
    code = ("from ast_cli.cli._errors import cli_errors\n"
            "with cli_errors(None, debug={debug}):\n"
            "    from huggingface_hub.utils import logging\n"
            "    logging.get_logger('huggingface_hub._tree_cache').warning('Ignored error while writing')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_VERBOSITY", "AST_DEBUG")}
    for debug, shown in ((False, False), (True, True)):
        done = subprocess.run([sys.executable, "-c", code.format(debug=debug)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0 and ("Ignored error" in done.stderr) == shown, done.stderr


def test_s8_19_rm_takes_the_revision_as_cached_prints_it(env, repo_files):  # CLI
    """--cached prints 12 digits of the commit; --rm ORG/NAME@<those 12> said "not in the Hugging Face cache"."""
    cache = cache_root(env)
    files = {name: repo_files[name] for name in SNAPSHOT_FILES}
    _fake_snapshot(cache, "test/x", "abcdef1" + "0" * 33, files)
    _fake_snapshot(cache, "test/x", "abcdef1" + "1" * 33, files, refs=("v1",))
    ambiguous = run_cli("models", "--rm", "test/x@abcdef1", "--yes")
    assert_clean_error(ambiguous, "abcdef1 is the start of 2 cached commits of test/x", code=2)
    shown = json.loads(run_cli("models", "--cached", "-f", "json").stdout)[1]["revision"][:12]
    result = run_cli("models", "--rm", f"test/x@{shown}", "--yes")
    assert result.exit_code == 0 and f"removed test/x@{shown}" in result.stderr, result.stderr
    assert [row.commit_hash for row in hub_cache.cached_checkpoints()] == ["abcdef1" + "0" * 33]


def test_s8_19_a_failed_removal_names_the_path_with_a_hint(env, repo_files, monkeypatch):  # CLI
    import shutil

    cache = cache_root(env)
    _fake_snapshot(cache, "test/x", "a" * 40, {name: repo_files[name] for name in SNAPSHOT_FILES})
    blob = next((cache / "models--test--x" / "blobs").iterdir())

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(blob))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    result = run_cli("models", "--rm", "test/x", "--yes")
    assert_clean_error(result, f"cannot remove {blob} from the cache: Operation not permitted")
    assert "Hint: the cache folder" in result.stderr


def _download_waiting(release: threading.Event) -> tuple[bool, list]:
    """``ast download REPO -q`` in a thread, ``release`` set (the fake hub answers) after 10 s: (whether it was
    still waiting then, [its result])."""
    results: list = []
    worker = threading.Thread(target=lambda: results.append(run_cli("download", REPO, "-q")), daemon=True)
    worker.start()
    worker.join(10)
    hung = worker.is_alive()
    release.set()
    worker.join(10)
    return hung, results


def test_s8_3_a_hub_that_stops_answering_mid_download_is_one_error_line(fake_hub, env, monkeypatch):  # CLI
    """model_info answered, then the file listing never is (snapshot_download asks it with no timeout). Each try
    now ends in the bounded wait; huggingface_hub's own retries (5, 1 to 8 s apart) are kept, their pauses
    skipped here."""
    from types import SimpleNamespace

    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    release = threading.Event()
    monkeypatch.setattr(fake_hub, "_tree", lambda *args: release.wait(30), raising=False)
    monkeypatch.setattr(hub, "HUB_TIMEOUT_SECONDS", 0.5)
    hung, results = _download_waiting(release)
    assert not hung, "the download still waited after 10 s"
    assert_clean_error(results[0], f"download of {REPO} interrupted while fetching config.json")


def test_s8_3_the_bound_survives_huggingface_hubs_client_reset(fake_hub, env, monkeypatch, request):
    """The file listing's first try meets a refused connection: huggingface_hub's http_backoff calls
    close_session() and retries on a NEW shared client, which lacked _bounded_requests' hook; the retry then
    waited with no timeout at all on a hub that accepts and never answers (found by a review)."""
    from types import SimpleNamespace

    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    monkeypatch.setattr(hub, "HUB_TIMEOUT_SECONDS", 0.5)
    release = threading.Event()
    original_tree = fake_hub._tree
    monkeypatch.setattr(fake_hub, "_tree", lambda *args: (release.wait(30), original_tree(*args))[1], raising=False)
    refused = []

    def refuse_first_listing(request):  # stands for a connection refused/reset once
        if "/tree/" in str(request.url) and not refused:
            refused.append(1)
            raise httpx2.ConnectError("connection refused (injected)", request=request)

    def factory():  # a client factory of the user's: each client it makes refuses the first listing once
        client = default_factory()
        client.event_hooks["request"].append(refuse_first_listing)
        return client

    default_factory = _http._GLOBAL_CLIENT_FACTORY
    set_client_factory(factory)
    request.addfinalizer(lambda: set_client_factory(default_factory))
    hung, results = _download_waiting(release)
    assert refused
    assert not hung, "the retried listing waited with no bound"


def test_s9_a_hub_that_trickles_is_one_error_line_and_not_retried(fake_hub, env, monkeypatch):  # CLI
    """The weights come a byte every 0.1 s: every read is within the per-read bound, so the download used to take
    days. Under HUB_SLOW_BYTES per HUB_SLOW_SECONDS (made small here) it is stalled: one error line, one GET of
    the weights (huggingface_hub's resumed tries would trickle again), nothing left in the snapshot."""
    release = threading.Event()
    fake_hub.trickle = ("model.safetensors", release)
    monkeypatch.setattr(hub, "HUB_SLOW_SECONDS", 0.5)
    monkeypatch.setattr(hub, "HUB_SLOW_BYTES", 1024)
    hung, results = _download_waiting(release)
    assert not hung, "the trickled download still ran after 10 s"
    assert_clean_error(results[0], f"download of {REPO} interrupted while fetching model.safetensors",
                       "bytes in 1 s: stalled")
    assert fake_hub.downloads("model.safetensors") == 1
    assert not list(Path(os.environ["HF_HOME"]).rglob("model.safetensors"))
