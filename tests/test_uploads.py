"""The upload augmentation: real encoders, seeded draws, each step on its share of the images."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bundle.images import decode
from cifar10.errors import UserError
from training.recipes import FAST_UPLOADS, RECIPES, UPLOAD_STRENGTHS, UPLOADS, describe_uploads, get_recipe
from training.uploads import gaussian_blur, round_trip, simulate


@pytest.fixture(scope="module")
def images(cifar):
    return cifar.train.images[:600]


@pytest.mark.parametrize(("fmt", "quality"), [("JPEG", 30), ("JPEG", 75), ("JPEG", 95), ("WEBP", 50)])
def test_the_lossy_step_gives_the_pixels_the_services_decoder_makes_of_such_an_upload(images, fmt, quality):
    for image in images[:10]:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, fmt, quality=quality)
        out = round_trip(image, fmt, quality)
        assert out.shape == image.shape and out.dtype == torch.uint8 and not torch.equal(out, image)
        np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), decode(buffer.getvalue()))


def test_blur_keeps_flat_images_and_softens_edges():
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(flat, torch.tensor([0.5, 1.0])), flat)
    edge = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    edge[..., 16:] = 255
    blurred = gaussian_blur(edge, torch.tensor([1.0]))[0, 0, 0]
    assert blurred[15] > 0 and blurred[16] < 255 and blurred[0] == 0 and blurred[31] == 255


def test_simulate_repeats_for_a_seed_and_touches_its_share(images):
    run = lambda seed: simulate(images.clone(), UPLOADS, torch.Generator().manual_seed(seed))  # noqa: E731
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    changed = (first != images).flatten(1).any(1).float().mean().item()
    # blur, noise and a lossy codec, each on its share of the images
    untouched = (1 - UPLOADS["blur"]) * (1 - UPLOADS["noise"]) * (1 - UPLOADS["jpeg"] - UPLOADS["webp"])
    assert changed == pytest.approx(1 - untouched, abs=0.06)
    assert first.dtype == torch.uint8 and first.shape == images.shape


def test_no_uploads_leave_the_images_alone(images):
    generator = torch.Generator().manual_seed(0)
    assert simulate(images, {}, generator) is images
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())  # no draws either


def test_describe_names_each_step():
    assert describe_uploads({}) == "none"
    mix = dict(UPLOADS, blur=0.15, noise=0.15, jpeg=0.5, webp=0.1)
    assert describe_uploads(mix) == "blur 15% (σ px 0.3–1), noise 15% (σ 2–12), jpeg 50% (q 30–95), webp 10% (q 50–95)"


def test_uploads_override_changes_shares_and_keeps_the_rest():
    mix = get_recipe("fast", uploads="jpeg=0.25, webp=0.05,blur=0")["uploads"]
    assert (mix["jpeg"], mix["webp"], mix["blur"], mix["noise"]) == (0.25, 0.05, 0.0, FAST_UPLOADS["noise"])
    assert mix["jpeg_quality"] == FAST_UPLOADS["jpeg_quality"] and mix["blur_sigma"] == FAST_UPLOADS["blur_sigma"]
    assert get_recipe("cnn-fast", uploads="none")["uploads"] == {}
    for spec in ("jpeg", "jpeg=2", "gamma=0.1", "jpeg=0.7,webp=0.5"):
        with pytest.raises(UserError, match="--uploads"):
            get_recipe("fast", uploads=spec)
    with pytest.raises(UserError, match="fast loop"):
        get_recipe("cnn-baseline", uploads="jpeg=0.3")


def test_uploads_override_sets_strength_ranges_within_their_bounds():
    mix = get_recipe("fast", uploads="jpeg=0.4,jpeg_quality=50-95,blur_sigma=0.2-0.8")["uploads"]
    assert (mix["jpeg"], mix["jpeg_quality"], mix["blur_sigma"]) == (0.4, (50, 95), (0.2, 0.8))
    assert mix["webp_quality"] == FAST_UPLOADS["webp_quality"] and mix["webp"] == FAST_UPLOADS["webp"]
    for recipe in RECIPES.values():  # the recipes' own ranges lie within the bounds too (the blur kernel is sized by them)
        for key, (low, high) in UPLOAD_STRENGTHS.items():
            if key in recipe.get("uploads", {}):
                assert low <= recipe["uploads"][key][0] <= recipe["uploads"][key][1] <= high, (recipe, key)
    # a range the step cannot apply (a blur wider than the kernel, a quality Pillow has not) or not a range
    for spec in ("jpeg_quality=95-50", "jpeg_quality=0-95", "jpeg_quality=50", "jpeg_quality=50.5-90", "blur_sigma=0.3-2"):
        with pytest.raises(UserError, match="STRENGTH=LOW-HIGH"):
            get_recipe("fast", uploads=spec)
