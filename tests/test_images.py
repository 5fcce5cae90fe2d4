"""bundle.images.decode: the pixels it gives for good images, the ImageError it raises for bad ones."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.hostile import png_header_only
from bundle.images import DEFAULT_LIMITS, FORMATS, HEIF, ImageError, Limits, decode, open_image
from scoring.inputs import folder_records
from tests.conftest import REPO


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def random_rgb(width: int = 32, height: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_a_32x32_png_comes_back_pixel_for_pixel():
    pixels = random_rgb()
    out = decode(encode(Image.fromarray(pixels), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.array_equal(out, pixels)


def test_jpeg_is_close_to_its_source():
    pixels = np.full((32, 32, 3), (200, 40, 90), np.uint8)
    out = decode(encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert np.abs(out.astype(int) - pixels).max() < 8


# the test extra installs pillow-heif; without it the HEIC tests are skipped, and the refusal below is tested
needs_heif = pytest.mark.skipif(not HEIF, reason="HEIC needs the [heif] extra (pillow-heif)")


@pytest.mark.parametrize("fmt", ["WEBP", "AVIF", pytest.param("HEIF", marks=needs_heif)])  # the web's formats, and iPhones' HEIC
def test_web_and_phone_formats_are_close_to_their_source(fmt):
    pixels = np.full((48, 48, 3), (200, 40, 90), np.uint8)
    out = decode(encode(Image.fromarray(pixels), fmt, quality=90))
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - (200, 40, 90)).max() < 12


def test_a_folder_is_read_for_every_accepted_formats_suffixes_and_no_animated_ones(tmp_path):
    """Offline scoring picks a folder's files by these suffixes, in any letter case."""
    names = ["a.PNG", "b.jpg", "c.JPEG", "d.jfif", "e.tif", "f.webp", "g.avif", "h.heic", "i.apng", "j.avifs", "k.heics", "l.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    ids = [record.id for record in folder_records(tmp_path, [])]
    assert ids == ["a.PNG", "b.jpg", "c.JPEG", "d.jfif", "e.tif", "f.webp", "g.avif"] + (["h.heic"] if HEIF else [])


def test_a_progressive_jpeg_is_judged_at_its_full_size():
    """libjpeg keeps every coefficient of a progressive JPEG, whatever the scale it decodes at."""
    big = Image.new("RGB", (2000, 1500), (200, 40, 90))
    with pytest.raises(ImageError, match=r"a progressive JPEG \(decoded whole\) of 2000×1500 is over 1,000,000 pixels \(CIFAR10_MAX_PIXELS\)"):
        decode(encode(big, "JPEG", progressive=True), Limits(max_pixels=1_000_000, pixels_setting="CIFAR10_MAX_PIXELS"))


@pytest.mark.parametrize(("brand", "message"), [(b"qt  ", "brand 'qt  ', a video"), (b"crx ", "brand 'crx '"), (b"avif", "corrupt or truncated AVIF")])
def test_an_iso_media_file_is_named_for_what_it_is(brand, message):
    """A phone's Live Photo video, a camera's CR3 raw file: ISO media, but no image; an AVIF that fails is corrupt."""
    data = (24).to_bytes(4, "big") + b"ftyp" + brand + bytes(4) + brand + b"isom" + bytes(200)
    with pytest.raises(ImageError, match=message):
        decode(data)


def test_a_jpeg_over_the_pixel_limit_is_judged_at_the_scale_it_decodes_at():
    """A 50-megapixel phone photo decodes at 1/8 scale (its header is read first): that is what the limit holds to."""
    big = Image.new("RGB", (2000, 1500), (200, 40, 90))
    limits = Limits(max_pixels=1_000_000)
    assert np.abs(decode(encode(big, "JPEG"), limits).astype(int) - (200, 40, 90)).max() < 8
    with pytest.raises(ImageError, match="2000×1500 is over 1,000,000 pixels"):
        decode(encode(big, "PNG"), limits)


@needs_heif
def test_a_heic_turned_by_its_orientation_is_upright_once():
    """libheif applies a HEIC's rotation itself; the EXIF orientation must not turn it a second time."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90° clockwise to show": white on top
    heic, jpeg = (decode(encode(Image.fromarray(pixels), fmt, quality=95, exif=exif.tobytes())) for fmt in ("HEIF", "JPEG"))
    assert jpeg[:12].mean() > 200 and jpeg[-12:].mean() < 50
    assert np.abs(heic.astype(int) - jpeg).max() < 32


@needs_heif
def test_a_truncated_avif_is_corrupt_and_a_heic_where_heic_is_not_accepted_says_so():
    avif = encode(Image.fromarray(random_rgb(48, 40)), "AVIF")
    with pytest.raises(ImageError, match="corrupt or truncated AVIF image"):
        decode(avif[: len(avif) // 2])
    heic = encode(Image.fromarray(random_rgb(48, 40)), "HEIF")
    with pytest.raises(ImageError, match="HEIC/HEIF images are not accepted here; send a JPEG or PNG"):
        decode(heic, Limits(formats=("PNG", "JPEG", "AVIF")))


@needs_heif  # to write the HEIC
def test_where_pillow_heif_is_missing_a_heic_is_refused_naming_the_extra_and_a_folders_are_counted(tmp_path):
    """The serving install and the container lack the optional pillow-heif: an iPhone photo gets a reason, not 'not an image'."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "IMG_0001.HEIC").write_bytes(encode(Image.fromarray(random_rgb(48, 40)), "HEIF"))
    Image.fromarray(random_rgb()).save(tmp_path / "photos" / "a.png")
    code = (
        "import sys, pathlib; sys.modules['pillow_heif'] = None\n"  # as if it were not installed
        "from bundle.images import HEIF, ImageError, decode\n"
        "from scoring.inputs import folder_records\n"
        "assert not HEIF\n"
        "print([r.id for r in folder_records(pathlib.Path(sys.argv[1]) / 'photos', [])])\n"
        "try:\n    decode((pathlib.Path(sys.argv[1]) / 'photos' / 'IMG_0001.HEIC').read_bytes())\n"
        "except ImageError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "['a.png']",
        "HEIC/HEIF images are not accepted here: install the optional pillow-heif (pip install 'cifar10-serve[heif]'); send a JPEG or PNG",
    ]
    assert "1 of the files without an image suffix are HEIC/HEIF photos: install pillow-heif" in done.stderr


def test_a_wide_image_is_center_cropped():
    pixels = np.zeros((64, 192, 3), np.uint8)
    pixels[:, 64:128] = 255  # a white centre square between black sides
    out = decode(encode(Image.fromarray(pixels), "PNG"))
    assert out.min() >= 250  # only the centre square survives


def test_transparency_is_composited_over_white():
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    out = decode(encode(Image.fromarray(rgba), "PNG"))
    assert (out == 255).all()


def test_sixteen_bit_grey_is_scaled_to_eight():
    grey = np.full((32, 32), 128 * 257, np.uint16)  # mid-grey; clipping to 8 bits would give 255
    out = decode(encode(Image.fromarray(grey), "PNG"))
    assert (out == 128).all()


def test_cmyk_jpeg_becomes_rgb():
    out = decode(encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"))
    assert out.shape == (32, 32, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60  # red


def test_the_header_tells_the_pixels_of_a_file_small_in_bytes():
    """A one-colour PNG at the pixel limit fits in the bytes the service decodes on its event loop;
    open_image gives its size from the header, which is how the service sends it to a thread instead."""
    from serving.uploads import INLINE_BYTES

    side = int(DEFAULT_LIMITS.max_pixels**0.5)
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert len(data) < INLINE_BYTES
    with open_image(data) as image:
        assert image.size == (side, side)
    assert (decode(data) == 128).all()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty: no bytes"),
        (b"GIF89a but not really", "not an image"),
        (b"%PDF-1.7\n" + b"0" * 100, "not an image"),
        (png_header_only(20_000, 20_000), "too large"),
        (png_header_only(1, 1), "too small"),
    ],
    ids=["empty", "garbage", "pdf", "bomb", "1x1"],
)
def test_bad_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode(data)


def test_a_truncated_png_is_corrupt():
    data = encode(Image.fromarray(random_rgb(64, 64)), "PNG")
    with pytest.raises(ImageError, match="corrupt or truncated PNG"):
        decode(data[: len(data) // 2])


def test_animated_gif_is_refused():
    frames = [Image.fromarray(random_rgb(seed=i)) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="animated"):
        decode(out.getvalue())


def test_formats_off_the_list_are_refused():
    data = encode(Image.fromarray(random_rgb()), "BMP")
    with pytest.raises(ImageError, match="accepted format"):
        decode(data, Limits(formats=("PNG", "JPEG")))


def test_a_tiff_whose_frame_count_fails_is_corrupt():
    """Found by the fuzz below: asking this mutated TIFF for its frame count raised TypeError inside Pillow."""
    data = bytearray(encode(Image.fromarray(random_rgb(48, 40)), "TIFF"))
    data[8] = 7
    with pytest.raises(ImageError, match="corrupt or truncated TIFF image"):
        decode(bytes(data[:140]))


# A bounded fuzz of the decoder in CI; a long run: CIFAR10_FUZZ_EXAMPLES=20000 pytest tests/test_images.py -k fuzz
FUZZ_EXAMPLES = int(os.environ.get("CIFAR10_FUZZ_EXAMPLES", "150"))


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize="CI" in os.environ)
@given(data=st.data())
def test_fuzz_mutated_images_decode_or_raise_image_error(fmt, data):
    original = encode(Image.fromarray(random_rgb(48, 40)), fmt)
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        at = data.draw(st.integers(0, len(mutated) - 1), label="at")
        mutated[at] = data.draw(st.integers(0, 255), label="byte")
    mutated = mutated[: data.draw(st.integers(1, len(mutated)), label="length")]
    try:
        pixels = decode(bytes(mutated))
    except ImageError:
        return
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)


def test_a_camera_mpo_jpeg_is_its_first_frame():
    """Phones and cameras write a second picture after the photograph (MPO); that is no animation."""
    photo, preview = Image.new("RGB", (40, 40), (200, 40, 90)), Image.new("RGB", (40, 40), (0, 0, 0))
    out = io.BytesIO()
    photo.save(out, format="MPO", save_all=True, append_images=[preview])
    assert Image.open(io.BytesIO(out.getvalue())).format == "MPO"
    pixels = decode(out.getvalue())
    assert np.abs(pixels.astype(int) - (200, 40, 90)).max() < 8


@pytest.mark.parametrize("mode, colour", [("L", 0), ("RGB", (0, 0, 0))])
def test_a_transparent_colour_is_composited_over_white(mode, colour):
    black = Image.new(mode, (32, 32), colour)
    assert (decode(encode(black, "PNG", transparency=colour)) == 255).all()


def test_a_dark_sixteen_bit_image_stays_dark():
    grey = np.full((32, 32), 200, np.uint16)  # 200 of 65,535: nearly black, not 200 of 255
    assert (decode(encode(Image.fromarray(grey), "PNG")) == 0).all()
