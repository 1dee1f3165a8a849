"""Image/label transforms shared by training and inference (SPEC §3.1, §8)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(H, W, 3) uint8 → normalised (3, H, W) float32."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x - m) / s


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) → (3, size, size), bilinear (SPEC §8: inference input is crop×crop)."""
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def train_crop(image: torch.Tensor, rng: np.random.Generator, crop: int,
               scale_range: tuple[float, float], mask: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """Random rescale, horizontal flip, random crop padded with zeros (SPEC §3.1).

    Returns ``(image (3, crop, crop), valid (crop, crop) bool, mask or None, info)``; padding
    is outside ``valid`` and gets mask value 255.
    """
    _, h, w = image.shape
    scale = float(rng.uniform(*scale_range))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
    flip = bool(rng.random() < 0.5)
    if flip:
        image = image.flip(-1)
        mask = mask.flip(-1) if mask is not None else None
    top = int(rng.integers(0, max(nh - crop, 0) + 1))
    left = int(rng.integers(0, max(nw - crop, 0) + 1))
    ch, cw = min(crop, nh), min(crop, nw)
    # place the valid part at a random offset inside the canvas when the image is smaller
    oy = int(rng.integers(0, crop - ch + 1))
    ox = int(rng.integers(0, crop - cw + 1))
    out = image.new_zeros((3, crop, crop))
    out[:, oy:oy + ch, ox:ox + cw] = image[:, top:top + ch, left:left + cw]
    valid = torch.zeros((crop, crop), dtype=torch.bool)
    valid[oy:oy + ch, ox:ox + cw] = True
    out_mask = None
    if mask is not None:
        out_mask = torch.full((crop, crop), 255, dtype=torch.long)
        out_mask[oy:oy + ch, ox:ox + cw] = mask[top:top + ch, left:left + cw]
    info = {"scale": scale, "flip": flip, "box": (oy, ox, ch, cw)}
    return out, valid, out_mask, info
