"""Time a bundle's KNN head per call, as the service calls it: `Bundle.knn` for the vote and the 5 nearest rows.

    python -m bench.knn_head
    git show 8ee40ab:models/airbench/knn.pkl > /tmp/airbench.pkl; git show 8ee40ab:models/cnn/knn.pkl > /tmp/cnn.pkl
    python -m bench.knn_head --pickles /tmp/airbench.pkl /tmp/cnn.pkl     # beside the scikit-learn heads of before

The queries are random embeddings of the bundle's width (a search costs the same whatever they
hold). With --pickles (needs scikit-learn, which the project no longer installs), each bundle's
old scikit-learn Pipeline is timed on the same queries in alternating rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.http_load import machine
from bundle.runtime import Bundle

ROWS = (1, 8, 256)


def per_call_ms(call, rows: int) -> float:
    call()  # warm
    repeats = max(1, 64 // rows)
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1000


def medians(bundle: Bundle, old, rows: int, rounds: int, rng: np.random.Generator) -> list[float]:
    """Median ms per call of the NumPy head, then of the old Pipeline if given, in alternating rounds."""
    queries = rng.normal(size=(rows, bundle.manifest.embedding_dim)).astype(np.float32)
    ways = [lambda: bundle.knn(queries, 5)]
    if old is not None:  # what Bundle.knn did with it: the Pipeline's vote, then its 5 nearest
        ways.append(lambda: (old.predict_proba(queries), old[-1].kneighbors(old[:-1].transform(queries), 5)))
    times: list[list[float]] = [[] for _ in ways]
    for _ in range(rounds):
        for call, measured in zip(ways, times):
            measured.append(per_call_ms(call, rows))
    return [statistics.median(measured) for measured in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["models/airbench", "models/cnn"])
    parser.add_argument("--pickles", nargs="*", default=[], help="each bundle's scikit-learn knn.pkl of before, in --models' order")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.pickles and len(args.pickles) != len(args.models):
        raise SystemExit("--pickles: one per bundle in --models, in the same order")
    print(f"machine: {machine()}; {args.rounds} alternating rounds, median ms per call\n")
    print("| bundle | rows per call | NumPy head |" + (" scikit-learn Pipeline |" if args.pickles else ""))
    print("| --- | ---: | ---: |" + (" ---: |" if args.pickles else ""))
    rng = np.random.default_rng(0)
    for i, folder in enumerate(args.models):
        bundle = Bundle.load(Path(folder))
        old = None
        if args.pickles:
            import joblib  # scikit-learn's persistence, installed with it

            old = joblib.load(args.pickles[i])
        for rows in ROWS:
            cells = " | ".join(f"{ms:.1f}" for ms in medians(bundle, old, rows, args.rounds, rng))
            print(f"| {bundle.manifest.name} | {rows} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
