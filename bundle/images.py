"""Image bytes → uint8 [32, 32, 3] RGB: the one decoder the service and offline scoring share.

It implements the bundle's input contract `center_crop_bicubic`: convert to RGB (transparent
pixels over white), crop the centre square, resize to 32×32 with Pillow's bicubic filter. Bad
input raises ImageError with a message a client can act on; nothing else escapes.

The formats are those of cameras, phones and the web: PNG, JPEG, BMP, GIF, WebP, TIFF and AVIF
(Pillow's own decoders), and HEIC/HEIF, the photos of iPhones, where the optional pillow-heif is
installed (`pip install 'cifar10-serve[heif]'`: its wheels bundle libheif and x265, LGPL and GPL).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

try:
    import pillow_heif
except ImportError:
    HEIF = False
else:
    pillow_heif.register_heif_opener()
    HEIF = True

SIZE = 32
# Every format accepted, with its files' suffixes (what offline scoring reads in a folder). AVIF where this
# Pillow decodes it (its wheels do), HEIF where pillow-heif is installed; never the animated variants' suffixes.
SUFFIXES_OF = {
    "PNG": (".png",), "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"), "BMP": (".bmp",), "GIF": (".gif",), "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"), "AVIF": (".avif",), "HEIF": (".heic", ".heif", ".hif"),
}  # fmt: skip
FORMATS = tuple(f for f in SUFFIXES_OF if (f != "AVIF" or features.check("avif")) and (f != "HEIF" or HEIF))
SUFFIXES = tuple(suffix for fmt in FORMATS for suffix in SUFFIXES_OF[fmt])
# An ISO media file (MP4, MOV, HEIF, AVIF) starts with an `ftyp` box naming its brands. These hold still images:
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")  # HEVC-coded, as phones write them
AVIF_BRANDS = (b"avif", b"avis")


class ImageError(ValueError):
    """The bytes are not an image we accept; the message says why."""


@dataclass(frozen=True)
class Limits:
    """Every limit of the decoder, with the defaults the service and scorer use."""

    formats: tuple[str, ...] = FORMATS
    max_pixels: int = 52_000_000  # width × height as decoded (a large JPEG's reduced scale), checked from the header before decoding: phones' 48- and 50-megapixel photos pass (8192×6144)
    pixels_setting: str = ""  # how the caller lets its user change max_pixels (CIFAR10_MAX_PIXELS), named in the refusal
    min_side: int = 8  # smaller images carry too little to classify
    allow_animated: bool = False


DEFAULT_LIMITS = Limits()

# Formats whose extra frames are not animation: a camera's MPO JPEG carries a preview or a second
# view after its picture, a HEIC the other shots of a burst. The first frame is the photograph.
STILL_MULTI_FRAME = ("MPO", "HEIF")


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """uint8 [32, 32, 3] RGB pixels of an encoded image."""
    return to_pixels(open_image(data, limits))


def open_image(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """The image with only its header read, and checked against the limits: cheap whatever its size,
    so a caller can see how many pixels decoding will cost before it pays (`image.size`: for a large
    JPEG, the reduced scale it will be decoded at)."""
    if not data:
        raise ImageError(f"empty: no bytes where an image was expected ({', '.join(limits.formats)})")
    try:  # reads the header only; Pillow's own bomb check (MAX_IMAGE_PIXELS) stays as a backstop
        image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError:
        raise unidentified(data, limits) from None
    except Image.DecompressionBombError:  # Pillow's own cap, should limits.max_pixels be set above it
        raise ImageError(f"image too large: over {min(limits.max_pixels, 2 * Image.MAX_IMAGE_PIXELS):,} pixels") from None
    except Exception as exc:  # a header Pillow cannot parse: its plugins raise OSError, ValueError, struct.error, …
        raise ImageError(f"corrupt or truncated image ({exc})") from None
    try:
        declared = image.size
        if image.format in ("JPEG", "MPO"):  # a large JPEG decodes at a reduced scale (a 50-megapixel photo at 1/8):
            image.draft("RGB", (SIZE * 4, SIZE * 4))  # far cheaper, and the limits apply to the pixels really decoded
        _check_header(image, limits, declared)
    except ImageError:
        image.close()
        raise
    except Exception as exc:
        image.close()
        raise ImageError(f"corrupt or truncated {image.format} image ({exc})") from None
    return image


def iso_image(data: bytes) -> str | None:
    """"avif" or "heic" for an ISO media file whose brands are those of still images; None for any other bytes
    (a video's MOV or MP4, a camera's raw CR3, no ISO media at all)."""
    if data[4:8] != b"ftyp":
        return None
    major, compatible = data[8:12], data[16:32]  # ftyp: size, "ftyp", major brand, minor version, compatible brands
    if any(brand in major + compatible for brand in AVIF_BRANDS):
        return "avif"
    return "heic" if major in HEIF_BRANDS else None


def unidentified(data: bytes, limits: Limits) -> ImageError:
    """Why no decoder took the bytes. An AVIF or HEIC that its decoder refuses is corrupt, not of
    another format; a HEIC where pillow-heif is missing needs the optional extra."""
    accepted = f"not an image in an accepted format ({', '.join(limits.formats)})"
    kind = iso_image(data)
    if kind == "avif":
        return ImageError("corrupt or truncated AVIF image: its decoder cannot read it")
    if kind is None:
        iso = f": an ISO media file of brand {data[8:12].decode('latin-1')!r}, a video or a raw photo perhaps" if data[4:8] == b"ftyp" else ""
        return ImageError(accepted + iso)
    if "HEIF" not in limits.formats:
        hint = "" if HEIF else ": install the optional pillow-heif (pip install 'cifar10-serve[heif]')"
        return ImageError(f"HEIC/HEIF images are not accepted here{hint}; send a JPEG or PNG")
    return ImageError("corrupt or truncated HEIC/HEIF image: its decoder cannot read it")


def to_pixels(image: Image.Image) -> np.ndarray:
    """Decode an image from open_image, crop and resize it; the image is closed after."""
    try:
        with image:
            return _to_pixels(image)
    except Exception as exc:  # crafted bytes make Pillow raise many types here too
        raise ImageError(f"corrupt or truncated {image.format} image ({exc})") from None


def _check_header(image: Image.Image, limits: Limits, declared: tuple[int, int]) -> None:
    # a progressive JPEG holds all its coefficients in memory whatever the scale it decodes at: its full size counts
    progressive = image.format in ("JPEG", "MPO") and image.info.get("progressive")
    width, height = declared if progressive else image.size
    if width * height > limits.max_pixels:  # the header says so; nothing decoded yet
        what = "a progressive JPEG (decoded whole) of " if progressive else ""
        setting = f" ({limits.pixels_setting})" if limits.pixels_setting else ""
        raise ImageError(f"image too large: {what}{width}×{height} is over {limits.max_pixels:,} pixels{setting}")
    if min(width, height) < limits.min_side:
        raise ImageError(f"image too small: {width}×{height}; each side must be at least {limits.min_side} pixels")
    frames = getattr(image, "n_frames", 1)  # TypeError from a crafted TIFF's n_frames, …
    if frames > 1 and image.format not in STILL_MULTI_FRAME and not limits.allow_animated:
        raise ImageError("animated images are not accepted; send a single frame")


def _to_pixels(image: Image.Image) -> np.ndarray:
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is nothing to turn
    rgb = _rgb(image)
    if rgb.size != (SIZE, SIZE):  # a 32×32 upload is already what crop + resize would give
        side = min(rgb.size)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def _rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit scaled to 8, transparency composited over white, CMYK converted."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image)  # integers: a float copy of a large 16-bit image would cost gigabytes
        sixteen_bit = image.mode != "I" or pixels.max() > 255  # mode I (32-bit) says nothing of its range
        image = Image.fromarray(np.clip(pixels // 257 if sixteen_bit else pixels, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # P, L or RGB with a transparent colour
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
