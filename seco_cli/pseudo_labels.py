"""Online pseudo labels from normalised CAMs (SPEC §3.3, §6)."""

from __future__ import annotations

import torch

IGNORE = 255


def cams_to_labels(cam: torch.Tensor, valid: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """Region map of ``cam`` (B, C, H, W) in [0, 1] (zero for absent classes).

    Pixel → class ``argmax + 1`` where the max CAM exceeds ``high``; → background (0) where it
    is at most ``low``; → 255 (uncertain) in between and outside ``valid`` (B, H, W).
    """
    score, cls = cam.max(dim=1)  # (B, H, W)
    label = torch.full_like(cls, IGNORE)
    label[score > high] = cls[score > high] + 1
    label[score <= low] = 0
    label[~valid] = IGNORE
    return label
