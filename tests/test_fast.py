"""The `fast` recipe's parts: whitening, schedule, augmentation, test-time augmentation, resume."""

import json
import shutil

import numpy as np
import pytest
import torch

from bundle.runtime import Bundle
from cifar10.errors import UserError
from tests.conftest import cpu_bf16
from training.analysis import load_trained
from training.export import export
from training.fast import epoch_images, init_whitening, lr_factor
from training.loop import load_checkpoint, normalization
from training.models import TestTimeAugmentation, airbench
from training.recipes import AIRBENCH_WHITENING_EPS, get_recipe, resumed
from training.report import runs_table
from training.train import train

CPU = torch.device("cpu")


def test_the_first_conv_whitens_training_patches(cifar):
    images = cifar.train.images[:1000]
    model = airbench(*normalization("channel_zscore", images))
    init_whitening(model, images, AIRBENCH_WHITENING_EPS)
    with torch.no_grad():
        out = model.body[0](model.normalize(images)) - model.body[0].bias.view(1, -1, 1, 1)
    half = out[:, :12].permute(1, 0, 2, 3).reshape(12, -1).double()  # the other 12 are their negatives
    covariance = half @ half.T / half.shape[1]
    # unit variance along every eigenvector (less the eps on tiny eigenvalues), no correlation
    assert torch.allclose(covariance.diagonal()[6:], torch.ones(6, dtype=torch.float64), atol=0.02)
    off_diagonal = covariance - torch.diag(covariance.diagonal())
    assert off_diagonal.abs().max() < 0.02
    assert torch.equal(out[:, 12:], -out[:, :12])


def test_the_whitening_eps_caps_the_gain_of_faint_patch_directions(cifar):
    images = cifar.train.images[:1000]
    gains = {}
    for eps in (AIRBENCH_WHITENING_EPS, 0.05):
        model = airbench(*normalization("channel_zscore", images))
        init_whitening(model, images, eps)
        gains[eps] = model.body[0].weight.flatten(1).norm(dim=1)  # a unit eigenvector over √(eigenvalue + eps)
        assert gains[eps].max() < eps**-0.5
    assert gains[0.05].max() < gains[AIRBENCH_WHITENING_EPS].max() / 3  # the faintest directions, damped
    with pytest.raises(UserError, match="--whitening-eps applies to recipes with airbench's whitening layer"):
        get_recipe("cnn-fast", whitening_eps=0.05)
    with pytest.raises(UserError, match="--whitening-eps must be positive"):
        get_recipe("fast", whitening_eps=0.0)
    older = {k: v for k, v in get_recipe("fast").items() if k != "whitening_eps"}  # a checkpoint from before the key
    assert resumed(older)["whitening_eps"] == AIRBENCH_WHITENING_EPS


def test_the_schedule_is_a_triangle():
    shape = get_recipe("fast")["lr_shape"]
    assert lr_factor(shape, 0.0) == pytest.approx(0.2)
    assert lr_factor(shape, 0.23) == pytest.approx(1.0)
    assert lr_factor(shape, 1.0) == pytest.approx(0.07)
    assert lr_factor(shape, 0.1) == pytest.approx(0.2 + 0.8 * 0.1 / 0.23)


def test_epoch_images_are_crops_mirrored_on_odd_epochs(cifar):
    images = cifar.train.images[:200]
    padded = torch.nn.functional.pad(images.float(), (2,) * 4, mode="reflect").to(torch.uint8)
    even = epoch_images(padded, 2, 0, torch.Generator().manual_seed(0))
    odd = epoch_images(padded, 2, 1, torch.Generator().manual_seed(0))
    assert torch.equal(odd, even.flip(-1))  # same draws, mirrored
    crops = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # [N, 3, 5, 5, 32, 32]: every offset
    matches = (crops == even[:, :, None, None]).flatten(start_dim=4).all(-1).all(1)  # [N, 5, 5]
    assert matches.any(-1).any(-1).all()  # every image is one of its 25 crops
    assert matches.flatten(1).float().argmax(1).unique().numel() > 10  # and the offsets vary


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror(cifar):
    model = airbench(*normalization("channel_zscore", cifar.train.images[:500])).eval()
    x = cifar.test.images[:8]
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
        assert torch.allclose(TestTimeAugmentation(model, "flip")(x), (plain + mirrored) / 2, atol=1e-5)
        assert torch.equal(TestTimeAugmentation(model, "none")(x), plain)
        six = TestTimeAugmentation(model, "flip-translate")
        assert six.weights.sum().item() == pytest.approx(1.0) and len(six.weights) == 6
        assert not torch.allclose(six(x), plain, atol=1e-3)
        # a uniform image looks the same in every view, so averaging them changes nothing
        uniform = torch.full((2, 3, 32, 32), 120, dtype=torch.uint8)
        assert torch.allclose(six(uniform), model(uniform), atol=1e-5)


