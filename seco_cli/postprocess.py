"""Per-image post-processing of inference (SPEC §8): numpy in and out, top-level functions so
the process pool of the ``pseudo`` and ``segment`` stages (:mod:`seco_cli.pool`) can run them.

**This module must stay torch-free** (numpy and pydensecrf only, at module level and through
its imports): every ``spawn`` worker of the pool imports it to unpickle its jobs, and importing
torch there costs seconds per worker, paid again by every stage run. PAR, the one torch step,
is imported lazily by :func:`pseudo_mask` when ``par_iterations > 0``. ``tests/test_postprocess.py``
guards this in a fresh interpreter.

- :func:`resize_scores`: bilinear resize of (K, h, w) scores, exactly torch's
  ``F.interpolate(mode="bilinear", align_corners=False)`` in numpy;
- :func:`cam_to_mask`: a constant background score against the image's class CAMs, argmax;
- :func:`dense_crf`, :func:`crf_labels`: the fully connected CRF (pydensecrf), then argmax;
- :func:`pseudo_mask`: normalised CAMs of the image's classes → pseudo mask. A constant
  background score ``bkg`` joins the class scores; the scores, divided by their sum (the
  "normalised class scores" — a per-pixel constant, so the CRF sees the same unary as with
  ``-log`` of the raw scores), are optionally refined by PAR and then by the dense CRF;
  argmax. With neither it is exactly :func:`cam_to_mask`.
- :func:`segment_labels`: segmentation logits → labels at the original size, softmax then the
  dense CRF over all classes when enabled;
- :func:`pseudo_job`, :func:`segment_job`: the two of them as the pool's jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_EPS = 1e-8


# --------------------------------------------------------------------------- resize, softmax
def _linear_indices(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                    np.ndarray]:
    """Source indices and weights of 1-D linear interpolation as torch's CPU kernel computes
    them with ``align_corners=False``: the source coordinate of output pixel i is
    ``(i + 0.5) · scale - 0.5`` (half-pixel centres) with the float32 ``scale = n_in / n_out``,
    rounded once to float32 (torch's fused multiply-add: exact in float64, then rounded),
    clamped at 0 below; ``i0`` its floor (at most ``n_in - 1``), ``i1 = min(i0 + 1, n_in - 1)``
    (edge clamping), float32 weights ``1 - λ`` and ``λ``. Downsampling samples likewise (no
    area averaging)."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - lam1), lam1


def resize_scores(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(K, h, w)`` float scores to ``(K, H, W)`` float32, without torch:
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` with the same
    indices and weights (width first, then height, in float32). Values agree to float32
    rounding (a few ulp: torch's CPU paths differ among themselves in their use of FMA)."""
    x = np.asarray(scores, dtype=np.float32)
    h_out, w_out = (int(s) for s in size)
    if x.shape[1:] == (h_out, w_out):
        return scores.astype(np.float32)  # a copy, as the resized case
    w0, w1, a0, a1 = _linear_indices(x.shape[2], w_out)
    rows = np.take(x, w0, axis=2)                                     # (K, h, W)
    rows *= a0
    rows += np.take(x, w1, axis=2) * a1                               # x[i0]·(1-λ) + x[i1]·λ
    h0, h1, b0, b1 = _linear_indices(x.shape[1], h_out)
    out = np.take(rows, h0, axis=1)                                   # (K, H, W)
    out *= b0[:, None]
    out += np.take(rows, h1, axis=1) * b1[:, None]
    return out


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Softmax of float scores over ``axis``, float32 (max subtracted first, as torch)."""
    x = np.asarray(x, dtype=np.float32)
    e = x - x.max(axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


# --------------------------------------------------------------------------- CAM → mask
def cam_to_mask(cam: np.ndarray, labels: Sequence[int], bkg: float,
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


# --------------------------------------------------------------------------- dense CRF
def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = 10,
              gauss_sxy: float = 1.0, gauss_compat: float = 1.0, bilateral_sxy: float = 121.0,
              bilateral_srgb: float = 5.0, bilateral_compat: float = 4.0,
              clip: float = 1e-5) -> np.ndarray:
    """Fully connected CRF (Krähenbühl & Koltun) over ``image`` (H, W, 3) uint8 RGB with the
    unary ``-log(clip(probs))`` from ``probs`` (K, H, W); returns (K, H, W) float32 marginals.

    Defaults are SPEC §8 (upstream): 10 iterations, Gaussian sxy 1 compat 1, bilateral sxy 121
    srgb 5 compat 4.
    """
    from pydensecrf import densecrf
    from pydensecrf.utils import unary_from_softmax

    h, w = image.shape[:2]
    k = probs.shape[0]
    if probs.shape[1:] != (h, w):
        raise ValueError(f"probs {probs.shape} do not match image {image.shape}")
    crf = densecrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=clip)))  # (K, H·W)
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb,
                             rgbim=np.require(image, np.uint8, ["C", "W"]),  # pydensecrf: writable
                             compat=bilateral_compat)
    q = crf.inference(iterations)
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)


def crf_labels(image: np.ndarray, probs: np.ndarray, labels: Sequence[int],
               **crf_kwargs: Any) -> np.ndarray:
    """Dense CRF then argmax: (H, W) uint8 where channel k of ``probs`` maps to ``labels[k]``
    (e.g. ``[0, *image_classes]``). ``crf_kwargs`` go to :func:`dense_crf`."""
    if len(labels) != probs.shape[0]:
        raise ValueError(f"{len(labels)} labels for {probs.shape[0]} channels")
    lut = np.asarray(labels, dtype=np.uint8)
    return lut[dense_crf(image, probs, **crf_kwargs).argmax(axis=0)]


# --------------------------------------------------------------------------- the pool's jobs
@dataclass(frozen=True)
class MaskSettings:
    """What :func:`pseudo_mask` needs from ``pseudo:`` and ``data:`` (picklable)."""

    bkg: float
    par_iterations: int = 0  # 0 = no PAR
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    crf: dict[str, Any] = field(default_factory=dict)  # dense_crf kwargs; empty = no CRF
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # PAR sees the normalised image
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def crf_kwargs(crf: Any) -> dict[str, Any]:
    """``CrfParams`` → :func:`dense_crf` kwargs; ``{}`` when it is off."""
    if crf.iterations == 0:
        return {}
    return {"iterations": crf.iterations, "gauss_sxy": crf.gauss_sxy,
            "gauss_compat": crf.gauss_compat, "bilateral_sxy": crf.bilateral_sxy,
            "bilateral_srgb": crf.bilateral_srgb, "bilateral_compat": crf.bilateral_compat}


def _par(image: np.ndarray, probs: np.ndarray, s: MaskSettings) -> np.ndarray:
    """PAR of ``probs`` (K, H, W) on ``image`` (H, W, 3) uint8: the one step that needs torch,
    imported here so that pool workers without PAR never load it."""
    import torch

    from seco_cli.data.transforms import to_tensor
    from seco_cli.refine import par_refine

    with torch.no_grad():
        img = to_tensor(image, s.mean, s.std)[None]                      # (1, 3, H, W)
        return par_refine(img, torch.from_numpy(probs)[None], s.par_dilations,
                          s.par_iterations)[0].numpy()


def pseudo_mask(image: np.ndarray, cam: np.ndarray, labels: list[int], s: MaskSettings,
                ) -> np.ndarray:
    """``image`` (H, W, 3) uint8, ``cam`` (K, h, w) in [0, 1] for ``labels`` → (H, W) uint8."""
    h, w = image.shape[:2]
    if not labels or (s.par_iterations == 0 and not s.crf):
        return cam_to_mask(cam, labels, s.bkg, (h, w))
    scores = resize_scores(cam, (h, w)).clip(0, 1)                       # (K, H, W)
    full = np.concatenate([np.full((1, h, w), s.bkg, np.float32), scores])  # (K+1, H, W)
    probs = full / np.maximum(full.sum(0, keepdims=True), _EPS)
    if s.par_iterations:
        probs = _par(image, probs, s)
    lut = [0, *labels]
    if s.crf:
        return crf_labels(image, probs, lut, **s.crf)
    return np.asarray(lut, np.uint8)[probs.argmax(0)]


def pseudo_job(job: tuple[str, np.ndarray, np.ndarray, list[int]], settings: MaskSettings,
               ) -> tuple[str, np.ndarray]:
    """(id, image, cam, labels) → (id, mask), for the pool."""
    image_id, image, cam, labels = job
    return image_id, pseudo_mask(image, cam, labels, settings)


def segment_labels(image: np.ndarray, logits: np.ndarray, crf: dict[str, Any],
                   labels: str = "all") -> np.ndarray:
    """``logits`` (C+1, h, w) → (H, W) uint8 at the size of ``image`` (H, W, 3): bilinear
    resize, then softmax + dense CRF when ``crf`` (dense_crf kwargs) is given, argmax.

    ``labels`` (``segment.crf_labels``): ``all`` runs the CRF over every label (SPEC §8);
    ``present`` over the labels that are the argmax of at least one pixel before it, in label
    order, with their own probabilities (the unary of a kept label is unchanged; the dropped
    labels' mass is simply gone). One label present: the CRF cannot change it, and is skipped.
    """
    scores = resize_scores(logits, image.shape[:2])                      # (C+1, H, W)
    if not crf:
        return scores.argmax(0).astype(np.uint8)
    probs = softmax(scores, 0)
    if labels == "all":
        return crf_labels(image, probs, list(range(scores.shape[0])), **crf)
    present = np.flatnonzero(np.bincount(probs.argmax(0).ravel(), minlength=probs.shape[0]))
    if present.size == 1:
        return np.full(image.shape[:2], present[0], dtype=np.uint8)
    return crf_labels(image, probs[present], present.tolist(), **crf)


def segment_job(job: tuple[str, np.ndarray, np.ndarray], crf: dict[str, Any],
                labels: str = "all") -> tuple[str, np.ndarray]:
    """(id, image, logits) → (id, labels), for the pool."""
    image_id, image, logits = job
    return image_id, segment_labels(image, logits, crf, labels)
