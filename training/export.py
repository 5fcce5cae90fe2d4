"""`cifar10 export`: a trained run → a bundle folder the service loads without torch.

models/<name>/model.onnx   uint8 [N, 32, 32, 3] RGB in; logits [N, 10], calibrated probabilities [N, 10]
                           and embedding [N, D] out
models/<name>/knn.npz      the KNN head on the training embeddings (NumPy arrays: bundle/knn.py)
models/<name>/manifest.json

The temperature is fitted on the run's held-out images first (training/calibration.py); the graph
is checked against the PyTorch model on every test image before the KNN head is fitted, and the
accuracies in the manifest are measured on the written graph with onnxruntime.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from bundle.knn import NeighbourHead
from bundle.manifest import KNN_FILE, MANIFEST, MODEL_FILE, Accuracy, FileEntry, KnnHead, Manifest, Normalization, Provenance
from bundle.runtime import OUTPUTS, PREDICT_CHUNK, sha256
from cifar10.errors import UserError
from cifar10.files import write_whole
from training.analysis import TrainedRun
from training.calibration import calibrate
from training.data import Cifar10
from training.evaluate import predict
from training.knn import KNN_COMPONENTS, fit_head
from training.metrics import softmax
from training.models import TestTimeAugmentation

TOLERANCE = 1e-3  # max |logit difference| between onnxruntime and PyTorch, both fp32
OPSET = 20  # from 20 the exporter writes GELU as one Gelu node, which onnxruntime runs as one fused kernel (docs/bundle.md)


class PixelsIn(nn.Module):
    """The bundle's contract around a trained model: uint8 NHWC pixels in; logits, probabilities
    (softmax of the logits over the calibration temperature) and the embedding out."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, embedding = self.model.forward_with_embedding(images.permute(0, 3, 1, 2))
        return logits, torch.softmax(logits / self.temperature, dim=1), embedding


def to_nhwc(images: torch.Tensor) -> np.ndarray:
    """Training keeps [N, 3, 32, 32]; the bundle takes what an image decoder gives: [N, 32, 32, 3]."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def export_onnx(model: nn.Module, temperature: float, path: Path) -> None:
    model = PixelsIn(model.float().cpu(), temperature).eval()
    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model, (example,), str(path), input_names=["images"], output_names=OUTPUTS,
        dynamic_shapes={"images": {0: batch}}, opset_version=OPSET, dynamo=True, external_data=False, optimize=True,
        verbose=False,  # the exporter's own progress lines; export has its bars
    )  # fmt: skip
    onnx.checker.check_model(str(path), full_check=True)
    batch_dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:  # the exporter can fall back to the example's fixed size
        raise UserError(f"the exported graph fixed its batch size at {batch_dim.dim_value}; the model must not depend on it")


def run_onnx(session: ort.InferenceSession, images: np.ndarray, progress: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, probabilities, embeddings) for uint8 NHWC images, in batches; progress labels a progress bar."""
    starts = tqdm(range(0, len(images), PREDICT_CHUNK), desc=progress, unit="batch", leave=False, disable=None if progress else True)
    outs = [session.run(OUTPUTS, {"images": images[i : i + PREDICT_CHUNK]}) for i in starts]
    return tuple(np.concatenate([o[k] for o in outs]) for k in range(len(OUTPUTS)))


def verify(onnx_logits: np.ndarray, onnx_probabilities: np.ndarray, torch_logits: np.ndarray, temperature: float) -> float:
    """Max |logit difference| over the test images; raises when it, any argmax or the calibrated
    probabilities (against softmax(PyTorch logits / temperature)) disagree."""
    diff = float(np.abs(onnx_logits - torch_logits).max())
    flipped = int((onnx_logits.argmax(1) != torch_logits.argmax(1)).sum())
    probability_diff = float(np.abs(onnx_probabilities - softmax(torch_logits, temperature)).max())
    print(
        f"verify: {len(onnx_logits)} test images, max |logit diff| {diff:.2e} (tolerance {TOLERANCE:.0e}), "
        f"{flipped} argmax changes, max |probability diff| {probability_diff:.2e}"
    )
    if diff > TOLERANCE or flipped or probability_diff > TOLERANCE:
        raise UserError(
            f"the ONNX graph disagrees with PyTorch (max logit diff {diff:.2e}, {flipped} argmax changes, "
            f"max probability diff {probability_diff:.2e}); no bundle written"
        )
    return diff


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replace the bundle's manifest in one rename: a reader sees the old one or the new one, whole."""
    write_whole(folder / MANIFEST, manifest.model_dump_json(indent=2) + "\n")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except OSError:
        return None
    return out.stdout.strip() or None


