"""Start a server process, wait until it is ready, stop it: shared by the benchmarks and the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
# our service, as `bentoml serve` in the repository root would start it
SERVE = [sys.executable, "-m", "bentoml", "serve", "serving.service:CIFAR10", "--host", "127.0.0.1", "--port", "{port}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# how long a server may take to answer its readiness check: generous, as a busy 2-core machine is slow to start one
READY_SECONDS = 180


def wait_ready(url: str, process: subprocess.Popen, seconds: float = READY_SECONDS, path: str = "/readyz", poll: float = 0.5) -> bool:
    """Poll url+path every `poll` seconds until it answers 200; False if the process dies or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(poll)
    return False


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants (a server's supervisor and workers), in bytes."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def tree_pss(pid: int) -> int:
    """The same tree's proportional set size: pages shared between its processes (libraries, a
    forked parent's) counted once in all, where RSS counts them once per process."""
    root = psutil.Process(pid)
    return sum(p.memory_full_info().pss for p in [root, *root.children(recursive=True)])


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen

    @property
    def rss(self) -> int:
        return tree_rss(self.process.pid)

    @property
    def pss(self) -> int:
        return tree_pss(self.process.pid)


@contextmanager
def running(
    command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = REPO, ready_path: str = "/readyz", poll: float = 0.5
) -> Iterator[Server]:
    """Run `command` (which gets the port as {port}) and yield it once `ready_path` answers 200."""
    port = free_port()
    with open(log, "w") as out:  # a file, not a pipe: nobody has to drain it
        process = subprocess.Popen(
            [part.format(port=port) for part in command], cwd=cwd, env=dict(os.environ, **(env or {})),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,  # its own process group: stop() ends all of it
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_ready(url, process, path=ready_path, poll=poll):
                raise RuntimeError(f"{command[:4]} was not ready within {READY_SECONDS} s; its log:\n{log.read_text()[-3000:]}")
            yield Server(url, process)
        finally:
            stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s; then any process it started and left behind (LitServe's workers outlive
    a terminated server), so that no stray process takes the cores from the next measurement."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    psutil.wait_procs(children, timeout=3)
    with contextlib.suppress(ProcessLookupError):  # whatever is left of its group, a dead server's children too
        os.killpg(process.pid, signal.SIGKILL)
