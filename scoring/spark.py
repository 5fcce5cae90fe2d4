"""A bundle's predictions as Spark columns, on any master: the Python API for users' own DataFrames.

    from scoring.spark import with_predictions

    images = spark.read.format("binaryFile").load("s3a://bucket/photos/")
    scored = with_predictions(images, "models/airbench", topk=3)   # reads the `content` column
    scored.drop("content").write.parquet("s3a://bucket/scored/")

Built on Spark's own convention for model inference, `pyspark.ml.functions.predict_batch_udf`: each
Python worker loads the bundle once and is fed numpy batches, which go through the same decoder and
the same `scoring.local.predict_columns` as the local engine. The bundle folder travels with the
job as a zip archive (`SparkContext.addArchive`, which every master accepts, unlike a folder given
to `addFile`), and so does the code executors run (the `bundle`, `scoring` and `cifar10` packages, through
`addPyFile`): executors need Python with this project's requirements and nothing on their disks.
Each executor checks the bundle's hashes when it loads it, as `Bundle.load` always does.
"""

from __future__ import annotations

import atexit
import hashlib
import re
import shutil
import tempfile
import zipfile
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np

from bundle.images import DEFAULT_LIMITS, Limits
from bundle.runtime import Bundle, verify
from scoring.inputs import Record
from scoring.local import Options, predict_columns, record_pixels, schema

PIXELS_SETTING = "max_pixels, cifar10 score --max-pixels"  # what a refusal of too large an image names to raise

EXECUTOR_PACKAGES = ("bundle", "scoring", "cifar10")  # what a Python worker imports to score a batch (cifar10: its files and errors)

_shipped: set[tuple[str, str]] = set()  # (Spark application id, file name): each is added to a job once


