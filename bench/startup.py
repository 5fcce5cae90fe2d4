"""Time from `bentoml serve` to a ready `/readyz`, and the memory of the serving processes.

    python -m bench.startup [--runs 3] [--env CIFAR10_MODELS=cnn]

Each run starts the service in the repository root with the given settings, polls `/readyz` every
50 ms, then sums the resident memory (RSS) of the server's whole process tree (BentoML's
supervisor and workers) idle, and again after --requests single-image requests.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import httpx

from bench.harness import REPO, SERVE, running
from bench.http_load import machine, test_pngs


def one_run(env: dict[str, str], blobs: list[bytes], requests: int) -> tuple[float, int, int]:
    started = time.perf_counter()
    with running(SERVE, REPO / "logs" / "startup_server.log", env=env, poll=0.05) as server:
        ready = time.perf_counter() - started
        time.sleep(1)
        idle = server.rss
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for i in range(requests):
                answer = client.post("/classify", files=[("images", ("x.png", blobs[i % len(blobs)], "image/png"))])
                answer.raise_for_status()  # memory after 500 answers, not after 500 refusals
        return ready, idle, server.rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="service settings")
    parser.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "data/cifar-10-batches-py"))
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    blobs = test_pngs(Path(args.data_dir), 100)
    (REPO / "logs").mkdir(exist_ok=True)
    print(f"machine: {machine()}; settings: {' '.join(args.env) or 'defaults'}")
    print("| run | serve → /readyz | RSS idle | RSS after requests |\n| ---: | ---: | ---: | ---: |")
    for run in range(1, args.runs + 1):
        ready, idle, busy = one_run(env, blobs, args.requests)
        print(f"| {run} | {ready:.1f} s | {idle / 2**20:,.0f} MiB | {busy / 2**20:,.0f} MiB ({args.requests} requests) |", flush=True)


if __name__ == "__main__":
    main()
