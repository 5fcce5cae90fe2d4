"""`cifar10 score --engine spark`: a thin layer on `scoring.spark.with_predictions`.

    cifar10 score INPUT --model NAME --output OUT.parquet --engine spark [--master spark://host:7077]

Executors read the inputs, so the driver never touches an image: folders and globs through Spark's
`binaryFile` source, tables through Spark's Parquet and CSV readers, at any Hadoop file system URI
(`hdfs://`, `s3a://`, `file:/`); the paths in a table of paths are opened as local files. Spark writes the output, a Parquet folder of part files,
through its commit protocol: `_SUCCESS` appears only when every row is in. A re-run finds the
folder complete (nothing to do; refused if its schema records other options) or left by a failed
run (written again from scratch: the output never holds a row twice).
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bundle.images import DEFAULT_LIMITS
from bundle.runtime import read_manifest
from scoring.inputs import FILE_URI, IMAGE_SUFFIXES, INTEGRAL, Columns, InputError, walk
from scoring.local import Options, ScoringError, Summary, check_same, schema
from scoring.spark import with_predictions

GLOB = re.compile(r"[*?\[{]")
SPARK_OUTPUT = re.compile(r"\.?part-.*|_temporary|_started_.*|_committed_.*|\._SUCCESS\.crc")  # what a job leaves before _SUCCESS
# Spark packs small files into a partition up to 128 MB, counting each at this many bytes: about
# 256 images a task, so tasks are short enough to spread evenly and cheap to redo after a failure
OPEN_COST = "512k"
OPTIONS_KEY = "cifar10_score_options"  # the run's Options, in the id column's metadata of the output's schema


def score_spark(
    source: str, bundle_dir, output: str, options: Options, columns: Columns, master: str = "local[*]", chunk: int = 1024,
    max_pixels: int = DEFAULT_LIMITS.max_pixels,
) -> Summary:  # fmt: skip
    """Score `source` (a folder, glob, .parquet or .csv, local path or URI) into the Parquet folder `output`."""
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    if output.lower().endswith(".csv"):
        raise ScoringError("the spark engine writes Parquet (a folder of part files); give --output a .parquet name")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this interpreter's packages
    ours = SparkSession.getActiveSession() is None
    spark = (
        SparkSession.builder.master(master).appName("cifar10-score")
        .config("spark.sql.files.openCostInBytes", OPEN_COST)
        .config("spark.ui.showConsoleProgress", "true")
        .getOrCreate()
    )  # fmt: skip
    try:
        state = output_state(spark, output)
        if state == "complete":
            found = spark.read.parquet(output).schema
            earlier = found["id"].metadata.get(OPTIONS_KEY) if "id" in found.names else None
            if earlier is None:
                raise ScoringError(
                    f"{output} holds a finished Parquet folder without the record of the options that made it (an output of an "
                    "earlier cifar10 version, or of another tool); choose another --output or remove it"
                )
            check_same(earlier, options, f"{output} holds a finished run", "choose another --output or remove it")
            return Summary(output=output)
        if state == "failed":
            print(f"{output} has no _SUCCESS marker: the output of a failed run; writing it again from scratch", file=sys.stderr)
        started = time.perf_counter()
        frame, images = input_frame(spark, source, columns, read_manifest(bundle_dir).classes)
        try:
            scored = with_predictions(
                frame, bundle_dir, topk=options.topk, embeddings=options.embeddings, knn=options.knn,
                precision=options.precision, batch_size=chunk, max_pixels=max_pixels, **images,
            )  # fmt: skip
        except ValueError as exc:  # e.g. a CSV column of image bytes, which CSV cannot hold
            raise InputError(f"{source}: {exc}") from None
        # the options travel in the output's own schema, as the id column's metadata
        described = F.col("id").alias("id", metadata={OPTIONS_KEY: asdict(options)})
        scored.select(described, *schema(options).names[1:]).write.mode("overwrite").parquet(output)
        return summarize(spark, output, time.perf_counter() - started)
    finally:
        if ours:
            spark.stop()


def input_frame(spark, source: str, columns: Columns, classes: tuple[str, ...]) -> tuple[object, dict[str, str]]:
    """A DataFrame of (id, true_label, the images as bytes or paths), and with_predictions' argument naming the images' column."""
    from pyspark.sql import functions as F

    suffix = source.rstrip("/").lower().rsplit(".", 1)[-1]
    if suffix in ("parquet", "csv"):
        return _table(spark, source, columns, classes)
    if re.fullmatch(r".*(data_batch_\d+|test_batch)", source):
        raise InputError(f"{source}: CIFAR-10 batch files are for --engine local")
    # ids are paths under the folder, or under the folder above a glob's first wildcard
    root = _uri(os.path.dirname(GLOB.split(source, 1)[0]) or "." if GLOB.search(source) else source.rstrip("/"))
    reader = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")  # class folders are not Hive partitions
        .option("pathGlobFilter", suffix_glob())
    )  # fmt: skip
    images = _read(lambda: reader.load(_uri(source)), source)
    warn_of_underscores(source)
    if images.select("path").isEmpty():  # binaryFile reads no content for a query without it
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {source}")
    path = F.regexp_replace(F.col("path"), "^file:///", "file:/")
    id_ = F.when(path.startswith(root + "/"), path.substr(len(root) + 2, 1 << 30)).otherwise(path)
    parent = F.element_at(F.split(id_, "/"), -2)
    label = F.when(F.size(F.split(id_, "/")) > 1, F.when(parent.isin(*classes), parent))
    return images.select(id_.alias("id"), label.alias("true_label"), F.col("content")), {"image_column": "content"}


def _table(spark, source: str, columns: Columns, classes: tuple[str, ...]) -> tuple[object, dict[str, str]]:
    from pyspark.sql import functions as F

    if source.rstrip("/").lower().endswith(".parquet"):
        frame = _read(lambda: spark.read.parquet(_uri(source)), source)
    else:
        frame = _read(lambda: spark.read.option("header", True).csv(_uri(source)), source)
    names = frame.columns
    if columns.image in names:
        images, argument = F.col(columns.image).alias("content"), {"image_column": "content"}
        id_ = F.col(columns.id).cast("string") if columns.id in names else F.concat(F.lit("row "), F.monotonically_increasing_id().cast("string"))
    elif columns.path in names:  # relative paths are relative to the table's folder, as in the local engine
        if not _uri(source).startswith("file:"):
            raise InputError(f"{source}: executors open a table's paths as local files; give a local table, or a column of image bytes")
        column = F.col(columns.path)
        folder = _uri(source).rsplit("/", 1)[0].removeprefix("file:")
        local = F.regexp_replace(column, FILE_URI, "")  # percent-encoded names are read as scoring.local.read_file reads them
        path = F.when(local.startswith("/"), local).otherwise(F.concat(F.lit(folder + "/"), local))
        images, argument = path.alias("path"), {"path_column": "path"}
        id_ = F.col(columns.id).cast("string") if columns.id in names else path
    else:
        raise InputError(
            f"{source}: no column {columns.image!r} (image bytes) or {columns.path!r} (paths); it has {', '.join(names)}. "
            f"Name yours with --image-column or --path-column."
        )
    label = _true_label(frame, columns.label, classes) if columns.label in names else F.lit(None).cast("string")
    return frame.select(id_.alias("id"), label.alias("true_label"), images), argument


def _read(load, source: str):
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import AnalysisException

    try:
        return load()
    except AnalysisException as exc:  # no such path, not a table
        raise InputError(f"{source}: Spark cannot read it ({str(exc).splitlines()[0]})") from None
    except Py4JJavaError as exc:  # e.g. a URI scheme without its Hadoop file system (s3a:// needs hadoop-aws)
        raise InputError(f"{source}: Spark cannot read it ({str(exc.java_exception).splitlines()[0]})") from None


def _true_label(frame, name: str, classes: tuple[str, ...]):
    """A class name or index in the table, as a class name; anything else stops the run, as in the local engine."""
    from pyspark.sql import functions as F

    value = F.regexp_replace(F.trim(F.col(name).cast("string")), INTEGRAL, "$1")  # a float column's 3.0 is index 3
    names = {c: c for c in classes} | {str(i): c for i, c in enumerate(classes)}
    mapping = F.create_map(*[F.lit(x) for pair in names.items() for x in pair])
    bad = frame.where(F.col(name).isNotNull() & mapping[value].isNull()).select(name).limit(1).collect()
    if bad:
        raise InputError(f"label {bad[0][0]!r} is neither a class name ({', '.join(classes)}) nor an index 0..{len(classes) - 1}")
    return mapping[value]


def warn_of_underscores(source: str) -> None:
    """Spark's file listing passes over names that start with '_' (Hadoop's hidden files; a camera's
    _DSC0001.JPG too), and whatever is in such a folder, with no word: say so for a local folder, where
    the driver can count them."""
    if not os.path.isdir(source):
        return
    root = Path(source)
    images = (p.relative_to(root) for p in walk(root).files if p.suffix.lower() in IMAGE_SUFFIXES)
    if skipped := [p for p in images if any(part.startswith("_") for part in p.parts)]:
        print(f"{len(skipped):,} images under {source} have a name or folder starting with '_' (e.g. {skipped[0]}), which Spark's "
              "file listing leaves out; --engine local scores them", file=sys.stderr)  # fmt: skip


def suffix_glob() -> str:
    """Hadoop's glob for the image suffixes, in any letter case: *.{[pP][nN][gG],…}."""
    either = lambda suffix: "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in suffix)  # noqa: E731
    return "*.{" + ",".join(either(s.lstrip(".")) for s in IMAGE_SUFFIXES) + "}"


