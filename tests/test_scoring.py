"""Offline scoring on real CIFAR-10 test images written as files: same answers as the bundle, resumable."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pyarrow import csv

import scoring.local
from bundle.images import decode
from bundle.runtime import Bundle
from cifar10.cli import main
from scoring.inputs import InputError, read_inputs
from scoring.local import Options, ScoringError, score
from tests.conftest import CORRUPT, REPO


@pytest.fixture(scope="module")
def bundle():
    return Bundle.load(REPO / "models" / "cnn")


def options(**kw) -> Options:
    return Options(**{"model": "cnn", "model_version": "v", "input": "in", **kw})


def run(folder, bundle, output, opts=None, batch=128):
    return score(read_inputs(folder, bundle.manifest.classes, chunk=batch), bundle, output, opts or options(), workers=2)


def test_a_folder_scores_like_the_bundle_and_records_failures(folder, bundle, test_images, tmp_path):
    summary = run(folder, bundle, tmp_path / "out.parquet", options(topk=3, knn=True))
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary.rows == len(table) == 303 and summary.failed == 3
    failed = {r["id"]: r["error"] for r in table if r["error"]}
    assert set(failed) == set(CORRUPT) and "empty" in failed["dog/empty.jpg"] and "not an image" in failed["cat/broken.png"]
    good = sorted((r for r in table if not r["error"]), key=lambda r: r["id"])
    pixels = np.stack([decode((folder / r["id"]).read_bytes()) for r in good])
    expected = bundle.predict(pixels)
    classes = bundle.manifest.classes
    assert [r["label"] for r in good] == [classes[i] for i in expected.logits.argmax(1)]
    assert np.allclose([r["probability"] for r in good], expected.probabilities.max(1), atol=1e-6)
    assert [r["topk_labels"][0] for r in good] == [r["label"] for r in good]
    votes = bundle.knn(expected.embeddings, bundle.manifest.knn.k)[0]
    assert [r["knn_label"] for r in good] == [classes[i] for i in votes.argmax(1)]
    truth = [r["id"].split("/")[0] for r in good]  # the class folder each file was written to
    assert [r["true_label"] for r in good] == truth
    assert summary.accuracy == pytest.approx(np.mean([classes[i] == t for i, t in zip(expected.logits.argmax(1), truth)]))
    assert not (tmp_path / "out.parquet.parts").exists()


def interrupt(monkeypatch, on_chunk: int) -> None:
    """Ctrl-C while the `on_chunk`th chunk is scored, until monkeypatch.undo()."""
    real, calls = scoring.local.score_chunk, []

    def score_chunk(*args):
        calls.append(1)
        if len(calls) == on_chunk:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(scoring.local, "score_chunk", score_chunk)


def test_an_interrupted_run_leaves_no_output_and_resumes_where_it_stopped(folder, bundle, tmp_path, monkeypatch):
    interrupt(monkeypatch, on_chunk=3)
    with pytest.raises(KeyboardInterrupt):
        run(folder, bundle, tmp_path / "out.parquet", batch=100)
    assert not (tmp_path / "out.parquet").exists()
    assert len(list((tmp_path / "out.parquet.parts").glob("part-*.parquet"))) == 2
    monkeypatch.undo()
    with pytest.raises(ScoringError, match="other options"):
        run(folder, bundle, tmp_path / "out.parquet", options(topk=2), batch=100)
    resumed = run(folder, bundle, tmp_path / "out.parquet", batch=100)
    assert resumed.skipped == 200 and resumed.new == 103 and resumed.rows == 303
    straight = run(folder, bundle, tmp_path / "straight.parquet", batch=100)
    by_id = lambda path: sorted(pq.read_table(path).to_pylist(), key=lambda r: r["id"])  # noqa: E731
    assert by_id(tmp_path / "out.parquet") == by_id(tmp_path / "straight.parquet")
    assert straight.accuracy == resumed.accuracy
    again = run(folder, bundle, tmp_path / "out.parquet")  # finished: nothing to do
    assert again.new == 0


def test_a_resumed_run_keeps_every_row_of_an_id_given_more_than_once(folder, bundle, tmp_path, monkeypatch):
    files = sorted(folder.rglob("*.png"))[:30]
    pq.write_table(pa.table({"id": ["same"] * 30, "image": [f.read_bytes() for f in files]}), tmp_path / "rows.parquet")
    interrupt(monkeypatch, on_chunk=2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "rows.parquet", bundle, tmp_path / "out.parquet", batch=10)
    monkeypatch.undo()
    resumed = run(tmp_path / "rows.parquet", bundle, tmp_path / "out.parquet", batch=10)
    assert resumed.skipped == 10 and resumed.new == 20 and resumed.rows == 30
    run(tmp_path / "rows.parquet", bundle, tmp_path / "straight.parquet", batch=10)
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == pq.read_table(tmp_path / "straight.parquet").to_pylist()


def test_tables_of_paths_or_bytes_give_the_same_labels(folder, bundle, tmp_path):
    files = sorted(p for p in folder.rglob("*.png") if p.parent.name in bundle.manifest.classes)[:50]
    paths = pa.table({"path": [str(p.relative_to(folder)) for p in files], "label": [p.parent.name for p in files]})
    csv.write_csv(paths, folder / "paths.csv")
    blobs = pa.table({"id": [p.name for p in files], "image": [p.read_bytes() for p in files]})
    pq.write_table(blobs, tmp_path / "blobs.parquet")
    from_paths = run(folder / "paths.csv", bundle, tmp_path / "a.parquet")
    from_bytes = run(tmp_path / "blobs.parquet", bundle, tmp_path / "b.parquet")
    a, b = pq.read_table(tmp_path / "a.parquet").to_pylist(), pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert [r["label"] for r in a] == [r["label"] for r in b] and from_paths.rows == from_bytes.rows == 50
    assert from_paths.labelled == 50 and from_bytes.labelled == 0
    assert [r["id"] for r in a] == [str(p.absolute()) for p in files]  # as Spark's engine names them


def test_a_folder_is_read_as_people_keep_one(test_images, bundle, tmp_path, capsys):
    """A class folder that is a link, a link to a class folder that sorts before it, a file name from an old
    archive (not UTF-8), macOS's hidden ._ copies, a link that leads nowhere, a loop, a pipe: each real image
    scored once, under its own folder's name, the rest counted."""
    pixels, root, elsewhere = test_images[0], tmp_path / "photos", tmp_path / "elsewhere" / "dog"
    (root / "cat").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    Image.fromarray(pixels[0]).save(elsewhere / "d.png")
    Image.fromarray(pixels[1]).save(root / "cat" / os.fsdecode(b"caf\xe9.png"))
    (root / "cat" / "._caf.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble: no image
    (root / "dog").symlink_to(elsewhere, target_is_directory=True)
    (root / "cat" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "cat" / "loop").symlink_to(root, target_is_directory=True)
    (root / "all_cats").symlink_to(root / "cat", target_is_directory=True)  # sorts before cat/, whose name is the label
    (root / ".stash" / "horse").mkdir(parents=True)  # a hidden folder, read through the link to it
    Image.fromarray(pixels[2]).save(root / ".stash" / "horse" / "h.png")
    (root / "horse").symlink_to(root / ".stash" / "horse", target_is_directory=True)
    os.mkfifo(root / "cat" / "pipe.png")  # a reader would wait on it for ever
    summary = run(root, bundle, tmp_path / "out.csv")
    rows = csv.read_csv(tmp_path / "out.csv").to_pylist()
    assert sorted((r["id"], r["true_label"], r["error"]) for r in rows) == [("cat/caf\\xe9.png", "cat", None), ("dog/d.png", "dog", None), ("horse/h.png", "horse", None)]
    assert summary.failed == 0
    err = capsys.readouterr().err
    assert "2 hidden files and folders (names starting with '.') under" in err and "1 links that lead nowhere under" in err and "cat/gone.jpg" in err
    assert "1 entries that are no regular file" in err  # the pipe
    assert "2 links to folders read under another name (or a loop) under" in err  # all_cats/, cat/loop


def test_a_tables_labels_and_paths_are_read_as_written_and_a_bad_one_stops_nothing_midway(folder, bundle, tmp_path):
    """Labels as pandas writes integers with gaps (floats), paths as file: URIs, written as Spark's binaryFile
    writes them (names as they are) and as Path.as_uri() does (percent-encoded); a label no class answers to,
    or image bytes given as text, refused before a part is written."""
    files = sorted(p for p in folder.rglob("*.png") if p.parent.name in bundle.manifest.classes)[:20]
    labels = [float(bundle.manifest.classes.index(p.parent.name)) for p in files]
    for i, name in enumerate(("my photo+1.png", "café.png", "100%.png", "a%20b.png")):  # the last two: names as they are
        files[i] = Path(shutil.copy(files[i], tmp_path / name))
    uris = [p.as_uri() for p in files[:2]] + [f"file:{p}" for p in files[2:5]] + [f"file://{p}" for p in files[5:]]
    pq.write_table(pa.table({"path": uris, "label": labels[:-1] + [None]}), tmp_path / "floats.parquet")
    summary = run(tmp_path / "floats.parquet", bundle, tmp_path / "floats.csv")
    assert summary.rows == 20 and summary.failed == 0 and summary.labelled == 19, summary.failures
    assert csv.read_csv(tmp_path / "floats.csv").column("true_label").to_pylist()[:3] == [bundle.manifest.classes[int(x)] for x in labels[:3]]
    for name, table, message in (
        ("kitten.parquet", pa.table({"path": [str(p) for p in files], "label": ["cat"] * 15 + ["kitten"] * 5}), "row 15: label 'kitten'"),
        ("half.csv", pa.table({"path": [str(p) for p in files], "label": ["3"] * 19 + ["3.5"]}), "row 19: label '3.5'"),
        ("base64.parquet", pa.table({"image": ["iVBORw0KGgo="] * 20}), "holds string, not image bytes"),
    ):
        (csv.write_csv if name.endswith(".csv") else pq.write_table)(table, tmp_path / name)
        with pytest.raises(InputError, match=message):
            run(tmp_path / name, bundle, tmp_path / f"{name}.out.parquet", batch=4)
        assert not (tmp_path / f"{name}.out.parquet.parts").exists()


def test_a_csvs_ids_and_labels_are_read_as_text_past_its_first_block(tmp_path):
    """pyarrow infers a CSV's types from its first megabyte: ids like "001" would become 1, and an id
    "x7" beyond that block would stop the run. Spark reads them as text; so does the local engine."""
    ids = [f"{i:06d}" for i in range(60_000)] + ["x7"]
    labels = [str(i % 10) for i in range(60_000)] + [""]
    csv.write_csv(pa.table({"id": ids, "path": [f"{i}.png" for i in ids], "label": labels}), tmp_path / "rows.csv")
    assert (tmp_path / "rows.csv").stat().st_size > 1 << 20
    records = [r for chunk in read_inputs(tmp_path / "rows.csv", [str(c) for c in "abcdefghij"]) for r in chunk]
    assert [r.id for r in records] == ids
    assert [r.label for r in records[:12]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] and records[-1].label is None


def test_a_malformed_csv_row_past_the_first_block_is_an_input_error_naming_where(tmp_path):
    rows = "".join(f"{i:06d},{i}.png\n" for i in range(200_000))  # 3.6 MB: blocks of 1 MB
    (tmp_path / "rows.csv").write_text("id,path\n" + rows + "x,y.png,an extra field\n")
    with pytest.raises(InputError, match=r"rows.csv: unreadable after row \d+"):
        [r for chunk in read_inputs(tmp_path / "rows.csv", [str(c) for c in "abcdefghij"]) for r in chunk]


def test_the_cli_scores_a_cifar_batch_file_to_csv_with_the_bundles_accuracy(shared_data, bundle, tmp_path, capsys):
    output = tmp_path / "test.csv"
    code = main(["score", str(shared_data / "test_batch"), "--model", "cnn", "--output", str(output), "--topk", "2", "--models-dir", str(REPO / "models")])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"accuracy {bundle.manifest.accuracy.onnx:.2%} on 10,000 labelled" in out
    table = csv.read_csv(output).to_pylist()
    assert len(table) == 10_000 and table[0]["id"] == "test_batch:0"
    top = json.loads(table[0]["topk_labels"])  # CSV has no lists: they are JSON text
    assert len(top) == 2 and top[0] == table[0]["label"]
    written = output.read_text().splitlines()[1].split('"[')[-1]  # the row's probabilities as float32 writes them, not as float64
    assert written.startswith(str(np.float32(table[0]["probability"])) + ", "), written


@pytest.mark.parametrize(
    ("source", "args", "message"),
    [
        (None, ["--model", "resnet"], "found: airbench, cnn"),  # the bundles' names
        (None, ["--model", "cnn", "--topk", "11"], "--topk must lie in 0..10"),
        (None, ["--model", "cnn", "--output", "x.json"], "must end in .parquet or .csv"),
        ("missing", ["--model", "cnn"], "input not found"),
        ("notes.txt", ["--model", "cnn"], "give an image, a folder of images, a .csv or .parquet table"),
        ("junk.png", ["--model", "cnn"], "every one of the 1 inputs failed"),  # written, and a status a script stops on
        (None, ["--model", "cnn", "--output", "notes.txt/o.csv"], "Not a directory"),  # no traceback
    ],
)
def test_bad_requests_are_one_line_errors(folder, source, args, message, tmp_path, capsys):
    """source None: the image folder; else a file of that name in tmp_path (created unless 'missing')."""
    if source is not None:
        source = tmp_path / source
        if source.name != "missing":
            source.write_text("not images")
    (tmp_path / "notes.txt").write_text("not images")
    argv = ["score", str(source or folder), "--output", str(tmp_path / "o.parquet"), "--models-dir", str(REPO / "models"), *args]
    argv = [str(tmp_path / a) if a.startswith("notes.txt/") else a for a in argv]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    if source is not None and source.name == "junk.png":  # run again, it says the same, not "already complete" and 0
        assert main(argv) == 1 and "every one of its 1 inputs failed" in capsys.readouterr().err


def test_a_finished_output_is_kept_only_for_the_same_options(folder, bundle, tmp_path):
    """A re-run that asks for another model, precision or input never reports the earlier run's rows as its own."""
    for output in (tmp_path / "done.csv", tmp_path / "done.parquet"):
        first = run(folder, bundle, output)
        assert first.rows == 303 and json.loads((tmp_path / f"{output.name}.options.json").read_text())["model"] == "cnn"
        again = run(folder, bundle, output)
        assert again.rows == 0 and again.new == 0  # nothing to do
        for other in (options(model="airbench"), options(precision="int8"), options(input="elsewhere"), options(topk=2)):
            with pytest.raises(ScoringError, match="holds a finished run with other options"):
                run(folder, bundle, output, other)
    with pytest.raises(ScoringError, match="model: 'cnn' then, 'airbench' now"):
        run(folder, bundle, tmp_path / "done.csv", options(model="airbench"))
    pq.write_table(pa.table({"something": [1]}), tmp_path / "taken.parquet")
    with pytest.raises(ScoringError, match="exists without taken.parquet.options.json"):
        run(folder, bundle, tmp_path / "taken.parquet")
    (tmp_path / "done.csv.options.json").write_text("{not json")
    with pytest.raises(ScoringError, match="is not the JSON this command writes"):
        run(folder, bundle, tmp_path / "done.csv")


def test_a_run_stopped_before_its_first_part_leaves_nothing_behind(folder, bundle, tmp_path, monkeypatch):
    interrupt(monkeypatch, on_chunk=1)
    with pytest.raises(KeyboardInterrupt):
        run(folder, bundle, tmp_path / "out.csv", batch=100)
    monkeypatch.undo()
    assert not (tmp_path / "out.csv.parts").exists()
    assert run(folder, bundle, tmp_path / "out.csv", options(topk=2), batch=100).rows == 303  # other options: a fresh start
    (tmp_path / "again.csv.parts").mkdir()  # stopped while writing its first part: its options, no part
    (tmp_path / "again.csv.parts" / "options.json").write_text(json.dumps({"model": "airbench"}))
    assert run(folder, bundle, tmp_path / "again.csv", batch=100).rows == 303


def test_parts_whose_options_are_unknown_are_never_adopted(folder, bundle, tmp_path, monkeypatch):
    interrupt(monkeypatch, on_chunk=2)
    with pytest.raises(KeyboardInterrupt):
        run(folder, bundle, tmp_path / "out.parquet", batch=100)
    monkeypatch.undo()
    (tmp_path / "out.parquet.parts" / "options.json").unlink()  # as a run stopped mid-removal of its parts could leave them
    with pytest.raises(ScoringError, match="parts without their options.json"):
        run(folder, bundle, tmp_path / "out.parquet", options(model="airbench"), batch=100)
    with pytest.raises(ValueError, match="no column 'image'"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "nocols.parquet")
        run(tmp_path / "nocols.parquet", bundle, tmp_path / "o.parquet")


def test_a_finished_csv_with_some_failures_is_complete_on_a_rerun(folder, tmp_path, capsys):
    """Its error column has empty cells for the rows that were scored: no error, not an empty one."""
    argv = ["score", str(folder), "--model", "cnn", "--output", str(tmp_path / "out.csv"), "--models-dir", str(REPO / "models")]
    assert main(argv) == 0 and "3 failed" in capsys.readouterr().out
    assert main(argv) == 0 and "already complete" in capsys.readouterr().out


def test_the_models_folder_is_found_where_the_services_setting_says_outside_the_repository(test_images, tmp_path, monkeypatch):
    Image.fromarray(test_images[0][0]).save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)  # no models/ here
    monkeypatch.setenv("CIFAR10_MODELS_DIR", str(REPO / "models"))
    assert main(["score", "cat.png", "--output", "one.csv", "--model", "cnn"]) == 0
    assert csv.read_csv(tmp_path / "one.csv").num_rows == 1


