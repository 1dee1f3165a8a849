"""L_reg: the dense-CRF energy regulariser of Tang et al. (ECCV 2018) on the segmentation
softmax, as ToCo/SeCo use it (SPEC §6).

For one image with gated pixels G, softmax S (K, h, w) and the Gaussian kernel
``W_ij = exp(-|p_i - p_j|² / 2σ_xy² - |I_i - I_j|² / 2σ_rgb²)`` (p in pixels of the given
resolution, I in 0–255 RGB):

    E_b = -Σ_k Σ_{i,j ∈ G} S_ki · W_ij · S_kj          (the diagonal W_ii = 1 included)

and the loss is ``scale · mean_b E_b`` (``reduction="image"``, the default) or
``scale · mean_b E_b / |G_b|`` (``reduction="pixel"``). Pixels outside the gate take no part,
on either side of W; an image with an empty gate contributes 0.

**Decision (SPEC §6):** plain PyTorch, no compiled permutohedral filter.
``crf_energy_exact`` evaluates W exactly between all gated pixels, materialised ``block`` rows
at a time (never more than block × N); ``crf_energy_window`` keeps only the pairs within
``radius`` pixels (a (2r+1)² square) using shifted slices; ``crf_energy`` takes the exact form
when every image has at most ``max_exact`` gated pixels. Both return gradients to S (the image
gets none) through one small autograd Function: W is symmetric, so dE_b/dS = -2 W S, and the
backward reuses the forward's W S instead of storing W. The energy is computed in float32
whatever the input dtype, with autocast off (a CUDA step's bf16 region).

Departures from ToCo's ``DenseEnergyLoss``: its gate is soft (``1 - max_k S`` on labelled
pixels, 1 on unlabelled ones) and applies to the rows of W only, the columns being all
valid-region pixels; here the caller's boolean gate applies to both sides. Its ``1/N`` is
1 / batch size — ``reduction="image"`` keeps that, so ``scale = 1e-7`` keeps its meaning.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

Reduction = Literal["image", "pixel"]


def _prepare(image: Tensor, seg: Tensor, gate: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Common dtype (≥ float32), boolean gate (B, h, w), and S zeroed outside the gate."""
    if image.shape[0] != seg.shape[0] or image.shape[-2:] != seg.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and seg {tuple(seg.shape)} differ")
    dtype = torch.promote_types(seg.dtype, torch.float32)
    b, _, h, w = seg.shape
    gate = torch.ones(b, h, w, dtype=torch.bool, device=seg.device) if gate is None else gate
    gate = gate.bool()
    gated = seg.to(dtype) * gate.unsqueeze(1).to(dtype)           # (B, K, h, w)
    return image.detach().to(dtype), gated, gate


def _reduce(energies: Tensor, gate: Tensor, scale: float, reduction: Reduction) -> Tensor:
    """(B,) per-image energies -> scalar loss."""
    if reduction == "pixel":
        energies = energies / gate.flatten(1).sum(1).clamp(min=1).to(energies.dtype)
    elif reduction != "image":
        raise ValueError(f"unknown reduction {reduction!r}")
    return scale * energies.mean()


