"""What a bigger onnxruntime call buys and costs: images/s and the memory its session keeps, by batch size.

    python -m bench.batch_memory [--models airbench cnn] [--batches 8 16 32 64] [--rounds 2] [--seconds 4]

Each measurement runs in a fresh process, which loads the bundle as the service does (its threads
shared among the workers, threads asleep between calls), runs calls of one batch size for
--seconds, and reports images/s and how much its resident memory grew: onnxruntime's arena keeps
the memory of the largest call a session has run. Batch sizes alternate within each round; the
table gives the median rate and the largest growth. It is what `CIFAR10_MAX_BATCH_SIZE` trades.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from bench.harness import REPO
from bench.http_load import machine


def measure(bundle: str, batch: int, seconds: float) -> tuple[float, float]:
    """(images/s, MiB the process grew by), in the calling process: run it in a fresh one."""
    import numpy as np
    import psutil

    from bundle.runtime import Bundle
    from serving.settings import Settings

    model = Bundle.load(REPO / "models" / bundle, threads=Settings().threads, spinning=False)
    before = psutil.Process().memory_info().rss
    pixels = np.zeros((batch, 32, 32, 3), np.uint8)
    model.predict(pixels)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict(pixels)
        count += batch
    return count / (time.perf_counter() - start), (psutil.Process().memory_info().rss - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["airbench", "cnn"])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()

    print(f"machine: {machine()}; {args.rounds} alternating rounds of {args.seconds:g} s per batch size")
    print("| bundle | images per call | images/s (median) | memory the session kept |\n| --- | ---: | ---: | ---: |")
    spawn = multiprocessing.get_context("spawn")
    for bundle in args.models:
        rates: dict[int, list[float]] = {}
        grown: dict[int, list[float]] = {}
        for _ in range(args.rounds):
            for batch in args.batches:
                with ProcessPoolExecutor(1, mp_context=spawn) as fresh:
                    rate, mib = fresh.submit(measure, bundle, batch, args.seconds).result()
                rates.setdefault(batch, []).append(rate)
                grown.setdefault(batch, []).append(mib)
        for batch in args.batches:
            print(f"| `{bundle}` | {batch} | {statistics.median(rates[batch]):,.0f} | {max(grown[batch]):,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