def test_one_image_is_an_input_and_files_left_out_of_a_folder_are_counted(test_images, bundle, tmp_path, capsys):
    pixels = test_images[0][:1]
    (tmp_path / "in").mkdir()
    Image.fromarray(pixels[0]).save(tmp_path / "in" / "cat.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "photo.cr2").write_bytes(b"\x00")  # a camera's raw file
    models = ["--models-dir", str(REPO / "models"), "--model", "cnn"]
    assert main(["score", str(tmp_path / "in" / "cat.png"), "--output", str(tmp_path / "one.csv"), *models]) == 0
    (row,) = csv.read_csv(tmp_path / "one.csv").to_pylist()
    assert row["id"] == "cat.png" and row["index"] == int(bundle.predict(pixels).logits.argmax())
    assert main(["score", str(tmp_path / "in"), "--output", str(tmp_path / "folder.csv"), *models]) == 0
    assert "2 files without an image suffix under" in capsys.readouterr().err and csv.read_csv(tmp_path / "folder.csv").num_rows == 1


def test_max_pixels_fails_the_larger_images_and_names_the_option(test_images, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(test_images[0][0]).save(tmp_path / "in" / "small.png")  # 32 × 32: 1,024 pixels
    Image.fromarray(test_images[0][1]).resize((64, 64)).save(tmp_path / "in" / "large.png")  # 4,096
    models = ["--models-dir", str(REPO / "models"), "--model", "cnn"]
    assert main(["score", str(tmp_path / "in"), "--output", str(tmp_path / "out.csv"), "--max-pixels", "2000", *models]) == 0
    rows = {r["id"]: r for r in csv.read_csv(tmp_path / "out.csv").to_pylist()}
    assert not rows["small.png"]["error"] and rows["small.png"]["label"]  # CSV: an empty error
    assert not rows["large.png"]["label"] and "64×64 is over 2,000 pixels (--max-pixels)" in rows["large.png"]["error"]
    assert main(["score", str(tmp_path / "in"), "--output", str(tmp_path / "zero.csv"), "--max-pixels", "0", *models]) != 0
    assert "--max-pixels at least 1" in capsys.readouterr().err