class _Energy(torch.autograd.Function):
    """Per-image E_b = -Σ S ⊙ (W S): (B,). ``filter_fn`` maps S to W S without a graph."""

    @staticmethod
    def forward(ctx, seg: Tensor, filter_fn: Callable[[Tensor], Tensor]) -> Tensor:
        # autocast off: W S stays in the dtype _prepare gave S (≥ float32) also inside the bf16
        # region of a CUDA training step, where its matrix products would come out in bf16
        # (and writing them into the float32 result fails)
        with torch.no_grad(), torch.autocast(seg.device.type, enabled=False):
            ws = filter_fn(seg)                                   # (B, K, h, w)
        ctx.save_for_backward(ws)
        return -(seg * ws).flatten(1).sum(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (ws,) = ctx.saved_tensors
        return -2.0 * ws * grad.view(-1, 1, 1, 1), None


# --- exact: W between all gated pixels, a block of rows at a time -------------------------

def _features(image: Tensor, idx: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """(y/σ_xy, x/σ_xy, rgb/σ_rgb) of the flat pixel indices ``idx`` of ``image`` (3, h, w):
    (N, 5), so that W_ij = exp(-|f_i - f_j|² / 2)."""
    w = image.shape[-1]
    ys = torch.div(idx, w, rounding_mode="floor").to(image.dtype)
    xs = (idx % w).to(image.dtype)
    return torch.cat([torch.stack([ys, xs], 1) / sigma_xy,
                      image.flatten(1)[:, idx].t() / sigma_rgb], dim=1)


def exact_filter(image: Tensor, seg: Tensor, gate: Tensor, sigma_rgb: float, sigma_xy: float,
                 block: int = 4096, counts: list[int] | None = None) -> Tensor:
    """W S over the gated pixels of each image, exactly: (B, K, h, w), 0 outside the gate.

    ``image`` (B, 3, h, w), ``seg`` (B, K, h, w), ``gate`` (B, h, w) bool. Cost O(N² (K + 5))
    per image, memory O(block · N). ``counts``: the gated pixels per image when the caller
    has read them already. The pixel indices of the whole batch come from one
    ``nonzero_static`` of that known size, so the batch waits for the device once (reading
    the counts), not once per image.
    """
    out = torch.zeros(seg.shape, dtype=seg.dtype, device=seg.device)  # contiguous: .view below
    flat = gate.flatten(1)                                        # (B, hw)
    if counts is None:
        counts = flat.sum(1).tolist()
    hw = flat.shape[1]
    every = torch.nonzero_static(flat.flatten(), size=sum(counts)).squeeze(1)  # image-major
    ends = itertools.accumulate(counts)
    for b, (n, end) in enumerate(zip(counts, ends, strict=True)):
        if n == 0:
            continue
        idx = every[end - n: end] - b * hw                        # (N,) flat pixels of image b
        feats = _features(image[b], idx, sigma_rgb, sigma_xy)     # (N, 5)
        s = seg[b].flatten(1)[:, idx]                             # (K, N)
        rows = []
        for start in range(0, idx.numel(), block):
            d = torch.cdist(feats[start: start + block], feats,
                            compute_mode="donot_use_mm_for_euclid_dist")  # (n, N)
            rows.append(s @ torch.exp(-0.5 * d.square()).t())   # (K, n)
        out[b].view(seg.shape[1], -1)[:, idx] = torch.cat(rows, dim=1)
    return out


def crf_energy_exact(image: Tensor, seg: Tensor, gate: Tensor | None, sigma_rgb: float = 15.0,
                     sigma_xy: float = 50.0, scale: float = 1e-7,
                     reduction: Reduction = "image", block: int = 4096,
                     counts: list[int] | None = None) -> Tensor:
    """L_reg with the exact W: ``image`` (B, 3, h, w) RGB 0–255, ``seg`` (B, K, h, w) softmax,
    ``gate`` (B, h, w) bool or None (all pixels). Returns a scalar.

    ``sigma_xy`` is in pixels of the given resolution (SPEC: 100 × 0.5 at half resolution).
    """
    image, seg, gate = _prepare(image, seg, gate)
    energies = _Energy.apply(
        seg, lambda s: exact_filter(image, s, gate, sigma_rgb, sigma_xy, block, counts))  # (B,)
    return _reduce(energies, gate, scale, reduction)


# --- window: W truncated to a (2r+1)² square, by shifted slices ---------------------------

def _half_window(radius: int, h: int, w: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) ≠ 0 of the (2r+1)² window, one of each ±pair, that fit an h × w image."""
    ry, rx = min(radius, h - 1), min(radius, w - 1)
    return [(dy, dx) for dy in range(ry + 1) for dx in range(-rx, rx + 1)
            if dy > 0 or dx > 0]


def _offset_kernel(image: Tensor, dy: int, dx: int, sigma_rgb: float, sigma_xy: float
                   ) -> tuple[Tensor, tuple[slice, slice], tuple[slice, slice]]:
    """W(i, i+o) for the offset o = (dy ≥ 0, dx), over the pixels i whose partner is inside:
    (B, 1, h', w'), with the (rows, cols) slices of i and of i+o."""
    h, w = image.shape[-2:]
    ya, yb = slice(0, h - dy), slice(dy, h)
    xa, xb = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    col = (image[..., ya, xa] - image[..., yb, xb]).pow(2).sum(1, keepdim=True)  # (B, 1, h', w')
    pos = math.exp(-(dy * dy + dx * dx) / (2 * sigma_xy**2))
    return torch.exp(col / (-2 * sigma_rgb**2)).mul_(pos), (ya, xa), (yb, xb)


def window_filter(image: Tensor, seg: Tensor, radius: int, sigma_rgb: float,
                  sigma_xy: float) -> Tensor:
    """W S with W truncated to the (2r+1)² window: (B, K, h, w). ``seg`` must already be zero
    outside the gate. Cost O((2r+1)² · B·K·h·w), memory O(B·K·h·w)."""
    out = seg.clone()                                              # diagonal, W_ii = 1
    for dy, dx in _half_window(radius, *seg.shape[-2:]):           # W symmetric: o and -o
        kernel, a, b = _offset_kernel(image, dy, dx, sigma_rgb, sigma_xy)
        out[..., a[0], a[1]].addcmul_(seg[..., b[0], b[1]], kernel)
        out[..., b[0], b[1]].addcmul_(seg[..., a[0], a[1]], kernel)
    return out


def crf_energy_window(image: Tensor, seg: Tensor, gate: Tensor | None, radius: int,
                      sigma_rgb: float = 15.0, sigma_xy: float = 50.0, scale: float = 1e-7,
                      reduction: Reduction = "image") -> Tensor:
    """L_reg with W truncated to pairs at most ``radius`` pixels apart along each axis; same
    arguments as :func:`crf_energy_exact`. Equal to it when ``radius >= max(h, w) - 1``; close
    when ``radius`` is several ``sigma_xy`` (or the colour term already cuts the far pairs)."""
    image, seg, gate = _prepare(image, seg, gate)
    energies = _Energy.apply(
        seg, lambda s: window_filter(image, s, radius, sigma_rgb, sigma_xy))  # (B,)
    return _reduce(energies, gate, scale, reduction)


def crf_energy(image: Tensor, seg: Tensor, gate: Tensor | None, sigma_rgb: float = 15.0,
               sigma_xy: float = 50.0, scale: float = 1e-7, max_exact: int = 4096,
               radius: int = 16, reduction: Reduction = "image") -> Tensor:
    """L_reg (SPEC §6): the exact form when every image has at most ``max_exact`` gated pixels
    (its cost grows as N²), else the ``radius`` window. One choice for the whole batch."""
    b, _, h, w = seg.shape
    counts = [h * w] * b if gate is None else gate.bool().flatten(1).sum(1).tolist()  # one wait
    if max(counts, default=0) <= max_exact:
        return crf_energy_exact(image, seg, gate, sigma_rgb, sigma_xy, scale, reduction,
                                counts=counts)
    return crf_energy_window(image, seg, gate, radius, sigma_rgb, sigma_xy, scale, reduction)
