"""A/B of service variants under the same HTTP load, in alternating rounds: what one change buys.

    python -m bench.ab --model cnn --variant default --variant spinning CIFAR10_THREAD_SPINNING=1
    python -m bench.ab --model cnn --variant default --variant "without uvloop, httptools" no:uvloop no:httptools
    git worktree add /tmp/before 8859fa7
    python -m bench.ab --model cnn --variant before @/tmp/before --variant after

A variant is a name followed by what sets it apart: KEY=VALUE service settings (environment
variables), @PATH to serve another source tree (a `git worktree` of another commit), no:MODULE
to serve as if that optional package were not installed. Each round starts every variant's
`bentoml serve` in turn and runs bench.http_load's closed-loop clients on it; this machine's
speed swings between minutes, so only rounds that alternate compare (in reversed order every
other round, so that no variant always goes first). Printed: each measurement, then the median
and best of each variant, and the median of its rounds' ratios to the first variant's; last,
each variant's serving processes' memory after its loads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.harness import REPO, SERVE, running
from bench.http_load import forms, load, machine, test_pngs


@dataclass
class Variant:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    tree: Path = REPO
    hidden: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, words: list[str]) -> Variant:
        variant = cls(words[0])
        for word in words[1:]:
            if word.startswith("@"):
                variant.tree = Path(word[1:]).resolve()
            elif word.startswith("no:"):
                variant.hidden.append(word.removeprefix("no:"))
            elif "=" in word:
                key, value = word.split("=", 1)
                variant.env[key] = value
            else:
                raise SystemExit(f"variant {variant.name!r}: {word!r} is none of KEY=VALUE, @PATH, no:MODULE")
        return variant

    def environment(self, stubs: Path) -> dict[str, str]:
        """The server's environment; hidden modules shadowed by stubs that fail to import."""
        if not self.hidden:
            return self.env
        folder = stubs / self.name.replace("/", "_").replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for module in self.hidden:
            (folder / f"{module}.py").write_text(f"raise ImportError('{module} hidden by bench.ab')\n")
        return {**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE | @PATH | no:MODULE]")
    parser.add_argument("--model", help="bundle to ask for (default: the service's default)")
    parser.add_argument("--images", type=int, nargs="+", default=[1], help="images per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    parser.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "data/cifar-10-batches-py"))
    args = parser.parse_args()

    variants = [Variant.parse(words) for words in args.variant]
    blobs = test_pngs(Path(args.data_dir), 1000)
    loads = [(n, c) for n in args.images for c in args.concurrency]
    print(f"machine: {machine()}; model {args.model or 'default'}; {args.rounds} rounds of {args.seconds:g} s per load")
    rates: dict[tuple[str, int, int], list[float]] = {}
    memory: dict[str, list[float]] = {}  # the serving processes' resident memory after each round's loads, MiB
    (REPO / "logs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as stubs:
        for round_ in range(1, args.rounds + 1):
            for variant in variants if round_ % 2 else variants[::-1]:  # no variant always first
                with running(
                    SERVE, REPO / "logs" / "ab_server.log", env=variant.environment(Path(stubs)), cwd=variant.tree
                ) as server:
                    for per_request, concurrency in loads:
                        result = asyncio.run(load(server.url, forms(server.url, blobs, per_request, args.model), per_request, concurrency, args.seconds))
                        rate = len(result.latencies) / result.seconds * per_request
                        rates.setdefault((variant.name, per_request, concurrency), []).append(rate)
                        p50, p99 = (np.percentile(result.latencies, q) * 1000 if result.latencies else float("nan") for q in (50, 99))
                        print(f"round {round_} | {variant.name} | {per_request} img × c={concurrency} | {rate:,.0f} img/s | "
                              f"p50 {p50:.1f} ms | p99 {p99:.1f} ms | errors {result.errors}", flush=True)  # fmt: skip
                    memory.setdefault(variant.name, []).append(server.rss / 2**20)
    print("\n| variant | images/request | concurrency | median img/s | best img/s | against the first variant (median of the rounds' ratios) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for per_request, concurrency in loads:
        first = rates[(variants[0].name, per_request, concurrency)]
        for variant in variants:
            measured = rates[(variant.name, per_request, concurrency)]
            ratio = statistics.median(a / max(b, 1e-9) for a, b in zip(measured, first))
            print(
                f"| {variant.name} | {per_request} | {concurrency} | {statistics.median(measured):,.0f} | {max(measured):,.0f} | {ratio:.2f}× |"
            )
    print("\n| variant | memory after the loads (median) |\n| --- | ---: |")
    for variant in variants:
        print(f"| {variant.name} | {statistics.median(memory[variant.name]):,.0f} MiB |")


if __name__ == "__main__":
    main()
