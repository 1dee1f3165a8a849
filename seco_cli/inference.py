"""Inference helpers shared by the ``cams`` and ``segment`` stages (SPEC §8)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seco_cli.checkpoint import check_compatible, load_checkpoint
from seco_cli.data.prepared import PreparedDataset
from seco_cli.data.transforms import resize_square, to_tensor
from seco_cli.models.network import SeCoNet
from seco_cli.params import Params


def load_model(path: Path, params: Params, num_classes: int, device: torch.device) -> tuple[SeCoNet, dict]:
    """The trained network in eval mode, checked against the params and dataset."""
    ckpt = load_checkpoint(path, stage_hint="train")
    check_compatible(ckpt, params.model.backbone, num_classes, path)
    mp = params.model.model_copy(update={"pretrained": False})  # weights come from the checkpoint
    net = SeCoNet(mp, num_classes)
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), ckpt.get("meta", {})


def batches(data: PreparedDataset, ids: list[str], size: int, crop: int, mean, std,
            ) -> Iterator[tuple[list[str], torch.Tensor, list[tuple[int, int]]]]:
    """(ids, images resized to crop×crop (B, 3, crop, crop), original sizes)."""
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        images, sizes = [], []
        for image_id in chunk:
            img = data.image(image_id)
            sizes.append(img.shape[:2])
            images.append(resize_square(to_tensor(img, mean, std), crop))
        yield chunk, torch.stack(images), sizes


def stored_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """``size`` scaled so its longest side is ``longest`` (0 keeps it)."""
    h, w = size
    if longest <= 0 or max(h, w) <= longest:
        return h, w
    r = longest / max(h, w)
    return max(1, round(h * r)), max(1, round(w * r))


def seg_logits(net: SeCoNet, images: torch.Tensor, scales: list[float], flip: bool) -> torch.Tensor:
    """Segmentation logits at the input size (SPEC §8): summed over the flip pair, max over
    scales. (B, C+1, H, W)."""
    b, _, h, w = images.shape
    best = None
    for s in scales:
        x = images if s == 1.0 else F.interpolate(
            images, scale_factor=s, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        tokens, _, _ = net.backbone(batch)
        logits = F.interpolate(net.decoder(tokens).float(), size=(h, w), mode="bilinear",
                               align_corners=False)
        if flip:
            logits = logits[:b] + logits[b:].flip(-1)
        best = logits if best is None else torch.maximum(best, logits)
    return best


def to_original(scores: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) → (K, H, W) float32 numpy, bilinear (K may be 0: an image without labels)."""
    if scores.shape[0] == 0:
        return np.zeros((0, *size), dtype=np.float32)
    return F.interpolate(scores[None].float(), size=size, mode="bilinear",
                         align_corners=False)[0].cpu().numpy()
