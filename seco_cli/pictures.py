"""The picture grid of evaluate: for a fixed sample of images one row of five panels, image |
ground truth | CAM | pseudo mask | prediction, each captioned with the classes it shows.

Pure: arrays in, a PIL image out. Masks use the VOC palette; a CAM panel tints the image with
the colour of its strongest class, in proportion to that class's score. A panel the stores
do not have for an image (e.g. no prediction for a train image) is grey and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from seco_cli.data.images import voc_palette
from seco_cli.postprocess import resize_scores

COLUMNS = ("image", "ground truth", "CAM", "pseudo mask", "prediction")
CAPTION = 14  # px: the strip under each panel and the header row
CAM_ALPHA = 0.7  # how strongly a CAM of score 1 tints the image
_MISSING = (96, 96, 96)
_STRIP = (32, 32, 32)
_TEXT = (240, 240, 240)


@dataclass
class GridRow:
    """One image's panels; ``None`` where a store has nothing for it."""

    image_id: str
    image: np.ndarray  # (H, W, 3) uint8
    gt: np.ndarray | None = None  # (H, W) uint8 class indices (255 = ignore)
    cam: np.ndarray | None = None  # (K, h, w) in [0, 1] for cam_labels
    cam_labels: Sequence[int] = ()
    pseudo: np.ndarray | None = None  # (H, W) uint8
    pred: np.ndarray | None = None  # (H, W) uint8


def grid_size(rows: int, panel: int) -> tuple[int, int]:
    """(width, height) of a grid of ``rows`` rows: header + rows × (panel + caption)."""
    return len(COLUMNS) * panel, CAPTION + rows * (panel + CAPTION)


def _fit(img: Image.Image, panel: int, resample: Image.Resampling) -> Image.Image:
    """Letterboxed into a ``panel``² square (aspect kept)."""
    w, h = img.size
    r = panel / max(w, h)
    small = img.convert("RGB").resize((max(1, round(w * r)), max(1, round(h * r))), resample)
    canvas = Image.new("RGB", (panel, panel), (0, 0, 0))
    canvas.paste(small, ((panel - small.width) // 2, (panel - small.height) // 2))
    return canvas


def _mask_image(mask: np.ndarray, palette: list[int]) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)), mode="P")
    img.putpalette(palette)
    return img


def _cam_image(image: np.ndarray, cam: np.ndarray, labels: Sequence[int],
               palette: list[int]) -> Image.Image:
    h, w = image.shape[:2]
    if not len(labels):
        return Image.fromarray(image)
    scores = resize_scores(cam, (h, w)).clip(0, 1)                         # (K, H, W)
    colours = np.asarray(palette, np.float32).reshape(-1, 3)[np.asarray(labels)]  # (K, 3)
    strength = scores.max(0)[..., None] * CAM_ALPHA                           # (H, W, 1)
    tint = colours[scores.argmax(0)]                                          # (H, W, 3)
    out = image.astype(np.float32) * (1 - strength) + tint * strength
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def _caption(draw: ImageDraw.ImageDraw, x: int, y: int, panel: int, names: list[str],
             colours: list[tuple[int, int, int]] | None, font: ImageFont.ImageFont) -> None:
    """Class names left to right in the strip at (x, y), each after a swatch of its colour;
    what does not fit is cut."""
    draw.rectangle([x, y, x + panel - 1, y + CAPTION - 1], fill=_STRIP)
    cx = x + 2
    for k, name in enumerate(names):
        if colours is not None:
            if cx + 10 > x + panel:
                break
            draw.rectangle([cx, y + 3, cx + 7, y + 10], fill=colours[k])
            cx += 10
        room = x + panel - 2 - cx
        while name and draw.textlength(name, font=font) > room:
            name = name[:-1]
        if not name:
            break
        draw.text((cx, y + 1), name, fill=_TEXT, font=font)
        cx += int(draw.textlength(name, font=font)) + 6


def _present(mask: np.ndarray) -> list[int]:
    return [int(c) for c in np.unique(mask) if c not in (0, 255)]


def sample_grid(rows: Sequence[GridRow], classes: Sequence[str], panel: int) -> Image.Image:
    """The grid (see :func:`grid_size`); ``classes`` names the class indices (0 = background)."""
    palette = voc_palette()
    rgb = [tuple(palette[3 * c: 3 * c + 3]) for c in range(256)]
    font = ImageFont.load_default()
    grid = Image.new("RGB", grid_size(len(rows), panel), _STRIP)
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(COLUMNS):
        _caption(draw, col * panel, 0, panel, [title], None, font)
    for r, row in enumerate(rows):
        y = CAPTION + r * (panel + CAPTION)
        masks = (row.gt, None, row.pseudo, row.pred)
        for col in range(len(COLUMNS)):
            x = col * panel
            if col == 0:
                img = _fit(Image.fromarray(row.image), panel, Image.Resampling.BILINEAR)
                names, colours = [row.image_id], None
            elif col == 2 and row.cam is not None:
                img = _fit(_cam_image(row.image, row.cam, row.cam_labels, palette), panel,
                           Image.Resampling.BILINEAR)
                labels = list(row.cam_labels)
                names, colours = [classes[c] for c in labels], [rgb[c] for c in labels]
            elif col != 2 and masks[col - 1] is not None:
                mask = masks[col - 1]
                img = _fit(_mask_image(mask, palette), panel, Image.Resampling.NEAREST)
                labels = _present(mask) or [0]  # only background: say so
                names, colours = [classes[c] for c in labels], [rgb[c] for c in labels]
            else:
                img, names, colours = Image.new("RGB", (panel, panel), _MISSING), ["n/a"], None
            grid.paste(img, (x, y))
            _caption(draw, x, y + panel, panel, names, colours, font)
    return grid
