import urllib.error

import pytest
import torch
from torchvision.models import vgg16, vgg16_bn

from cifar10.errors import UserError
from training.models import build_model, count_parameters, seed_cnn, vgg16_3block, vgg16_full
from training.models import vgg16_bn as vgg16_bn_classifier

UNIT = ([0.0] * 3, [255.0] * 3)
IMAGENET_FILE = "vgg16-397923af.pth"  # the file name torchvision's IMAGENET1K_V1 caches
IMAGENET_BN_FILE = "vgg16_bn-6c64b313.pth"  # and its vgg16_bn's


def test_seed_cnn_matches_the_study_table():
    counts = count_parameters(seed_cnn(*UNIT))
    assert counts["trainable"] == 81_962
    assert counts["bn_statistics"] == 384
    assert counts["total"] == 82_346


def test_vgg16_3block_matches_the_study_table():
    counts = count_parameters(vgg16_3block(*UNIT))
    assert counts["total"] == 2_787_914
    assert counts["trainable"] == 2_787_402


@pytest.mark.parametrize("builder, dim", [(seed_cnn, 1600), (vgg16_3block, 256), (vgg16_full, 256), (vgg16_bn_classifier, 256)])
def test_every_model_gives_logits_and_its_penultimate_embedding(builder, dim):
    model = builder(*UNIT).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    logits, embedding = model.forward_with_embedding(pixels)
    assert logits.shape == (2, 10) and embedding.shape == (2, dim)
    assert torch.allclose(model.head(embedding), logits)  # the embedding is the last layer's input


def test_normalisation_travels_in_the_state_dict():
    model = seed_cnn([10.0, 20.0, 30.0], [2.0, 4.0, 8.0])
    state = model.state_dict()
    assert state["normalize.mean"].flatten().tolist() == [10.0, 20.0, 30.0]
    pixels = torch.full((1, 3, 32, 32), 30.0)
    assert model.normalize(pixels)[0, :, 0, 0].tolist() == [10.0, 2.5, 0.0]


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="seed_cnn"):
        build_model("resnet", *UNIT)


def _reference_vgg16() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return vgg16(weights=None).state_dict()


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    state = _reference_vgg16()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / IMAGENET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = vgg16_3block(*UNIT, weights="imagenet", freeze=True)
    features = model.body[0]
    assert torch.equal(features[0].weight, state["features.0.weight"])
    assert torch.equal(features[14].weight, state["features.14.weight"])
    counts = count_parameters(model)
    assert counts["frozen"] == 1_735_488 and counts["trainable"] == 2_787_402 - 1_735_488


def test_vgg16_bn_loads_torchvisions_imagenet_vgg16_bn_weights(tmp_path, monkeypatch):
    torch.manual_seed(2)
    state = vgg16_bn(weights=None).state_dict()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / IMAGENET_BN_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    features = vgg16_bn_classifier(*UNIT, weights="imagenet").body[0]
    assert torch.equal(features[0].weight, state["features.0.weight"])
    assert torch.equal(features[41].running_var, state["features.41.running_var"])  # the last BatchNorm


def test_missing_imagenet_weights_stop_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as error:
        vgg16_full(*UNIT, weights="imagenet")
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / IMAGENET_FILE) in message and "--weights" in message


@pytest.mark.parametrize("features_only", [False, True], ids=["whole-vgg16", "features-only"])
def test_weights_from_a_state_dict_file(tmp_path, features_only):
    state = _reference_vgg16()
    if features_only:
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    model = vgg16_full(*UNIT, weights=str(path))
    expected = state["features.28.weight" if not features_only else "28.weight"]
    assert torch.equal(model.body[0][28].weight, expected)


def test_weights_that_do_not_fit_are_a_user_error(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="do not fit"):
        vgg16_3block(*UNIT, weights=str(path))
    with pytest.raises(UserError, match="not found"):
        vgg16_3block(*UNIT, weights=str(tmp_path / "absent.pt"))
