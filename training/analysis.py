"""Everything `cifar10 evaluate` measures about a trained run, as one JSON-ready dict plus arrays.

Selection (the KNN's k and distance, the temperature) only ever looks at training images: the
run's held-out tail when it kept one (`cifar10 train --holdout N`), else the last
`KNN_VALIDATION` training images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cifar10.errors import UserError
from training.calibration import fit_temperature
from training.data import Cifar10, Split
from training.evaluate import predict
from training.hardware import describe
from training.knn import VALIDATION_TAIL, fit_head
from training.loop import load_checkpoint, make_model
from training.metrics import confusion_matrix, example_indices, per_class_scores, reliability, softmax, top_confusions
from training.models import Classifier

EXAMPLES = 10
NEIGHBOUR_ROWS, NEIGHBOURS = 5, 5  # the neighbours grid: test images, and training images each


@dataclass
class Outputs:
    """A split's network outputs, as numpy."""

    logits: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)


def outputs(model, split: Split, device: torch.device, bf16: bool, name: str) -> Outputs:
    logits, embeddings = predict(model, split.images, device, bf16, progress=f"{name} images")
    return Outputs(logits.numpy(), embeddings.numpy(), split.labels.numpy())


def split_report(out: Outputs, classes, temperature: float | None) -> dict:
    probs = out.probabilities
    predicted = probs.argmax(1)
    cm = confusion_matrix(out.labels, predicted, len(classes))
    scores = per_class_scores(cm)
    report = {
        "images": len(out.labels),
        "accuracy": float((predicted == out.labels).mean()),
        "confusion": cm.tolist(),
        "per_class": {k: v.tolist() for k, v in scores.items()},
        "top_confusions": top_confusions(cm, classes),
        "ece": reliability(probs, out.labels).ece,
    }
    if temperature is not None:
        report["ece_scaled"] = reliability(softmax(out.logits, temperature), out.labels).ece
    return report


@dataclass
class TrainedRun:
    name: str
    model: Classifier
    checkpoint: dict
    history: list[dict]


def load_trained(path: Path, data: Cifar10, finished: bool = False) -> TrainedRun:
    """A run folder or checkpoint, checked against the data; every mismatch is a UserError.

    finished: refuse a run stopped before its last epoch ended (its weights are mid-schedule), as a
    bundle must not be made of one."""
    checkpoint = load_checkpoint(path)
    recipe = checkpoint["recipe"]
    if list(checkpoint["classes"]) != list(data.classes):
        raise UserError(f"{path} was trained on classes {checkpoint['classes']}, but the data has {list(data.classes)}")
    model = make_model(dict(recipe, weights="none"), checkpoint["mean"], checkpoint["std"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{path}: the weights do not fit a {recipe['model']} model ({detail})") from exc
    history = checkpoint["position"]["history"]
    if not history:
        raise UserError(f"{path} has no finished epoch, so there is nothing to evaluate; resume it first")
    position, epochs = checkpoint["position"], recipe["epochs"]
    if finished and (position["epoch"] < epochs or position["step"] != 0):
        raise UserError(f"{path} stopped during epoch {position['epoch'] + 1} of {epochs}; finish it first: cifar10 train --resume {path}")
    run_dir = path if path.is_dir() else path.parent
    return TrainedRun(run_dir.name, model, checkpoint, history)


def analyse(run: TrainedRun, data: Cifar10, device: torch.device, bf16: bool) -> tuple[dict, dict]:
    """(metrics as JSON-ready dict, arrays the plots need)."""
    model, recipe = run.model.to(device, memory_format=torch.channels_last), run.checkpoint["recipe"]
    holdout = recipe.get("holdout", 0)
    train_split, held_split, test_split = data.splits(recipe.get("limit"), holdout)
    train = outputs(model, train_split, device, bf16, "train")
    held = outputs(model, held_split, device, bf16, "held-out") if holdout else None
    test = outputs(model, test_split, device, bf16, "test")
    classes = list(data.classes)

    temperature = fit_temperature(held.logits, held.labels) if held is not None else None
    knn_metrics, neighbours = knn_on_embeddings(train, held, test, len(classes))
    metrics = {
        "run": run.name,
        "epochs": len(run.history),
        "recipe": recipe,
        "data": data.source,
        "device": describe(device),
        "classes": classes,
        "train": split_report(train, classes, temperature),
        "test": split_report(test, classes, temperature),
        "temperature": temperature,
        "selection_images": "held-out tail of the training set, never trained on"
        if holdout
        else f"last {min(VALIDATION_TAIL, len(train.labels) // 5)} training images (the network trained on them too)",
        "examples": {k: v.tolist() for k, v in example_indices(test.probabilities, test.labels, EXAMPLES).items()},
        "knn": knn_metrics,
    }
    arrays = {"test": test, "test_images": test_split.images, "train_split": train_split, "neighbours": neighbours}
    return metrics, arrays


def knn_on_embeddings(train: Outputs, held: Outputs | None, test: Outputs, classes: int) -> tuple[dict, dict]:
    """Choose k and distance without the test set, refit on all training embeddings, score."""
    held_embeddings, held_labels = (held.embeddings, held.labels) if held is not None else (None, None)
    head, choice = fit_head(train.embeddings, train.labels, classes, held_embeddings, held_labels)
    distances, indices = head.nearest(test.embeddings[:NEIGHBOUR_ROWS], NEIGHBOURS)
    splits = tqdm((("train", train), ("test", test)), desc="KNN: scoring the training and test sets", total=2, unit="split", leave=False, disable=None)
    accuracy = {name: head.accuracy(split.embeddings, split.labels) for name, split in splits}  # a search of every training row for each
    metrics = {
        "k": choice.k,
        "metric": choice.metric,
        "validation_accuracy": choice.validation_accuracy,
        "validation_scores": choice.scores,
        "validation_images": len(choice.validation_indices),
        "train_accuracy": accuracy["train"],
        "test_accuracy": accuracy["test"],
    }
    return metrics, {"distances": distances, "indices": indices}
