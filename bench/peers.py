"""Our service against the servers a user would otherwise run, single-image requests, all in one run.

    pip install -e ".[bench]"      # LitServe, for its row
    python -m bench.peers --data-dir ../shared/data/cifar-10-batches-py [--models airbench cnn] [--rounds 3] [--int8]

For each bundle, each server starts in turn and bench.http_load's closed-loop clients post one
CIFAR-10 test PNG per request to its /classify (the same multipart form for all) at each
concurrency, for --seconds after a one-second warm-up; then the next server. Rounds alternate
the servers, since this machine's speed swings between minutes. The servers:

- ours: `bentoml serve` with its defaults, and with the settings `--advised` names for a bundle;
- minimal: bench/minimal_app.py, Starlette + onnxruntime in 2 uvicorn workers, one `session.run`
  per request;
- with --int8, ours serving the bundle's int8 variant (CIFAR10_PRECISION=BUNDLE:int8) and the
  minimal app on the same graph, so that what int8 buys is compared like for like;
- LitServe: bench/litserve_app.py, LitServe + onnxruntime, 2 workers, batches of up to 32; with
  --litserve-variants, more LitServe rows with its tuning options (`fast-queue`, `api-servers=1`,
  comma-separated in one variant), to check that the row above is LitServe at its best here.

Printed: each measurement as it comes, then per bundle a table of median requests/s (p50 / p99 ms)
at each concurrency, the servers' memory after the loads (RSS summed over their processes, and
PSS, which counts what they share once: fairer to servers of several processes), ours against
each peer, and every server against onnxruntime in this process (each round, while no server
runs: the bundle's graph in calls of the service's batch size, no HTTP and no load client, the
better of one session on every thread and one single-thread session per core side by side), the
ceiling that no server of the same graph passes on these cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.harness import REPO, SERVE, running
from bench.http_load import MINIMAL, forms, load, machine, test_pngs
from bench.v2_load import in_process_rate
from bundle.images import decode
from bundle.manifest import INT8_FILE
from bundle.runtime import Bundle, available_cores
from serving.settings import Settings


@dataclass(frozen=True)
class Peer:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def graph(self) -> str:
        """Which of the bundle's graphs it serves: a ratio across graphs is the graph's as much as the server's."""
        return "int8" if "int8" in self.env.get("CIFAR10_PRECISION", "") or self.env.get("BENCH_GRAPH") == INT8_FILE else "fp32"


def peers(bundle: str, advised: dict[str, str], int8: bool = False, litserve_variants: tuple[str, ...] = ()) -> list[Peer]:
    folder = {"BENCH_BUNDLE": str(REPO / "models" / bundle)}
    minimal = [p.replace("{workers}", "2") for p in MINIMAL]
    found = [Peer("ours, defaults", SERVE)]
    if advised:
        found.append(Peer(f"ours, {' '.join(f'{k}={v}' for k, v in advised.items())}", SERVE, advised))
    if int8:
        found.append(Peer(f"ours, CIFAR10_PRECISION={bundle}:int8", SERVE, {"CIFAR10_PRECISION": f"{bundle}:int8"}))
    found.append(Peer("minimal Starlette + onnxruntime", minimal, folder))
    if int8:
        found.append(Peer("minimal, int8 graph", minimal, {**folder, "BENCH_GRAPH": INT8_FILE}))
    try:
        import litserve  # noqa: F401  # a bench-only extra
    except ImportError:
        print("LitServe is not installed (pip install -e '.[bench]'): its row is left out", file=sys.stderr)
    else:
        command = [sys.executable, "-m", "bench.litserve_app", "--port", "{port}", "--workers", "2", "--batch", "32"]
        found.append(Peer("LitServe + onnxruntime", command, folder))
        for variant in litserve_variants:  # "fast-queue,api-servers=1" → --fast-queue --api-servers 1
            options = [part for option in variant.split(",") for part in ["--" + option.partition("=")[0], option.partition("=")[2]] if part != ""]
            found.append(Peer(f"LitServe + onnxruntime, {variant}", command + options, folder))
    return found