def _uri(location: str) -> str:
    """A local path as the file: URI Spark reports; a URI as given."""
    if "://" in location or location.startswith("file:"):
        return location.replace("file:///", "file:/")
    return "file:" + os.path.abspath(location)


def output_state(spark, output: str) -> str:
    """'absent', 'complete' (Spark's _SUCCESS marker is there) or 'failed' (part files without it).

    Anything else at `output` is refused rather than overwritten: a file, or a folder holding more
    than a Spark job writes."""
    from py4j.protocol import Py4JJavaError

    jvm = spark.sparkContext._jvm  # Hadoop's FileSystem: the one view of any URI Spark writes to
    path = jvm.org.apache.hadoop.fs.Path(output)
    try:
        fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    except Py4JJavaError as exc:  # e.g. s3a:// without hadoop-aws on the class path
        raise ScoringError(f"{output}: Spark has no file system for it ({str(exc.java_exception).splitlines()[0]})") from None
    if not fs.exists(path):
        return "absent"
    if fs.exists(jvm.org.apache.hadoop.fs.Path(path, "_SUCCESS")):
        return "complete"
    names = [status.getPath().getName() for status in fs.listStatus(path)] if fs.getFileStatus(path).isDirectory() else None
    if names is None or not all(SPARK_OUTPUT.fullmatch(name) for name in names):
        raise ScoringError(f"{output} exists and is not the output of a Spark job; choose another --output or remove it")
    return "failed"


def summarize(spark, output: str, seconds: float) -> Summary:
    from pyspark.sql import functions as F

    written = spark.read.parquet(output)
    counts = written.agg(
        F.count("*").alias("rows"),
        F.sum(F.col("error").isNotNull().cast("int")).alias("failed"),
        F.sum((F.col("true_label").isNotNull() & F.col("label").isNotNull()).cast("int")).alias("labelled"),
        F.sum((F.col("true_label") == F.col("label")).cast("int")).alias("correct"),
    ).first()
    failures = [f"{r['id']}: {r['error']}" for r in written.where(F.col("error").isNotNull()).select("id", "error").limit(10).collect()]
    return Summary(
        rows=counts["rows"], failed=counts["failed"] or 0, new=counts["rows"], seconds=seconds,
        labelled=counts["labelled"] or 0, correct=counts["correct"] or 0,
        output=output, failures=failures,
    )  # fmt: skip
