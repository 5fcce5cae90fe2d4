"""The bundle manifest: everything the service needs to know about a model, in one JSON file.

Training writes it through these models and serving reads it through them, so the two cannot
drift apart. Importable without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# 2: a calibrated `probabilities` output, its calibration and the robustness table;
# 3: the KNN head as NumPy arrays (knn.npz, bundle/knn.py) instead of a scikit-learn pickle
SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
KNN_FILE = "knn.npz"
DEFAULT_BUNDLE = "airbench"  # what the service answers with and `cifar10 score` uses when no model is named
MODELS_DIR = "models"  # where the service and the command line look for bundles, unless CIFAR10_MODELS_DIR says otherwise
INT8_FILE = "model.int8.onnx"
Precision = Literal["fp32", "int8"]  # fp32: MODEL_FILE; int8: the variant `cifar10 quantize` adds
PRECISIONS: tuple[str, ...] = Precision.__args__
TestTimeAugmentation = Literal["none", "flip", "flip-translate"]
TTA_LEVELS: tuple[str, ...] = TestTimeAugmentation.__args__


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputContract(Strict):
    """What `model.onnx` takes: exactly the pixels of a decoded 32×32 RGB image."""

    name: Literal["images"] = "images"
    dtype: Literal["uint8"] = "uint8"
    shape: tuple[None, Literal[32], Literal[32], Literal[3]] = (None, 32, 32, 3)
    layout: Literal["NHWC"] = "NHWC"
    channel_order: Literal["RGB"] = "RGB"
    resize: Literal["center_crop_bicubic"] = Field(
        default="center_crop_bicubic",
        description="images of another size are converted to RGB, center-cropped to a square, "
        "then resized to 32x32 with Pillow's BICUBIC filter",
    )


class Normalization(Strict):
    """Inside the graph: (pixels - mean) / std per channel, in 0..255 units. Recorded for reference."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class FileEntry(Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class ConditionScore(Strict):
    """The graph on the test set sent as one kind of upload (training/robustness.py), decoded as the service decodes."""

    condition: str
    description: str
    images: int = Field(ge=1)
    accuracy: float = Field(ge=0, le=1)
    ece: float = Field(ge=0, le=1, description="expected calibration error of `probabilities` (15 equal-width bins)")
    ece_uncalibrated: float = Field(ge=0, le=1, description="the same of softmax(logits), before calibration")
    mean_confidence: float = Field(ge=0, le=1, description="mean top-1 probability")


class Variant(Strict):
    """An alternative graph with the same inputs and outputs (e.g. int8), and its measured accuracy."""

    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="a file of the bundle folder, listed in files")
    precision: Literal["fp32", "fp16", "int8"]
    test_accuracy: float = Field(ge=0, le=1)
    calibration_images: int | None = Field(default=None, ge=1, description="training images that set the int8 ranges")
    robustness: tuple[ConditionScore, ...] = Field(default=(), description="`cifar10 robustness`; empty until measured")


class Calibration(Strict):
    """How the graph's `probabilities` come from its `logits`: softmax(logits / temperature).

    The temperature minimises the negative log-likelihood of held-out training images (never
    trained on) sent as every upload condition; 'none' (temperature 1) for a run that kept none."""

    method: Literal["temperature", "none"]
    temperature: float = Field(gt=0)
    fit_images: int = Field(ge=0, description="held-out training images")
    fit_conditions: tuple[str, ...] = Field(description="the upload conditions each of them was sent as")
    ece_before: float | None = Field(ge=0, le=1, description="on the fitting set, of softmax(logits)")
    ece_after: float | None = Field(ge=0, le=1, description="on the fitting set, of probabilities")


class KnnHead(Strict):
    k: int = Field(ge=1)
    metric: Literal["euclidean", "cosine"]
    components: int | None = Field(default=None, ge=1, description="PCA dimensions before the KNN, None for none")
    fit_images: int = Field(ge=1)
    test_accuracy: float = Field(ge=0, le=1)
    test_accuracy_full_embedding: float | None = Field(default=None, ge=0, le=1)


class Accuracy(Strict):
    """Measured by the export on the test set with onnxruntime."""

    test_images: int = Field(ge=1)
    onnx: float = Field(ge=0, le=1)
    pytorch: float = Field(ge=0, le=1)
    max_abs_logit_diff: float = Field(ge=0)
    tolerance: float = Field(gt=0)


class Provenance(Strict):
    git_commit: str | None
    created: str
    versions: dict[str, str]
    data: str
    run: str


class Manifest(Strict):
    schema_version: Literal[3] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str
    architecture: str
    recipe: dict
    classes: tuple[str, ...]
    input: InputContract = InputContract()
    normalization: Normalization
    embedding_dim: int = Field(ge=1)
    outputs: tuple[Literal["logits"], Literal["probabilities"], Literal["embedding"]] = ("logits", "probabilities", "embedding")
    test_time_augmentation: TestTimeAugmentation = Field(
        default="none",
        description="views averaged inside the graph: 'flip' runs 2 per image, 'flip-translate' 6",
    )
    calibration: Calibration
    accuracy: Accuracy
    robustness: tuple[ConditionScore, ...] = Field(default=(), description="`cifar10 robustness`; empty until measured")
    knn: KnnHead
    variants: tuple[Variant, ...] = ()
    files: dict[str, FileEntry]
    provenance: Provenance

    @field_validator("classes")
    @classmethod
    def _distinct_names(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError("classes must be at least two distinct names")
        return classes
