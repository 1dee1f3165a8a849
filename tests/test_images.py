"""Image and mask I/O: palette PNG round trip, image modes converted, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seco_cli.data.images import image_size, load_image, load_mask, save_png, voc_palette
from seco_cli.errors import DataError


def test_voc_palette_png_round_trip(tmp_path: Path):
    mask = np.array([[0, 1, 2], [15, 20, 255]], dtype=np.uint8)
    save_png(tmp_path / "m.png", mask, voc_palette())
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P"
        rgb = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), mask)
    assert tuple(rgb[0, 1]) == (128, 0, 0)  # aeroplane red, as in VOC
    assert tuple(rgb[0, 2]) == (0, 128, 0)
    assert tuple(rgb[1, 0]) == (192, 128, 128)  # person
    assert tuple(rgb[1, 2]) == (224, 224, 192)  # ignore


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_image_modes_become_rgb(tmp_path: Path, mode: str):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(
        np.arange(30, dtype=np.uint16).reshape(6, 5) * 2000)
    ext = "jpg" if mode == "CMYK" else "png"
    if mode == "I;16":
        img = img.convert("I;16")
    img.save(tmp_path / f"x.{ext}")
    out = load_image(tmp_path / f"x.{ext}")
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8


def test_exif_rotation_is_applied(tmp_path: Path):
    img = Image.fromarray(np.zeros((4, 8, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (8, 4, 3)
    assert image_size(tmp_path / "r.jpg") == (8, 4)


def test_corrupt_and_missing_images_are_data_errors(tmp_path: Path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="corrupt or not an image"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "none.jpg")