def export(
    run: TrainedRun, data: Cifar10, out: Path, name: str, components: int | None = KNN_COMPONENTS, tta: str = "none"
) -> Manifest:
    """Write the bundle to a temporary folder, then move it into place: never half a bundle.

    tta: test-time augmentation built into the graph (models.TTA_LEVELS); the KNN head is fitted
    on the embeddings that graph gives, so it matches what serving computes.
    """
    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another --name")
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    try:
        manifest = _write_bundle(run, data, folder, name, components, tta)
        folder.chmod(0o755)  # mkdtemp makes it private; a bundle is read by other users (containers)
        folder.rename(out)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return manifest


def _write_bundle(run: TrainedRun, data: Cifar10, folder: Path, name: str, components: int | None, tta: str) -> Manifest:
    recipe = run.checkpoint["recipe"]
    train, held, test = data.splits(recipe.get("limit"), recipe.get("holdout", 0))
    model = TestTimeAugmentation(run.model.float(), tta)
    calibration = calibrate(model, held)  # on the views and precision the graph will compute
    export_onnx(model, calibration.temperature, folder / MODEL_FILE)
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    test_logits, test_probabilities, test_embeddings = run_onnx(session, to_nhwc(test.images), "onnxruntime test")
    torch_logits = predict(model, test.images, torch.device("cpu"), bf16=False, progress="PyTorch test")[0].numpy()
    diff = verify(test_logits, test_probabilities, torch_logits, calibration.temperature)  # before anything else is written
    labels = test.labels.numpy()
    train_embeddings = run_onnx(session, to_nhwc(train.images), "onnxruntime train")[2]
    held_embeddings = run_onnx(session, to_nhwc(held.images), "onnxruntime held-out")[2] if len(held) else None
    fit = (train_embeddings, train.labels.numpy(), len(data.classes), held_embeddings, held.labels.numpy())
    head, choice = fit_head(*fit, components=components)
    full = fit_head(*fit)[0] if components else head
    head.save(folder / KNN_FILE)
    served = NeighbourHead.load(folder / KNN_FILE, len(data.classes), choice.k, choice.metric)  # its accuracy is what the file gives

    manifest = Manifest(
        name=name,
        version=datetime.now(UTC).strftime("%Y%m%d.%H%M%S"),
        architecture=recipe["model"],
        recipe=recipe,
        classes=tuple(data.classes),
        normalization=Normalization(mean=tuple(run.checkpoint["mean"]), std=tuple(run.checkpoint["std"])),
        embedding_dim=int(test_embeddings.shape[1]),
        test_time_augmentation=tta,
        calibration=calibration,
        accuracy=Accuracy(
            test_images=len(labels),
            onnx=float((test_logits.argmax(1) == labels).mean()),
            pytorch=float((torch_logits.argmax(1) == labels).mean()),
            max_abs_logit_diff=diff,
            tolerance=TOLERANCE,
        ),
        knn=KnnHead(
            k=choice.k,
            metric=choice.metric,
            components=components,
            fit_images=len(train),
            test_accuracy=served.accuracy(test_embeddings, labels),
            test_accuracy_full_embedding=full.accuracy(test_embeddings, labels),
        ),
        files={f: FileEntry(sha256=sha256(folder / f), bytes=(folder / f).stat().st_size) for f in (MODEL_FILE, KNN_FILE)},
        provenance=Provenance(
            git_commit=git_commit(),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            versions={p: version(p) for p in ("torch", "onnx", "onnxruntime", "numpy")},
            data=data.source,
            run=run.name,
        ),
    )
    write_manifest(folder, manifest)
    return manifest
