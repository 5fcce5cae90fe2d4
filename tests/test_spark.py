"""Offline scoring on a real Spark standalone cluster: a master and two 1-core workers on 127.0.0.1,
started from PySpark's own scripts. The CLI's Spark engine and the DataFrame API give the local
engine's rows, corrupt files get error rows, and a worker killed mid-job costs nothing but time."""

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import csv

from bench.score_throughput import write_pngs
from bench.spark_cluster import StandaloneCluster, spark_home
from bundle.images import decode
from bundle.runtime import Bundle, BundleError
from cifar10.cli import main
from scoring.inputs import read_inputs
from scoring.local import Options, score
from tests.conftest import CLASSES, REPO

pytest.importorskip("pyspark")
MODELS = REPO / "models"


@pytest.fixture(scope="module", autouse=True)
def driver_jvm_stopped_after():
    """PySpark keeps its driver's JVM for the life of the Python process, spark.stop() or not; the
    tests after these get its memory and its background CPU back. It exits when its stdin closes."""
    yield
    from pyspark import SparkContext

    if SparkContext._gateway is not None:
        SparkContext._gateway.shutdown()
        SparkContext._gateway.proc.stdin.close()
        SparkContext._gateway.proc.wait(timeout=60)
        SparkContext._gateway = SparkContext._jvm = None  # a later session starts a new one


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as env, StandaloneCluster(workers=2, cores=1, memory="1g") as running:
        env.setenv("SPARK_LOCAL_IP", "127.0.0.1")  # the driver too: nothing leaves the loopback
        env.setenv("PYSPARK_PYTHON", sys.executable)  # executors need this project's requirements
        yield running


@pytest.fixture(scope="module")
def spark(cluster):
    """The test process as the driver of an application on the cluster, for the DataFrame API."""
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master(cluster.url).appName("tests")
        .config("spark.sql.files.openCostInBytes", "512k")  # as `cifar10 score` packs small files: ~256 a task
        .getOrCreate()
    )  # fmt: skip
    yield session
    session.stop()


def local_rows(source, output, model="cnn", topk=2) -> dict[str, dict]:
    bundle = Bundle.load(MODELS / model)
    options = Options(model, bundle.manifest.version, str(source), topk)
    score(read_inputs(source, bundle.manifest.classes), bundle, output, options, workers=2)
    return by_id(pq.read_table(output).to_pylist())


def by_id(rows) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


def assert_same_rows(spark: dict[str, dict], local: dict[str, dict]) -> None:
    assert sorted(spark) == sorted(local)
    for id_, row in spark.items():
        expected = local[id_]
        assert {k: v for k, v in row.items() if "probabilit" not in k} == {k: v for k, v in expected.items() if "probabilit" not in k}
        assert row["probability"] == pytest.approx(expected["probability"], abs=1e-6) if expected["probability"] is not None else row["probability"] is None


def spark_cli(source, output, cluster, *args) -> list[str]:
    return ["score", str(source), "--model", "cnn", "--output", str(output), "--engine", "spark", "--master", cluster.url,
            "--models-dir", str(MODELS), *args]  # fmt: skip


def test_the_cli_scores_a_folder_on_the_cluster_like_the_local_engine(cluster, folder, tmp_path, capsys):
    local = local_rows(folder, tmp_path / "local.parquet")
    output = tmp_path / "spark.parquet"
    assert main(spark_cli(folder, output, cluster, "--topk", "2")) == 0, capsys.readouterr().err
    assert "302 rows, 2 failed" in capsys.readouterr().out
    assert (output / "_SUCCESS").is_file()
    spark = by_id(pq.read_table(output).to_pylist())
    assert "dog/empty.jpg" not in spark  # Spark's file sources skip empty files (docs/batch-scoring.md)
    del local["dog/empty.jpg"]
    assert_same_rows(spark, local)
    assert "not an image" in spark["cat/broken.png"]["error"] and spark["cat/broken.png"]["label"] is None

    assert main(spark_cli(folder, output, cluster, "--topk", "2")) == 0  # finished: nothing to do
    assert "already complete" in capsys.readouterr().out
    assert main(spark_cli(folder, output, cluster)) == 1  # other options
    assert "holds a finished run with other options (topk: 2 then, 0 now)" in capsys.readouterr().err
    assert main(spark_cli(folder, output, cluster, "--topk", "2", "--precision", "int8")) == 1  # same columns, another graph
    assert "precision: 'fp32' then, 'int8' now" in capsys.readouterr().err


