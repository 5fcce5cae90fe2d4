"""A model bundle on disk → an onnxruntime session and a KNN head: the only place a model is loaded.

Loading checks, in this order, and refuses with a BundleError that names the file and the
problem: the manifest parses under a known schema version; the files it opens (the graph of the
precision asked for, knn.npz) are listed, exist and have their sha256; the ONNX graph's inputs
and outputs, and the KNN head's arrays, match the manifest. A bundle that loads cannot fail
later for these reasons.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from bundle.knn import NeighbourHead
from bundle.manifest import KNN_FILE, MANIFEST, MODEL_FILE, SCHEMA_VERSION, Manifest, Variant

log = logging.getLogger(__name__)


class BundleError(Exception):
    """A bundle that cannot be served; the message names the file and what is wrong."""


class MissingVariant(BundleError):
    """The bundle has no graph of the precision asked for."""


OUTPUTS = ["logits", "probabilities", "embedding"]  # what every graph gives, in this order


@dataclass(frozen=True)
class Prediction:
    logits: np.ndarray  # float32 [N, classes]
    probabilities: np.ndarray  # float32 [N, classes]: calibrated inside the graph (manifest.calibration)
    embeddings: np.ndarray  # float32 [N, D]

    def __getitem__(self, rows: slice) -> Prediction:
        return Prediction(self.logits[rows], self.probabilities[rows], self.embeddings[rows])

    @staticmethod
    def concatenate(parts: list[Prediction]) -> Prediction:
        if len(parts) == 1:  # one onnxruntime call: its arrays as they are, no copy
            return parts[0]
        return Prediction(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("logits", "probabilities", "embeddings")))


def find_bundles(models_dir: Path) -> list[Path]:
    """The bundle folders of a models folder (those holding a manifest), sorted by name."""
    return sorted(p.parent for p in models_dir.glob(f"*/{MANIFEST}"))


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not folder.parent.is_dir():
        raise BundleError(f"no models folder {folder.parent.resolve()} (give the folder that holds the bundles, such as the repository's models/)")
    if not folder.is_dir():  # a name mistyped: say which bundles there are
        found = [p.name for p in find_bundles(folder.parent)]
        raise BundleError(f"no bundle {folder.name!r} in {folder.parent.resolve()}; " + (f"found: {', '.join(found)}" if found else "it holds none"))
    if not path.is_file():
        raise BundleError(f"{path}: missing; a bundle holds {MANIFEST}, {MODEL_FILE} and {KNN_FILE}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        found = raw.get("schema_version") if isinstance(raw, dict) else None
        hint = "; export the run again with this version's `cifar10 export`" if isinstance(found, int) and found < SCHEMA_VERSION else ""
        raise BundleError(f"{path}: schema_version {found!r} is not {SCHEMA_VERSION}, the one this version reads{hint}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BundleError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']} ({exc.error_count()} problems)") from exc


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(folder: Path, manifest: Manifest, names: tuple[str, ...]) -> None:
    """Each named file is listed in the manifest and has the sha256 listed there."""
    for name in names:
        if name not in manifest.files:
            raise BundleError(f"{folder / MANIFEST}: does not list {name}")
        path, expected = folder / name, manifest.files[name].sha256
        if not path.is_file():
            raise BundleError(f"{path}: missing (the manifest lists it)")
        digest = sha256(path)
        if digest != expected:
            raise BundleError(f"{path}: sha256 {digest[:12]}… does not match the manifest's {expected[:12]}…; refusing to load it")


def check_graph(path: Path, session: ort.InferenceSession, manifest: Manifest) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(uint8)" or inputs[0].shape[1:] != [32, 32, 3]:
        got = [(i.name, i.type, i.shape) for i in inputs]
        raise BundleError(f"{path}: inputs {got} differ from the manifest's images uint8 [N, 32, 32, 3]")
    shapes = {o.name: o.shape for o in outputs}
    classes = len(manifest.classes)
    expected = {"logits": classes, "probabilities": classes, "embedding": manifest.embedding_dim}
    if set(shapes) != set(expected) or any(len(shapes[k]) != 2 or shapes[k][1] != v for k, v in expected.items()):
        wanted = ", ".join(f"{k} [N, {v}]" for k, v in expected.items())
        raise BundleError(f"{path}: outputs {shapes} differ from the manifest's {wanted}")


def available_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU set, capped by a container's CPU quota.

    `docker run --cpus 2` leaves every host core in the CPU set and sets a cgroup v2 quota
    instead ("200000 100000" in cpu.max): without the cap, onnxruntime (and a decoding pool)
    would start a thread per host core and the quota would throttle them.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or a format we do not know: the CPU set
        pass
    return cores


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build can see it, else the CPU; onnxruntime reports what it really used."""
    available = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]


