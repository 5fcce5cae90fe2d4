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
import time

from bench.http_load import add_service_options, machine, ms, open_loop, saturation, serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the saturation rate")
    parser.add_argument("--every", type=float, default=30.0, help="seconds per printed row")
    add_service_options(parser)
    args = parser.parse_args()

    with serving(args, "soak_server.log") as (server, blobs):
        peak = saturation(server.url, blobs, args.model, seconds=5, runs=3)
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