@cache
def _staging() -> Path:
    """Where the driver keeps the files it serves to executors, until it exits (made on the driver only)."""
    folder = Path(tempfile.mkdtemp(prefix="cifar10-spark-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def with_predictions(
    frame, bundle: str | Path, *, image_column: str = "content", path_column: str | None = None, topk: int = 0,
    embeddings: bool = False, knn: bool = False, precision: str = "fp32", batch_size: int = 256,
    max_pixels: int = DEFAULT_LIMITS.max_pixels,
):  # fmt: skip
    """`frame` with the prediction columns of `cifar10 score` appended (docs/batch-scoring.md).

    The images are encoded bytes in `image_column` (binary), or, with `path_column`, image files every
    executor can open at those paths. The columns added: `label`, `index`, `probability` (the
    bundle's calibrated probability of that label); `topk_labels` and `topk_probabilities` with
    `topk`; `embedding`; `knn_label`, `knn_neighbours`, `knn_distances` with `knn`; and `error`,
    null or why the row's image could not be read or decoded. A bad image never fails the job: its
    row gets `error` and nulls. `batch_size` images per call of the predictor, which onnxruntime takes in calls of at most 256.
    An image that decodes to more than `max_pixels` (width × height, from its header) is such a row.
    """
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    folder = Path(bundle)
    manifest, _ = verify(folder, precision)  # on the driver first: a clear BundleError before any task runs
    options = Options(folder.name, manifest.version, "", topk, embeddings, knn, precision)
    column = _input_column(frame, image_column, path_column)
    if not 0 <= topk <= len(manifest.classes) or batch_size < 1:
        raise ValueError(f"topk must lie in 0..{len(manifest.classes)} and batch_size be at least 1, got {topk} and {batch_size}")
    limits = replace(DEFAULT_LIMITS, max_pixels=max_pixels, pixels_setting=PIXELS_SETTING)
    predicted = prediction_schema(options)
    clash = sorted({n.lower() for n in predicted.names} & {c.lower() for c in frame.columns})  # Spark ignores case by default
    if clash:
        raise ValueError(f"the DataFrame already has the column(s) {', '.join(clash)} that predictions add; rename them first (withColumnRenamed)")

    alias = ship(frame.sparkSession.sparkContext, folder)
    predict = predict_batch_udf(
        _predictor(alias, options, reads_paths=path_column is not None, limits=limits),
        return_type=from_arrow_schema(predicted),
        batch_size=batch_size,
    )
    struct = "__cifar10_prediction"
    scored = frame.withColumn(struct, predict(F.col(f"`{column}`")))
    ok = F.col(f"{struct}.error").isNull()
    added = [
        (F.when(ok, F.col(f"{struct}.{f.name}")) if _is_list(f) else F.col(f"{struct}.{f.name}")).alias(f.name) for f in predicted
    ]  # list columns carry fillers for failed rows (predict_batch_udf wants 2-D arrays): null them here
    return scored.select(*[F.col(f"`{c}`") for c in frame.columns], *added)


def _input_column(frame, image_column: str, path_column: str | None) -> str:
    from pyspark.sql.types import BinaryType, StringType

    name, wanted = (path_column, StringType()) if path_column is not None else (image_column, BinaryType())
    types = dict(frame.dtypes)
    if name not in types:
        raise ValueError(f"no column {name!r} in the DataFrame; it has {', '.join(frame.columns)}")
    if frame.schema[name].dataType != wanted:
        raise ValueError(f"column {name!r} is {types[name]}; it must be {wanted.simpleString()} ({'paths' if path_column else 'encoded image bytes'})")
    return name


def prediction_schema(options: Options):
    """The columns predictions add: the output schema less what the input says (id, true label)."""
    import pyarrow as pa

    full = schema(options)
    return pa.schema([f for f in full if f.name not in ("id", "true_label")])


def _is_list(field) -> bool:
    import pyarrow as pa

    return pa.types.is_list(field.type)


def _predictor(alias: str, options: Options, reads_paths: bool, limits: Limits):
    """make_predict_fn for predict_batch_udf: runs on an executor, once per Python worker."""

    def make_predict():
        from pyspark import SparkFiles, TaskContext

        # Spark runs a task per core, so the session gets the task's cores (spark.task.cpus, 1 by
        # default), not onnxruntime's default of every core on the machine
        bundle = Bundle.load(SparkFiles.get(alias), threads=TaskContext.get().cpus(), precision=options.precision)

        lists = {f.name for f in prediction_schema(options) if _is_list(f)}

        def predict(values: np.ndarray) -> dict[str, np.ndarray]:
            decoded = [_pixels(value, reads_paths, limits) for value in values]
            return {name: _as_array(column, name in lists) for name, column in predict_columns(bundle, decoded, options).items()}

        return predict

    return make_predict


def _pixels(value, reads_paths: bool, limits: Limits) -> np.ndarray | str:
    if value is None:
        return "no image: the input column is null"
    return record_pixels(Record("", Path(value) if reads_paths else bytes(value)), limits)


def _as_array(values: list, is_list: bool) -> np.ndarray:
    """A column as predict_batch_udf takes it: 1-D for scalars, 2-D for lists (failed rows padded)."""
    if not is_list:
        return np.array(values, dtype=object)
    width = next((len(v) for v in values if v is not None), 0)
    padded = np.empty((len(values), width), dtype=object)
    for i, v in enumerate(values):
        if v is not None:
            padded[i] = v
    return padded


def ship(context, folder: Path) -> str:
    """Add the bundle (as an archive) and the executors' code to the job; the name executors find the bundle under."""
    digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()[:12]
    alias = re.sub(r"[^A-Za-z0-9._-]", "_", f"{folder.resolve().name}-{digest}")  # another version, another archive; a URI fragment
    archive = _staging() / f"{alias}.zip"
    if (context.applicationId, archive.name) not in _shipped:
        shutil.make_archive(str(archive.with_suffix("")), "zip", folder)
        context.addArchive(f"{archive}#{alias}")
        _shipped.add((context.applicationId, archive.name))
    code = package_zip(_staging())
    if (context.applicationId, code.name) not in _shipped:
        context.addPyFile(str(code))
        _shipped.add((context.applicationId, code.name))
    return alias


def package_zip(folder: Path) -> Path:
    """The packages executors import, as one zip for addPyFile, so they run this very code."""
    root = Path(__file__).resolve().parents[1]
    archive = folder / "cifar10-scoring.zip"
    if not archive.exists():
        with zipfile.ZipFile(archive, "w") as zf:
            for package in EXECUTOR_PACKAGES:
                for path in (root / package).glob("*.py"):
                    zf.write(path, f"{package}/{path.name}")
    return archive
