"""The image loader: every normalization and every refusal, on files the tests build themselves."""

import io

import numpy as np
import pytest
from PIL import Image

from detector.base.io import ImageError, load_image, read_image_size


def _save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_real_photo_loads_as_rgb_uint8(chess):
    path = sorted((chess / "test").glob("*.jpg"))[0]
    arr = load_image(path)
    assert arr.dtype == np.uint8 and arr.shape == (1371, 2048, 3)
    assert read_image_size(path) == (1371, 2048)
    assert load_image(path.read_bytes()).shape == arr.shape


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_modes_are_normalized_to_rgb(tmp_path, mode):
    rgb = Image.new("RGB", (7, 5), (200, 100, 50))
    img = rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.full((5, 7), 65535, np.uint16))
    ext = "tiff" if mode in ("CMYK", "I;16") else "png"
    arr = load_image(_save(tmp_path, img, f"x.{ext}"))
    assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8
    if mode == "I;16":
        assert arr.max() == 255  # full-scale 16-bit maps to full-scale 8-bit


def test_alpha_is_composited_over_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    arr = load_image(_save(tmp_path, img, "t.png"))
    assert (arr == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    path = _save(tmp_path, img, "r.jpg", exif=exif)
    assert load_image(path).shape == (8, 4, 3)  # height and width swapped


def test_missing_directory_empty_and_non_image(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.jpg")


def test_truncated_file_is_refused(tmp_path, chess):
    data = sorted((chess / "test").glob("*.jpg"))[0].read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(path)
    assert "cut.jpg" in str(info.value) and "\n" not in str(info.value)


def test_pixel_limit_checked_before_decoding(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (100, 100)), "big.png")
    with pytest.raises(ImageError, match="megapixels"):
        load_image(path, max_pixels=9_999)
    assert load_image(path, max_pixels=10_000).shape == (100, 100, 3)


def test_zero_size_image_is_refused(tmp_path):
    # A PNG header declaring width 0 cannot be written by Pillow; craft the bytes by hand.
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    with pytest.raises(ImageError):
        load_image(io.BytesIO(png).getvalue())
