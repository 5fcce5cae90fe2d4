"""Export a tiny trained run to a bundle; load it back the way the service does; tamper with it."""

import io
import json
import pickle
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from bundle.manifest import Manifest
from bundle.runtime import Bundle, BundleError
from tests.conftest import REPO, cpu_bf16
from training.analysis import load_trained
from training.export import export
from training.recipes import get_recipe
from training.robustness import CONDITIONS
from training.train import train


@pytest.fixture(scope="module")
def bundle_dir(cifar, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "run").mkdir()
    recipe = get_recipe("cnn-znorm", epochs=1, limit=400, holdout=100)
    train(recipe, cifar, root / "run", torch.device("cpu"), bf16=cpu_bf16(), progress=False)
    export(load_trained(root / "run", cifar), cifar, root / "models" / "tiny", "tiny", components=8)
    return root / "models" / "tiny"


@pytest.fixture
def copy(bundle_dir, tmp_path):
    return shutil.copytree(bundle_dir, tmp_path / "tiny")


def test_onnxruntime_matches_pytorch_on_random_pixels(bundle_dir, cifar):
    bundle = Bundle.load(bundle_dir)
    model = load_trained(bundle_dir.parent.parent / "run", cifar).model.float().eval()
    pixels = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    got = bundle.predict(pixels)
    with torch.no_grad():
        logits, embedding = model.forward_with_embedding(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    np.testing.assert_allclose(got.logits, logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.embeddings, embedding.numpy(), atol=1e-4)
    temperature = bundle.manifest.calibration.temperature
    np.testing.assert_allclose(got.probabilities, torch.softmax(logits / temperature, 1).numpy(), atol=1e-5)
    assert bundle.providers == ["CPUExecutionProvider"]


def test_the_graph_calibrates_its_probabilities_with_the_temperature_fitted_on_held_out_images(bundle_dir):
    calibration = Bundle.load(bundle_dir).manifest.calibration
    assert calibration.method == "temperature" and calibration.fit_images == 100
    assert calibration.fit_conditions == tuple(CONDITIONS) and calibration.temperature > 0
    assert calibration.ece_after <= calibration.ece_before + 0.01  # fitted on those very images


def test_a_run_without_held_out_images_exports_uncalibrated(cifar, tmp_path):
    recipe = get_recipe("cnn-znorm", epochs=1, limit=200)
    train(recipe, cifar, tmp_path, torch.device("cpu"), bf16=cpu_bf16(), progress=False)
    manifest = export(load_trained(tmp_path, cifar), cifar, tmp_path / "models" / "plain", "plain", components=8)
    assert manifest.calibration.method == "none" and manifest.calibration.temperature == 1.0
    got = Bundle.load(tmp_path / "models" / "plain").predict(np.zeros((2, 32, 32, 3), np.uint8))
    np.testing.assert_allclose(got.probabilities, torch.softmax(torch.from_numpy(got.logits), 1).numpy(), atol=1e-6)


def test_the_manifest_describes_the_bundle(bundle_dir, cifar):
    manifest = Manifest.model_validate_json((bundle_dir / "manifest.json").read_text())
    assert manifest.classes == cifar.classes and manifest.embedding_dim == 1600
    assert manifest.input.dtype == "uint8" and manifest.input.shape == (None, 32, 32, 3)
    assert manifest.accuracy.test_images == 400 and manifest.accuracy.max_abs_logit_diff <= manifest.accuracy.tolerance
    assert manifest.knn.components == 8 and manifest.knn.fit_images == 300
    assert set(manifest.files) == {"model.onnx", "knn.npz"} and manifest.outputs == ("logits", "probabilities", "embedding")
    assert manifest.normalization.std[0] > 1  # global z-score in pixel units travels with the bundle
    onnx.checker.check_model(str(bundle_dir / "model.onnx"))
    # the accuracy the manifest states is what onnxruntime gives on those test images
    images = cifar.test.images[:400].permute(0, 2, 3, 1).contiguous().numpy()
    bundle = Bundle.load(bundle_dir)
    predicted = bundle.predict(images).logits.argmax(1)
    assert (predicted == cifar.test.labels[:400].numpy()).mean() == pytest.approx(manifest.accuracy.onnx)


def test_training_and_serving_see_the_same_pixels(bundle_dir, cifar, shared_data):
    """A test image as the training loader reads it, and as PNG bytes decoded by Pillow."""
    with open(shared_data / "test_batch", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][7]
    png = io.BytesIO()
    Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).save(png, format="PNG")
    decoded = np.asarray(Image.open(io.BytesIO(png.getvalue())).convert("RGB"))[None]
    model = load_trained(bundle_dir.parent.parent / "run", cifar).model.float().eval()
    with torch.no_grad():
        expected = model(cifar.test.images[7:8]).numpy()
    np.testing.assert_allclose(Bundle.load(bundle_dir).predict(decoded).logits, expected, atol=1e-4)


def test_the_knn_head_answers_votes_and_neighbours(bundle_dir):
    bundle = Bundle.load(bundle_dir)
    embeddings = bundle.predict(np.zeros((3, 32, 32, 3), np.uint8)).embeddings
    votes, distances, indices, labels = bundle.knn(embeddings, neighbours=4)
    assert votes.shape == (3, 10) and np.allclose(votes.sum(1), 1)
    assert indices.shape == (3, 4) and indices.max() < 300 and (np.diff(distances, axis=1) >= 0).all()
    assert labels.shape == (3, 4) and labels.max() < 10


