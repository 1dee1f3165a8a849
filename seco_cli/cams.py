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


def rescale(images: torch.Tensor, scale: float, multiple: int = 1) -> torch.Tensor:
    """``images`` (B, 3, H, W) resized by ``scale`` (bilinear), each side rounded to a multiple
    of ``multiple`` (a ViT's patch size) — exactly ``scale`` where that is already one."""
    h, w = images.shape[-2:]
    size = tuple(max(multiple, round(d * scale / multiple) * multiple) for d in (h, w))
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def fuse_cams(cam_fn, images: torch.Tensor, scales: list[float], flip: bool,
              out_size: tuple[int, int], multiple: int = 1):
    """Multi-scale CAM fusion (SPEC §3.2): per scale the CAM of the image and of its flip
    (flipped back) are combined by element-wise **max**, upsampled to ``out_size``, ReLU'd,
    and **summed** over scales. ``cam_fn`` maps ``(B, 3, h, w)`` to raw CAMs ``(B, C, h', w')``,
    or to a tuple of such maps (e.g. final and auxiliary CAMs of one forward pass), each fused
    alike. Scaled sides are rounded to a multiple of ``multiple`` (:func:`rescale`).
    Returns ``(B, C, H, W)`` (not normalised), or the tuple of them.
    """
    b = images.shape[0]
    total: list[torch.Tensor] | None = None
    single = False
    for s in scales:
        x = rescale(images, s, multiple)
        batch = torch.cat([x, x.flip(-1)]) if flip else x  # one forward for image + flip
        out = cam_fn(batch)
        single = isinstance(out, torch.Tensor)
        fused = []
        for cam in (out,) if single else out:
            if flip:
                cam = torch.maximum(cam[:b], cam[b:].flip(-1))  # the flip's CAM, flipped back
            fused.append(F.relu(F.interpolate(cam.float(), size=out_size, mode="bilinear",
                                              align_corners=False)))
        total = fused if total is None else [t + f for t, f in zip(total, fused, strict=True)]
    assert total is not None, "fuse_cams needs at least one scale"
    return total[0] if single else tuple(total)


def normalise_cams(cam: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-class min-max normalisation to [0, 1], zeroed for classes not in ``labels`` (B, C)."""
    flat = cam.flatten(2)
    lo = flat.min(-1).values[..., None, None]
    hi = flat.max(-1).values[..., None, None]
    return (cam - lo) / (hi - lo + eps) * labels[..., None, None]
