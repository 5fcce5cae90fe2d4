"""A Spark standalone cluster on this machine, started from PySpark's own scripts: a master and N
workers on 127.0.0.1, as docs/batch-scoring.md starts one by hand. Used by the tests and by
`bench.score_throughput --cluster`.

    with StandaloneCluster(workers=2, cores=1) as cluster:
        ... SparkSession.builder.master(cluster.url) ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.harness import free_port

MASTER = "org.apache.spark.deploy.master.Master"
WORKER = "org.apache.spark.deploy.worker.Worker"


def spark_home() -> Path:
    import pyspark

    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


class StandaloneCluster:
    """Master and workers as child processes; each worker in its own process group with its executors."""

    def __init__(self, workers: int = 2, cores: int = 1, memory: str = "2g", startup_s: float = 120):
        self.cores, self.memory, self.startup_s = cores, memory, startup_s
        self.folder = Path(tempfile.mkdtemp(prefix="spark-standalone-"))
        self.port, self.ui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_HOME": str(spark_home()), "SPARK_LOG_DIR": str(self.folder)}
        self.master: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.wanted = workers

    def __enter__(self) -> StandaloneCluster:
        try:
            self.master = self._spawn("master", MASTER, "--host", "127.0.0.1", "--port", str(self.port), "--webui-port", str(self.ui_port))
            for _ in range(self.wanted):
                self.start_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, cls: str, *args: str) -> subprocess.Popen:
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            raise RuntimeError("Spark needs Java 17 or newer: install it (apt-get install default-jre-headless) or set JAVA_HOME")
        with open(self.folder / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                [str(spark_home() / "bin" / "spark-class"), cls, *args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # a group: it and its executors
            )  # fmt: skip

    def start_worker(self) -> None:
        n = len(self.workers)
        self.workers.append(
            self._spawn(
                f"worker{n}", WORKER, "-h", "127.0.0.1", "--cores", str(self.cores), "--memory", self.memory,
                "--webui-port", str(free_port()), "--work-dir", str(self.folder / f"work{n}"), self.url,
            )  # fmt: skip
        )
        self.wait_for(sum(w.poll() is None for w in self.workers))

    def alive_workers(self) -> int:
        """What the master says: workers registered and ALIVE."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=10) as reply:
                state = json.load(reply)
        except OSError:
            return -1
        return sum(w["state"] == "ALIVE" for w in state.get("workers", []))

    def wait_for(self, workers: int) -> None:
        deadline = time.monotonic() + self.startup_s
        while self.alive_workers() != workers:
            if self.master.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(self.folder.glob("*.log")))
                raise RuntimeError(f"the standalone cluster did not reach {workers} alive workers\n{logs}")
            time.sleep(0.5)

    def kill_worker(self, n: int) -> None:
        """SIGKILL worker n with its executors and their Python workers, as a lost machine would go."""
        _signal_group(self.workers[n], signal.SIGKILL)
        self.workers[n].wait()

    def stop(self) -> None:
        """Every process started, executors and Python workers included, ends."""
        started = [p for p in [*self.workers, self.master] if p is not None]
        for process in started:
            _signal_group(process, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            _signal_group(process, signal.SIGKILL)  # whatever of its group outlived it
        shutil.rmtree(self.folder, ignore_errors=True)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