@pytest.mark.parametrize("name", ["knn.npz", "model.onnx"])
def test_a_flipped_byte_is_refused_before_the_file_is_read(copy, name, monkeypatch):
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    monkeypatch.setattr("numpy.load", lambda *a, **k: pytest.fail("read a tampered bundle"))
    with pytest.raises(BundleError, match=rf"{name}: sha256 .* does not match"):
        Bundle.load(copy)


def test_an_incomplete_bundle_names_the_missing_file(copy):
    (copy / "knn.npz").unlink()
    with pytest.raises(BundleError, match=r"knn.npz: missing"):
        Bundle.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest.json: missing"):
        Bundle.load(copy)


def test_a_knn_head_that_disagrees_with_the_manifest_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["knn"]["fit_images"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"knn.npz: 300 rows of 8 dimensions, where the manifest says 301 of 8"):
        Bundle.load(copy)


def test_a_knn_head_that_projects_other_embeddings_than_the_graph_gives_is_refused(copy):
    """Rows and PCA width agree with the manifest, but the projection expects wider embeddings."""
    import hashlib

    with np.load(copy / "knn.npz") as arrays:
        head = {name: arrays[name] for name in arrays.files}
    width = head["components"].shape[1] + 1
    head["components"] = np.hstack([head["components"], np.zeros((len(head["components"]), 1), head["components"].dtype)])
    head["mean"] = np.append(head["mean"], 0).astype(head["mean"].dtype)
    np.savez(copy / "knn.npz", **head)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["knn.npz"] = {"sha256": hashlib.sha256((copy / "knn.npz").read_bytes()).hexdigest(), "bytes": (copy / "knn.npz").stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"knn.npz: projects {width}-dimensional embeddings, the graph gives {width - 1}"):
        Bundle.load(copy)


def test_a_graph_whose_outputs_are_not_one_row_per_image_is_refused(copy):
    """A graph with the right names but rank-1 outputs: a BundleError, not an IndexError that the
    service's CIFAR10_BROKEN_BUNDLES=skip would not catch."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper

    pixels = helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 32, 32, 3])
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT)]
    nodes += [helper.make_node("ReduceMean", ["x"], [name], axes=[1, 2, 3], keepdims=0) for name in ("logits", "probabilities", "embedding")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"]) for name in ("logits", "probabilities", "embedding")]
    model = helper.make_model(helper.make_graph(nodes, "flat", [pixels], outputs), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, copy / "model.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": hashlib.sha256((copy / "model.onnx").read_bytes()).hexdigest(), "bytes": (copy / "model.onnx").stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"model.onnx: outputs .* differ from the manifest's logits \[N, 10\]"):
        Bundle.load(copy)


def test_an_unknown_schema_version_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version 99"):
        Bundle.load(copy)
    manifest["schema_version"] = 2  # a bundle exported with a scikit-learn knn.pkl
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version 2 is not 3.*export the run again"):
        Bundle.load(copy)


def test_a_graph_whose_inputs_differ_from_the_manifest_is_refused(copy):
    import hashlib

    from onnx import TensorProto, helper, numpy_helper

    # a valid graph with the right outputs but float input: what an exporter without the cast gives
    weights = numpy_helper.from_array(np.zeros((3072, 10), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["embedding"]), helper.make_node("MatMul", ["embedding", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"])],
        "float_input",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3072])],
        [weights],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(copy / "model.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"]["sha256"] = hashlib.sha256((copy / "model.onnx").read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"model.onnx: inputs \[\('images', 'tensor\(float\)'"):
        Bundle.load(copy)


def test_export_never_overwrites(bundle_dir, cifar):
    from cifar10.errors import UserError

    with pytest.raises(UserError, match="exists"):
        export(load_trained(bundle_dir.parent.parent / "run", cifar), cifar, bundle_dir, "tiny")


def test_serving_never_imports_torch_or_scikit_learn():
    import subprocess
    import sys

    code = """
import sys, numpy, bundle.runtime
bundle = bundle.runtime.Bundle.load("models/cnn")
bundle.knn(bundle.predict(numpy.zeros((1, 32, 32, 3), numpy.uint8)).embeddings, 3)
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "sklearn", "scipy"}))
"""
    found = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr


def test_export_refuses_a_graph_that_disagrees_with_pytorch():
    from cifar10.errors import UserError
    from training.export import verify
    from training.metrics import softmax

    torch_logits = np.eye(4, 10, dtype=np.float32)
    probabilities = softmax(torch_logits, 2.0)
    assert verify(torch_logits + 1e-5, probabilities, torch_logits, 2.0) <= 1e-3
    with pytest.raises(UserError, match="disagrees with PyTorch.*no bundle written"):
        verify(torch_logits + 0.01, probabilities, torch_logits, 2.0)
    with pytest.raises(UserError, match="max probability diff"):  # a graph that calibrates with another temperature
        verify(torch_logits, softmax(torch_logits, 1.0), torch_logits, 2.0)


def test_predict_refuses_anything_but_uint8_nhwc(bundle_dir):
    bundle = Bundle.load(bundle_dir)
    with pytest.raises(ValueError, match=r"uint8 \[N, 32, 32, 3\]"):
        bundle.predict(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[N, 32, 32, 3\]"):
        bundle.predict(np.zeros((1, 32, 32, 3), np.float32))


def test_gelu_is_exported_as_one_node_that_onnxruntime_runs_fused(tmp_path):
    """One node, not a Div-Erf-Add-Mul-Mul chain of five passes over the activations (docs/performance.md)."""
    import onnxruntime as ort

    from training.export import export_onnx
    from training.models import build_model

    model = build_model("airbench", [125.0] * 3, [60.0] * 3).eval()
    export_onnx(model, 1.0, tmp_path / "model.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert ops.count("Gelu") == 7 and "Erf" not in ops
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    logits = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], {"images": pixels})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
