"""Online pseudo labels from normalised CAMs (SPEC §3.3, §6)."""

from __future__ import annotations

import torch

from seco_cli.tags import IGNORE, UNCERTAIN, region_map


def cams_to_labels(cam: torch.Tensor, valid: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """Region map of ``cam`` (B, C, H, W) in [0, 1] (zero for absent classes) as a loss target.

    Pixel → class ``argmax + 1`` where the max CAM exceeds ``high``; → background (0) where it
    is at most ``low``; → 255 (uncertain) in between and outside ``valid`` (B, H, W).
    """
    region = region_map(cam, valid, high, low)
    return region.masked_fill(region == UNCERTAIN, IGNORE)