def test_the_cli_scores_tables_of_bytes_and_of_paths_on_the_cluster(spark, cluster, folder, tmp_path, capsys):
    """Parquet with image bytes, CSV with paths relative to the table, Parquet with file: URIs: each as the local engine scores it.

    The `spark` fixture's application is running, so the CLI joins it rather than starting its own."""
    files = sorted(folder.rglob("*.png"))
    files = [p for p in files if p.name in ("broken.png", "notes.txt.png")] + files[:118]
    ids = [str(p.relative_to(folder)) for p in files]
    labels = [p.parent.name if p.parent.name in CLASSES else None for p in files]
    pq.write_table(pa.table({"id": ids, "image": [p.read_bytes() for p in files], "label": labels}), tmp_path / "images.parquet")
    csv.write_csv(pa.table({"id": ids, "path": ids, "label": [CLASSES.index(x) if x else None for x in labels]}), folder / "paths.csv")
    # paths as file: URIs, written as binaryFile writes them (names as they are, 100%.png) and as Path.as_uri()
    # does (percent-encoded, my%20photo%2B1.png); labels as pandas writes integers with gaps (floats)
    names = ("my photo+1.png", "café.png", "100%.png", "a%20b.png")
    copies = [Path(shutil.copy(files[2 + i], tmp_path / name)) for i, name in enumerate(names)]
    written = [copies[0].as_uri(), copies[1].as_uri(), f"file:{copies[2]}", f"file:{copies[3]}"]
    uris = {"id": ids, "path": [f"file://{p}" for p in files[:2]] + written + [f"file://{p}" for p in files[6:]], "label": [float(CLASSES.index(x)) if x else None for x in labels]}
    pq.write_table(pa.table(uris), tmp_path / "uris.parquet")
    try:
        for table in (tmp_path / "images.parquet", folder / "paths.csv", tmp_path / "uris.parquet"):
            local = local_rows(table, tmp_path / f"local-{table.stem}.parquet")
            output = tmp_path / f"spark-{table.stem}.parquet"
            assert main(spark_cli(table, output, cluster, "--topk", "2")) == 0, capsys.readouterr().err
            assert_same_rows(by_id(pq.read_table(output).to_pylist()), local)
            assert sum(r["error"] is not None for r in local.values()) == 2 and sum(r["true_label"] is not None for r in local.values()) == 119  # broken.png is in cat/
    finally:
        (folder / "paths.csv").unlink()


def test_a_glob_reads_only_what_it_matches_with_ids_under_the_folder_above_it(spark, cluster, folder, tmp_path, capsys):
    local = {id_: row for id_, row in local_rows(folder, tmp_path / "local.parquet").items() if fnmatch.fnmatch(id_, "*/00*.png")}
    output = tmp_path / "spark.parquet"
    assert main(spark_cli(f"{folder}/*/00*.png", output, cluster, "--topk", "2")) == 0, capsys.readouterr().err
    assert_same_rows(by_id(pq.read_table(output).to_pylist()), local)
    assert len(local) == 100 and all(row["true_label"] == id_.split("/")[0] for id_, row in local.items())


@pytest.mark.parametrize(
    ("source", "output", "message"),
    [
        ("missing", "out.parquet", "Spark cannot read it"),
        ("images", "images", "is not the output of a Spark job"),  # never overwritten
        ("images", "dotfiles", "is not the output of a Spark job"),
        ("images", "out.csv", "writes Parquet"),
        ("bytes.csv", "out.parquet", "must be binary"),
    ],
)
def test_bad_spark_requests_are_one_line_errors(spark, cluster, folder, tmp_path, capsys, source, output, message):
    csv.write_csv(pa.table({"image": ["not bytes"]}), tmp_path / "bytes.csv")
    (tmp_path / "dotfiles" / ".git").mkdir(parents=True)
    paths = {"images": folder, "missing": tmp_path / "missing"}
    assert main(spark_cli(paths.get(source, tmp_path / source), paths.get(output, tmp_path / output), cluster)) == 1
    assert message in capsys.readouterr().err
    assert len(list(folder.rglob("*.png"))) == 302 and (tmp_path / "dotfiles" / ".git").is_dir()  # nothing removed


