"""Label refinement with PAR (pixel-adaptive refinement, SPEC §6, as in ToCo), in torch.

PAR diffuses class probabilities between pixels of similar colour: an affinity over the 8
neighbours at each of several dilations, built once from the image, is applied ``iterations``
times. Everything is plain torch with shifted slices of a replicate-padded tensor (no unfold,
no conv kernels), on whatever device the inputs live.

The dense CRF of inference (SPEC §8, pydensecrf) is numpy-only and lives in
:mod:`seco_cli.postprocess` (:func:`~seco_cli.postprocess.dense_crf`), which the CRF pool's
workers import without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
_EPS = 1e-8

# The 8-neighbourhood in ToCo's order: top row, middle row (no centre), bottom row.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(dy, dx) of the 8 neighbours at every dilation: ``8 * len(dilations)`` offsets."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _RING]


def _shifted(padded: Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> Tensor:
    """``x[..., y+dy, x+dx]`` for every pixel, read from ``x`` replicate-padded by ``pad``."""
    return padded[..., pad + dy: pad + dy + h, pad + dx: pad + dx + w]


def _neighbours(x: Tensor, offsets: list[tuple[int, int]]) -> Tensor:
    """(B, C, H, W) -> (B, C, M, H, W): the value at each of the M offsets, borders replicated."""
    h, w = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, [pad] * 4, mode="replicate")
    return torch.stack([_shifted(padded, pad, dy, dx, h, w) for dy, dx in offsets], dim=2)


def par_affinity(image: Tensor, dilations: Sequence[int] = PAR_DILATIONS,
                 colour_scale: float = 0.3, pos_scale: float = 0.3,
                 pos_weight: float = 0.01) -> Tensor:
    """PAR affinity of every pixel to its M = 8·len(dilations) neighbours: (B, M, H, W).

    What is computed (ToCo's PAR, per pixel i and neighbour j):
    - colour: ``a_ij = -mean_c( |I_cj - I_ci| / (σ_ci + 1e-8) / colour_scale )²`` where
      ``σ_ci`` is the (unbiased, n-1) std over the M neighbours of the neighbour values
      ``I_cj`` of channel c — equal to the std of the differences ``I_cj - I_ci`` since the
      centre is constant over j; then softmax over the M neighbours;
    - position: ``p_j = -( r_j / σ_r / pos_scale )²`` with ``r_j`` = d for axial and d·√2 for
      diagonal neighbours, ``σ_r`` their (unbiased) std over the M offsets; softmax over M
      (the same for every pixel);
    - affinity = ``(softmax(a) + pos_weight · softmax(p)) / (1 + pos_weight)``.
    **Departure:** ToCo does not divide by ``1 + pos_weight``, so its maps grow by 1.01 per
    iteration; the division keeps them distributions and changes no argmax.
    """
    offsets = neighbour_offsets(dilations)
    img = image.float()                                            # (B, 3, H, W)
    nb = _neighbours(img, offsets)                                 # (B, 3, M, H, W)
    std = nb.std(dim=2, keepdim=True)                              # (B, 3, 1, H, W)
    diff = (nb - img.unsqueeze(2)).abs()                           # (B, 3, M, H, W)
    colour = -((diff / (std + _EPS) / colour_scale) ** 2).mean(dim=1)  # (B, M, H, W)
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets],
                        dtype=img.dtype, device=img.device)        # (M,)
    pos = (-((dist / dist.std() / pos_scale) ** 2)).softmax(dim=0)  # (M,)
    aff = colour.softmax(dim=1) + pos_weight * pos.view(1, -1, 1, 1)
    return aff / (1.0 + pos_weight)


def par_propagate(probs: Tensor, aff: Tensor, dilations: Sequence[int] = PAR_DILATIONS,
                  iterations: int = 10) -> Tensor:
    """``iterations`` times: probs_i ← Σ_j aff_ij · probs_j over the M neighbours j.

    ``probs`` (B, K, H, W), ``aff`` (B, M, H, W) from :func:`par_affinity` with the same
    dilations. Accumulates neighbour by neighbour, so memory stays O(B·K·H·W).
    """
    offsets = neighbour_offsets(dilations)
    h, w = probs.shape[-2:]
    pad = max(dilations)
    for _ in range(iterations):
        padded = F.pad(probs, [pad] * 4, mode="replicate")        # (B, K, H+2p, W+2p)
        out = torch.zeros_like(probs)
        for m, (dy, dx) in enumerate(offsets):
            out = out.addcmul(aff[:, m: m + 1], _shifted(padded, pad, dy, dx, h, w))
        probs = out
    return probs


def par_refine(image: Tensor, probs: Tensor, dilations: Sequence[int] = PAR_DILATIONS,
               iterations: int = 10, colour_scale: float = 0.3, pos_scale: float = 0.3,
               pos_weight: float = 0.01, downscale: int = 2) -> Tensor:
    """PAR (SPEC §6) of class probabilities ``probs`` (B, K, H, W) guided by the normalised
    ``image`` (B, 3, H, W); returns (B, K, H, W) float32 probabilities.

    As ToCo: image and probs are resized (bilinear) to ``(H // downscale, W // downscale)``,
    refined there, and the result resized back to (H, W). Distributions stay distributions
    (every step is a convex combination). Differentiable; callers usually wrap it in
    ``torch.no_grad()``.
    """
    size = probs.shape[-2:]
    img, p = image.float(), probs.float()
    if downscale > 1:
        small = (max(1, size[0] // downscale), max(1, size[1] // downscale))
        img = F.interpolate(img, size=small, mode="bilinear", align_corners=False)
        p = F.interpolate(p, size=small, mode="bilinear", align_corners=False)
    aff = par_affinity(img, dilations, colour_scale, pos_scale, pos_weight)  # (B, M, h, w)
    p = par_propagate(p, aff, dilations, iterations)                          # (B, K, h, w)
    if p.shape[-2:] != size:
        p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
    return p
