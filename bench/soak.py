"""Soak: a long open-loop run below saturation, with errors and the server's memory over time.

    python -m bench.soak [--minutes 10] [--load 0.7] [--model airbench] [--env KEY=VALUE ...]

Starts `bentoml serve` here, measures the saturation rate (closed loop, concurrency 32, the median
of three 5 s runs), then offers single-image requests at --load × that rate (Poisson arrivals) for
--minutes, printing a row every --every seconds: requests, refusals (429: load shedding, when a
burst passes CIFAR10_MAX_CONCURRENCY), errors (anything else: 5xx, timeouts, lost connections),
latency, and the resident memory of the server's process tree.
The summary gives the memory growth from the end of the first interval (after warm-up) to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
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
        peak = statistics.median(saturation(server.url, blobs, args.model, seconds=5) for _ in range(3))  # this machine swings
        rate = args.load * peak
        print(f"machine: {machine()}; model {args.model or 'default'}; saturation {peak:,.1f} requests/s (median of 3); "
              f"{args.minutes:g} min at {rate:,.1f} requests/s ({args.load:.0%})")  # fmt: skip
        print("| minute | requests | refused (429) | errors | p50 ms | p99 ms | server memory MiB |", flush=True)
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
        started, sent, refused, failed, memory = time.monotonic(), 0, 0, collections.Counter(), []
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            interval = min(args.every, args.minutes * 60 - elapsed)
            answers = asyncio.run(open_loop(server.url, blobs, rate, interval, args.model, seed=len(memory)))
            sent, refused, failed = sent + answers.sent, refused + len(answers.refused), failed + answers.failed
            memory.append(server.rss / 2**20)
            print(f"| {(time.monotonic() - started) / 60:.1f} | {answers.sent:,} | {len(answers.refused):,} | {sum(answers.failed.values()):,} | "
                  f"{ms(answers.served, 50)} | {ms(answers.served, 99)} | {memory[-1]:,.0f} |", flush=True)  # fmt: skip
        growth = (memory[-1] - memory[0]) / memory[0]
        errors = ", ".join(f"{n}× {what}" for what, n in failed.most_common()) or "no errors"
        print(f"\n{sent:,} requests in {args.minutes:g} min: {refused:,} refused (429), {errors}; memory {memory[0]:,.0f} → "
              f"{memory[-1]:,.0f} MiB ({growth:+.1%}) from the end of the first interval; server alive: {server.process.poll() is None}")  # fmt: skip

if __name__ == "__main__":
    main()