def test_a_rerun_after_a_failed_job_writes_the_output_again_without_duplicates(spark, cluster, folder, tmp_path, capsys):
    output = tmp_path / "spark.parquet"
    output.mkdir()  # what a failed job leaves: part files, no _SUCCESS
    pq.write_table(pa.table({"id": ["cat/0001.png"] * 3}), output / "part-00000-left-by-a-failed-job.parquet")
    assert main(spark_cli(folder, output, cluster)) == 0, capsys.readouterr().err
    assert "writing it again from scratch" in capsys.readouterr().err
    ids = pq.read_table(output).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 302


def test_the_dataframe_api_adds_the_bundles_predictions(spark, folder, tmp_path):
    from scoring.spark import with_predictions

    bundle = Bundle.load(MODELS / "cnn")
    images = spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("pathGlobFilter", "*.png").load(str(folder))
    scored = with_predictions(images, MODELS / "cnn", topk=3, embeddings=True, knn=True, batch_size=64)
    scored.drop("content").write.parquet(str(tmp_path / "scored.parquet"))
    rows = sorted(pq.read_table(tmp_path / "scored.parquet").to_pylist(), key=lambda r: r["path"])
    good = [r for r in rows if r["error"] is None]
    assert len(rows) == 302 and {r["path"].rsplit("/", 1)[1] for r in rows if r["error"]} == {"broken.png", "notes.txt.png"}
    assert all(r[c] is None for r in rows if r["error"] for c in ("label", "topk_labels", "embedding", "knn_neighbours"))

    pixels = np.stack([decode((folder / r["path"].split(str(folder) + "/")[1]).read_bytes()) for r in good])
    offline = bundle.predict(pixels)
    votes, _, neighbours, _ = bundle.knn(offline.embeddings, bundle.manifest.knn.k)
    assert [r["index"] for r in good] == offline.probabilities.argmax(1).tolist()
    assert np.allclose([r["probability"] for r in good], offline.probabilities.max(1), atol=1e-6)
    assert np.allclose([r["embedding"] for r in good], offline.embeddings, atol=1e-5)
    assert [r["topk_labels"][0] for r in good] == [r["label"] for r in good]
    assert [r["knn_label"] for r in good] == [CLASSES[i] for i in votes.argmax(1)]
    assert [r["knn_neighbours"] for r in good] == neighbours.tolist()

    capped = with_predictions(images.limit(3), MODELS / "cnn", max_pixels=1000).select("label", "error").collect()  # 32 × 32 is 1,024
    assert all(r["label"] is None and "32×32 is over 1,000 pixels (max_pixels, cifar10 score --max-pixels)" in r["error"] for r in capped)

    with pytest.raises(ValueError, match="already has the column"):
        with_predictions(images.withColumnRenamed("length", "label"), MODELS / "cnn")
    with pytest.raises(ValueError, match="must be binary"):
        with_predictions(images, MODELS / "cnn", image_column="path")
    with pytest.raises(ValueError, match="topk must lie in 0..10"):
        with_predictions(images, MODELS / "cnn", topk=11)
    with pytest.raises(BundleError, match="no bundle .no-bundle. in"):
        with_predictions(images, tmp_path / "no-bundle")


