"""Model management: aliases, `ast download`, the HF cache, offline use, and the errors when a model cannot be had.

Downloads go through huggingface_hub to ``FakeHub``, a threaded HTTP server on 127.0.0.1 that serves tiny model
repos in the hub's URL layout; ``HF_ENDPOINT`` points at it. Nothing here touches the real hub.
"""

from __future__ import annotations

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
from urllib.parse import unquote, urlsplit

import pytest
from typer.testing import CliRunner

from ast_cli import DEFAULT_MODEL, hub
from ast_cli.cli import app
from ast_cli.errors import CheckpointError, HubError, ModelNotFoundError
from conftest import write_audio

REPO = "acme/tiny-ast"
TOKEN = "hf_secret_test_token"


# -- a tiny hub ------------------------------------------------------------------------------------


class FakeHub:
    """Serves repos as huggingface_hub expects: ``/api/models/{repo}[/revision/{rev}]``,
    ``/api/models/{repo}/tree/{rev}`` and ``/{repo}/resolve/{rev}/{file}`` (HEAD and GET, with ``ETag``,
    ``X-Repo-Commit``, ``Content-Length``, byte ranges). Unknown repos answer 404 ``X-Error-Code: RepoNotFound``.

    ``drop``: a file name whose GET is cut off half-way, after which the whole server stops (connection refused).
    ``requests``: (method, path) of every request, to count downloads.
    """

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.drop: str | None = None
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
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.running = True

    def add(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False,
            refs=("main",)) -> str:
        """Publish ``files`` as one commit of ``repo_id``, reachable from ``refs``; return the commit hash."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        commit = digest.hexdigest()
        self.repos[repo_id] = {"files": dict(files), "commit": commit, "private": private, "gated": gated,
                               "refs": set(refs)}
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
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._model_info(request, match[1], unquote(match[2] or "main"))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            return self._tree(request, match[1], unquote(match[2]))
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(request, match[1], unquote(match[2]), unquote(match[3]), body)
        self._send(request, 404, {"error": "not found"})

    def _repo(self, request, repo_id: str, revision: str) -> dict | None:
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
        if revision not in repo["refs"] and revision != repo["commit"]:
            self._send(request, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def _model_info(self, request, repo_id: str, revision: str) -> None:
        if repo := self._repo(request, repo_id, revision):
            self._send(request, 200, {"id": repo_id, "modelId": repo_id, "sha": repo["commit"],
                                      "private": repo["private"],
                                      "siblings": [{"rfilename": name} for name in sorted(repo["files"])]})

    def _tree(self, request, repo_id: str, revision: str) -> None:
        if repo := self._repo(request, repo_id, revision):
            self._send(request, 200, [{"type": "file", "path": name, "size": len(data),
                                       "oid": hashlib.sha1(data).hexdigest()}
                                      for name, data in sorted(repo["files"].items())])

    def _resolve(self, request, repo_id: str, revision: str, filename: str, body: bool) -> None:
        repo = self._repo(request, repo_id, revision)
        if repo is None:
            return
        data = repo["files"].get(filename)
        if data is None:
            self._send(request, 404, {"error": "Entry not found"},
                       {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo["commit"]})
            return
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": repo["commit"],
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
    """Online, with a fresh HF_HOME per test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
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
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.stderr, result.stderr
    return result


