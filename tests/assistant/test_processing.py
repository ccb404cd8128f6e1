"""Image loading: modes are normalised, and bad files raise ImageError naming the file and the problem."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loupe_vlm.assistant.processing import ImageError, load_image, lowlevel_size
from tests.helpers import ASSETS


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("P", (8, 8), 3).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"
    Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)).save(tmp_path / "i16.png")
    out = np.asarray(load_image(tmp_path / "i16.png"))
    assert out.dtype == np.uint8 and out.max() > out.min()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (10, 30)


@pytest.mark.parametrize("name, content, kind", [
    ("empty.png", b"", "empty"),
    ("text.png", b"this is not an image at all", "not_image"),
])
def test_bad_files_raise_named_errors(tmp_path, name, content, kind):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.kind == kind and str(path) in str(info.value)


def test_truncated_missing_and_huge(tmp_path):
    data = (ASSETS / "noisy.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "cut.png")
    assert info.value.kind == "truncated" and "cut.png" in str(info.value)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "nope.png")
    assert info.value.kind == "missing"
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "big.png", max_pixels=4_000_000)
    assert info.value.kind == "too_large" and "decompression bomb" in str(info.value)


def test_lowlevel_size_respects_budget_and_multiple():
    assert lowlevel_size(1000, 500, 448) == (448, 224)
    w, h = lowlevel_size(37, 23, 448)
    assert w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16
