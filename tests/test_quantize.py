"""`cifar10 quantize` on a copy of the committed CNN bundle: the int8 variant, its checks, serving it."""

import json
import os
import re
import shutil
import subprocess

import httpx
import numpy as np
import pytest

from bench.harness import SERVE, free_port, running
from bundle.runtime import Bundle, BundleError, MissingVariant
from cifar10.errors import UserError
from serving.settings import Settings
from tests.conftest import REPO
from tests.test_service import encode
from training.quantize import quantize


def without_variants(folder):
    """The bundle as `cifar10 export` wrote it: no variant, nor its file."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for variant in manifest["variants"]:
        del manifest["files"][variant["file"]]
        (folder / variant["file"]).unlink()
    manifest["variants"] = []
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def models(cifar, tmp_path_factory):
    """models/: the CNN bundle with a fresh int8 variant, and the default bundle without one."""
    root = tmp_path_factory.mktemp("quantize") / "models"
    for name in ("cnn", "airbench"):
        without_variants(shutil.copytree(REPO / "models" / name, root / name))
    quantize(root / "cnn", cifar, calibration_images=256)
    return root


@pytest.fixture
def copy(models, tmp_path):
    return shutil.copytree(models / "cnn", tmp_path / "cnn")


def test_the_variant_is_listed_hashed_and_as_accurate_as_recorded(models, cifar):
    fp32, int8 = Bundle.load(models / "cnn"), Bundle.load(models / "cnn", precision="int8")
    (variant,) = int8.manifest.variants
    assert variant.precision == "int8" and variant.calibration_images == 256 and int8.precision == "int8"
    assert variant.file in int8.manifest.files and (models / "cnn" / variant.file).is_file()
    pixels, labels = cifar.test.images.permute(0, 2, 3, 1).contiguous().numpy(), cifar.test.labels.numpy()
    measured = (int8.predict(pixels).probabilities.argmax(1) == labels).mean()  # all 10,000 test images, again
    assert variant.test_accuracy == pytest.approx(measured, abs=1e-4)
    assert abs(variant.test_accuracy - fp32.test_accuracy) < 0.005


def test_int8_predictions_agree_with_fp32(models, cifar):
    pixels = cifar.test.images[:500].permute(0, 2, 3, 1).contiguous().numpy()
    fp32 = Bundle.load(models / "cnn").predict(pixels).logits.argmax(1)
    int8 = Bundle.load(models / "cnn", precision="int8").predict(pixels).logits.argmax(1)
    assert (fp32 == int8).mean() > 0.95


def test_a_tampered_variant_is_refused_and_the_fp32_graph_still_loads(copy):
    data = bytearray((copy / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.int8.onnx: sha256 .* does not match"):
        Bundle.load(copy, precision="int8")
    assert Bundle.load(copy).precision == "fp32"


def test_quantizing_again_replaces_the_variant(copy, cifar):
    quantize(copy, cifar, calibration_images=64)
    (variant,) = Bundle.load(copy, precision="int8").manifest.variants
    assert variant.calibration_images == 64


@pytest.mark.parametrize("count", [0, 50_001])
def test_calibration_needs_between_one_and_all_training_images(copy, cifar, count):
    with pytest.raises(UserError, match="--calibration-images must lie in 1..50000"):
        quantize(copy, cifar, calibration_images=count)
    (variant,) = Bundle.load(copy, precision="int8").manifest.variants  # the earlier variant, untouched
    assert variant.calibration_images == 256


def test_a_bundle_without_the_variant_says_how_to_make_one(models):
    with pytest.raises(MissingVariant, match="cifar10 quantize airbench"):
        Bundle.load(models / "airbench", precision="int8")


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("int4", "each part must be a precision (fp32, int8) or BUNDLE:PRECISION, got 'int4'"),
        ("cnn:int4", "each part must be a precision (fp32, int8) or BUNDLE:PRECISION, got 'cnn:int4'"),
        (":int8", "each part must be a precision (fp32, int8) or BUNDLE:PRECISION, got ':int8'"),
        ("int8,cnn:fp32,cnn:int8", "bundle cnn given twice"),
        ("int8,fp32", "the precision for the other bundles given twice"),
    ],
)
def test_a_precision_setting_without_meaning_is_refused(monkeypatch, given, reason):
    monkeypatch.setenv("CIFAR10_PRECISION", given)
    with pytest.raises(ValueError, match=re.escape(f"CIFAR10_PRECISION={given!r} ({reason})")):
        Settings.from_env()


def test_the_precision_is_chosen_per_bundle():
    assert Settings(precision="airbench:int8").precision_of("airbench") == "int8"
    assert Settings(precision="airbench:int8").precision_of("cnn") == "fp32"  # a bundle not named: fp32
    assert Settings(precision="int8, cnn:fp32").precision_of("other") == "int8"  # a bare precision: the bundles not named
    assert Settings(precision="int8, cnn:fp32").precision_of("cnn") == "fp32"


@pytest.mark.parametrize("setting", ["int8", "cnn:int8"])
def test_the_service_serves_int8_where_a_bundle_has_it_or_where_asked(models, tmp_path, shared_data, setting):
    env = dict(CIFAR10_MODELS_DIR=str(models), CIFAR10_DEFAULT_MODEL="cnn", CIFAR10_PRECISION=setting)
    log = tmp_path / "serve.log"
    with running(SERVE, log, env=env) as server:
        url = server.url
        listed = {m["name"]: m for m in httpx.post(f"{url}/models", json={}, timeout=30).json()}
        pixels = np.zeros((32, 32, 3), np.uint8)
        answer = httpx.post(f"{url}/classify", files=[("images", ("0.png", encode(pixels), "image/png"))], timeout=30)
    assert listed["cnn"]["precision"] == "int8"
    assert listed["cnn"]["test_accuracy"] == Bundle.load(models / "cnn", precision="int8").test_accuracy
    assert listed["airbench"]["precision"] == "fp32"  # no variant (int8 for all: with a warning), or not asked
    assert answer.status_code == 200 and answer.json()[0]["label"]
    assert ("has no int8 variant" in log.read_text()) == (setting == "int8")


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("CIFAR10_PRECISION=cnnn:int8", "CIFAR10_PRECISION names cnnn, not among the bundles served: airbench, cnn"),
        ("CIFAR10_DEFAULT_MODEL=cnnn", "CIFAR10_DEFAULT_MODEL names cnnn, not among the bundles served: airbench, cnn"),
        ("CIFAR10_PRECISION=airbench:int8", "asks for airbench:int8, and airbench has no int8 variant"),  # named, so not fp32 instead
    ],
)
def test_a_bundle_named_by_a_setting_but_not_served_as_named_stops_the_start(models, tmp_path, setting, reason):
    name, value = setting.split("=")
    env = dict(CIFAR10_MODELS_DIR=str(models), **{name: value})
    command = [part.format(port=free_port()) for part in SERVE]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert reason in result.stdout + result.stderr


@pytest.mark.parametrize(("loss", "advised"), [(0.002, True), (0.005, True), (0.02, False)])
def test_the_cli_advises_serving_int8_only_within_the_tolerance(copy, shared_data, monkeypatch, capsys, loss, advised):
    import training.quantize
    from bundle.manifest import Variant
    from cifar10.cli import main

    fp32 = Bundle.load(copy).manifest.accuracy.onnx
    variant = Variant(file="model.int8.onnx", precision="int8", test_accuracy=fp32 - loss, calibration_images=8)
    monkeypatch.setattr(training.quantize, "quantize", lambda *args: variant)  # the decision, not the quantization
    assert main(["quantize", copy.name, "--models-dir", str(copy.parent), "--data-dir", str(shared_data)]) == 0
    out, err = capsys.readouterr()
    assert ("serve it with CIFAR10_PRECISION=cnn:int8" in out) is advised and ("keep serving fp32" in err) is not advised
