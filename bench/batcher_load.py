"""The batcher alone, in process: images/s of concurrent requests through serving.batching.Batcher.

    python -m bench.batcher_load --sessions 1 2
    git worktree add /tmp/before ec2ef58
    python -m bench.batcher_load --variant before=/tmp/before --variant after=.

No HTTP and no decoding: what the batcher's scheduling of onnxruntime calls costs or buys. Clients
alternate between requests of each size in `--images` (by default a 64-image request and a lone
image). Each variant (a source tree's serving/batching.py) runs at each session count in turn,
in alternating rounds; printed: every measurement, then the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np

from bench.harness import REPO
from bench.http_load import machine
from bundle.runtime import Bundle


def batcher_class(tree: Path):
    spec = importlib.util.spec_from_file_location(f"batching_{abs(hash(tree))}", tree / "serving" / "batching.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Batcher


def rate(batcher, sizes: list[int], concurrency: int, seconds: float) -> float:
    pixels = {n: np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in sizes}

    async def run() -> float:
        done, stop = 0, time.perf_counter() + seconds

        async def client(i: int) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                n = sizes[i % len(sizes)]
                await batcher.predict(pixels[n])
                done += n
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        return done / (time.perf_counter() - start)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="airbench")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=TREE", help="a source tree's batcher (default: this one)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[2])
    parser.add_argument("--images", type=int, nargs="+", default=[64, 1], help="request sizes the clients take in turn")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) or {"this tree": "."}
    bundles = {n: Bundle.load(REPO / "models" / args.model, threads=args.threads, spinning=False, sessions=n) for n in args.sessions}
    classes = {name: batcher_class(Path(tree)) for name, tree in variants.items()}
    print(f"machine: {machine()}; {args.model}, requests of {args.images} images in turn, concurrency {args.concurrency}, calls of up to {args.max_batch_size}")
    rates: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for name, batcher in classes.items():
            for sessions, bundle in bundles.items():
                measured = rate(batcher(bundle, args.max_batch_size, 0), args.images, args.concurrency, args.seconds)
                rates.setdefault((name, sessions), []).append(measured)
                print(f"round {r + 1} | {name} | sessions {sessions} | {measured:.1f} img/s", flush=True)
    print("\n| variant | sessions | median img/s |\n| --- | ---: | ---: |")
    for (name, sessions), measured in rates.items():
        print(f"| {name} | {sessions} | {statistics.median(measured):.1f} |")


if __name__ == "__main__":
    main()
