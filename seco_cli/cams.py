"""Class activation maps: fusion over scales and flips, and CAM → mask (SPEC §3.2, §8)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_scores(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(K, h, w)`` float scores to ``(K, H, W)`` float32."""
    if scores.shape[1:] == tuple(size):
        return scores.astype(np.float32)
    t = torch.from_numpy(scores.astype(np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


def cam_to_mask(cam: np.ndarray, labels: list[int], bkg: float,
                size: tuple[int, int] | None = None) -> np.ndarray:
    """Argmax of a constant background score ``bkg`` against the image's class CAMs.

    ``cam`` is ``(K, h, w)`` normalised scores for the image's ``labels`` (class indices 1..C,
    K = len(labels)); the result is ``(H, W) uint8`` with 0 = background. ``size`` resizes
    the scores first (bilinear). An image without labels is all background.
    """
    h, w = size if size is not None else cam.shape[1:]
    if len(labels) == 0:
        return np.zeros((h, w), dtype=np.uint8)
    scores = resize_scores(cam, (h, w)) if size is not None else cam.astype(np.float32)
    full = np.concatenate([np.full((1, h, w), bkg, dtype=np.float32), scores], axis=0)
    lut = np.asarray([0, *labels], dtype=np.uint8)
    return lut[full.argmax(axis=0)]
