"""Separate in image space (SPEC §3.3–§3.5, §3.7): region map, local patches, category tags.

Region map values: 0 = background, c ∈ 1..C = class c, −1 = uncertain, 255 = ignore (outside
the valid region of a padded crop). Tag values (shared with ``memory.py``): 0 = background,
c ≥ 1 = class c, −1 = uncertain (excluded from both contrasts).

Everything here is batched, pure and deterministic given its ``torch.Generator``; the only
randomness is the choice of patch centres (SPEC §3.8: the caller seeds the generator from
seed, iteration and rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNCERTAIN = -1
IGNORE = 255


def region_map(cam: torch.Tensor, valid: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """Region map (B, H, W) long of ``cam`` (B, C, H, W) in [0, 1], absent classes zeroed.

    Class ``argmax + 1`` where the max CAM is > ``high``; 0 where it is ≤ ``low``; −1
    (uncertain) in between; 255 outside ``valid`` (B, H, W) bool (SPEC §3.3).
    """
    if low > high:
        raise ValueError(f"region_map needs low ≤ high, got low={low}, high={high}")
    score, cls = cam.max(dim=1)  # (B, H, W)
    region = torch.full_like(cls, UNCERTAIN)
    region = torch.where(score > high, cls + 1, region)
    region = torch.where(score <= low, torch.zeros_like(region), region)
    return region.masked_fill(~valid, IGNORE)


def valid_bbox(valid: torch.Tensor) -> torch.Tensor:
    """Bounding box (B, 4) long ``(y0, x0, y1, x1)``, end-exclusive, of ``valid`` (B, H, W).

    An image with no valid pixel gets the whole image.
    """
    _, h, w = valid.shape
    rows = valid.any(dim=2).to(torch.uint8)  # (B, H)
    cols = valid.any(dim=1).to(torch.uint8)  # (B, W)
    # argmax returns the first maximal index: the first valid row / column from each side
    y0, x0 = rows.argmax(dim=1), cols.argmax(dim=1)  # (B,)
    y1, x1 = h - rows.flip(1).argmax(dim=1), w - cols.flip(1).argmax(dim=1)  # (B,)
    return torch.stack([y0, x0, y1, x1], dim=1)


def sample_patch_boxes(
    region: torch.Tensor, valid: torch.Tensor, n: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` square boxes of side ``size`` per image, inside the valid region (SPEC §3.4).

    Returns ``boxes`` (B, n, 4) long ``(y0, x0, y1, x1)`` end-exclusive, and ``too_small``
    (B, n) bool: the valid region is smaller than a patch in some dimension (or empty), so the
    box is only kept inside the image and the patch must be tagged −1 (``patch_tags`` does).
    Centres: distinct pixels, uncertain ones first (see ``_draw_centres``).
    """
    b, h, w = region.shape
    if not 1 <= size <= min(h, w):
        raise ValueError(f"patch size {size} must be in [1, {min(h, w)}] for a {h}×{w} input")
    if not 1 <= n <= h * w:
        raise ValueError(f"number of patches {n} must be in [1, {h * w}]")
    bbox = valid_bbox(valid)  # (B, 4)
    extent = bbox[:, 2:] - bbox[:, :2]  # (B, 2) valid (height, width)
    too_small = (extent < size).any(dim=1) | ~valid.flatten(1).any(dim=1)  # (B,)
    limit = torch.tensor([h - size, w - size], device=region.device)
    lo = torch.where(too_small[:, None], torch.zeros_like(bbox[:, :2]), bbox[:, :2])  # (B, 2)
    hi = torch.where(too_small[:, None], limit.expand(b, 2), bbox[:, 2:] - size)  # (B, 2)
    centres = _draw_centres(region, valid, lo, hi, n, size, generator)  # (B, n, 2)
    # a no-op for centres drawn from the first two tiers; moves the fallback ones inside
    top_left = torch.maximum(torch.minimum(centres - size // 2, hi[:, None]), lo[:, None])
    boxes = torch.cat([top_left, top_left + size], dim=-1)  # (B, n, 4)
    return boxes, too_small[:, None].expand(b, n)


def _draw_centres(region: torch.Tensor, valid: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Centres (B, n, 2) long ``(y, x)``: n distinct pixels per image, uniformly at random
    within the best tier: 3 = uncertain and its patch fits in ``[lo, hi + size)``; 2 = valid
    and fits; 1 = valid; 0 = anything. Lower tiers only fill up when higher ones run out.

    Vectorised sampling without replacement: top-n of (tier + uniform noise) per image.
    Decision: upstream falls back to any pixel for *all* centres when fewer than n uncertain
    centres exist, and keeps patches inside the image, not the valid region; here each
    missing centre alone falls back, and every patch fits the valid region when it can.
    """
    b, h, w = region.shape
    half = size // 2
    ys = torch.arange(h, device=region.device).view(1, h, 1)
    xs = torch.arange(w, device=region.device).view(1, 1, w)
    lo_y, lo_x = (lo[:, 0] + half).view(b, 1, 1), (lo[:, 1] + half).view(b, 1, 1)
    hi_y, hi_x = (hi[:, 0] + half).view(b, 1, 1), (hi[:, 1] + half).view(b, 1, 1)
    fits = (ys >= lo_y) & (ys <= hi_y) & (xs >= lo_x) & (xs <= hi_x)  # (B, H, W)
    uncertain = region == UNCERTAIN
    tier = valid.long() + (valid & fits).long() + (valid & fits & uncertain).long()  # (B, H, W)
    # float64 noise: float32 loses resolution next to the tier offset and would create ties
    noise = torch.rand(b, h * w, generator=generator, dtype=torch.float64,
                       device=generator.device).to(region.device)  # (B, H*W)
    index = (tier.flatten(1).double() + noise).topk(n, dim=1).indices  # (B, n)
    return torch.stack([index // w, index % w], dim=-1)  # (B, n, 2)


def gather_boxes(x: torch.Tensor, boxes: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """Contents (B, n, K, s, s) of the equal-size boxes (B, n, 4) of ``x`` (B, K, H, W).

    Exact pure gather (no interpolation): equal-size integer boxes index a regular grid.
    ``side``: the boxes' side when the caller knows it (:func:`sample_patch_boxes` draws
    them at a given size); else it is read from the boxes and checked, a wait for the device.
    """
    b, n, _ = boxes.shape
    s = box_size(boxes) if side is None else side
    offsets = torch.arange(s, device=x.device)
    ys = boxes[..., 0, None].to(x.device) + offsets  # (B, n, s)
    xs = boxes[..., 1, None].to(x.device) + offsets  # (B, n, s)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    out = x.permute(0, 2, 3, 1)[bi, ys[..., :, None], xs[..., None, :]]  # (B, n, s, s, K)
    return out.permute(0, 1, 4, 2, 3)  # (B, n, K, s, s)


def box_size(boxes: torch.Tensor) -> int:
    """Side of the square boxes (B, n, 4); raises unless all boxes share it."""
    sides = torch.cat([boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]])
    if sides.numel() == 0:
        raise ValueError("no boxes")
    s = int(sides.flatten()[0])
    if s < 1 or not bool((sides == s).all()):
        raise ValueError("boxes must be squares of one common positive side")
    return s


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, out_size: int,
                 side: int | None = None) -> torch.Tensor:
    """All patches (B*n, 3, out, out) of ``images`` (B, 3, H, W) at ``boxes`` (B, n, 4).

    Image-major order (patch j of image i at row i*n + j). Resized bilinearly (antialiased)
    only when ``out_size`` differs from the box side.
    """
    patches = gather_boxes(images, boxes, side).flatten(0, 1)  # (B*n, 3, s, s)
    if patches.shape[-1] != out_size:
        patches = F.interpolate(patches, size=(out_size, out_size), mode="bilinear",
                                align_corners=False, antialias=True)
    return patches


def _value_counts(values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (..., C+3) of region values (..., P): slot 0 background, 1..C the classes,
    C+1 uncertain, C+2 ignore."""
    c = num_classes
    index = torch.where(values == UNCERTAIN, c + 1, values)
    index = torch.where(values == IGNORE, c + 2, index)
    counts = torch.zeros(*values.shape[:-1], c + 3, dtype=torch.long, device=values.device)
    return counts.scatter_add_(-1, index, torch.ones_like(index))


def _fill_single_label(region: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Uncertain pixels of single-label images become that class (SPEC §3.5 *(up)*).

    Decision: "single-label" follows the image labels. Upstream uses the number of
    *confident* classes in the region map, so a multi-label image with one confident class
    had its other object's uncertain pixels relabelled as that class.
    """
    single = labels.sum(dim=1) == 1  # (B,)
    cls = labels.argmax(dim=1) + 1  # (B,)
    fill = single[:, None, None] & (region == UNCERTAIN)  # (B, H, W)
    return torch.where(fill, cls[:, None, None], region)


def patch_tags(region: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
               threshold: float, too_small: torch.Tensor, side: int | None = None,
               ) -> torch.Tensor:
    """Tags (B, n) long of the patches ``boxes`` (B, n, 4) of ``region`` (B, H, W) (SPEC §3.5).

    ``labels`` (B, C) multi-hot. p = (#class + #uncertain pixels) / #valid pixels of the patch
    (255 excluded from both). p ≤ ``threshold`` → 0; else exactly one class among the class
    pixels → that class; else (several classes, or only uncertain pixels) → −1. Patches with
    no valid pixel, or flagged ``too_small`` (B, n), → −1.
    """
    c = labels.shape[1]
    region = _fill_single_label(region, labels)
    patches = gather_boxes(region[:, None], boxes, side)  # (B, n, 1, s, s)
    counts = _value_counts(patches.flatten(2), c)  # (B, n, C+3)
    # Decision (SPEC §3.5): upstream sums class indices — a bug; we count pixels.
    n_valid = counts[..., : c + 2].sum(dim=-1)  # (B, n)
    n_fore = counts[..., 1 : c + 2].sum(dim=-1)  # (B, n) class + uncertain pixels
    present = counts[..., 1 : c + 1] > 0  # (B, n, C)
    # float64 so that a proportion exactly at the threshold compares as equal
    p = n_fore.double() / n_valid.clamp(min=1).double()
    one = present.sum(dim=-1) == 1
    tags = torch.where(one, present.long().argmax(dim=-1) + 1, UNCERTAIN)
    tags = torch.where(p <= threshold, 0, tags)
    return torch.where((n_valid == 0) | too_small.to(tags.device), UNCERTAIN, tags)


def alone_tags(logits: torch.Tensor, labels: torch.Tensor, threshold: float,
               keep: torch.Tensor) -> torch.Tensor:
    """Tags (N,) long of patches from their own classification (``train.patch_tags: alone``,
    a deviation from SPEC §3.5, README): ``logits`` (N, C) of each patch forwarded alone,
    ``labels`` (N, C) the multi-hot of its image. Exactly one of the image's classes with
    sigmoid > ``threshold`` → that class; none → 0 (background); several → −1. Patches
    where ``keep`` (N,) is False (no valid pixel, or did not fit) → −1.
    """
    fires = (torch.sigmoid(logits.float()) > threshold) & (labels > 0)
    n = fires.sum(dim=1)
    tags = torch.where(n == 1, fires.long().argmax(dim=1) + 1, UNCERTAIN)
    tags = torch.where(n == 0, 0, tags)
    return torch.where(keep.to(tags.device), tags, UNCERTAIN)


def global_tags(region: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Global-view tags (B,) long (SPEC §3.7): the image's class when exactly one labelled
    class has confident pixels in ``region`` (B, H, W), else −1.

    Decision (SPEC §3.5): upstream tags an image with no confident class as class 1; −1 here.
    """
    c = labels.shape[1]
    counts = _value_counts(region.flatten(1), c)  # (B, C+3)
    confident = (counts[:, 1 : c + 1] > 0) & labels.bool()  # (B, C)
    one = confident.sum(dim=1) == 1
    return torch.where(one, confident.long().argmax(dim=1) + 1, UNCERTAIN)
