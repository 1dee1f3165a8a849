"""Reading images and masks from disk into canonical arrays.

Images become ``(H, W, 3) uint8`` RGB whatever their mode (grayscale, RGBA, palette, 16-bit,
CMYK) with EXIF orientation applied; masks become ``(H, W) uint8`` class indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seco_cli.errors import DataError


def _existing_image(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file '{path}' does not exist", str(path),
                        "check the dataset root and its lists")
    return path


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 array of an image file; a clear :class:`DataError` when unreadable."""
    path = _existing_image(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                canvas = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(canvas, img)
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image file '{path}' is corrupt or not an image ({exc})", str(path),
                        "replace the file or remove its id from the split lists") from exc
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DataError(f"image file '{path}' has no pixels", str(path), "remove it from the lists")
    return rgb


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file as :func:`load_image` returns it, reading only the header."""
    path = _existing_image(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"image file '{path}' is corrupt or not an image ({exc})", str(path),
                        "replace the file or remove its id from the split lists") from exc
    if w == 0 or h == 0:
        raise DataError(f"image file '{path}' has no pixels", str(path), "remove it from the lists")
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def load_mask(path: str | Path) -> np.ndarray:
    """Class-index mask of a PNG (palette indices, or gray values) as ``(H, W) uint8``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file '{path}' does not exist", str(path), "check the dataset layout")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "L"):
                arr = np.asarray(img)
            elif img.mode in ("I;16", "I"):
                arr = np.asarray(img).astype(np.int64)
                if arr.max() > 255:
                    raise DataError(f"mask '{path}' has values above 255", str(path),
                                    "masks hold class indices 0..C and 255 (ignore)")
            else:
                arr = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"mask file '{path}' is corrupt ({exc})", str(path), "replace the file") from exc
    return arr.astype(np.uint8)


def save_png(path: str | Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    """Write an RGB image, or a class-index mask with an optional palette."""
    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(palette)
    img.save(path)


def voc_palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), 255 = white-ish ignore."""
    pal = []
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.extend([r, g, b])
    pal[255 * 3: 255 * 3 + 3] = [224, 224, 192]
    return pal
