"""Isolated-patch probe: does a partner (context or co-occurring object) alone carry a class?

A CAM that fires on the water around a boat can have two causes, and they need different
cures: the water *alone* looks like "boat" to the classifier (pure co-occurrence, learned
because water never came without a boat), or the water only fires in the whole image,
because attention carried the boat's evidence into its tokens (leakage). This probe tells
them apart without the CAM: it cuts each image (resized to the inference input, SPEC §8)
into ``train.patch_size`` tiles — the patch size of the method's *separate* step — on a grid
of ``step`` × that side (overlapping below 1), and classifies every tile **alone**, with both
classifier heads (image logits by global max pooling, SPEC §2).

For a coupled pair (victim, partner), over the images labelled with the victim:

- *object* tiles: at least ``min_fraction`` of their labelled pixels are the victim;
- *partner* tiles: no victim pixel, at least ``min_fraction`` partner pixels (the partner may
  be ``background``: the context);

and per head the victim's logit on each: ``auc`` = P(an object tile scores above a partner
tile) (ties count half; 1 = the class is read from the object alone, 0.5 = object and
partner are indistinguishable, below 0.5 = the partner alone is the stronger cue),
``object_fire`` / ``partner_fire`` = the fraction of tiles whose logit is positive (the
classifier says "present" from that tile alone), and ``logit_gap`` = mean object − mean
partner logit. Tiles are out of the training distribution (a crop seen at patch size), so the
threshold-free AUC is the number to compare across runs; the fire rates tell the direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seco_cli.data.prepared import PreparedDataset
from seco_cli.data.transforms import resize_square, to_tensor
from seco_cli.metrics import auc
from seco_cli.models.network import SeCoNet

IGNORE = 255
HEADS = ("final", "aux")


def tile(x: torch.Tensor, size: int, step: int | None = None) -> torch.Tensor:
    """(..., H, W) → (n, ..., size, size): the tiles whose top-left corners lie every ``step``
    pixels (default ``size``: no overlap) from the top-left corner, row by row; a remainder
    narrower than a tile is left out."""
    step = step or size
    t = x.unfold(-2, size, step).unfold(-2, size, step)  # (..., rows, cols, size, size)
    rows, cols = t.shape[-4], t.shape[-3]
    lead = x.dim() - 2
    t = t.permute(lead, lead + 1, *range(lead), lead + 2, lead + 3)
    return t.reshape(rows * cols, *x.shape[:-2], size, size)


def tile_fractions(mask: torch.Tensor, size: int, num_labels: int,
                   step: int | None = None) -> np.ndarray:
    """(H, W) mask with values 0..num_labels−1 and 255 → (n, num_labels): each tile's share
    of each label among its labelled (not 255) pixels; a tile with none is all zero."""
    tiles = tile(mask, size, step).reshape(-1, size * size).long()
    valid = tiles != IGNORE
    counts = torch.zeros(tiles.shape[0], num_labels + 1, dtype=torch.float64)
    counts.scatter_add_(1, torch.where(valid, tiles, num_labels),
                        torch.ones(tiles.shape, dtype=counts.dtype))
    labelled = counts[:, :num_labels].sum(1, keepdim=True)
    return (counts[:, :num_labels] / labelled.clamp(min=1)).numpy()


def _summary(obj: list[float], partner: list[float]) -> dict[str, float | None]:
    o, p = np.asarray(obj, dtype=np.float64), np.asarray(partner, dtype=np.float64)
    both = o.size > 0 and p.size > 0
    scores = np.concatenate([o, p])
    positive = np.arange(scores.size) < o.size
    return {"auc": auc(scores, positive) if both else None,
            "object_fire": float((o > 0).mean()) if o.size else None,
            "partner_fire": float((p > 0).mean()) if p.size else None,
            "logit_gap": float(o.mean() - p.mean()) if both else None}


@torch.no_grad()
def patch_probe(net: SeCoNet, data: PreparedDataset, ids: Sequence[str],
                pairs: Sequence[tuple[int, int]], names: Sequence[str], crop: int, patch: int,
                step: float, mean, std, min_fraction: float, batch_size: int,
                device: torch.device) -> dict[str, Any]:
    """Classify the tiles of ``ids`` alone and summarise them per pair (module docstring).

    ``pairs`` are (victim, partner) label indices (0 = background, classes 1..C) and
    ``names`` their ``victim/partner`` keys. Each image needs a mask."""
    num_labels = data.num_classes + 1
    stride = max(1, round(patch * step))
    scores = {n: {h: ([], []) for h in HEADS} for n in names}  # pair → head → (object, partner)
    counts = {n: [0, 0] for n in names}
    pending: list[tuple[torch.Tensor, np.ndarray, list[int]]] = []

    def flush() -> None:
        if not pending:
            return
        tiles = torch.cat([t for t, _, _ in pending]).to(device)
        out = net(tiles, with_seg=False)
        logits = {"final": out.logits.float().cpu().numpy(),
                  "aux": out.aux_logits.float().cpu().numpy()}
        start = 0
        for t, frac, labels in pending:
            rows = slice(start, start + t.shape[0])
            start += t.shape[0]
            for (v, q), name in zip(pairs, names, strict=True):
                if v not in labels:
                    continue
                is_obj = frac[:, v] >= min_fraction
                is_partner = (frac[:, v] == 0) & (frac[:, q] >= min_fraction)
                counts[name][0] += int(is_obj.sum())
                counts[name][1] += int(is_partner.sum())
                for h in HEADS:
                    victim = logits[h][rows, v - 1]
                    scores[name][h][0].extend(victim[is_obj].tolist())
                    scores[name][h][1].extend(victim[is_partner].tolist())
        pending.clear()

    victims = {v for v, _ in pairs}
    queued = 0
    for image_id in ids:
        if not victims.intersection(data.labels(image_id)):
            continue  # no pair's victim: none of its tiles would count
        image = resize_square(to_tensor(data.image(image_id), mean, std), crop)
        mask = torch.from_numpy(np.ascontiguousarray(data.mask(image_id)))
        mask = F.interpolate(mask[None, None].float(), size=(crop, crop), mode="nearest")[0, 0]
        pending.append((tile(image, patch, stride),
                        tile_fractions(mask.to(torch.uint8), patch, num_labels, stride),
                        data.labels(image_id)))
        queued += pending[-1][0].shape[0]
        if queued >= batch_size:
            flush()
            queued = 0
    flush()
    per_side = (crop - patch) // stride + 1
    return {"images": len(ids), "patch": patch, "stride": stride,
            "tiles_per_image": per_side ** 2, "min_fraction": min_fraction,
            "pairs": {n: {"object_tiles": counts[n][0], "partner_tiles": counts[n][1],
                          **{h: _summary(*scores[n][h]) for h in HEADS}} for n in names}}
