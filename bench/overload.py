"""Overload: open-loop load at multiples of the measured saturation rate, and what the server does with it.

    python -m bench.overload [--model airbench] [--factors 1 2 4] [--seconds 10] [--env CIFAR10_MAX_CONCURRENCY=64]

Starts `bentoml serve` here, measures the saturation rate (closed loop, concurrency 32), then offers
single-image requests at each factor × that rate (Poisson arrivals; each client waits at most
--deadline s) and prints, per factor: served/s (until the last answer), the share refused with 429 and how fast, the
latency of the served, any other outcome (5xx, timeouts, connection errors). Then a retry storm:
--storm closed-loop connections (256) that resend at once on every answer, Retry-After ignored,
as a naive client fleet does; printed: goodput (200s per second) against the saturation rate,
the p99 of the served and every status seen. Last, a short run at half the saturation rate
checks that the server serves normally again, and that it never died.
The client (plain asyncio streams) shares the machine with the server; latency counts from each request's
scheduled time, so a client that falls behind shows in the figures instead of hiding.
"""

from __future__ import annotations

import argparse
import asyncio

from bench.http_load import Answers, add_service_options, forms, load, machine, ms, open_loop, saturation, serving

HEADER = [
    "| load | offered req/s | served req/s | refused (429) | 429 p99 ms | served p50 ms | served p99 ms | other outcomes |",
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
]


def row(label: str, a: Answers) -> str:
    others = ", ".join(f"{n}× {what}" for what, n in a.failed.most_common()) or "none"
    return (
        f"| {label} | {a.rate:,.0f} | {len(a.served) / a.until_last:,.1f} | {len(a.refused) / max(a.sent, 1):.1%} | "
        f"{ms(a.refused, 99)} | {ms(a.served, 50)} | {ms(a.served, 99)} | {others} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", type=float, nargs="*", default=[1, 2, 4], help="open-loop loads, × saturation (none: only the storm)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per factor")
    parser.add_argument("--deadline", type=float, default=10.0, help="seconds a client waits for its answer")
    parser.add_argument("--storm", type=int, default=256, help="connections of the retry storm (0: none)")
    add_service_options(parser)
    args = parser.parse_args()

    with serving(args, "overload_server.log") as (server, blobs):
        rate = saturation(server.url, blobs, args.model)
        print(f"machine: {machine()}; model {args.model or 'default'}; settings {' '.join(args.env) or 'defaults'}")
        print(f"saturation (closed loop, concurrency 32): {rate:,.1f} requests/s; {args.seconds:g} s per load; deadline {args.deadline:g} s\n")
        print("\n".join(HEADER), flush=True)
        for factor in args.factors:
            answers = asyncio.run(open_loop(server.url, blobs, factor * rate, args.seconds, args.model, args.deadline))
            print(row(f"{factor:g}× saturation", answers), flush=True)
        if args.storm:
            storm = asyncio.run(load(server.url, forms(server.url, blobs, 1, args.model), 1, args.storm, args.seconds))
            goodput = len(storm.latencies) / storm.seconds
            statuses = ", ".join(f"{n:,}× {status or 'no answer'}" for status, n in sorted(storm.statuses.items())) or "none"
            print(f"\nretry storm, {args.storm} connections resending at once: goodput {goodput:,.1f} requests/s "
                  f"= {goodput / rate:.0%} of saturation; served p99 {ms(storm.latencies, 99)} ms; "
                  f"{len(storm.latencies):,}× 200, {statuses}", flush=True)  # fmt: skip
        after = asyncio.run(open_loop(server.url, blobs, 0.5 * rate, args.seconds, args.model, args.deadline))
        print(row("afterwards, 0.5×", after))
        print(f"\nserver process alive throughout: {server.process.poll() is None}; memory {server.rss / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