def preload_cuda(providers: list[str]) -> None:
    """Load CUDA and cuDNN from pip's nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) when CUDA is asked for."""
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def session_options(threads: int | None, spinning: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(model_path: Path, providers: list[str] | None, threads: int | None, spinning: bool) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(model_path), session_options(threads, spinning), providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise BundleError(f"{model_path}: onnxruntime cannot load it ({exc})") from exc


# Images per onnxruntime call: activation memory grows with the batch (times the views of test-time
# augmentation), while the rate is flat or falls from 8 images on (docs/performance.md).
PREDICT_CHUNK = 256


def variant(folder: Path, manifest: Manifest, precision: str) -> Variant | None:
    """The manifest's entry for a precision other than fp32 (None for fp32, the main graph)."""
    if precision == "fp32":
        return None
    found = next((v for v in manifest.variants if v.precision == precision), None)
    if found is None:
        raise MissingVariant(f"{folder}: has no {precision} variant; make one with `cifar10 quantize {manifest.name}`")
    return found


def verify(folder: Path, precision: str = "fp32") -> tuple[Manifest, Variant | None]:
    """The manifest, and the variant for `precision`, once the files to load have their listed sha256."""
    manifest = read_manifest(folder)
    chosen = variant(folder, manifest, precision)
    check_files(folder, manifest, (chosen.file if chosen else MODEL_FILE, KNN_FILE))
    return manifest, chosen


class Bundle:
    """A loaded bundle: `predict` for the network, `knn` for the head on its embeddings."""

    def __init__(
        self, folder: Path, manifest: Manifest, sessions: list[ort.InferenceSession], head: NeighbourHead, chosen: Variant | None = None
    ):
        self.folder, self.manifest, self.sessions, self.head = folder, manifest, sessions, head
        self.providers = sessions[0].get_providers()  # what onnxruntime really uses, not what was asked
        self.precision = chosen.precision if chosen else "fp32"
        self.test_accuracy = chosen.test_accuracy if chosen else manifest.accuracy.onnx  # of the graph in use
        self.robustness = chosen.robustness if chosen else manifest.robustness  # of the graph in use

    @classmethod
    def load(
        cls, folder: str | Path, providers: list[str] | None = None, threads: int | None = None, precision: str = "fp32",
        spinning: bool = True, sessions: int = 1,
    ) -> Bundle:
        """precision 'int8' loads the bundle's int8 variant (MissingVariant where it has none).

        spinning: onnxruntime's threads spin-wait for the next call (its default), which is fastest when
        nothing else needs the cores; False lets them sleep, for a process whose Python work shares the
        cores with them (docs/performance.md).
        sessions: beyond 1, that many more onnxruntime sessions of the graph (`predict(images, session=i)`,
        i = 1..sessions), which split the threads among them, for calls that run at once; session 0 has
        them all, for a call that runs alone (serving/batching.py). None are added on a GPU, where there
        are no threads to split, without a thread count, or with fewer threads than sessions."""
        folder = Path(folder)
        manifest, chosen = verify(folder, precision)  # before any file is read
        model_path = folder / (chosen.file if chosen else MODEL_FILE)
        if sessions < 1:
            raise ValueError(f"sessions must be at least 1, got {sessions}")
        opened = [open_session(model_path, providers, threads, spinning)]
        check_graph(model_path, opened[0], manifest)
        if sessions > 1 and threads and threads >= sessions and opened[0].get_providers()[0] == "CPUExecutionProvider":
            shares = [threads // sessions + (i < threads % sessions) for i in range(sessions)]
            opened += [open_session(model_path, providers, share, spinning) for share in shares]
        bundle = cls(folder, manifest, opened, load_head(folder, manifest), chosen)
        asked = providers or ["CPUExecutionProvider"]
        log.info("bundle %s (%s) from %s: provider in use %s (asked for %s)", manifest.name, precision, folder, bundle.providers[0], asked)
        return bundle

    @property
    def session(self) -> ort.InferenceSession:
        return self.sessions[0]

    def predict(self, images: np.ndarray, session: int = 0) -> Prediction:
        """images: uint8 [N, 32, 32, 3] RGB, as images.decode gives them; any N, in onnxruntime calls of at
        most PREDICT_CHUNK images, so in bounded memory. Calls on different sessions run at once, each on
        its own threads; calls on the same one share them."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"expected uint8 [N, 32, 32, 3], got {images.dtype} {images.shape}")
        starts = range(0, max(len(images), 1), PREDICT_CHUNK)  # an empty batch is one call too, answered with no rows
        calls = [Prediction(*self.sessions[session].run(OUTPUTS, {"images": images[i : i + PREDICT_CHUNK]})) for i in starts]
        return Prediction.concatenate(calls)

    def knn(self, embeddings: np.ndarray, neighbours: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(vote distribution [N, classes], and per neighbour: distance, training-set index, class index)."""
        votes, distances, indices = self.head.search(embeddings, neighbours)
        return votes, distances, indices, self.head.labels[indices]


def load_head(folder: Path, manifest: Manifest) -> NeighbourHead:
    knn = manifest.knn
    try:
        head = NeighbourHead.load(folder / KNN_FILE, len(manifest.classes), knn.k, knn.metric)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # what np.load raises for a file that is not an .npz of arrays
        raise BundleError(f"{folder / KNN_FILE}: not a KNN head this version reads ({exc})") from exc
    dimensions = knn.components or manifest.embedding_dim
    if head.points.shape != (knn.fit_images, dimensions) or (head.components is not None) != bool(knn.components):
        raise BundleError(f"{folder / KNN_FILE}: {head.points.shape[0]} rows of {head.points.shape[1]} dimensions, where the manifest says {knn.fit_images} of {dimensions}")
    if head.components is not None and head.components.shape[1] != manifest.embedding_dim:
        raise BundleError(f"{folder / KNN_FILE}: projects {head.components.shape[1]}-dimensional embeddings, the graph gives {manifest.embedding_dim}")
    return head
