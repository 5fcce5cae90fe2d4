"""Offline scoring on Apache Spark: the same decode and scoring code as the local engine, per partition.

    cifar10 score INPUT --model NAME --output OUT --engine spark [--master URL]

The bundle folder and the code executors run (the `bundle` and `scoring` packages) travel with the
job (SparkContext addFile / addPyFile): nothing is assumed on their disks but Python and this project's
requirements. Each Python worker loads the bundle once and scores its partitions with
`DataFrame.mapInPandas`, a chunk at a time, through `scoring.local.score_chunk`. The output is a
Parquet folder written by Spark under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import zipfile
from functools import cache
from pathlib import Path

from bundle.images import DEFAULT_LIMITS
from bundle.runtime import Bundle, read_manifest
from scoring.inputs import Columns, InputError, Record, folder_records
from scoring.local import Options, ScoringError, Summary, record_pixels, schema, score_chunk


@cache
def _worker_bundle(name: str, precision: str) -> Bundle:
    """One bundle per Python worker, from the copy Spark shipped with the job.

    Spark runs a task per core, so each session gets the task's cores (spark.task.cpus, 1 by
    default), not onnxruntime's default of every core on the machine.
    """
    from pyspark import SparkFiles, TaskContext

    return Bundle.load(SparkFiles.get(name), threads=TaskContext.get().cpus(), precision=precision)


def _score_partitions(bundle_name: str, options: Options, chunk: int):
    import pandas as pd

    def score_frames(frames):
        bundle = _worker_bundle(bundle_name, options.precision)
        classes = bundle.manifest.classes
        index = {name: i for i, name in enumerate(classes)} | {str(i): i for i in range(len(classes))}
        for frame in frames:
            for start in range(0, len(frame), chunk):
                part = frame.iloc[start : start + chunk]
                records = [
                    Record(i, content if content is not None else Path(path) if path is not None else b"", index.get(label))
                    for i, content, path, label in zip(part["id"], part["content"], part["path"], part["label"])
                ]
                decoded = [record_pixels(r, DEFAULT_LIMITS) for r in records]
                yield pd.DataFrame(score_chunk(bundle, records, decoded, options))

    return score_frames


def _input_frame(spark, source: Path, columns: Columns, classes: tuple[str, ...]):
    """A DataFrame of (id, content: image bytes or null, path: a file to read or null, label name or null)."""
    from pyspark.sql import functions as F

    none = F.lit(None)
    if source.is_dir():  # listed here as the local engine lists it (Spark's own file source drops empty files)
        rows = [(r.id, None, str(r.source), classes[r.label] if r.label is not None else None) for r in folder_records(source, classes)]
        return spark.createDataFrame(rows, "id string, content binary, path string, label string")
    if source.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(f"the spark engine reads a folder of images or a .csv/.parquet table, not {source}; use --engine local")
    frame = spark.read.parquet(str(source)) if source.suffix.lower() == ".parquet" else spark.read.option("header", True).csv(str(source))
    names = frame.columns
    if columns.image in names:
        content, path = F.col(columns.image), none.cast("string")
    elif columns.path in names:  # read by the executors: the paths must be on storage they can see
        column = F.col(columns.path)
        content = none.cast("binary")
        path = F.when(column.startswith("/"), column).otherwise(F.concat(F.lit(str(source.resolve().parent) + "/"), column))
    else:
        raise InputError(f"{source}: no column {columns.image!r} (image bytes) or {columns.path!r} (paths); it has {', '.join(names)}")
    id_ = F.col(columns.id).cast("string") if columns.id in names else (path if columns.path in names else F.monotonically_increasing_id().cast("string"))
    label = F.col(columns.label).cast("string") if columns.label in names else none.cast("string")
    return frame.select(id_.alias("id"), content.alias("content"), path.alias("path"), label.alias("label"))


EXECUTOR_PACKAGES = ("bundle", "scoring")  # what a Python worker imports to score a partition


def _package_zip(folder: Path) -> Path:
    """The packages executors import, as one zip for addPyFile, so they run this very code."""
    root = Path(__file__).resolve().parents[1]
    archive = folder / "cifar10-scoring.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for package in EXECUTOR_PACKAGES:
            for path in (root / package).glob("*.py"):
                zf.write(path, f"{package}/{path.name}")
    return archive


def score_spark(
    source: Path, bundle_dir: Path, output: Path, options: Options, columns: Columns,
    master: str = "local[*]", chunk: int = 1024,
) -> Summary:  # fmt: skip
    """Score `source` on Spark into the Parquet folder `output`; an existing `output` is refused."""
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    if output.exists():
        raise ScoringError(f"{output} exists; the spark engine writes a new Parquet folder: remove it or choose another --output")
    if output.suffix.lower() == ".csv":
        raise ScoringError("the spark engine writes Parquet (a folder of part files); give --output a .parquet name")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this interpreter's packages
    spark = (
        SparkSession.builder.master(master).appName("cifar10-score")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.showConsoleProgress", "true")
        .getOrCreate()
    )  # fmt: skip
    staging = output.with_name(f".{output.name}.spark-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spark.sparkContext.addPyFile(str(_package_zip(Path(tmp))))
        spark.sparkContext.addFile(str(bundle_dir.resolve()), recursive=True)
        frame = _input_frame(spark, source, columns, read_manifest(bundle_dir).classes)
        spark_schema = from_arrow_schema(schema(options))  # the local engine's columns, as Spark types
        scored = frame.mapInPandas(_score_partitions(bundle_dir.resolve().name, options, chunk), schema=spark_schema)
        scored.write.parquet(str(staging))
    os.replace(staging, output)  # the folder appears only when Spark finished writing it
    seconds = time.perf_counter() - started
    written = spark.read.parquet(str(output))
    counts = written.agg(
        F.count("*").alias("rows"),
        F.sum(F.col("error").isNotNull().cast("int")).alias("failed"),
        F.sum((F.col("true_label").isNotNull() & F.col("label").isNotNull()).cast("int")).alias("labelled"),
        F.sum((F.col("true_label") == F.col("label")).cast("int")).alias("correct"),
    ).first()
    failures = [f"{r['id']}: {r['error']}" for r in written.where(F.col("error").isNotNull()).select("id", "error").limit(10).collect()]
    labelled = counts["labelled"] or 0
    return Summary(
        rows=counts["rows"], failed=counts["failed"] or 0, new=counts["rows"], seconds=seconds,
        accuracy=(counts["correct"] or 0) / labelled if labelled else None, labelled=labelled,
        output=str(output), failures=failures,
    )  # fmt: skip
