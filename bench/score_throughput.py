"""Offline scoring throughput: `cifar10 score` local and on a Spark standalone cluster on the 10,000
test images as PNG files, against onnxruntime in process on the same images already decoded (what
decoding, I/O and the engine cost).

    python -m bench.score_throughput [--model airbench] [--data-dir DIR] [--folder /tmp/cifar10-test-png]
                                     [--master spark://host:7077] [--rounds 2]

The PNG folder (class/NNNNN.png) is written once and reused. Without --master, the benchmark starts
its own cluster from PySpark's scripts (a master and two 1-core workers on 127.0.0.1, as
docs/batch-scoring.md starts one by hand). In-process onnxruntime (warmed, threads spinning: the
best it does with nothing else to run) and the two engines take turns in each round, each engine
into a fresh output; the table gives the median images/s and the accuracy against the bundle
manifest's own.
It prints first what reading and decoding one PNG cost on one thread: the work the engines add to
the model's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.http_load import machine
from bench.spark_cluster import StandaloneCluster
from bundle.images import decode
from bundle.runtime import Bundle
from scoring.inputs import Columns, read_inputs
from scoring.local import Options, score
from scoring.spark_job import score_spark
from training.data import load_cifar10


def write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, classes) -> None:
    if len(list(folder.rglob("*.png"))) == len(images):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        path = folder / classes[label] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        path.write_bytes(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="airbench")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--data-dir")
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "cifar10-test-png"))
    parser.add_argument("--master", help="a running cluster's master URL (default: start 2 workers x 1 core here)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    data = load_cifar10(args.data_dir)
    images = data.test.images.permute(0, 2, 3, 1).contiguous().numpy()
    labels = data.test.labels.numpy()
    folder = Path(args.folder)
    write_pngs(folder, images, labels, data.classes)
    bundle_dir = Path(args.models_dir) / args.model
    bundle = Bundle.load(bundle_dir)  # spinning threads: the best onnxruntime can do with nothing else to run
    stated = bundle.manifest.accuracy.onnx
    print(f"machine: {machine()}; bundle {args.model} ({bundle.manifest.architecture}, TTA {bundle.manifest.test_time_augmentation}), "
          f"manifest accuracy {stated:.2%}; {len(images):,} test images as PNG in {folder}")  # fmt: skip
    rows = []

    files = sorted(folder.rglob("*.png"))
    start = time.perf_counter()
    blobs = [p.read_bytes() for p in files]
    read = time.perf_counter()
    decoded = np.stack([decode(blob) for blob in blobs])
    per_image = lambda seconds: f"{seconds / len(files) * 1e6:,.0f} µs"  # noqa: E731
    print(f"per image on one thread: reading the file {per_image(read - start)}, decoding {per_image(time.perf_counter() - read)}")
    truth = np.array([data.classes.index(p.parent.name) for p in files])
    in_process = "onnxruntime in process, decoded arrays"
    bundle.predict(decoded[:256])  # warm: the arena grows on the first call

    def in_process_rate() -> float:
        start = time.perf_counter()
        predicted = bundle.predict(decoded).logits.argmax(1)
        rate = len(files) / (time.perf_counter() - start)
        assert abs(float((predicted == truth).mean()) - stated) < 5e-5, "in process, the manifest's accuracy"
        return rate

    options = Options(args.model, bundle.manifest.version, str(folder))
    scorer = Bundle.load(bundle_dir, spinning=False)  # as `cifar10 score` loads it
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if not args.master:  # a cluster on this machine: the driver too stays on the loopback
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        master = args.master or stack.enter_context(StandaloneCluster(workers=2, cores=1)).url
        cluster = f"cifar10 score --engine spark, {'cluster ' + args.master if args.master else 'standalone cluster, 2 workers x 1 core'}"
        rates: dict[str, list[float]] = {in_process: [], "cifar10 score --engine local": [], cluster: []}
        for round_ in range(args.rounds):
            rates[in_process].append(in_process_rate())
            local = score(read_inputs(folder, bundle.manifest.classes), scorer, Path(tmp) / f"local{round_}.parquet", options)
            rates["cifar10 score --engine local"].append(local.images_per_second)
            started = time.perf_counter()
            spark = score_spark(str(folder), bundle_dir, str(Path(tmp) / f"spark{round_}.parquet"), options, Columns(), master=master)
            rates[cluster].append(spark.images_per_second)
            print(f"round {round_ + 1}: local {local.images_per_second:,.0f} images/s, cluster {spark.images_per_second:,.0f} images/s "
                  f"({spark.seconds:.1f} s of {time.perf_counter() - started:.1f} s with the session's start)", flush=True)  # fmt: skip
            assert local.accuracy == spark.accuracy and local.rows == spark.rows == len(files)
        rows += [(name, float(np.median(values)), local.accuracy) for name, values in rates.items()]
        rows.append(("local / in process", rows[1][1] / rows[0][1], None))
        rows.append(("cluster / local", rows[2][1] / rows[1][1], None))

    print("\n| path | images/s | accuracy | = manifest |")
    print("| --- | ---: | ---: | --- |")
    for name, rate, accuracy in rows:
        if accuracy is None:
            print(f"| {name} | {rate:.0%} | | |")
        else:
            print(f"| {name} | {rate:,.0f} | {accuracy:.2%} | {'yes' if abs(accuracy - stated) < 5e-5 else 'NO'} |")


if __name__ == "__main__":
    main()
