"""The BentoML service: upload bytes → images.decode → uint8 array → Bundle → response model.

    bentoml serve            # in the repository root; bentofile.yaml points here

Settings come from CIFAR10_* environment variables (serving/settings.py).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort
from bentoml.exceptions import BadInput, BentoMLException

from serving.batching import Batcher, Overloaded
from serving.bundle import Bundle, BundleError, MissingVariant, Prediction
from serving.images import ImageError, decode
from serving.schemas import Classification, Embedding, KnnAnswer, LabelProbability, ModelSummary, Neighbour, TopK
from serving.settings import Settings
from serving.uploads import RawImageBody, refuse_urls_for_files

log = logging.getLogger("bentoml.cifar10")  # BentoML's server shows its own logger tree only

def default_providers() -> list[str]:
    """CUDA when this onnxruntime build can see it, else the CPU; onnxruntime reports what it really used."""
    available = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]


def preload_cuda(providers: list[str]) -> None:
    """Load CUDA and cuDNN from pip's nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) when CUDA is asked for."""
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def load_bundles(settings: Settings) -> dict[str, Bundle]:
    if not settings.models_dir.is_dir():
        raise BundleError(f"models folder {settings.models_dir} not found; set CIFAR10_MODELS_DIR or run from the repository root")
    folders = [settings.models_dir / n for n in settings.models] or sorted(
        p for p in settings.models_dir.iterdir() if (p / "manifest.json").is_file()
    )
    if not folders:
        raise BundleError(f"no bundle in {settings.models_dir}: export one with `cifar10 export RUN --name NAME`")
    providers = list(settings.providers) or default_providers()
    preload_cuda(providers)
    bundles = {}
    for folder in folders:
        try:
            bundle = Bundle.load(folder, providers=providers, threads=settings.threads or None, precision=settings.precision)
        except MissingVariant as exc:
            log.warning("%s: serving its fp32 graph", exc)
            bundle = Bundle.load(folder, providers=providers, threads=settings.threads or None)
        bundle.predict(np.zeros((1, 32, 32, 3), np.uint8))  # warm-up before /readyz says yes
        log.info("bundle %s (%s): provider in use %s (asked for %s)", bundle.manifest.name, bundle.precision, bundle.providers[0], providers)
        bundles[bundle.manifest.name] = bundle
    return bundles