def assert_clean_error(result, *fragments: str, code: int = 1) -> None:
    """Non-zero exit, at most three lines on stderr (Error + Hint), no traceback, the message names the problem."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


# -- aliases and the registry ----------------------------------------------------------------------


def test_registry_has_the_eight_published_checkpoints():
    assert len(hub.REGISTRY) == 8
    assert len({spec.alias for spec in hub.REGISTRY}) == 8
    assert all(spec.repo_id.startswith("MIT/ast-finetuned-") for spec in hub.REGISTRY)
    assert hub.find_alias("audioset-10-10-0.4593").repo_id == DEFAULT_MODEL
    speech = hub.find_alias("speech-commands-v2")
    assert (speech.num_labels, speech.max_length, speech.input_seconds) == (35, 128, 1.28)
    assert (speech.mean, speech.std) == (-6.845978, 5.5654526)
    assert hub.find_alias("audioset-16-16-0.442").frequency_stride == 16


def test_aliases_and_hub_ids_resolve_to_repo_and_revision():
    assert hub.parse_model_name("audioset-16-16-0.442") == ("MIT/ast-finetuned-audioset-16-16-0.442", None)
    assert hub.parse_model_name("Speech-Commands-V2") == ("MIT/ast-finetuned-speech-commands-v2", None)
    assert hub.parse_model_name("speech-commands-v2@v1") == ("MIT/ast-finetuned-speech-commands-v2", "v1")
    assert hub.parse_model_name("acme/tiny-ast") == ("acme/tiny-ast", None)
    assert hub.parse_model_name("acme/tiny-ast@refs/pr/1") == ("acme/tiny-ast", "refs/pr/1")
    with pytest.raises(ModelNotFoundError, match="unknown model") as info:
        hub.parse_model_name("audioset-16-16-0.44")
    assert "did you mean audioset-16-16-0.442" in info.value.hint
    for bad in ("nonsense", "a--b/c", "acme/x@"):
        with pytest.raises(ModelNotFoundError):
            hub.parse_model_name(bad)


def test_looks_local():
    assert hub.looks_local("./model") and hub.looks_local("/x/y") and hub.looks_local("ckpt.pth")
    assert hub.looks_local("a/b/c")
    assert not hub.looks_local("acme/tiny-ast") and not hub.looks_local("acme/tiny-ast@refs/pr/1")
    assert not hub.looks_local("speech-commands-v2")


def test_models_list_json_and_table(env):
    rows = json.loads(run_cli("models", "--format", "json").stdout)
    assert [row["alias"] for row in rows] == [spec.alias for spec in hub.REGISTRY]
    first = rows[0]
    assert first["repo_id"] == DEFAULT_MODEL and first["default"] is True
    assert (first["num_labels"], first["max_length"], first["input_seconds"]) == (527, 1024, 10.24)
    assert not any(row["cached"] for row in rows)
    assert run_cli("download", "--list", "--format", "json").stdout == run_cli("models", "-f", "json").stdout

    table = run_cli("download", "--list").stdout
    assert "MIT/ast-finetuned-speech-commands-v2" in table and "1.28 s" in table
    assert "speech-commands-v2" in table.splitlines()[-1]
    assert_clean_error(run_cli("models", "--format", "yaml"), "--format", code=2)


def test_models_list_shows_what_is_cached(fake_hub, env, repo_files):
    spec = hub.find_alias("speech-commands-v2")
    fake_hub.add(spec.repo_id, repo_files)
    path = run_cli("download", "speech-commands-v2", "-q").stdout.strip()
    rows = {row["alias"]: row for row in json.loads(run_cli("models", "-f", "json").stdout)}
    assert rows["speech-commands-v2"]["cached"] and rows["speech-commands-v2"]["path"] == path
    assert not rows["audioset-10-10-0.4593"]["cached"]
    assert set(hub.cached_models()) == {spec.repo_id}


# -- downloading -----------------------------------------------------------------------------------


def test_download_fetches_only_inference_files_and_is_idempotent(fake_hub, env):
    result = run_cli("download", REPO)
    assert result.exit_code == 0, result.stderr
    path = Path(result.stdout.strip())
    commit = fake_hub.repos[REPO]["commit"]
    assert path == cache_root(env) / "models--acme--tiny-ast" / "snapshots" / commit
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert (cache_root(env) / "models--acme--tiny-ast" / "refs" / "main").read_text() == commit
    assert "model.safetensors" in result.stderr  # the summary line on stderr; data alone on stdout
    gets = {name: fake_hub.downloads(name) for name in ("config.json", "model.safetensors", "pytorch_model.bin")}
    assert gets == {"config.json": 1, "model.safetensors": 1, "pytorch_model.bin": 0}

    again = run_cli("download", REPO, "--quiet")
    assert again.exit_code == 0 and again.stdout.strip() == str(path) and again.stderr == ""
    assert fake_hub.downloads("model.safetensors") == 1 and fake_hub.downloads("config.json") == 1

    forced = run_cli("download", REPO, "--force", "-q")
    assert forced.exit_code == 0 and fake_hub.downloads("model.safetensors") == 2


def test_download_sends_library_name_and_honours_hf_hub_cache(fake_hub, env, monkeypatch, tmp_path):
    seen = []
    original = fake_hub._handle
    fake_hub._handle = lambda request, body: (seen.append(request.headers.get("user-agent", "")),
                                              original(request, body))[1]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    path = hub.download(REPO)
    assert path.is_relative_to(tmp_path / "elsewhere") and seen
    assert all("ast-cli/" in agent for agent in seen)
    other = hub.download(REPO, cache_dir=str(tmp_path / "explicit"))
    assert other.is_relative_to(tmp_path / "explicit")


def test_environment_is_read_at_call_time(fake_hub, env, monkeypatch):
    """huggingface_hub captured HF_HUB_OFFLINE at import; what counts is the environment now."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as if imported under HF_HUB_OFFLINE=1
    path = hub.download(REPO)  # HF_HUB_OFFLINE=0 now
    assert path.name == fake_hub.repos[REPO]["commit"] and constants.HF_HUB_OFFLINE is True

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests_before = len(fake_hub.requests)
    with pytest.raises(ModelNotFoundError, match="offline mode is on"):
        hub.resolve_model("acme/other")
    assert hub.resolve_model(REPO) == path and len(fake_hub.requests) == requests_before


