"""Reading images and masks from disk into canonical arrays.

Images become ``(H, W, 3) uint8`` RGB whatever their mode (grayscale, RGBA, palette, 16-bit,
32-bit float, CMYK) with EXIF orientation applied; masks become ``(H, W) uint8`` class
indices. Every failure is a one-line :class:`DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seco_cli.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _existing_image(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file '{path}' does not exist", str(path),
                        "check the dataset root and its lists")
    if path.stat().st_size == 0:
        raise DataError(f"image file '{path}' is empty (0 bytes)", str(path),
                        "replace the file or remove its id from the split lists")
    return path


def _declares_no_pixels(path: Path) -> bool:
    """A PNG whose header says 0 columns or rows (PIL refuses to identify it)."""
    with open(path, "rb") as f:
        head = f.read(24)
    return (head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
            and (head[16:20] == b"\0\0\0\0" or head[20:24] == b"\0\0\0\0"))


def _unreadable(path: Path, exc: Exception) -> DataError:
    if isinstance(exc, Image.DecompressionBombError):
        return DataError(f"image file '{path}' has too many pixels to decode safely", str(path),
                         "downscale the image or remove its id from the split lists")
    if _declares_no_pixels(path):
        return DataError(f"image file '{path}' has no pixels (0 width or height)", str(path),
                         "remove it from the lists")
    return DataError(f"image file '{path}' is corrupt or not an image ({exc})", str(path),
                     "replace the file or remove its id from the split lists")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float gray images scaled to 8 bits (not clipped at 255)."""
    arr = np.asarray(img, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    peak = float(finite.max()) if finite.size else 0.0
    if img.mode == "F" and peak <= 1.0:
        top = 1.0  # float images in [0, 1]
    else:
        top = 65535.0 if peak > 255 else 255.0
    arr = np.nan_to_num(arr / top * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 array of an image file; a clear :class:`DataError` when unreadable."""
    path = _existing_image(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                img = _to_8bit(img)
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                canvas = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(canvas, img)
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from exc
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
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from exc
    if w == 0 or h == 0:
        raise DataError(f"image file '{path}' has no pixels", str(path), "remove it from the lists")
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _mask_indices(img: Image.Image, path: Path) -> np.ndarray:
    """The class indices a mask image holds; colour and fractional masks are refused."""
    rule = "masks hold class indices 0..C and 255 (ignore)"
    if img.mode in ("P", "L"):
        return np.asarray(img)
    if img.mode == "1":  # a binary mask: 0 background, 1 the single class
        return np.asarray(img).astype(np.uint8)
    if img.mode in ("LA", "PA"):  # the index channel; alpha carries no class
        return np.asarray(img)[..., 0]
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.int64)
        if arr.size and (arr.max() > 255 or arr.min() < 0):
            raise DataError(f"mask '{path}' has values outside 0..255", str(path), rule)
        return arr
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)[..., :3]
        if (arr == arr[..., :1]).all():  # gray values stored as RGB
            return arr[..., 0]
        raise DataError(f"mask '{path}' is a colour image, not class indices", str(path),
                        "save masks as palette or grayscale PNGs; " + rule)
    raise DataError(f"mask '{path}' has image mode {img.mode}, not class indices", str(path),
                    "save masks as palette or grayscale PNGs; " + rule)


def load_mask(path: str | Path) -> np.ndarray:
    """Class-index mask of a PNG (palette indices, or gray values) as ``(H, W) uint8``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file '{path}' does not exist", str(path), "check the dataset layout")
    try:
        with Image.open(path) as img:
            img.load()
            arr = _mask_indices(img, path)
    except _UNREADABLE as exc:
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
