"""Reading images into the one array type every stage takes: RGB ``uint8`` ``(H, W, 3)``.

``load_image`` applies the EXIF orientation and normalizes grayscale, palette, alpha, 16-bit and CMYK
images. It refuses, with an :class:`ImageError` whose message is one line naming the file and the
reason, a missing path, a directory, a non-image, a truncated or corrupt file, a zero-size image and
an image above a pixel limit (checked from the header, before the pixels are decoded).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from detector.base.defaults import DEFAULT_MAX_PIXELS
from detector.base.errors import UserError
from detector.base.pool import ItemFailed

# The project checks the pixel count itself (with a clearer message than Pillow's bomb warning),
# and never accepts a truncated file as complete.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = str | os.PathLike | bytes | bytearray | memoryview
# File name endings taken as images when a folder or a pattern is listed (any file given by name is
# tried whatever its name).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageError(UserError, ValueError):
    """An image the project cannot use; ``str(err)`` is one line: what, which file, what to do."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> ``RGB``; alpha is composited over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def read_image_size(source: ImageSource) -> tuple[int, int]:
    """``(height, width)`` from the header alone, with the same refusals as :func:`load_image`."""
    with _open(source) as img:
        w, h = img.size
        return (h, w)


def _open(source: ImageSource) -> Image.Image:
    name = _describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"cannot read image {name}: the data is empty; pass the bytes of an image file")
        fp = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(f"cannot read image '{name}': no such file; check the path")
        if path.is_dir():
            raise ImageError(f"cannot read image '{name}': it is a directory; pass an image file")
        if path.stat().st_size == 0:
            raise ImageError(f"cannot read image '{name}': the file is empty (0 bytes); replace it")
        fp = str(path)
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image '{name}': not an image file Pillow recognizes "
                         "(JPEG, PNG, BMP, TIFF, WebP, ...); convert or remove it") from None
    except OSError as err:
        raise ImageError(f"cannot read image '{name}': {err}; check the file") from None


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file (path or bytes) as an RGB ``uint8`` array of shape ``(H, W, 3)``.

    ``max_pixels``: refuse images with more pixels than this (``None``: no limit). The check uses
    the header only, so an oversized image is refused before it is decoded.
    """
    name = _describe(source)
    quoted = name if name.startswith("<") else f"'{name}'"
    with _open(source) as img:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"cannot read image {quoted}: it has zero size ({w}x{h}); replace it")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageError(
                f"cannot read image {quoted}: {w}x{h} = {w * h / 1e6:.1f} megapixels exceeds the limit of "
                f"{max_pixels / 1e6:g} megapixels; resize it or raise the limit (max_pixels)")
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            arr = np.asarray(rgb, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as err:
            reason = str(err) or type(err).__name__
            if "truncated" in reason.lower():
                reason = "the file is truncated"
            raise ImageError(f"cannot read image {quoted}: corrupt or truncated data ({reason}); "
                             "re-download or replace it") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"cannot read image {quoted}: decoded to an unusable shape {arr.shape}; replace it")
    return np.ascontiguousarray(arr)


def load_image_item(source: ImageSource) -> np.ndarray:
    """:func:`load_image` in a batch job's worker: whatever the file causes is an
    :class:`~detector.base.pool.ItemFailed` whose message is the reason the job records."""
    try:
        return load_image(source)
    except UserError as err:
        raise ItemFailed(str(err)) from None
    except Exception as err:  # noqa: BLE001 - anything else a file can cause is recorded too
        raise ItemFailed(f"cannot read image: {type(err).__name__}: {err}") from None