def test_repo_without_safetensors_gets_pytorch_model_bin(fake_hub, env, repo_files):
    fake_hub.add("acme/old-ast", {k: v for k, v in repo_files.items() if k != "model.safetensors"})
    path = hub.download("acme/old-ast")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]


def test_revisions(fake_hub, env, repo_files):
    commit = fake_hub.add("acme/tagged", repo_files, refs=("main", "v1"))
    assert hub.download("acme/tagged@v1").name == commit
    assert run_cli("download", "acme/tagged", "--revision", "v1", "-q").stdout.strip().endswith(commit)
    assert hub.resolve_model("acme/tagged@v1", offline=True).name == commit
    assert_clean_error(run_cli("download", "acme/tagged@v2"), "has no revision 'v2'")
    assert_clean_error(run_cli("download", "acme/tagged@v1", "--revision", "v2"), "different revisions", code=2)


def test_private_repo_needs_hf_token(fake_hub, env, monkeypatch, repo_files):
    fake_hub.add("acme/private-ast", repo_files, private=True)
    assert_clean_error(run_cli("download", "acme/private-ast"), "no model 'acme/private-ast'", "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub.download("acme/private-ast").name == fake_hub.repos["acme/private-ast"]["commit"]
    fake_hub.add("acme/gated-ast", repo_files, gated=True)
    assert_clean_error(run_cli("download", "acme/gated-ast"), "acme/gated-ast is a gated repo", "HF_TOKEN")


def test_several_models_one_bad(fake_hub, env):
    result = run_cli("download", REPO, "nobody/no-such-model", "-q")
    assert result.exit_code == 1
    assert result.stdout.strip().endswith(fake_hub.repos[REPO]["commit"])
    assert "no model 'nobody/no-such-model'" in result.stderr and len(result.stderr.splitlines()) <= 3


# -- first use, offline use ------------------------------------------------------------------------


def test_classify_downloads_on_first_use_then_works_offline(fake_hub, env, monkeypatch, clip, repo_files, tmp_path):
    first = run_cli("classify", str(clip), "--model", REPO, "--format", "json")
    assert first.exit_code == 0, first.stderr
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


def test_resolve_model_library(fake_hub, env, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        hub.resolve_model(REPO, offline=True)
    assert fake_hub.requests == []  # offline means no request at all
    path = hub.resolve_model(REPO)  # online (HF_HUB_OFFLINE=0): downloaded on first use
    fake_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model(REPO) == path
    assert hub.download(REPO) == path  # offline download: the complete cached snapshot
    assert hub.cached_snapshot(REPO) == path


def test_offline_and_not_cached_is_one_clean_error(env, monkeypatch, clip):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("classify", str(clip), "--model", "nobody/no-such-model")
    assert_clean_error(result, "not in the Hugging Face cache", "ast download nobody/no-such-model")
    assert_clean_error(run_cli("download", "nobody/no-such-model"), "offline mode is on")


def test_offline_not_cached_in_a_real_process(env, clip):
    """The acceptance check, as a user runs it: a fresh process, HF_HUB_OFFLINE=1 in its environment."""
    environ = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(env / "hf_home"))
    proc = subprocess.run([sys.executable, "-m", "ast_cli", "classify", str(clip), "--model", "nobody/no-such-model"],
                          capture_output=True, text=True, env=environ, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("Error: model 'nobody/no-such-model' is not in the Hugging Face cache")


# -- errors ----------------------------------------------------------------------------------------


def test_repo_not_found(fake_hub, env):
    assert_clean_error(run_cli("download", "nobody/no-such-model"), "no model 'nobody/no-such-model'",
                       "Hint: check the name")
    with pytest.raises(ModelNotFoundError):
        hub.download("nobody/no-such-model")
    assert_clean_error(run_cli("download", "no-such-alias"), "unknown model 'no-such-alias'")


def test_network_unreachable(env, monkeypatch):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert_clean_error(run_cli("download", REPO), f"cannot reach the hub at http://127.0.0.1:{port}",
                       "Hint: check the network")
    with pytest.raises(HubError):
        hub.resolve_model(REPO)


def test_repo_without_ast_weights_or_config(fake_hub, env, repo_files):
    fake_hub.add("acme/readme-only", {"README.md": b"hi"})
    assert_clean_error(run_cli("download", "acme/readme-only"), "does not look like an AST checkpoint",
                       "no config.json and no model.safetensors or pytorch_model.bin")
    fake_hub.add("acme/no-weights", {"config.json": repo_files["config.json"]})
    assert_clean_error(run_cli("download", "acme/no-weights"), "no model.safetensors or pytorch_model.bin")
    bert = json.dumps({"model_type": "bert"}).encode()
    fake_hub.add("acme/bert", {"config.json": bert, "model.safetensors": repo_files["model.safetensors"]})
    assert_clean_error(run_cli("download", "acme/bert"), "describes a 'bert' model")
    assert fake_hub.downloads("model.safetensors") == 0  # found out before fetching any weights


def test_server_down_midway(fake_hub, env, monkeypatch, repo_files):
    import huggingface_hub.file_download as file_download

    monkeypatch.setattr(file_download.time, "sleep", lambda seconds: None)  # its resume retries wait 1 s each
    fake_hub.drop = "model.safetensors"
    result = run_cli("download", REPO)
    assert_clean_error(result, f"download of {REPO} interrupted while fetching model.safetensors",
                       f"run `ast download {REPO}` again")
    assert not fake_hub.running and fake_hub.downloads("config.json") == 1
    repo_cache = cache_root(env) / "models--acme--tiny-ast"
    assert not list(repo_cache.rglob("*.incomplete"))  # no partial file left behind
    assert hub.cached_snapshot(REPO) is None
    with pytest.raises(ModelNotFoundError):
        hub.resolve_model(REPO, offline=True)

    # The hub comes back (elsewhere): the next run fetches only what is missing.
    again = FakeHub()
    try:
        again.add(REPO, repo_files)
        monkeypatch.setenv("HF_ENDPOINT", again.url)
        result = run_cli("download", REPO, "-q")
        assert result.exit_code == 0, result.stderr
        assert again.downloads("config.json") == 0 and again.downloads("model.safetensors") == 1
        weights = Path(result.stdout.strip()) / "model.safetensors"
        assert weights.read_bytes() == repo_files["model.safetensors"]
    finally:
        again.stop()


def test_corrupt_weights_are_named_with_force_hint(fake_hub, env, monkeypatch, clip, repo_files):
    path = Path(run_cli("download", REPO, "-q").stdout.strip())
    weights = path / "model.safetensors"
    with open(weights, "r+b") as handle:  # a truncated file in the cache (the snapshot entry links to the blob)
        handle.truncate(len(repo_files["model.safetensors"]) // 2)

    result = run_cli("download", REPO)
    assert_clean_error(result, f"corrupt or truncated weights file {weights}", f"ast download {REPO} --force")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_clean_error(run_cli("classify", str(clip), "--model", REPO), "corrupt or truncated", "--force")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        hub.resolve_model(REPO)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert run_cli("download", REPO, "--force", "-q").exit_code == 0
    assert weights.read_bytes() == repo_files["model.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli("classify", str(clip), "--model", REPO).exit_code == 0


def test_corrupt_weights_from_the_server(fake_hub, env, repo_files):
    fake_hub.add("acme/broken", dict(repo_files, **{"model.safetensors": repo_files["model.safetensors"][:100]}))
    result = run_cli("download", "acme/broken")
    assert_clean_error(result, "corrupt or truncated weights file", "model.safetensors",
                       "ast download acme/broken --force")


def test_download_of_a_local_path_is_a_usage_error(env, tmp_path):
    assert_clean_error(run_cli("download", str(tmp_path)), "is a local path", code=2)
