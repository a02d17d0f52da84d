"""``--engine ray`` and ``--shard K/N`` (#14): the same records as the local engine, on a local Ray and on two
Ray nodes; a worker killed mid-run loses no record; shards that together are the unsharded set.

Ray runs in a loopback-only network namespace (``raynet``); these tests skip, saying why, without the ``ray``
extra, root or iproute2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from ast_cli.cli import app
from ast_cli.audio.inputs import expand_inputs
from ast_cli.tasks.distributed import parse_shard, ray_available, take_shard
from ast_cli.errors import UsageError
import raynet
from conftest import write_audio
from tolerances import SAME_MACHINE_BATCHING

runner = CliRunner()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    for i, (seconds, rate, channels) in enumerate([(1.0, 16000, 1), (2.1, 44100, 2), (0.3, 8000, 1), (1.5, 22050, 2),
                                                    (0.9, 48000, 1)]):
        write_audio(root / ("sub" if i % 2 else ".") / f"c{i}.wav", seconds, rate, channels, seed=i)
    (root / "empty.wav").write_bytes(b"")
    (root / "junk.flac").write_bytes(b"fLaC but not really" * 10)
    return root


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_shards_split_the_list_exactly():
    from ast_cli.audio.inputs import InputFile

    items = [InputFile(f"in/{i:02d}.wav") for i in range(60)]
    shards = [take_shard(items, (k, 3)) for k in (1, 2, 3)]
    assert sorted((x for s in shards for x in s), key=items.index) == items and all(shards)
    assert all(shard == sorted(shard, key=items.index) for shard in shards)  # in input order
    assert take_shard(items, None) == items
    for bad in ("0/3", "4/3", "a/b", "3", "-1/2"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_shards_on_the_local_engine_together_give_the_unsharded_set(tiny_checkpoint, tree):
    whole = records(runner.invoke(app, ["classify", str(tree), "--model", str(tiny_checkpoint[0]), "-f",
                                        "jsonl"]).stdout)
    parts = [records(runner.invoke(app, ["classify", str(tree), "--model", str(tiny_checkpoint[0]), "-f", "jsonl",
                                         "--shard", f"{k}/3"]).stdout) for k in (1, 2, 3)]
    assert sorted(r["path"] for p in parts for r in p) == sorted(r["path"] for r in whole)
    assert len(whole) == 7


def test_s8_D7_a_path_written_another_way_is_in_the_same_shard(tiny_checkpoint, tree, monkeypatch):
    """Shard 1 of ``tree`` and shard 2 of ``./tree`` (a job array's tasks started another way) tagged some files
    twice and others never (found by a review): the path is hashed written one way."""
    monkeypatch.chdir(tree.parent)
    paths = []
    for k, written in ((1, tree.name), (2, f"./{tree.name}/"), (3, f"{tree.name}//.")):
        result = runner.invoke(app, ["classify", written, "--model", str(tiny_checkpoint[0]), "-f", "jsonl",
                                     "--shard", f"{k}/3"])
        paths += [os.path.normpath(r["path"]) for r in records(result.stdout)]
    assert len(paths) == len(set(paths)) == 7


def test_engine_ray_without_ray_is_one_line(tiny_checkpoint, tree, monkeypatch):
    import ast_cli.tasks.distributed as distributed

    monkeypatch.setattr(distributed, "ray_available", lambda: False)
    for command in (["classify", str(tree)], ["extract-features", str(tree), "--out", "/tmp/unused"]):
        result = runner.invoke(app, [*command, "--model", str(tiny_checkpoint[0]), "--engine", "ray"])
        assert result.exit_code == 2 and "needs Ray Data" in result.stderr and "ast-cli[ray]" in result.stderr


def test_worker_sizes_are_checked_before_anything(tiny_checkpoint, tree):
    for option, value in (("--cpus-per-worker", "0"), ("--cpus-per-worker", "-1"), ("--gpus-per-worker", "-1"),
                          ("--cpus-per-worker", "nan")):
        result = runner.invoke(app, ["classify", str(tree), "--model", str(tiny_checkpoint[0]), "--engine", "ray",
                                     option, value])
        assert result.exit_code == 2 and f"Error: {option}: must be" in result.stderr, (option, value, result.stderr)


def test_no_cluster_at_the_address_is_one_line_in_seconds_and_touches_nothing(tiny_checkpoint, tree, tmp_path,
                                                                              monkeypatch):
    """Ray itself retries an address nothing answers at for minutes, silently; we fail within seconds."""
    import socket

    if not ray_available():
        pytest.skip("the ray extra is not installed (pip install -e '.[test]')")
    with socket.socket() as sock:  # a loopback port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "keep.jsonl"
    out.write_text('{"earlier": "output"}\n')
    base = ["classify", str(tree), "--model", str(tiny_checkpoint[0]), "--engine", "ray", "-o", str(out),
            "--overwrite"]
    start = time.monotonic()
    result = runner.invoke(app, [*base, "--ray-address", f"127.0.0.1:{port}"])
    assert result.exit_code == 2 and time.monotonic() - start < 30
    assert f"Error: --ray-address: no Ray cluster answers at 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and out.read_text() == '{"earlier": "output"}\n'
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    result = runner.invoke(app, ["extract-features", str(tree), "--model", str(tiny_checkpoint[0]), "--engine",
                                 "ray", "--out", str(tmp_path / "feats")])
    assert result.exit_code == 2 and "Error: RAY_ADDRESS (environment): no Ray cluster" in result.stderr
    assert not (tmp_path / "feats").exists()
    monkeypatch.delenv("RAY_ADDRESS")
    result = runner.invoke(app, [*base, "--ray-address", "nonsense"])
    assert result.exit_code == 2 and "is not a Ray address" in result.stderr


class NotRay:
    """A loopback TCP server that accepts and then says ``banner`` (or nothing): the port is open, it is not Ray."""

    def __init__(self, banner: bytes = b""):
        import socket
        import threading

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.accepted = threading.Event()
        self.connections = []

        def serve():
            while True:
                try:
                    connection, _ = self.server.accept()
                except OSError:
                    return
                self.connections.append(connection)
                connection.sendall(banner)
                self.accepted.set()

        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        self.server.close()
        for connection in self.connections:
            connection.close()


@pytest.mark.parametrize("banner", [b"SSH-2.0-OpenSSH_9.6\r\n", b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_23_4_an_address_where_something_else_answers_is_one_line_in_seconds(tiny_checkpoint, tree, tmp_path, banner):
    """The TCP probe passed, then ray.init retried for a minute and more, printing Ray's GCS errors."""
    if not ray_available():
        pytest.skip("the ray extra is not installed (pip install -e '.[test]')")
    other = NotRay(banner)
    out = tmp_path / "keep.jsonl"
    out.write_text('{"earlier": "output"}\n')
    start = time.monotonic()
    try:
        result = runner.invoke(app, ["classify", str(tree), "--model", str(tiny_checkpoint[0]), "--engine", "ray",
                                     "--ray-address", f"127.0.0.1:{other.port}", "-o", str(out), "--overwrite"])
    finally:
        other.close()
    assert result.exit_code == 2 and time.monotonic() - start < 15, result.stderr
    assert result.stderr.startswith(f"Error: --ray-address: what answers at 127.0.0.1:{other.port} is not Ray")
    assert len(result.stderr.splitlines()) == 2 and result.stderr.splitlines()[1].startswith("Hint: ")
    assert out.read_text() == '{"earlier": "output"}\n'


@pytest.mark.slow  # a whole process
def test_23_4_sigterm_while_the_address_is_tried_ends_the_run_in_a_second_or_two(tiny_checkpoint, tree):
    if not ray_available():
        pytest.skip("the ray extra is not installed (pip install -e '.[test]')")
    other = NotRay()  # silent: the probe waits for its answer
    proc = subprocess.Popen([sys.executable, "-m", "ast_cli", "classify", str(tree), "--model", str(tiny_checkpoint[0]),
                             "--engine", "ray", "--ray-address", f"127.0.0.1:{other.port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert other.accepted.wait(60)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        other.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and time.monotonic() - start < 2.5, err
    assert "Traceback" not in err


def same_records(a: list[dict], b: list[dict]) -> None:
    """The Ray engine's records are the local engine's: same files in the same order, same errors, durations and
    labels, scores within 1e-6."""
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        assert (x["error"], x["duration"], x["size"]) == (y["error"], y["duration"], y["size"])
        assert [l["index"] for l in x["labels"]] == [l["index"] for l in y["labels"]]
        assert all(abs(p["score"] - q["score"]) <= 1e-6 for p, q in zip(x["labels"], y["labels"]))
        assert len(x.get("segments") or []) == len(y.get("segments") or [])
        for s, t in zip(x.get("segments") or [], y.get("segments") or []):
            assert (s["start"], s["end"]) == (t["start"], t["end"])
            assert all(abs(p["score"] - q["score"]) <= 1e-6 for p, q in zip(s["labels"], t["labels"]))


needs_ray = pytest.mark.skipif(raynet.reason_unavailable() is not None, reason=str(raynet.reason_unavailable()))


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on this machine, as `ray start` makes them, in a loopback-only namespace."""
    space = raynet.RayNamespace()
    try:
        space.start_cluster((1, 1))
        yield space
    finally:
        space.close()


HTTP2_SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(16)
print("ready", flush=True)
held = []
while True:
    connection, _ = server.accept()
    held.append(connection)
    connection.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # an empty SETTINGS frame, then silence
    print("accepted", flush=True)
"""


@pytest.mark.slow  # whole processes
@needs_ray
def test_23_4_sigterm_while_ray_init_waits_ends_the_run_in_a_second_or_two(tiny_checkpoint, tree):
    """Past the probe (this server speaks HTTP/2 but never answers an RPC, as a hung GCS would), ray.init waits in
    C++ for a minute; SIGTERM waited with it (20 s and more). In a loopback-only namespace: Ray may look for the
    address on the machine's own network address too."""
    space = raynet.RayNamespace()
    server = subprocess.Popen(space.command([sys.executable, "-c", HTTP2_SERVER, "6391"]), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        proc = space.popen_ast(["classify", str(tree), "--model", str(tiny_checkpoint[0]), "--engine", "ray",
                                "--ray-address", "127.0.0.1:6391"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        assert server.stdout.readline().strip() == "accepted"  # the probe
        assert server.stdout.readline().strip() == "accepted"  # ray.init
        time.sleep(1.0)  # well inside ray.init's wait
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143 and time.monotonic() - start < 2.5, (time.monotonic() - start, err)
        assert "Traceback" not in err
    finally:
        server.kill()
        space.close()


def classify_args(tree, checkpoint) -> list[str]:
    return ["classify", str(tree), "--model", str(checkpoint), "-f", "jsonl", "--top", "0", "--segments"]


@pytest.mark.slow  # starts Ray
@needs_ray
def test_a_local_ray_gives_the_local_engines_records(tiny_checkpoint, tree):
    """No --ray-address: the run starts a Ray of its own, with this machine's CPUs, and ends it."""
    base = classify_args(tree, tiny_checkpoint[0])
    local = runner.invoke(app, base)
    space = raynet.RayNamespace()
    try:
        nothing = space.ast([*base, "--engine", "ray", "--ray-address", "auto"], timeout=120)
        assert nothing.returncode == 2 and "Error: --ray-address: cannot join the Ray cluster at auto" in nothing.stderr
        assert "Traceback" not in nothing.stderr and not nothing.stdout
        assert "`--address` flag" not in nothing.stderr  # Ray's own advice names ray's flag, not ours (#24.11)
        remote = space.ast([*base, "--engine", "ray"])
        assert local.exit_code == remote.returncode == 1, remote.stderr  # the two bad files
        same_records(records(local.stdout), records(remote.stdout))
        assert remote.stderr.count("error: ") == 2, remote.stderr
        assert "Traceback" not in remote.stderr
        assert not space.pids_named("raylet"), "the local Ray outlived its run"
    finally:
        space.close()


@pytest.mark.slow
@needs_ray
def test_two_nodes_give_the_local_engines_records(cluster, tiny_checkpoint, tree, tmp_path):
    nodes = cluster.exec([sys.executable, "-c", "import ray; ray.init(address='auto', log_to_driver=False); "
                                               "print(sum(n['Alive'] for n in ray.nodes()))"], timeout=120)
    assert nodes.stdout.split()[-1] == "2", nodes.stdout + nodes.stderr
    base = classify_args(tree, tiny_checkpoint[0])
    local = runner.invoke(app, base)
    remote = cluster.ast([*base, "--engine", "ray", "--ray-address", "auto"])
    assert remote.returncode == 1, remote.stderr
    same_records(records(local.stdout), records(remote.stdout))
    # --shard and --resume mean the same with Ray: shard 1 of 2 first, then the rest resumed into the same file
    out = tmp_path / "tags.jsonl"
    found = expand_inputs([str(tree)])  # shards go by a hash of the path: one that holds some files but not all
    part = next(f"1/{n}" for n in range(2, 9) if 0 < len(take_shard(found, (1, n))) < len(found))
    first = cluster.ast([*base, "--engine", "ray", "--ray-address", "auto", "--shard", part, "-o", str(out)])
    assert first.returncode in (0, 1), first.stderr
    done = {r["path"] for r in records(out.read_text())}
    rest = cluster.ast([*base, "--engine", "ray", "--ray-address", "auto", "-o", str(out), "--resume"])
    assert rest.returncode == 1, rest.stderr
    got = records(out.read_text())
    assert {r["path"] for r in got} == {r["path"] for r in records(local.stdout)}
    good = [r["path"] for r in got if r["error"] is None]
    assert len(good) == len(set(good)) == 5 and 0 < len(done) < 7  # done files were not redone; failed ones were


@pytest.mark.slow
@needs_ray
def test_extract_features_on_two_nodes_writes_the_local_engines_features(cluster, tiny_checkpoint, tree, tmp_path):
    from safetensors.numpy import load_file

    from ast_cli.tasks.extract import read_metadata

    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    common = ["extract-features", str(tree), "--model", str(tiny_checkpoint[0])]  # not quiet: a summary
    assert runner.invoke(app, [*common, "--out", str(local_dir)]).exit_code == 1
    remote = cluster.ast([*common, "--out", str(ray_dir), "--engine", "ray", "--ray-address", "auto"])
    assert remote.returncode == 1 and "5 written, 0 skipped" in remote.stderr, remote.stderr
    written = sorted(local_dir.rglob("*.safetensors"))
    assert len(written) == 5
    for path in written:
        mine = load_file(ray_dir / path.relative_to(local_dir))["embedding"]
        np.testing.assert_allclose(mine, load_file(path)["embedding"], atol=SAME_MACHINE_BATCHING)
        made = [read_metadata(str(p), "safetensors") for p in (path, ray_dir / path.relative_to(local_dir))]
        assert made[0]["model"] == made[1]["model"] and made[0]["weights"] == made[1]["weights"]  # one model (s9)
    again = runner.invoke(app, [*common, "--out", str(ray_dir)])  # the local engine knows the Ray run's outputs
    assert again.exit_code == 1 and "0 written, 5 skipped" in again.stderr, again.stderr


@pytest.mark.slow
@needs_ray
def test_a_worker_killed_mid_run_loses_no_record_and_writes_none_twice(cluster, tiny_checkpoint, tmp_path):
    """kill -9 of one actor process while records stream out: Ray restarts it and redoes its batch; every
    record arrives exactly once, in order."""
    import threading

    many = tmp_path / "many"
    for i in range(120):
        write_audio(many / f"c{i:03d}.wav", 3.0, 16000, 1, seed=i)
    proc = cluster.popen_ast(["classify", str(many), "--model", str(tiny_checkpoint[0]), "-f", "jsonl",
                              "--engine", "ray", "--ray-address", "auto"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        workers = cluster.pids_named("ray::MapWorker")
        if len(lines) >= 8 and workers:
            os.kill(workers[0], signal.SIGKILL)
            killed = (workers[0], len(lines))
        time.sleep(0.05)
    assert killed is not None, f"the run ended before a worker could be killed ({len(lines)} records)"
    assert proc.poll() is None and killed[1] < 120, "the kill came after the run"
    assert proc.wait(timeout=300) == 0, "".join(errors)
    reader.join(timeout=30)
    got = [json.loads(line)["path"] for line in lines]
    assert got == [str(many / f"c{i:03d}.wav") for i in range(120)]  # each once, in order


def test_library_noise_on_stdout_never_reaches_the_data():
    """What Ray's raylet prints on stdout about a dead worker goes to stderr while the Ray engine writes data."""
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from ast_cli.cli._io import stdout_for_data_only\n"
        "with stdout_for_data_only() as data:\n"
        "    print('(raylet) a worker died')\n"
        "    os.write(1, b'(raylet) more noise\\n')\n"
        "    data.write('{\"record\": 1}\\n')\n"
        "print('after')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.stdout == '{"record": 1}\nafter\n'
    assert "(raylet) a worker died" in proc.stderr and "(raylet) more noise" in proc.stderr


@pytest.mark.slow
@needs_ray
def test_worker_sizes_no_node_has_are_refused_at_once(cluster, tiny_checkpoint, tree, tmp_path):
    """Ray would wait forever, silently, for a node with 2 CPUs (both have 1) or a GPU (none has one)."""
    out = tmp_path / "keep.jsonl"
    out.write_text('{"earlier": "output"}\n')
    base = ["classify", str(tree), "--model", str(tiny_checkpoint[0]), "--engine", "ray", "--ray-address", "auto",
            "-o", str(out), "--overwrite"]
    for option, words in ((["--cpus-per-worker", "2"], "--cpus-per-worker: no node of the Ray cluster has 2 CPUs"),
                          (["--gpus-per-worker", "1"], "--gpus-per-worker: no node of the Ray cluster has 1 CPUs "
                                                       "and 1 GPUs")):
        result = cluster.ast([*base, *option], timeout=120)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert out.read_text() == '{"earlier": "output"}\n'


@pytest.mark.slow
@needs_ray
def test_sigterm_ends_a_ray_run_like_a_local_one_and_resume_finishes_it(cluster, tiny_checkpoint, tmp_path):
    """ray.init puts in a SIGTERM handler of its own (exit 15, a traceback with --debug); ours must stay: exit
    143, every finished record kept, and --resume does the rest, each file once."""
    many = tmp_path / "many"
    for i in range(60):
        write_audio(many / f"c{i:03d}.wav", 3.0, 16000, 1, seed=i)
    out = tmp_path / "tags.jsonl"
    base = ["classify", str(many), "--model", str(tiny_checkpoint[0]), "--engine", "ray", "--ray-address", "auto",
            "-o", str(out)]
    proc = cluster.popen_ast(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before SIGTERM could be sent"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    done = out.read_text().splitlines()
    assert 4 <= len(done) < 60
    rest = cluster.ast([*base, "--resume"])
    assert rest.returncode == 0, rest.stderr
    got = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert sorted(got) == [str(many / f"c{i:03d}.wav") for i in range(60)]  # each file once


def test_28_ray_address_without_engine_ray_is_refused_not_ignored(tiny_checkpoint, tmp_path, monkeypatch):
    """#28 walk: README said heads do not run "with --ray-address"; ``classify --head DIR --ray-address ADDR`` (and
    any run given --ray-address without --engine ray) ran locally and said nothing of the address."""
    from ast_cli.cli import classify as cli_classify, index as cli_index

    clip = write_audio(tmp_path / "a.wav", 0.5)
    for module in (cli_classify, cli_index):
        monkeypatch.setattr(module, "fetch_model", lambda *a, **k: pytest.fail("the model was fetched"))
    for command in (["classify", str(clip), "-o", str(tmp_path / "tags.jsonl")],
                    ["index", str(clip), "--db", str(tmp_path / "db")]):
        result = runner.invoke(app, [*command, "--model", str(tiny_checkpoint[0]), "--ray-address", "auto"])
        assert result.exit_code == 2
        assert result.stderr.splitlines() == ["Error: --ray-address: auto is a Ray cluster to join, and this run is "
                                              "local", "Hint: use --engine ray"]
    assert sorted(os.listdir(tmp_path)) == ["a.wav"]


def test_s8_16_files_added_between_shard_runs_move_no_other_file():
    """Shard K of N was the K-th of every N files of the sorted list: a file added between two shard runs shifted
    the others, so some were in no shard (never processed, every run reporting success) and some in two. Each
    file's shard now comes from a hash of its path alone."""
    from ast_cli.audio.inputs import InputFile

    before = [InputFile(f"rec/{name}.wav") for name in "bcdefghijklmnop"]
    after = sorted([InputFile("rec/a.wav"), InputFile("rec/ff.wav"), *before[1:]], key=lambda item: item.path)
    for n in (2, 3, 7):
        for k in range(1, n + 1):  # the files of both lists keep their shard
            assert [i for i in take_shard(before, (k, n)) if i in after] == [i for i in take_shard(after, (k, n))
                                                                             if i in before]
        union = [item for k in range(1, n + 1) for item in take_shard(after, (k, n))]
        assert sorted(union, key=lambda item: item.path) == after  # every file, each exactly once


@pytest.mark.skipif(not ray_available(), reason="the ray extra is not installed")
@pytest.mark.parametrize("silenced", [True, False])
def test_s9_ray_start_up_notes_stay_off_stderr_unless_debugging(monkeypatch, capfd, silenced):
    """A Ray of the run's own printed "Token authentication is enabled for this Ray cluster. Set
    RAY_AUTH_MODE=disabled to opt out..." (a warning of Ray's own logger) and notes of its C++ core on fd 2 at
    every ``--engine ray`` run. ray.init now runs with both kept off stderr; --debug (not silenced) shows them."""
    import logging

    import ray

    from ast_cli.tasks.distributed import RaySettings, connect

    def init(**kwargs):
        os.write(2, b"network_util.cc:330: Failed to determine local IP\n")  # as Ray's C++ core prints
        logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    logged, handler = [], logging.Handler()
    handler.emit = logged.append  # what Ray's logger would hand its stderr handler
    logging.getLogger("ray._private.authentication").addHandler(handler)
    level = logging.getLogger("ray").level
    try:
        connect(RaySettings(engine="ray"), silence_native=silenced)
    finally:
        logging.getLogger("ray._private.authentication").removeHandler(handler)
    assert ("network_util" in capfd.readouterr().err) is not silenced
    assert bool(logged) is not silenced, logged
    assert logging.getLogger("ray").level == level  # as Ray set it: only the start-up is quieted


@pytest.mark.slow  # starts Ray
@needs_ray
def test_s9_a_local_ray_run_prints_only_our_lines(tiny_checkpoint, tree, tmp_path):
    """The same, for real: Ray's own auth mode (RAY_AUTH_MODE unset, as a user's is) and a home of its own."""
    space = raynet.RayNamespace()
    try:
        run = space.exec(["env", "-u", "RAY_AUTH_MODE", f"HOME={tmp_path}", sys.executable, "-m", "ast_cli",
                          *classify_args(tree, tiny_checkpoint[0]), "--engine", "ray", "--ray-workers", "1"],
                         timeout=300)
    finally:
        space.close()
    lines = run.stderr.splitlines()
    assert run.returncode == 1 and len(records(run.stdout)) == 7, run.stderr  # the two bad files
    assert [line for line in lines if not line.startswith("error: ")] == [lines[-1]], run.stderr  # and a summary
    assert lines[-1].startswith("5 tagged, 2 failed"), run.stderr
