"""Class activation maps in torch: fusion over scales and flips, normalisation (SPEC §3.2).

CAM → mask and the resize of stored scores are numpy, in :mod:`seco_cli.postprocess`
(:func:`~seco_cli.postprocess.cam_to_mask`, :func:`~seco_cli.postprocess.resize_scores`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
