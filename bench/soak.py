"""Soak: a long open-loop run below saturation, with errors and the server's memory over time.

    python -m bench.soak [--minutes 10] [--load 0.7] [--model airbench] [--env KEY=VALUE ...]

Starts `bentoml serve` here, measures the saturation rate (closed loop, concurrency 32), then offers
single-image requests at --load × that rate (Poisson arrivals) for --minutes, printing a row every
--every seconds: requests, errors, latency, and the resident memory of the server's process tree.
The summary gives the memory growth from the end of the first interval (after warm-up) to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from bench.harness import REPO, SERVE, running
from bench.http_load import machine, open_loop, saturation, test_pngs
from bench.overload import ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the saturation rate")
    parser.add_argument("--every", type=float, default=30.0, help="seconds per printed row")
    parser.add_argument("--model", help="bundle to ask for (default: the service's default)")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="service settings")
    parser.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "data/cifar-10-batches-py"))
    args = parser.parse_args()

    blobs = test_pngs(Path(args.data_dir), 1000)
    env = dict(item.split("=", 1) for item in args.env)
    (REPO / "logs").mkdir(exist_ok=True)
    with running(SERVE, REPO / "logs" / "soak_server.log", env=env) as server:
        rate = args.load * saturation(server.url, blobs, args.model)
        print(f"machine: {machine()}; model {args.model or 'default'}; {args.minutes:g} min at {rate:,.1f} requests/s ({args.load:.0%} of saturation)")
        print("| minute | requests | errors | p50 ms | p99 ms | server memory MiB |\n| ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
        started, sent, errors, memory = time.monotonic(), 0, 0, []
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            interval = min(args.every, args.minutes * 60 - elapsed)
            answers = asyncio.run(open_loop(server.url, blobs, rate, interval, args.model, seed=len(memory)))
            sent += answers.sent
            errors += answers.sent - len(answers.served)
            memory.append(server.rss / 2**20)
            print(f"| {(time.monotonic() - started) / 60:.1f} | {answers.sent:,} | {answers.sent - len(answers.served):,} | "
                  f"{ms(answers.served, 50)} | {ms(answers.served, 99)} | {memory[-1]:,.0f} |", flush=True)  # fmt: skip
        growth = (memory[-1] - memory[0]) / memory[0]
        print(f"\n{sent:,} requests in {args.minutes:g} min, {errors:,} errors; memory {memory[0]:,.0f} → {memory[-1]:,.0f} MiB ({growth:+.1%}) "
              f"from the end of the first interval; server alive: {server.process.poll() is None}")  # fmt: skip


if __name__ == "__main__":
    main()