def side_by_side_rate(bundle: Bundle, pixels: np.ndarray, per_call: int, seconds: float) -> float:
    """Images/s of the bundle's single-thread sessions 1.. each called in a thread of its own at once
    (how two peer processes, or our two batches, use two cores)."""
    calls = [pixels[i : i + per_call] for i in range(0, len(pixels), per_call)]
    counts = [0] * (len(bundle.sessions) - 1)
    stop = time.perf_counter() + seconds

    def run(session: int) -> None:
        while time.perf_counter() < stop:
            for batch in calls:
                bundle.predict(batch, session)
                counts[session - 1] += len(batch)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(session,)) for session in range(1, len(bundle.sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def ceiling_rate(bundle: Bundle, pixels: np.ndarray, seconds: float) -> float:
    """onnxruntime's best rate in process for the service's calls: one session on every thread, or one per core side by side."""
    per_call = Settings.max_batch_size
    rates = [in_process_rate(bundle, pixels, per_call, seconds / 2)]
    if len(bundle.sessions) > 1:
        bundle.predict(pixels[:per_call], 1)  # warm
        rates.append(side_by_side_rate(bundle, pixels, per_call, seconds / 2))
    return max(rates)


@dataclass
class Measured:
    rates: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    errors: int = 0

    def cell(self) -> str:
        p50, p99 = ([v for v in values if v == v] or [float("nan")] for values in (self.p50, self.p99))  # rounds with no answer: NaN
        return f"{statistics.median(self.rates):,.0f} ({statistics.median(p50):.1f} / {statistics.median(p99):.0f})"


def run_bundle(bundle: str, servers: list[Peer], blobs: list[bytes], args: argparse.Namespace) -> None:
    measured: dict[tuple[str, int], Measured] = {}
    memory: dict[str, list[float]] = {}  # resident, summed over the server's processes
    shared: dict[str, list[float]] = {}  # proportional: what several processes share counted once
    graphs = sorted({peer.graph for peer in servers})
    cores = available_cores()
    loaded = {graph: Bundle.load(REPO / "models" / bundle, precision=graph, threads=cores, sessions=cores) for graph in graphs}
    pixels = np.stack([decode(blob) for blob in blobs[:256]])
    ceiling: dict[str, list[float]] = {graph: [] for graph in graphs}  # images/s in process, a rate per round
    for round_ in range(1, args.rounds + 1):
        for graph in graphs:
            ceiling[graph].append(ceiling_rate(loaded[graph], pixels, args.seconds))
            print(f"{bundle} | round {round_} | onnxruntime in process, {graph} | {ceiling[graph][-1]:,.1f} images/s", flush=True)
        for peer in servers if round_ % 2 else servers[::-1]:  # no server always first: drift within a round evens out
            log = REPO / "logs" / f"peers_{bundle}_{servers.index(peer)}.log"
            with running(peer.command, log, env=peer.env) as server:
                for concurrency in args.concurrency:
                    result = asyncio.run(load(server.url, forms(server.url, blobs, 1, bundle), 1, concurrency, args.seconds))
                    m = measured.setdefault((peer.name, concurrency), Measured())
                    m.rates.append(len(result.latencies) / result.seconds)
                    m.p50.append(np.percentile(result.latencies, 50) * 1000 if result.latencies else float("nan"))
                    m.p99.append(np.percentile(result.latencies, 99) * 1000 if result.latencies else float("nan"))
                    m.errors += result.errors
                    print(f"{bundle} | round {round_} | {peer.name} | c={concurrency} | {m.rates[-1]:,.1f} req/s | "
                          f"p50 {m.p50[-1]:.1f} ms | p99 {m.p99[-1]:.1f} ms | errors {result.errors}", flush=True)  # fmt: skip
                memory.setdefault(peer.name, []).append(server.rss / 2**20)
                shared.setdefault(peer.name, []).append(server.pss / 2**20)
    print(f"\n`{bundle}`, single-image requests: median requests/s (p50 / p99 ms) of {args.rounds} rounds, in alternating order")
    print("| server | " + " | ".join(f"concurrency {c}" for c in args.concurrency) + " | memory (RSS / PSS) | errors |")
    print("| --- |" + " ---: |" * (len(args.concurrency) + 2))
    for peer in servers:
        cells = [measured[(peer.name, c)].cell() for c in args.concurrency]
        errors = sum(measured[(peer.name, c)].errors for c in args.concurrency)
        print(f"| {peer.name} | {' | '.join(cells)} | {statistics.median(memory[peer.name]):,.0f} / {statistics.median(shared[peer.name]):,.0f} MiB | {errors} |")
    print("ratios: the median over rounds of each round's ratio")
    for ours in (p for p in servers if p.name.startswith("ours")):
        for other in (p for p in servers if not p.name.startswith("ours")):
            ratios = [
                statistics.median(a / max(b, 1e-9) for a, b in zip(measured[(ours.name, c)].rates, measured[(other.name, c)].rates))
                for c in args.concurrency
            ]
            across = "" if ours.graph == other.graph else f" ({ours.graph} graph against {other.graph})"
            print(f"| {ours.name} / {other.name}{across} | {' | '.join(f'{r:.2f}×' for r in ratios)} | | |")
    in_process = ", ".join(f"{graph} {statistics.median(rates):,.0f} images/s" for graph, rates in ceiling.items())
    print(f"onnxruntime in process, calls of {Settings.max_batch_size}, no HTTP and no load client, its better layout (median of the rounds): {in_process}")
    for peer in servers:
        shares = [statistics.median(a / max(b, 1e-9) for a, b in zip(measured[(peer.name, c)].rates, ceiling[peer.graph])) for c in args.concurrency]
        print(f"| {peer.name} / onnxruntime in process ({peer.graph}) | {' | '.join(f'{r:.0%}' for r in shares)} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "data/cifar-10-batches-py"))
    parser.add_argument("--models", nargs="+", default=["airbench", "cnn"])
    parser.add_argument("--advised", nargs="*", default=[], metavar="BUNDLE:KEY=VALUE",
                        help="settings for a second row of ours, for a bundle (cnn:CIFAR10_WORKERS=2, say)")  # fmt: skip
    parser.add_argument("--int8", action="store_true", help="add ours and the minimal app on each bundle's int8 variant")
    parser.add_argument("--litserve-variants", nargs="*", default=[], metavar="OPTIONS",
                        help="more LitServe rows, each with bench.litserve_app options without their dashes: fast-queue, api-servers=1, or both comma-separated")  # fmt: skip
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    args = parser.parse_args()

    advised: dict[str, dict[str, str]] = {}
    for item in args.advised:
        bundle, setting = item.split(":", 1)
        key, value = setting.split("=", 1)
        advised.setdefault(bundle, {})[key] = value
    blobs = test_pngs(Path(args.data_dir), 1000)
    (REPO / "logs").mkdir(exist_ok=True)
    print(f"machine: {machine()}; {args.rounds} rounds of {args.seconds:g} s per measurement")
    for bundle in args.models:
        run_bundle(bundle, peers(bundle, advised.get(bundle, {}), args.int8, tuple(args.litserve_variants)), blobs, args)


if __name__ == "__main__":
    main()
