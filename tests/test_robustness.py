"""The robustness table: real encoders and the service's decoder, scores that are right by hand."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from bundle.images import decode
from bundle.runtime import Bundle
from tests.conftest import REPO
from training.robustness import CONDITIONS, Answers, decoded, format_table, score, uploads


@pytest.fixture(scope="module")
def pixels(cifar):
    return cifar.test.images[:40].permute(0, 2, 3, 1).contiguous().numpy()


def test_each_condition_sends_what_its_name_says(pixels):
    formats = {"png": "PNG", "jpeg95": "JPEG", "jpeg50": "JPEG", "webp": "WEBP", "noise": "PNG", "blur": "PNG", "photo": "JPEG"}
    for name, fmt in formats.items():
        data = uploads(pixels[:3], CONDITIONS[name])
        with Image.open(io.BytesIO(data[0])) as image:
            assert image.format == fmt and image.size == ((256, 256) if name == "photo" else (32, 32))
    np.testing.assert_array_equal(decoded(uploads(pixels, CONDITIONS["png"])), pixels)  # lossless
    jpeg50, jpeg95 = (np.abs(decoded(uploads(pixels, CONDITIONS[n])).astype(int) - pixels).mean() for n in ("jpeg50", "jpeg95"))
    assert 0 < jpeg95 < jpeg50
    noise = decoded(uploads(pixels, CONDITIONS["noise"])).astype(float) - pixels
    assert 7 < noise.std() < 11  # σ 10, less what clipping at 0 and 255 takes
    assert np.array_equal(uploads(pixels[:2], CONDITIONS["noise"]), uploads(pixels[:2], CONDITIONS["noise"]))  # seeded


def test_uploads_decode_through_the_services_decoder(pixels):
    data = uploads(pixels[:4], CONDITIONS["photo"])
    np.testing.assert_array_equal(decoded(data), np.stack([decode(d) for d in data]))


def test_the_score_is_right_by_hand():
    labels = np.array([0, 1, 2, 3])
    answers = Answers(predicted=np.array([0, 1, 2, 0]), confidence=np.array([0.9, 0.9, 0.9, 0.9]), uncalibrated=np.full(4, 0.75))
    row = score(answers, labels)
    assert row["accuracy"] == 0.75 and row["ece"] == pytest.approx(0.15) and row["ece_uncalibrated"] == pytest.approx(0.0)
    assert row["mean_confidence"] == pytest.approx(0.9) and row["images"] == 4
    assert "ece_uncalibrated" not in score(Answers(answers.predicted, answers.confidence), labels)
    table = format_table({"png": {"description": "PNG (lossless)", **row}})
    assert "| PNG (lossless) | 75.00% | 15.00% | 0.900 | 0.00% |" in table


def test_the_cli_measures_a_bundle_records_it_and_writes_the_report(tmp_path, tiny_cifar, capsys):
    from cifar10.cli import main

    shutil.copytree(REPO / "models" / "cnn", tmp_path / "models" / "cnn")
    code = main(["robustness", "cnn", "--models-dir", str(tmp_path / "models"), "--data-dir", str(tiny_cifar), "--out", str(tmp_path / "report")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| JPEG quality 75 |" in out and "recorded in" in out
    bundle = Bundle.load(tmp_path / "models" / "cnn")  # the manifest changed, the hashed files did not
    rows = {r.condition: r for r in bundle.manifest.robustness}
    assert list(rows) == list(CONDITIONS) and all(r.images == 20 for r in rows.values())
    int8 = Bundle.load(tmp_path / "models" / "cnn", precision="int8")
    assert [r.condition for r in int8.robustness] == list(CONDITIONS)
    assert (tmp_path / "report" / "reliability-fp32-jpeg75.png").is_file()
    assert json.loads((tmp_path / "report" / "robustness.json").read_text())["int8"]["png"]["images"] == 20
