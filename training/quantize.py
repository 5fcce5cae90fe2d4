"""`cifar10 quantize NAME`: add an int8 variant to a bundle, calibrated on training images.

onnxruntime's static quantization (QDQ format, per-channel int8 weights, uint8 activations) of
the convolutions and matrix products; the ranges come from `calibration_images` training images
(never test images). The variant's accuracy is measured on every test image and recorded in the
manifest beside its sha256, so the service loads it (CIFAR10_PRECISION=int8) only after the same
checks as the main graph. The KNN head stays the one fitted on fp32 embeddings.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from bundle.manifest import INT8_FILE, MODEL_FILE, FileEntry, Variant
from bundle.runtime import Bundle, sha256
from cifar10.errors import UserError
from training.data import Cifar10
from training.export import run_onnx, to_nhwc, write_manifest

CALIBRATION_IMAGES = 512
INT8_TOLERANCE = 0.005  # test accuracy an int8 variant may lose against its fp32 graph and still be advised for serving
CALIBRATION_BATCH = 64


class Batches(CalibrationDataReader):
    def __init__(self, pixels: np.ndarray):
        self.batches = iter([{"images": pixels[i : i + CALIBRATION_BATCH]} for i in range(0, len(pixels), CALIBRATION_BATCH)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def calibration_pixels(data: Cifar10, count: int, seed: int = 0) -> np.ndarray:
    """A seeded random sample of training images, uint8 NHWC as the graph takes them."""
    if not 1 <= count <= len(data.train):
        raise UserError(f"--calibration-images must lie in 1..{len(data.train)}, got {count}")
    chosen = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:count]
    return to_nhwc(data.train.images[chosen])


def quantize(folder: Path, data: Cifar10, calibration_images: int = CALIBRATION_IMAGES) -> Variant:
    """Write folder/model.int8.onnx and list it in the manifest (replacing an earlier int8 variant)."""
    bundle = Bundle.load(folder)  # the same checks as serving: hashes, graph contract
    manifest = bundle.manifest
    if list(manifest.classes) != list(data.classes):
        raise UserError(f"{folder} was trained on classes {list(manifest.classes)}, but the data has {list(data.classes)}")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".quantize-") as tmp:
        prepared, written = Path(tmp) / "prepared.onnx", Path(tmp) / INT8_FILE
        quant_pre_process(str(folder / MODEL_FILE), str(prepared))
        quantize_static(
            str(prepared), str(written), Batches(calibration_pixels(data, calibration_images)),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            # 7-bit weights: CPUs without AVX-512 VNNI multiply uint8 by int8 in pairs summed into int16
            # (vpmaddubsw), which saturates with 8-bit weights; with 7 the sums fit, and every x86 CPU
            # computes what a VNNI one does (docs/bundle.md#the-int8-variant)
            reduce_range=True,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        )  # fmt: skip
        session = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
        test = data.splits(manifest.recipe.get("limit"), manifest.recipe.get("holdout", 0))[2]  # the fp32 figure's test images
        logits = run_onnx(session, to_nhwc(test.images), "int8 test")[0]
        accuracy = float((logits.argmax(1) == test.labels.numpy()).mean())
        entry = Variant(file=INT8_FILE, precision="int8", test_accuracy=accuracy, calibration_images=calibration_images)
        updated = manifest.model_copy(
            update=dict(
                variants=tuple(v for v in manifest.variants if v.precision != "int8") + (entry,),
                files={**manifest.files, INT8_FILE: FileEntry(sha256=sha256(written), bytes=written.stat().st_size)},
            )
        )
        os.replace(written, folder / INT8_FILE)
        write_manifest(folder, updated)  # last: until here the bundle is the old one, whole
    return entry
