"""Ray for the tests, in a network namespace of its own that has nothing but loopback.

Even a local Ray connects its processes over the host's own network address, not only loopback. These tests
may talk to loopback only, so every Ray process (head, second node, the ``ast`` driver, its actors) runs inside a
namespace the test makes (``ip netns add``, loopback up, no other interface): whatever Ray opens, there is
nowhere for it to go but 127.0.0.1 of that namespace. Closing the namespace ends every process in it, so a test
that fails halfway leaves no Ray behind. Needs root and iproute2 (``reason_unavailable`` says what is missing).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_names = itertools.count()


def reason_unavailable() -> str | None:
    """Why a namespaced Ray cannot run here, or None when it can."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return "the ray extra is not installed (pip install -e '.[test,ray]')"
    if shutil.which("ip") is None:
        return "needs iproute2's ip, for a loopback-only network namespace"
    if os.geteuid() != 0:
        return "needs root, for a loopback-only network namespace (ip netns add)"
    return None


class RayNamespace:
    """A loopback-only network namespace with a Ray temp dir of its own; ``close()`` ends all of it."""

    def __init__(self):
        self.name = f"ast-test-{os.getpid()}-{next(_names)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.exec(["ip", "link", "set", "lo", "up"], check=True)
        # Short: Ray's unix socket paths live under it and must fit in 107 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="astray", dir="/tmp"))
        self.port = None

    @property
    def env(self) -> dict:
        """This process's environment as it is now (the tests' offline hub among it), with Ray's temp dir; Ray's
        actors get the environment of the node that starts them, so the hub is offline there too."""
        env = {**os.environ, "RAY_TMPDIR": str(self.tmp), "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        for name in ("RAY_ADDRESS", "AST_DEBUG"):
            env.pop(name, None)
        return env

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def exec(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(args), env=self.env if hasattr(self, "tmp") else None, **kwargs)

    def ast(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        """``ast ARGS`` inside the namespace."""
        kwargs.setdefault("timeout", 600)
        return self.exec([sys.executable, "-m", "ast_cli", *args], **kwargs)

    def popen_ast(self, args: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command([sys.executable, "-m", "ast_cli", *args]), env=self.env, **kwargs)

    def start_cluster(self, cpus_per_node: tuple[int, ...] = (1, 1), port: int = 6390) -> None:
        """``ray start --head --num-cpus A``, then a node joining it for each further count, as a user would."""
        ray = str(Path(sys.executable).with_name("ray"))
        head = self.exec([ray, "start", "--head", "--num-cpus", str(cpus_per_node[0]), "--port", str(port),
                          "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                         timeout=180)
        assert head.returncode == 0, head.stdout + head.stderr
        for cpus in cpus_per_node[1:]:
            node = self.exec([ray, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                              "--num-cpus", str(cpus)], timeout=180)
            assert node.returncode == 0, node.stdout + node.stderr
        self.port = port

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def pids_named(self, text: str) -> list[int]:
        """Processes in the namespace whose command line contains ``text`` (Ray's actors are "ray::MapWorker...")."""
        found = []
        for pid in self.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(pid)
        return found

    def close(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
