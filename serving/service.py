"""The BentoML service: upload bytes → bundle.images (open, decode) → uint8 array → Bundle → response model.

    bentoml serve            # in the repository root; bentofile.yaml points here

Settings come from CIFAR10_* environment variables (serving/settings.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import bentoml
import numpy as np
from bentoml.exceptions import BadInput, BentoMLException, InternalServerError
from PIL import Image
from pydantic import Field, ValidationError
from starlette.datastructures import UploadFile

from bundle.images import ImageError, open_image, to_pixels
from bundle.runtime import (
    Bundle,
    BundleError,
    MissingVariant,
    Prediction,
    default_providers,
    find_bundles,
    preload_cuda,
    read_manifest,
    verify,
)
from serving import boundary, v2
from serving.admission import Abandonment, Admission
from serving.batching import Batcher
from serving.errors import ErrorAnswers
from serving.schemas import (
    CalibrationSummary,
    Classification,
    Embedding,
    KnnAnswer,
    LabelProbability,
    ModelSummary,
    Neighbour,
    TopK,
    UploadScore,
)
from serving.settings import Settings
from serving.uploads import INLINE_BYTES, INLINE_PIXELS, RAW_BODY_NAME, Bodies, Upload, upload_bytes

log = logging.getLogger("bentoml.cifar10")  # BentoML's server shows its own logger tree only
T = TypeVar("T")

def bundle_folders(settings: Settings) -> list[Path]:
    if not settings.models_dir.is_dir():
        raise BundleError(f"models folder {settings.models_dir} not found; set CIFAR10_MODELS_DIR or run from the repository root")
    folders = [settings.models_dir / n for n in settings.models] or find_bundles(settings.models_dir)
    if not folders:
        raise BundleError(f"no bundle in {settings.models_dir}: export one with `cifar10 export RUN --name NAME`")
    return folders


def each_bundle(settings: Settings, open_one: Callable[[Path], T]) -> list[T]:
    """open_one(folder) for every bundle to serve; one that raises BundleError stops all, or is skipped (CIFAR10_BROKEN_BUNDLES)."""
    opened = []
    for folder in bundle_folders(settings):
        try:
            opened.append(open_one(folder))
        except BundleError as exc:
            if settings.broken_bundles == "fail":
                raise BundleError(f"{exc}\n(set CIFAR10_BROKEN_BUNDLES=skip to serve the other bundles without it)") from None
            log.error("skipping a bundle that cannot be served (CIFAR10_BROKEN_BUNDLES=skip): %s", exc)
    if not opened:
        raise BundleError(f"no bundle in {settings.models_dir} can be served; see the errors above")
    return opened


def check_bundle(folder: Path, settings: Settings) -> None:
    """The checks of Bundle.load that need no onnxruntime session: the manifest, and the sha256 of the files a worker opens."""
    try:
        verify(folder, settings.precision_of(folder.name))
    except MissingVariant:  # served as fp32, with a warning from the worker
        verify(folder)


def check_names(settings: Settings, folders: list[Path]) -> None:
    """At start, in the supervisor: a bundle that a setting names but is not there or not served is a typo
    or a stale setting: say so, not serve fp32 or another default. (Only the stock CIFAR10_DEFAULT_MODEL gives way to the first bundle
    served, so that CIFAR10_MODELS=cnn needs no second setting.)"""
    # a name that is no folder is a typo, not a broken bundle: CIFAR10_BROKEN_BUNDLES=skip does not pass it over at start
    # (a folder removed later is a broken bundle to a worker that starts then)
    if missing := [folder.name for folder in folders if not folder.is_dir()]:
        found = ", ".join(p.name for p in find_bundles(settings.models_dir)) or "none"
        raise BundleError(f"CIFAR10_MODELS names {', '.join(missing)}, not a bundle in {settings.models_dir}; found: {found}")
    served = [folder.name for folder in folders]
    unknown = sorted(name for name in settings.precisions() if name is not None and name not in served)
    if unknown:
        raise BundleError(f"CIFAR10_PRECISION names {', '.join(unknown)}, not among the bundles served: {', '.join(served)}")
    for name, precision in settings.precisions().items():  # a bundle named with a precision it lacks: asked for, so not fp32 instead
        if name is None or precision == "fp32":
            continue
        try:
            variants = {v.precision for v in read_manifest(settings.models_dir / name).variants}
        except BundleError:  # a broken bundle: CIFAR10_BROKEN_BUNDLES decides, in each_bundle
            continue
        if precision not in variants:
            raise BundleError(f"CIFAR10_PRECISION asks for {name}:{precision}, and {name} has no {precision} variant: add one with `cifar10 quantize {name}`")
    if settings.default_model not in served and settings.default_model != Settings.default_model:
        raise BundleError(f"CIFAR10_DEFAULT_MODEL names {settings.default_model}, not among the bundles served: {', '.join(served)}")


def load_bundles(settings: Settings) -> dict[str, Bundle]:
    providers = list(settings.providers) or default_providers()
    preload_cuda(providers)
    return {b.manifest.name: b for b in each_bundle(settings, lambda folder: load_bundle(folder, providers, settings))}


def load_bundle(folder: Path, providers: list[str], settings: Settings) -> Bundle:
    options = dict(providers=providers, threads=settings.threads or None, spinning=settings.thread_spinning, sessions=settings.sessions)
    try:
        bundle = Bundle.load(folder, precision=settings.precision_of(folder.name), **options)
    except MissingVariant as exc:
        log.warning("%s: serving its fp32 graph", exc)
        bundle = Bundle.load(folder, **options)
    for session in range(len(bundle.sessions)):  # warm-up before /readyz says yes
        bundle.predict(np.zeros((1, 32, 32, 3), np.uint8), session)
    log.info("bundle %s (%s): provider in use %s (asked for %s)", bundle.manifest.name, bundle.precision, bundle.providers[0], providers)
    return bundle


@functools.cache
def concurrency_gauge():
    """The requests admitted at once now, summed over the live workers (serving/admission.py)."""
    from prometheus_client import Gauge  # in the worker, once BentoML has set up multiprocess metrics

    return Gauge("cifar10_concurrency_limit", "Requests admitted at once, summed over the live workers", multiprocess_mode="livesum")


def image_name(index: int, upload: UploadFile) -> str:
    """How an error names an image: its place in the request, and the file name the client gave it."""
    given = upload.filename if upload.filename and upload.filename != RAW_BODY_NAME else None
    return f"image {index}" + (f" ({given[:60]!r})" if given else "")


def answering(endpoint: Callable) -> Callable:
    """For every endpoint: an answer it built wrongly (a probability of NaN from a broken graph) is a fault of the
    server, a 500 with the traceback in the log: BentoML answers every pydantic ValidationError with a 400,
    which tells the client its request was wrong and not to send it again."""

    @functools.wraps(endpoint)
    async def answered(*args, **kwargs):
        try:
            return await endpoint(*args, **kwargs)
        except ValidationError as exc:
            raise InternalServerError(f"the service built an answer it cannot send ({exc.title}: {exc.error_count()} invalid values); its log has the details") from exc

    return answered


def cannot_start(reason: Exception) -> NoReturn:
    """End `bentoml serve` with the reason alone (exit status 1): what to fix is a setting or a bundle, not code."""
    raise SystemExit(f"cifar10 cannot start: {reason}")


try:
    SETTINGS = Settings.from_env()  # read once at import: BentoML's decorators below need some of them
except ValueError as exc:
    cannot_start(exc)
ROUTES = ("/classify", "/topk", "/embed", "/knn")
# at least one image per request; the upper bound (CIFAR10_MAX_IMAGES) is checked in the endpoint
Images = Annotated[list[Upload], Field(min_length=1)]


@bentoml.service(name="cifar10", workers=SETTINGS.workers, traffic={"timeout": SETTINGS.timeout_s}, http=SETTINGS.http())
@bentoml.asgi_app(v2.app)  # the Open Inference Protocol's /v2 routes, beside the image endpoints
class CIFAR10:
    @bentoml.on_deployment
    def check_bundles() -> None:
        """Runs once in BentoML's supervisor before any worker starts: a broken bundle ends `bentoml serve` here
        with exit status 1 and the reason, where a worker failing in __init__ would be restarted over and over."""
        # the supervisor runs where `bentoml serve` was started; workers run in the service's working dir (a bento's src/)
        settings = dataclasses.replace(SETTINGS, models_dir=Path(CIFAR10.working_dir) / SETTINGS.models_dir)
        try:
            check_names(settings, bundle_folders(settings))
            each_bundle(settings, lambda folder: check_bundle(folder, settings))
        except BundleError as exc:
            cannot_start(exc)

    def __init__(self) -> None:
        # imported here: BentoML sets up multiprocess metrics in the worker before __init__ runs
        from prometheus_client import Counter, Histogram

        self.settings = s = SETTINGS
        self.bundles = load_bundles(s)
        self.default = s.default_model if s.default_model in self.bundles else next(iter(self.bundles))
        predictions = Counter("cifar10_predictions", "Images classified, per model and label", ["model", "label"])
        # each (model, class) counter looked up once, not per image: labels() showed in the request path's profile (docs/performance.md)
        self.predictions = {
            (name, i): predictions.labels(model=name, label=label) for name, b in self.bundles.items() for i, label in enumerate(b.manifest.classes)
        }
        concurrency_gauge().set(s.max_concurrency)
        sizes = Histogram("cifar10_batch_size", "Images per onnxruntime call", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batchers = {
            name: Batcher(bundle, s.max_batch_size, s.max_latency_ms, sizes.labels(model=name).observe)
            for name, bundle in self.bundles.items()
        }
        # Everything loaded so far lives as long as the worker: keep it out of the garbage collector's full
        # passes, which would otherwise walk all of it again and again under load, stalling every request.
        gc.collect()
        gc.freeze()

    async def _predict(self, bundle: Bundle, images: list[UploadFile]) -> Prediction:
        """Decode, then run in the bundle's batcher together with concurrent requests.

        The endpoints are coroutines: a request waits for its batch without holding a thread, with
        less Python work per request than a thread hand-off (docs/performance.md). Small uploads, such
        as CIFAR-10's own images, decode on the event loop too, for the same reason; a request of more
        bytes or more pixels (read from the headers first: a small PNG can hold 52 megapixels) decodes
        in a thread, so that the loop goes on answering, and stops at its next image once abandoned."""
        if len(images) > self.settings.max_images:
            raise BadInput(f"{len(images)} images in one request; at most {self.settings.max_images}")
        small = sum(upload.size or 0 for upload in images) <= INLINE_BYTES
        opened = self._open(images) if small else await asyncio.to_thread(self._open, images)
        pixels_in_all = sum(image.width * image.height for image in opened)
        if pixels_in_all > self.settings.max_request_pixels:
            for image in opened:
                image.close()
            message = f"the images decode to {pixels_in_all:,} pixels in all, over the limit of {self.settings.max_request_pixels:,} (CIFAR10_MAX_REQUEST_PIXELS): send fewer or smaller images per request"
            raise BentoMLException(message, error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        abandoned = threading.Event()
        try:
            if small and pixels_in_all <= INLINE_PIXELS:
                pixels = self._decode(opened, images, abandoned)
            else:
                pixels = await asyncio.to_thread(self._decode, opened, images, abandoned)
        except asyncio.CancelledError:  # the client went away, or CIFAR10_TIMEOUT_S ran out
            abandoned.set()
            raise
        return await self.batchers[bundle.manifest.name].predict(pixels)

    def _open(self, images: list[UploadFile]) -> list[Image.Image]:
        """Each upload's bytes, within their limit, opened as an image whose header is checked."""
        opened = []
        limits = self.settings.limits  # built once per request, not per image
        for i, upload in enumerate(images):
            try:
                data = upload_bytes(upload, self.settings.max_image_bytes)
            except ValueError as exc:
                raise BentoMLException(f"{image_name(i, upload)}: {exc}", error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None
            try:
                opened.append(open_image(data, limits))
            except ImageError as exc:
                raise BadInput(f"{image_name(i, upload)}: {exc}") from None
        return opened

    @staticmethod
    def _decode(opened: list[Image.Image], uploads: list[UploadFile], abandoned: threading.Event) -> np.ndarray:
        arrays = []
        for i, image in enumerate(opened):
            if abandoned.is_set():  # nobody waits for the answer: leave the cores to requests that do
                raise asyncio.CancelledError
            try:
                arrays.append(to_pixels(image))
            except ImageError as exc:
                raise BadInput(f"{image_name(i, uploads[i])}: {exc}") from None
        return np.stack(arrays)

    def count(self, bundle: Bundle, indices) -> None:
        """The predictions metric: one per image, by the label answered."""
        for i in indices:
            self.predictions[bundle.manifest.name, int(i)].inc()

    def __is_ready__(self) -> bool:
        return bool(self.bundles)

    def _bundle(self, model: str | None) -> Bundle:
        name = model or self.default
        if name not in self.bundles:
            raise BadInput(f"unknown model {name!r}; loaded: {', '.join(self.bundles)}")
        return self.bundles[name]

    @bentoml.api
    @answering
    async def classify(self, images: Images, model: str | None = None) -> list[Classification]:
        """The most probable class of each image."""
        bundle = self._bundle(model)
        probs = (await self._predict(bundle, images)).probabilities
        classes = bundle.manifest.classes
        self.count(bundle, probs.argmax(1))
        return [Classification(label=classes[i], index=int(i), probability=float(p[i])) for p, i in zip(probs, probs.argmax(1))]

    @bentoml.api
    @answering
    async def topk(self, images: Images, k: Annotated[int, Field(ge=1)] = 3, model: str | None = None) -> list[TopK]:
        """The k most probable classes of each image."""
        bundle = self._bundle(model)
        classes = bundle.manifest.classes
        if not 1 <= k <= len(classes):
            raise BadInput(f"k must lie in 1..{len(classes)}, got {k}")
        probs = (await self._predict(bundle, images)).probabilities
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        self.count(bundle, order[:, 0])
        return [TopK(top=[LabelProbability(label=classes[i], probability=float(p[i])) for i in row]) for p, row in zip(probs, order)]

    @bentoml.api
    @answering
    async def embed(self, images: Images, model: str | None = None) -> list[Embedding]:
        """The penultimate-layer embedding of each image."""
        embeddings = (await self._predict(self._bundle(model), images)).embeddings
        return [Embedding(embedding=e.tolist()) for e in embeddings]

    @bentoml.api
    @answering
    async def knn(self, images: Images, neighbours: Annotated[int, Field(ge=1, le=SETTINGS.max_neighbours)] = 5, model: str | None = None) -> list[KnnAnswer]:
        """The KNN head's vote on each image's embedding, and its nearest training images."""
        bundle = self._bundle(model)
        classes = bundle.manifest.classes
        if neighbours > len(bundle.head.points):  # a head fitted on fewer training rows than CIFAR10_MAX_NEIGHBOURS
            raise BadInput(f"neighbours must lie in 1..{len(bundle.head.points)}, the training rows of {bundle.manifest.name}'s KNN head; got {neighbours}")
        embeddings = (await self._predict(bundle, images)).embeddings
        votes, distances, indices, labels = await asyncio.to_thread(bundle.knn, embeddings, neighbours)  # a search over the training set
        return [
            KnnAnswer(
                label=classes[int(v.argmax())],
                votes={name: float(share) for name, share in zip(classes, v)},
                neighbours=[Neighbour(index=int(i), distance=float(d), label=classes[int(c)]) for i, d, c in zip(*row)],
            )
            for v, row in zip(votes, zip(indices, distances, labels))
        ]

    @bentoml.api(route="/models")
    @answering
    async def models(self) -> list[ModelSummary]:
        """The loaded bundles: what they are, how good, and where they run."""
        return [
            ModelSummary(
                name=name, version=b.manifest.version, architecture=b.manifest.architecture,
                recipe=b.manifest.recipe.get("name", ""), classes=list(b.manifest.classes),
                embedding_dim=b.manifest.embedding_dim, precision=b.precision, test_accuracy=b.test_accuracy, test_images=b.manifest.accuracy.test_images,
                calibration=CalibrationSummary(**b.manifest.calibration.model_dump(include={"method", "temperature", "fit_images"})),
                robustness={r.condition: UploadScore(description=r.description, accuracy=r.accuracy, ece=r.ece) for r in b.robustness},
                knn_test_accuracy=b.manifest.knn.test_accuracy, knn_k=b.manifest.knn.k, knn_metric=b.manifest.knn.metric,
                provider=b.providers[0], default=name == self.default,
            )  # fmt: skip
            for name, b in self.bundles.items()
        ]


boundary.apply()
# The service's own middleware. BentoML stacks it innermost in this order, except Admission, which the
# boundary moves outermost, just under BentoML's request metrics (serving/boundary.py shows the whole stack).
CIFAR10.add_asgi_middleware(ErrorAnswers, routes=ROUTES, bodyless=("/models",))
CIFAR10.add_asgi_middleware(
    Admission, admits=lambda path: path in ROUTES or v2.is_infer(path),
    max_concurrency=SETTINGS.max_concurrency, max_queue=SETTINGS.max_queue, max_queue_wait_s=SETTINGS.max_queue_wait_s,
    target_latency_s=SETTINGS.target_latency_s, on_limit=lambda value: concurrency_gauge().set(value),
)  # fmt: skip
CIFAR10.add_asgi_middleware(
    Bodies, paths=ROUTES, post_only=(*ROUTES, "/models"), readable=("/models",),
    max_image_bytes=SETTINGS.max_image_bytes, max_request_bytes=SETTINGS.max_request_bytes,
)  # fmt: skip
CIFAR10.add_asgi_middleware(Abandonment, watches=lambda path: path in ROUTES or v2.is_infer(path))  # sees the body Bodies passes on
CIFAR10.add_asgi_middleware(boundary.DirectEndpoints, service=CIFAR10, routes=ROUTES)  # innermost: answers the image endpoints' forms