@bentoml.service(name="cifar10", workers=Settings.from_env().workers, threads=Settings.from_env().request_threads, traffic={"timeout": 60})
class CIFAR10:
    def __init__(self) -> None:
        # imported here: BentoML sets up multiprocess metrics in the worker before __init__ runs
        from prometheus_client import Counter, Histogram

        self.settings = s = Settings.from_env()
        self.bundles = load_bundles(s)
        self.default = s.default_model if s.default_model in self.bundles else next(iter(self.bundles))
        self.predictions = Counter("cifar10_predictions", "Images classified, per model and label", ["model", "label"])
        sizes = Histogram("cifar10_batch_size", "Images per onnxruntime call", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batchers = {
            name: Batcher(bundle, s.max_batch_size, s.max_latency_ms, s.max_queue, sizes.labels(model=name).observe)
            for name, bundle in self.bundles.items()
        }

    def _predict(self, bundle: Bundle, images: list[Path]) -> Prediction:
        """Decode, then run in the bundle's batcher together with concurrent requests."""
        pixels = self._pixels(images)
        try:
            return self.batchers[bundle.manifest.name].predict(pixels)
        except Overloaded as exc:  # 429, not 503: BentoML hides the message of every 5xx
            raise BentoMLException(f"{exc}; retry later", error_code=HTTPStatus.TOO_MANY_REQUESTS) from None

    def _count(self, bundle: Bundle, labels: list[str]) -> None:
        for label in labels:
            self.predictions.labels(model=bundle.manifest.name, label=label).inc()

    def __is_ready__(self) -> bool:
        return bool(self.bundles)

    def _bundle(self, model: str | None) -> Bundle:
        name = model or self.default
        if name not in self.bundles:
            raise BadInput(f"unknown model {name!r}; loaded: {', '.join(self.bundles)}")
        return self.bundles[name]

    def _pixels(self, images: list[Path]) -> np.ndarray:
        if not images:
            raise BadInput("no image: send one or more files in the multipart field 'images'")
        if len(images) > self.settings.max_images:
            raise BadInput(f"{len(images)} images in one request; at most {self.settings.max_images}")
        arrays = []
        for i, path in enumerate(images):
            size = path.stat().st_size
            if size > self.settings.max_image_bytes:
                raise BentoMLException(
                    f"image {i}: {size:,} bytes, over the limit of {self.settings.max_image_bytes:,}",
                    error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                )
            try:
                arrays.append(decode(path.read_bytes(), self.settings.limits))
            except ImageError as exc:
                raise BadInput(f"image {i}: {exc}") from None
        return np.stack(arrays)

    @bentoml.api
    def classify(self, images: list[Path], model: str | None = None) -> list[Classification]:
        """The most probable class of each image."""
        bundle = self._bundle(model)
        probs = self._predict(bundle, images).probabilities
        classes = bundle.manifest.classes
        self._count(bundle, [classes[i] for i in probs.argmax(1)])
        return [Classification(label=classes[i], index=int(i), probability=float(p[i])) for p, i in zip(probs, probs.argmax(1))]

    @bentoml.api
    def topk(self, images: list[Path], k: int = 3, model: str | None = None) -> list[TopK]:
        """The k most probable classes of each image."""
        bundle = self._bundle(model)
        classes = bundle.manifest.classes
        if not 1 <= k <= len(classes):
            raise BadInput(f"k must lie in 1..{len(classes)}, got {k}")
        probs = self._predict(bundle, images).probabilities
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        self._count(bundle, [classes[row[0]] for row in order])
        return [TopK(top=[LabelProbability(label=classes[i], probability=float(p[i])) for i in row]) for p, row in zip(probs, order)]

    @bentoml.api
    def embed(self, images: list[Path], model: str | None = None) -> list[Embedding]:
        """The penultimate-layer embedding of each image."""
        embeddings = self._predict(self._bundle(model), images).embeddings
        return [Embedding(embedding=e.tolist()) for e in embeddings]

    @bentoml.api
    def knn(self, images: list[Path], neighbours: int = 5, model: str | None = None) -> list[KnnAnswer]:
        """The KNN head's vote on each image's embedding, and its nearest training images."""
        if not 1 <= neighbours <= self.settings.max_neighbours:
            raise BadInput(f"neighbours must lie in 1..{self.settings.max_neighbours}, got {neighbours}")
        bundle = self._bundle(model)
        classes = bundle.manifest.classes
        votes, distances, indices, labels = bundle.knn(self._predict(bundle, images).embeddings, neighbours)
        return [
            KnnAnswer(
                label=classes[int(v.argmax())],
                votes={name: float(share) for name, share in zip(classes, v)},
                neighbours=[Neighbour(index=int(i), distance=float(d), label=classes[int(c)]) for i, d, c in zip(*row)],
            )
            for v, row in zip(votes, zip(indices, distances, labels))
        ]

    @bentoml.api(route="/models")
    def models(self) -> list[ModelSummary]:
        """The loaded bundles: what they are, how good, and where they run."""
        return [
            ModelSummary(
                name=name, version=b.manifest.version, architecture=b.manifest.architecture,
                recipe=b.manifest.recipe.get("name", ""), classes=list(b.manifest.classes),
                embedding_dim=b.manifest.embedding_dim, precision=b.precision, test_accuracy=b.test_accuracy,
                knn_test_accuracy=b.manifest.knn.test_accuracy, knn_k=b.manifest.knn.k, knn_metric=b.manifest.knn.metric,
                provider=b.providers[0], default=name == self.default,
            )  # fmt: skip
            for name, b in self.bundles.items()
        ]


refuse_urls_for_files()
# One image may also come as the raw body (Content-Type image/* or application/octet-stream).
CIFAR10.add_asgi_middleware(
    RawImageBody, paths=("/classify", "/topk", "/embed", "/knn"), max_bytes=Settings.from_env().max_image_bytes
)