@pytest.fixture(scope="module")
def fast_run(cifar, tmp_path_factory):
    """Two epochs on 2,048 images, the lookahead active from the start (resume: tests/test_train.py)."""
    run_dir = tmp_path_factory.mktemp("fast")
    recipe = get_recipe("fast", epochs=2, limit=2048, batch_size=256)
    recipe["lookahead"] = dict(recipe["lookahead"], start_epoch=0)
    summary = train(recipe, cifar, run_dir, CPU, bf16=cpu_bf16(), progress=False)
    return run_dir, summary


def test_a_run_whose_loss_stops_being_a_number_stops_there_and_says_what_to_change(cifar, tmp_path):
    recipe = get_recipe("cnn-fast", epochs=3, limit=512, batch_size=128, lr=1e12)
    with pytest.raises(UserError, match=r"training diverged: the loss is not a number at epoch 1, step \d+\. Train again with a lower --lr \(this run's: 1e\+12\) or more images and steps$"):
        train(recipe, cifar, tmp_path, CPU, bf16=cpu_bf16(), progress=False)  # in its first epoch: no checkpoint to speak of
    assert not (tmp_path / "history.json").exists()  # it stopped in its first epoch, not after the third


def test_fast_training_learns(fast_run):
    run_dir, summary = fast_run
    history = json.loads((run_dir / "history.json").read_text())
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert summary["final"]["test"]["accuracy"] > 0.25  # 2,048 images, 2 epochs: well above chance
    assert set(summary["final"]["test_tta"]) == {"flip", "flip-translate"}
    assert load_checkpoint(run_dir)["lookahead"] is not None


def test_runs_table_shows_the_held_out_upload_mean_and_tells_upload_candidates_apart(fast_run, tmp_path):
    run_dir, summary = fast_run
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    changed = dict(summary, recipe=get_recipe("fast", epochs=2, limit=2048, batch_size=256, uploads="jpeg=0.25"))
    (candidate / "run.json").write_text(json.dumps(changed))
    shutil.copytree(run_dir, tmp_path / "default", ignore=shutil.ignore_patterns("*.pt"))
    rows = {line.split(" | ")[0]: line for line in runs_table(tmp_path).splitlines() if line.startswith("| ")}
    mean = f"{summary['final']['held_out_uploads']['mean']:.2%}"
    assert f"| {mean} |" in rows["| default"] and "uploads" not in rows["| default"]
    assert ", uploads " in rows["| candidate"] and "jpeg 25%" in rows["| candidate"]
    eps = tmp_path / "eps"
    eps.mkdir()
    (eps / "run.json").write_text(json.dumps(dict(summary, recipe=get_recipe("fast", epochs=2, limit=2048, batch_size=256, whitening_eps=0.05))))
    rows = {line.split(" | ")[0]: line for line in runs_table(tmp_path).splitlines() if line.startswith("| ")}
    assert ", whitening eps 0.05" in rows["| eps"] and "whitening" not in rows["| default"]


def test_export_puts_the_tta_inside_the_graph(fast_run, cifar, tmp_path):
    run = load_trained(fast_run[0], cifar)
    manifest = export(run, cifar, tmp_path / "fast", "fast", components=8, tta="flip")
    assert manifest.test_time_augmentation == "flip"
    pixels = cifar.test.images[:16].permute(0, 2, 3, 1).contiguous().numpy()
    got = Bundle.load(tmp_path / "fast").predict(pixels).logits
    with torch.no_grad():
        plain = run.model.float().eval()(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        mirrored = run.model(torch.from_numpy(pixels[:, :, ::-1].copy()).permute(0, 3, 1, 2))
    np.testing.assert_allclose(got, ((plain + mirrored) / 2).numpy(), atol=1e-4)


def test_a_fast_run_resumes_only_at_its_own_length(fast_run, capsys):
    from cifar10.cli import main

    assert main(["train", "--resume", str(fast_run[0]), "--epochs", "5"]) == 1
    assert "schedule spans its whole length" in capsys.readouterr().err


def test_the_study_cnn_learns_with_the_fast_loop(cifar, tmp_path):
    recipe = get_recipe("cnn-fast", epochs=3, limit=2048, batch_size=128)
    train(recipe, cifar, tmp_path, CPU, bf16=cpu_bf16(), progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    # measured in training mode: its BatchNorm statistics (Keras' momentum 0.01) need more steps
    assert history[2]["train_loss"] < history[0]["train_loss"]
    assert history[2]["train_accuracy"] > 0.3


def test_vgg16_trains_with_the_fast_loop_without_whitening(cifar, tmp_path):
    recipe = get_recipe("vgg16-fast", epochs=1, limit=128)
    summary = train(recipe, cifar, tmp_path, CPU, bf16=cpu_bf16(), progress=False)
    assert summary["parameters"]["trainable"] > 14_000_000  # all 13 convolutions, with BatchNorm
    assert np.isfinite(summary["final"]["test"]["loss"])


def test_tta_lives_on_the_device_of_its_model():
    model = airbench([0.0] * 3, [1.0] * 3).to("meta")
    assert TestTimeAugmentation(model, "flip-translate").weights.device.type == "meta"
