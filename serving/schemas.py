"""Response models: BentoML puts them in the OpenAPI document, so clients see every field."""

from __future__ import annotations

from pydantic import BaseModel, Field

PROBABILITY = (
    "softmax(logits / T), T being the model's calibration temperature (/models): fitted on held-out training images "
    "sent as PNG, JPEG, WebP, noisy and blurred uploads, so that of the answers given with probability p about a share "
    "p is right; /models also gives each model's measured accuracy and calibration error per kind of upload"
)


class Classification(BaseModel):
    label: str = Field(description="the most probable class")
    index: int = Field(description="its position in the model's class list")
    probability: float = Field(ge=0, le=1, description=PROBABILITY)


class LabelProbability(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1, description=PROBABILITY)


class TopK(BaseModel):
    top: list[LabelProbability] = Field(description="the k most probable classes, most probable first")


class Embedding(BaseModel):
    embedding: list[float] = Field(description="the penultimate layer: the input of the last Dense layer")


class Neighbour(BaseModel):
    index: int = Field(description="row of the training set the KNN head was fitted on")
    distance: float
    label: str


class KnnAnswer(BaseModel):
    label: str = Field(description="the KNN head's vote")
    votes: dict[str, float] = Field(description="share of the k neighbours per class")
    neighbours: list[Neighbour]


class CalibrationSummary(BaseModel):
    method: str = Field(description="temperature: probabilities are softmax(logits / temperature); none: softmax(logits)")
    temperature: float
    fit_images: int = Field(description="held-out training images (never trained on) the temperature was fitted on")


class UploadScore(BaseModel):
    description: str
    accuracy: float = Field(description="on the test images sent as this kind of upload")
    ece: float = Field(description="expected calibration error of the probabilities (15 bins)")


class ModelSummary(BaseModel):
    name: str
    version: str
    architecture: str
    recipe: str
    classes: list[str]
    embedding_dim: int
    precision: str = Field(description="fp32, or int8 for the bundle's quantised variant (CIFAR10_PRECISION, for every bundle or per bundle)")
    test_accuracy: float = Field(description="of the graph in use on the test set, measured by export or quantize")
    test_images: int = Field(description="the test images test_accuracy was measured on: 10,000 unless the run was trained with --limit")
    calibration: CalibrationSummary
    robustness: dict[str, UploadScore] = Field(description="of the graph in use, per kind of upload (`cifar10 robustness`); empty until measured")
    knn_test_accuracy: float
    knn_k: int
    knn_metric: str
    provider: str = Field(description="the onnxruntime execution provider really in use")
    default: bool
