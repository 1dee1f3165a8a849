"""Per-image post-processing of inference (SPEC §8), numpy in and out, top-level functions so
a process pool (:mod:`seco_cli.pool`) can run them:

- :func:`pseudo_mask`: normalised CAMs of the image's classes → pseudo mask. A constant
  background score ``bkg`` joins the class scores; the scores, divided by their sum (the
  "normalised class scores" — a per-pixel constant, so the CRF sees the same unary as with
  ``-log`` of the raw scores), are optionally refined by PAR and then by the dense CRF;
  argmax. With neither it is exactly :func:`seco_cli.cams.cam_to_mask`.
- :func:`segment_labels`: segmentation logits → labels at the original size, softmax then the
  dense CRF over all classes when enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from seco_cli.cams import cam_to_mask, resize_scores
from seco_cli.data.transforms import to_tensor
from seco_cli.refine import crf_labels, par_refine

_EPS = 1e-8


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
    """``CrfParams`` → :func:`seco_cli.refine.dense_crf` kwargs; ``{}`` when it is off."""
    if crf.iterations == 0:
        return {}
    return {"iterations": crf.iterations, "gauss_sxy": crf.gauss_sxy,
            "gauss_compat": crf.gauss_compat, "bilateral_sxy": crf.bilateral_sxy,
            "bilateral_srgb": crf.bilateral_srgb, "bilateral_compat": crf.bilateral_compat}


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
        with torch.no_grad():
            img = to_tensor(image, s.mean, s.std)[None]                # (1, 3, H, W)
            probs = par_refine(img, torch.from_numpy(probs)[None], s.par_dilations,
                               s.par_iterations)[0].numpy()
    lut = [0, *labels]
    if s.crf:
        return crf_labels(image, probs, lut, **s.crf)
    return np.asarray(lut, np.uint8)[probs.argmax(0)]


def pseudo_job(job: tuple[str, np.ndarray, np.ndarray, list[int]], settings: MaskSettings,
               ) -> tuple[str, np.ndarray]:
    """(id, image, cam, labels) → (id, mask), for the pool."""
    image_id, image, cam, labels = job
    return image_id, pseudo_mask(image, cam, labels, settings)


def segment_labels(image: np.ndarray, logits: np.ndarray, crf: dict[str, Any]) -> np.ndarray:
    """``logits`` (C+1, h, w) → (H, W) uint8 at the size of ``image`` (H, W, 3): bilinear
    resize, then softmax + dense CRF when ``crf`` (dense_crf kwargs) is given, argmax."""
    scores = resize_scores(logits, image.shape[:2])                      # (C+1, H, W)
    if not crf:
        return scores.argmax(0).astype(np.uint8)
    probs = torch.from_numpy(scores).softmax(0).numpy()
    return crf_labels(image, probs, list(range(scores.shape[0])), **crf)


def segment_job(job: tuple[str, np.ndarray, np.ndarray], crf: dict[str, Any],
                ) -> tuple[str, np.ndarray]:
    """(id, image, logits) → (id, labels), for the pool."""
    image_id, image, logits = job
    return image_id, segment_labels(image, logits, crf)