def test_a_worker_killed_mid_job_is_replaced_and_the_output_is_complete(spark, cluster, cifar, tmp_path):
    """1,000 images in tasks of 16: one worker is killed (with its executor) while both work."""
    from scoring.spark import with_predictions

    images, labels = cifar.test.images[:1000].permute(0, 2, 3, 1).numpy(), cifar.test.labels[:1000].numpy()
    write_pngs(tmp_path / "in", images, labels, CLASSES)
    killed = threading.Event()
    context = spark.sparkContext

    def kill_when_both_workers_are_busy():
        deadline = time.monotonic() + 300
        while not killed.is_set() and time.monotonic() < deadline:
            for stage in filter(None, map(context.statusTracker().getStageInfo, context.statusTracker().getActiveStageIds())):
                if stage.numCompletedTasks >= 1 and stage.numActiveTasks >= 2 and not killed.is_set():
                    cluster.kill_worker(1)
                    killed.set()
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_both_workers_are_busy, daemon=True)
    spark.conf.set("spark.sql.files.maxPartitionBytes", "8m")  # with the open cost of 512k: 16 files a task
    frame = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(tmp_path / "in"))
    killer.start()
    try:
        with_predictions(frame, MODELS / "cnn").drop("content").write.parquet(str(tmp_path / "out.parquet"))
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
        killer.join(timeout=1)
    try:
        assert killed.is_set() and cluster.workers[1].poll() is not None and cluster.alive_workers() == 1
        assert (tmp_path / "out.parquet" / "_SUCCESS").is_file()
        table = pq.read_table(tmp_path / "out.parquet").to_pylist()
        paths = [r["path"] for r in table]
        assert len(paths) == len(set(paths)) == 1000 and all(r["error"] is None for r in table)
        order = np.argsort([int(p.rsplit("/", 1)[1].removesuffix(".png")) for p in paths])
        offline = Bundle.load(MODELS / "cnn").predict(images).probabilities.argmax(1)
        assert np.array_equal(np.array([r["index"] for r in table])[order], offline)
    finally:
        cluster.start_worker()


def test_the_docs_spark_submit_example_runs_on_a_cluster(folder, tmp_path):
    """docs/batch-scoring.md's with_predictions script, through spark-submit, with local paths for its s3a:// ones.

    On a cluster of its own: the module's cluster is held by the `spark` fixture's application,
    which a standalone master gives every core, so a second application would wait for one."""
    page = (REPO / "docs" / "batch-scoring.md").read_text()
    script = re.search(r"```python\n(# score_photos.py\n.*?)```", page, re.DOTALL).group(1)
    photos = shutil.copytree(folder, tmp_path / "photos", ignore=shutil.ignore_patterns("*.csv"))  # what other tests left aside
    script = script.replace("s3a://bucket/photos/", str(photos)).replace("s3a://bucket/scored.parquet", str(tmp_path / "scored.parquet"))
    (tmp_path / "score_photos.py").write_text(script.replace('"models/airbench"', repr(str(MODELS / "airbench"))))
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    with StandaloneCluster(workers=1, cores=2, memory="1g") as cluster:
        submit = [str(spark_home() / "bin" / "spark-submit"), "--master", cluster.url, str(tmp_path / "score_photos.py")]
        done = subprocess.run(submit, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(tmp_path / "scored.parquet").to_pylist()
    assert len(rows) == 302 and sum(r["error"] is None for r in rows) == 300  # the empty file has no row: docs say so
    assert all(len(r["topk_labels"]) == 3 for r in rows if r["error"] is None)


def test_the_spark_job_ships_every_package_its_executors_import(tmp_path):
    """Executors without this project import the zip the job ships; the cluster above, on this machine,
    would find the installed packages and hide a missing one. So this Python starts without site (-S: no
    editable install of this project) and finds the third-party packages alone on its path."""
    from scoring.spark import package_zip

    archive, site = package_zip(tmp_path), sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path.insert(0, {str(archive)!r}); sys.path.append({site!r}); import scoring.spark, scoring.local, bundle.runtime; "
        "print(scoring.spark.__file__, scoring.local.__file__, bundle.runtime.__file__)"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(path.startswith(str(archive)) for path in done.stdout.split()), done.stdout


def test_images_spark_will_pass_over_are_counted_before_the_job(tmp_path, capsys):
    """Spark's listing skips names starting with '_' (Hadoop's hidden files) without a word; for a local folder the driver says so."""
    from scoring.spark_job import warn_of_underscores

    for folder in ("cat", "_raw", "a", "b"):
        (tmp_path / folder).mkdir()
    for name in ("cat/_DSC0001.JPG", "cat/a.png", "cat/_SUCCESS", "_raw/b.png"):
        (tmp_path / name).write_bytes(b"")
    for folder in ("a", "b"):  # two loops: a walk that follows links without remembering where it has been never ends
        (tmp_path / folder / "up").symlink_to(tmp_path, target_is_directory=True)
    warn_of_underscores(str(tmp_path))
    assert "2 images under" in capsys.readouterr().err
