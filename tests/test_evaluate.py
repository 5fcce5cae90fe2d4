"""`cifar10 evaluate` and `cifar10 report` on a tiny real run; KNN selection and temperature."""

import json
import pickle

import numpy as np
import pytest
import torch

from cifar10.cli import main
from cifar10.errors import UserError
from tests.conftest import cpu_bf16, write_tiny_cifar
from training import knn
from training.analysis import load_trained
from training.calibration import fit_temperature
from training.data import load_cifar10
from training.knn import select_knn
from training.loop import CHECKPOINT
from training.recipes import get_recipe
from training.train import train

SECTIONS = [
    "## Summary", "## Per-class scores (test set)", "## Top confusions", "## Confusion matrices",
    "## Training curves", "### Right, most confident", "### Right, least confident",
    "### Wrong, most confident", "### Wrong, least confident", "## Calibration", "## KNN on embeddings",
]  # fmt: skip
PNGS = [
    "confusion_train", "confusion_test", "curves", "right_most_confident", "right_least_confident",
    "wrong_most_confident", "wrong_least_confident", "reliability", "neighbours",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(cifar, tmp_path_factory):
    """cnn-baseline on the first 600 images, the last 100 of them held out."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_dir.mkdir()
    recipe = get_recipe("cnn-baseline", epochs=2, limit=600, holdout=100)
    train(recipe, cifar, run_dir, torch.device("cpu"), bf16=cpu_bf16(), progress=False)
    return run_dir


def test_the_report_has_every_section(tiny_run, shared_data, capsys, monkeypatch):
    seen = {}
    original = knn.select_knn

    def spy(embeddings, labels, classes, validation_indices, **kwargs):
        seen.update(rows=len(embeddings), validation=np.asarray(validation_indices))
        return original(embeddings, labels, classes, validation_indices, **kwargs)

    monkeypatch.setattr(knn, "select_knn", spy)
    assert main(["evaluate", str(tiny_run), "--data-dir", str(shared_data)]) == 0, capsys.readouterr().err
    report = (tiny_run / "report" / "report.md").read_text()
    for section in SECTIONS:
        assert section in report
    for name in PNGS:
        assert (tiny_run / "report" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    metrics = json.loads((tiny_run / "report" / "metrics.json").read_text())
    assert metrics["train"]["images"] == 500 and metrics["test"]["images"] == 600
    assert metrics["temperature"] > 0 and "ece_scaled" in metrics["test"]
    # KNN selection saw the 500 training and 100 held-out embeddings, validated on the held-out ones
    assert seen["rows"] == 600 and seen["validation"].tolist() == list(range(500, 600))
    assert metrics["knn"]["validation_images"] == 100
    assert all(len(metrics["examples"][k]) <= 10 for k in metrics["examples"])

    assert main(["report", "--compare", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert f"| tiny | cnn-baseline | 2 | {metrics['train']['accuracy']:.2%} |" in out


def test_compare_needs_an_evaluated_run(tmp_path, capsys):
    assert main(["report", "--compare", str(tmp_path)]) == 1
    assert "cifar10 evaluate" in capsys.readouterr().err


def _tamper(run_dir, tmp_path, change) -> object:
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    change(checkpoint)
    path = tmp_path / "tampered.pt"
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_of_another_architecture_is_named(tiny_run, cifar, tmp_path):
    path = _tamper(tiny_run, tmp_path, lambda c: c["recipe"].update(model="vgg16_3block"))
    with pytest.raises(UserError, match="do not fit a vgg16_3block model"):
        load_trained(path, cifar)


def test_a_run_without_a_finished_epoch_is_refused(tiny_run, cifar, tmp_path):
    path = _tamper(tiny_run, tmp_path, lambda c: c["position"].update(history=[]))
    with pytest.raises(UserError, match="no finished epoch"):
        load_trained(path, cifar)


def test_a_run_stopped_before_its_last_epoch_is_not_exported(tiny_run, cifar, tmp_path, capsys):
    path = _tamper(tiny_run, tmp_path, lambda c: c["position"].update(epoch=1, step=3))
    assert load_trained(path, cifar).history  # evaluating it is fine
    with pytest.raises(UserError, match=r"stopped during epoch 2 of 2; finish it first: cifar10 train --resume"):
        load_trained(path, cifar, finished=True)


def test_resuming_with_no_more_epochs_than_finished_is_refused(tiny_run, capsys):
    assert main(["train", "--resume", str(tiny_run), "--epochs", "2"]) == 1
    assert "the run has finished 2 epochs already; give more" in capsys.readouterr().err


def test_classes_that_differ_from_the_data_are_named(tiny_run, tmp_path):
    folder = write_tiny_cifar(tmp_path / "cifar-10-batches-py")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    with pytest.raises(UserError, match="trained on classes"):
        load_trained(tiny_run, load_cifar10(folder))


def test_knn_selection_uses_only_the_indices_it_is_given():
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 40)
    embeddings = rng.normal(size=(400, 8)) + labels[:, None] * 3.0  # ten well-separated clusters
    validation = np.arange(300, 400)
    choice = select_knn(embeddings, labels, 10, validation, ks=(1, 5))
    assert choice.validation_indices.tolist() == validation.tolist()
    assert choice.fit_indices.tolist() == list(range(300))
    assert choice.validation_accuracy > 0.9 and set(choice.scores) == {
        "euclidean k=1", "euclidean k=5", "cosine k=1", "cosine k=5"
    }  # fmt: skip


def test_temperature_undoes_overconfident_logits():
    rng = np.random.default_rng(0)
    calibrated = rng.normal(size=(20000, 10)) * 2
    probs = np.exp(calibrated) / np.exp(calibrated).sum(1, keepdims=True)
    labels = (probs.cumsum(1) > rng.random((20000, 1))).argmax(1)  # labels drawn from the probabilities
    assert fit_temperature(calibrated * 3, labels) == pytest.approx(3.0, rel=0.1)


def test_a_reduced_head_keeps_its_neighbours_in_the_training_rows():
    from training.knn import fit_head

    rng = np.random.default_rng(1)
    labels = np.tile(np.arange(10), 50)
    embeddings = rng.normal(size=(500, 40)) + np.eye(10, 40)[labels] * 6.0
    head, choice = fit_head(embeddings[:400], labels[:400], 10, embeddings[400:], labels[400:], components=8)
    assert head.components.shape == (8, 40) and choice.validation_indices.tolist() == list(range(400, 500))
    distances, indices = head.nearest(embeddings[400:405], 3)
    assert indices.shape == (5, 3) and indices.max() < 400
    assert (labels[indices[:, 0]] == labels[400:405]).all() and (np.diff(distances, axis=1) >= 0).all()
