"""The embedded procedural dataset: small images that show the co-occurrence problem.

Each foreground class is a shape with its own colour and texture, drawn on a low-frequency
noise background. Two kinds of coupling make image-level labels ambiguous, as in VOC:

* **context coupling** (boat/water, train/rails): a class sits on its own background texture
  with probability ``rate``; the context also appears alone (``context_alone_rate``). Context
  pixels are *background* in the masks, so a CAM that fires on the water is a false positive.
* **object coupling** (horse/person): when ``a`` is present, ``b`` is added with probability
  ``rate``, overlapping ``a`` (a rider on the horse); ``b`` also appears on its own.

Every random choice of image ``i`` comes from ``numpy.random.default_rng([seed, i])``, so the
dataset is deterministic by seed and independent of generation order.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from seco_cli.data.prepared import Sample
from seco_cli.data.sources import SourceData
from seco_cli.params import SyntheticParams

# Per class: shape, base colour (RGB in [0, 1]) and texture; classes beyond this table get a
# shape and colour derived from their index.
_LOOKS: dict[str, tuple[str, tuple[float, float, float], str]] = {
    "boat": ("hull", (0.80, 0.30, 0.15), "hstripes"),
    "train": ("rect", (0.85, 0.80, 0.20), "windows"),
    "horse": ("ellipse", (0.50, 0.30, 0.12), "spots"),
    "person": ("person", (0.95, 0.65, 0.55), "plain"),
    "car": ("roundrect", (0.15, 0.75, 0.45), "vstripes"),
    "bird": ("triangle", (0.90, 0.15, 0.70), "plain"),
}
_SHAPES = ["ellipse", "rect", "triangle", "hull", "roundrect"]
_TEXTURES = ["plain", "hstripes", "vstripes", "spots", "windows"]


def _look(name: str, index: int) -> tuple[str, np.ndarray, str]:
    if name in _LOOKS:
        shape, colour, texture = _LOOKS[name]
        return shape, np.asarray(colour), texture
    hue = (index * 0.61803) % 1.0  # golden-ratio hues keep derived colours apart
    colour = np.asarray([0.5 + 0.45 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)])
    return _SHAPES[index % len(_SHAPES)], colour, _TEXTURES[(index // 2) % len(_TEXTURES)]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def _texture(kind: str, colour: np.ndarray, yy: np.ndarray, xx: np.ndarray, phase: float) -> np.ndarray:
    base = np.broadcast_to(colour, (*yy.shape, 3)).copy()
    if kind == "hstripes":
        base *= (0.75 + 0.25 * (np.sin(yy * 1.3 + phase) > 0))[..., None]
    elif kind == "vstripes":
        base *= (0.75 + 0.25 * (np.sin(xx * 1.3 + phase) > 0))[..., None]
    elif kind == "spots":
        base *= (0.7 + 0.3 * ((np.sin(xx * 0.9 + phase) * np.sin(yy * 0.9)) > 0.3))[..., None]
    elif kind == "windows":
        win = (np.sin(xx * 1.1 + phase) > 0.4) & (np.sin(yy * 1.1) > 0.4)
        base[win] = (0.2, 0.3, 0.6)
    return base


def _shape_mask(shape: str, size: int, box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    canvas = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(canvas)
    w, h = x1 - x0, y1 - y0
    if shape == "ellipse":
        d.ellipse(box, fill=1)
    elif shape == "rect":
        d.rectangle(box, fill=1)
    elif shape == "roundrect":
        d.rounded_rectangle(box, radius=max(1.0, min(w, h) / 4), fill=1)
    elif shape == "triangle":
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=1)
    elif shape == "hull":
        d.polygon([(x0, y0 + h * 0.35), (x1, y0 + h * 0.35), (x1 - w * 0.2, y1),
                   (x0 + w * 0.2, y1)], fill=1)
        d.rectangle((x0 + w * 0.45, y0, x0 + w * 0.55, y0 + h * 0.35), fill=1)  # mast
    elif shape == "person":
        d.ellipse((x0 + w * 0.3, y0, x1 - w * 0.3, y0 + h * 0.3), fill=1)  # head
        d.rounded_rectangle((x0 + w * 0.15, y0 + h * 0.28, x1 - w * 0.15, y1),
                            radius=max(1.0, w / 5), fill=1)
    return np.asarray(canvas, dtype=bool)


def _context(kind: str, rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray,
             img: np.ndarray) -> int:
    """Paint a context band over the lower part of ``img``; return its top row."""
    top = int(size * rng.uniform(0.45, 0.6))
    band = yy >= top
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "water":
        wave = 0.5 + 0.5 * np.sin(yy * 0.9 + np.sin(xx * 0.35 + phase) * 2.0)
        colour = np.stack([0.10 + 0.08 * wave, 0.35 + 0.15 * wave, 0.75 + 0.15 * wave], -1)
    elif kind == "rails":
        ties = (np.sin(xx * 0.8 + phase) > 0.5)
        rails = (np.abs(((yy - top) % 10) - 5) < 1.2)
        grey = 0.45 + 0.2 * ties - 0.25 * rails
        colour = np.stack([grey, grey * 0.95, grey * 0.9], -1)
    else:  # any other context name: a textured band whose colour derives from the name
        seed = sum(map(ord, kind))
        c = np.asarray([(seed * k % 97) / 97 for k in (3, 5, 7)])
        colour = _texture("vstripes", c, yy, xx, phase)
    img[band] = colour[band]
    return top


def _box(rng: np.random.Generator, size: int, side: float, aspect: float,
         centre: tuple[float, float] | None = None) -> tuple[float, float, float, float]:
    w = side * size * np.sqrt(aspect)
    h = side * size / np.sqrt(aspect)
    w, h = min(w, size - 2.0), min(h, size - 2.0)
    if centre is None:
        cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
    else:
        cx = float(np.clip(centre[0], w / 2, size - w / 2))
        cy = float(np.clip(centre[1], h / 2, size - h / 2))
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def generate_image(p: SyntheticParams, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(S, S, 3) uint8`` and mask ``(S, S) uint8`` number ``index`` of the dataset."""
    rng = np.random.default_rng([seed, index])
    s = p.image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    ground = np.asarray([0.55, 0.5, 0.4]) + rng.uniform(-0.1, 0.1, 3)
    img = ground * (0.8 + 0.4 * _smooth_noise(rng, s, 4))[..., None]
    mask = np.zeros((s, s), dtype=np.uint8)
    cls_index = {name: i + 1 for i, name in enumerate(p.classes)}
    contexts = {c.cls: c for c in p.contexts}

    chosen: list[str] = []
    if rng.random() >= p.empty_rate:
        n = int(rng.integers(1, p.max_objects + 1))
        weights = np.asarray([p.class_weights.get(c, 1.0) for c in p.classes], dtype=np.float64)
        k = min(n, int((weights > 0).sum()))
        if k > 0:
            chosen = list(rng.choice(p.classes, size=k, replace=False, p=weights / weights.sum()))
    partners = [(o.a, o.b) for o in p.objects if o.a in chosen and o.b not in chosen
                and rng.random() < o.rate]

    # contexts first (they are background), then objects on top; one context band per image
    # (bands share the lower part of the image, a second would paint over the first)
    tops: dict[str, int] = {}
    for name in chosen:
        c = contexts.get(name)
        if c is not None and not tops and rng.random() < c.rate:
            tops[c.context] = _context(c.context, rng, s, yy, xx, img)
    for c in p.contexts:
        if not tops and c.cls not in chosen and rng.random() < p.context_alone_rate:
            tops[c.context] = _context(c.context, rng, s, yy, xx, img)

    boxes: dict[str, tuple[float, float, float, float]] = {}
    lo, hi = p.object_size
    for name in chosen:
        side = rng.uniform(lo, hi) * p.class_scales.get(name, 1.0)
        c = contexts.get(name)
        centre = None
        if c is not None and c.context in tops:  # sit on the context: bottom inside the band
            top = tops[c.context]
            centre = (rng.uniform(0, s), top + rng.uniform(-0.05, 0.15) * s)
        boxes[name] = _box(rng, s, side, rng.uniform(0.8, 1.6), centre)
    for a, b in partners:  # b overlaps the upper part of a (rider on horse)
        x0, y0, x1, _ = boxes[a]
        side = rng.uniform(lo, hi) * 0.8 * p.class_scales.get(b, 1.0)
        boxes[b] = _box(rng, s, side, 0.6, ((x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * s,
                                             y0 - side * s * 0.2))
    for name, box in boxes.items():  # a partner is drawn after its anchor, so on top
        k = cls_index[name]
        shape, colour, texture = _look(name, k)
        region = _shape_mask(shape, s, box)
        colour = np.clip(colour * rng.uniform(0.85, 1.15), 0, 1)
        img[region] = _texture(texture, colour, yy, xx, rng.uniform(0, 2 * np.pi))[region]
        mask[region] = k

    img = img + rng.normal(0.0, p.noise, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask


def read(p: SyntheticParams, seed: int) -> SourceData:
    """The dataset as a source for ``prepare``: ids ``train_00000``…, ``val_00000``…."""
    splits = {
        "train": [f"train_{i:05d}" for i in range(p.num_train)],
        "val": [f"val_{i:05d}" for i in range(p.num_val)],
    }

    order = splits["train"] + splits["val"]  # image index = position in this order
    index = {image_id: i for i, image_id in enumerate(order)}

    def load(image_id: str) -> Sample:
        image, mask = generate_image(p, seed, index[image_id])
        return Sample(id=image_id, image=image, mask=mask)

    return SourceData(classes=["background", *p.classes], splits=splits, order=order, load=load)
