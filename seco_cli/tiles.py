"""Tiles classified alone: a label-free check of a CAM, and a coarse CAM of their own.

A from-scratch classifier can learn an *inverted* CAM for a class that always comes with a
partner (the person beside the horse, the boat on its water): the map fires on everything but
the object, and the image is still classified right. The same classifier, shown the image's
tiles one by one, still finds the object in its own tiles (README, "Deviations from SPEC";
``bench/tile_cams.py`` measures both). This module cuts images into tiles, spreads each tile's
image logit (global max pooling, SPEC §2) back over its pixels, and correlates that map with
the whole-image CAM: a head whose CAM rises where its tiles find the class *agrees*
(r ≈ +0.5 on the embedded data), an inverted one does not (r ≤ +0.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seco_cli.models.network import SeCoNet


def tile_starts(side: int, size: int, step: int) -> list[int]:
    """Offsets of ``size`` tiles every ``step`` pixels along a side of ``side`` pixels, plus
    one flush against the far edge when the grid falls short of it, so every pixel is
    covered; a side no longer than a tile is one tile at 0."""
    if side <= size:
        return [0]
    starts = list(range(0, side - size + 1, step))
    if starts[-1] != side - size:
        starts.append(side - size)
    return starts


def tiles_of(images: torch.Tensor, size: int, step: int
             ) -> tuple[torch.Tensor, list[tuple[int, int]], tuple[int, int]]:
    """(B, 3, H, W) → tiles (B·T, 3, th, tw) image-major, their (top, left) offsets, and
    their side (th, tw) = ``size`` clipped to the image."""
    h, w = images.shape[-2:]
    th, tw = min(size, h), min(size, w)
    where = [(y, x) for y in tile_starts(h, size, step) for x in tile_starts(w, size, step)]
    crops = torch.stack([images[:, :, y:y + th, x:x + tw] for y, x in where], 1)
    return crops.flatten(0, 1), where, (th, tw)


def place(values: torch.Tensor, where: list[tuple[int, int]], side: tuple[int, int],
          size: tuple[int, int], reduce: str) -> torch.Tensor:
    """Per-tile maps (B, T, C, th, tw) back onto (B, C, H, W): each pixel the ``mean`` or the
    ``min`` over the tiles covering it."""
    b, _, c = values.shape[:3]
    th, tw = side
    if reduce == "mean":
        out = values.new_zeros(b, c, *size)
        cover = values.new_zeros(1, 1, *size)
        for i, (y, x) in enumerate(where):
            out[..., y:y + th, x:x + tw] += values[:, i]
            cover[..., y:y + th, x:x + tw] += 1
        return out / cover
    out = values.new_full((b, c, *size), float("inf"))
    for i, (y, x) in enumerate(where):
        out[..., y:y + th, x:x + tw] = torch.minimum(out[..., y:y + th, x:x + tw], values[:, i])
    return out


def spread_logits(logits: torch.Tensor, where: list[tuple[int, int]], side: tuple[int, int],
                  size: tuple[int, int], reduce: str) -> torch.Tensor:
    """Tile logits (B, T, C) spread over their tiles' pixels → (B, C, H, W), ReLU'd (a tile
    that says "absent" adds nothing, as a CAM's negative scores add nothing)."""
    spread = logits[..., None, None].expand(*logits.shape, *side)
    return F.relu(place(spread, where, side, size, reduce))


@dataclass
class TileLogits:
    """Both heads' logits of every tile of a batch classified alone, and where the tiles lie:
    :meth:`map` spreads one head's logits over the pixels only when a caller asks for it."""

    logits: dict[str, torch.Tensor]  # head (``final``, ``aux``) → (B, T, C) float32
    where: list[tuple[int, int]]
    side: tuple[int, int]
    size: tuple[int, int]

    def map(self, head: str, reduce: str) -> torch.Tensor:
        """(B, C, H, W), ≥ 0: the head's tile logits spread over the pixels, a pixel taking
        the ``mean`` or the ``min`` over the tiles that cover it."""
        return spread_logits(self.logits[head], self.where, self.side, self.size, reduce)

    def fallback(self, power: float) -> torch.Tensor:
        """The map a class on the tile fallback takes as its CAM (training's online labels and
        the ``cams`` stage's seeds alike): the final head's ``min`` map, :func:`sharpen`-ed
        by ``power`` (``train.cam_select_fallback_power``)."""
        return sharpen(self.map("final", "min"), power)


@torch.no_grad()
def classify_tiles(net: SeCoNet, images: torch.Tensor, size: int, step: int) -> TileLogits:
    """One forward of every ``size`` tile (every ``step`` pixels, the far edges covered) of
    ``images`` (B, 3, H, W), each alone: both heads' image logits per tile."""
    b = images.shape[0]
    tiles, where, side = tiles_of(images, size, step)
    out = net(tiles, with_seg=False)
    logits = {head: x.float().unflatten(0, (b, len(where)))
              for head, x in (("final", out.logits), ("aux", out.aux_logits))}
    return TileLogits(logits, where, side, tuple(images.shape[-2:]))


def sharpen(ref: torch.Tensor, power: float) -> torch.Tensor:
    """A tile-logit map (B, C, H, W), ≥ 0, divided by its maximum over each image's pixels
    and raised to ``power``: the tiles that find the class most keep their weight, tiles
    scoring it half as much fall to 2^-power of it. ``power`` 1 returns ``ref`` itself (the
    correlation does not see the scale); a map that is zero over an image stays zero."""
    if power == 1.0:
        return ref
    peak = ref.flatten(2).amax(-1)[..., None, None]
    return (ref / peak.clamp(min=torch.finfo(ref.dtype).tiny)).pow(power)


def pixel_agreement(cam: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and class, the Pearson correlation over the (``valid``) pixels between
    ``cam`` and ``ref`` (both (B, C, H, W)): (r (B, C), defined (B, C) bool — False where
    either map is constant over the pixels, r is then 0)."""
    x, y = cam.double().flatten(2), ref.double().flatten(2)
    w = (torch.ones_like(x[:, :1]) if valid is None else valid.double().flatten(1)[:, None])
    n = w.sum(-1).clamp(min=1)
    xc = x - (x * w).sum(-1, keepdim=True) / n[..., None]
    yc = y - (y * w).sum(-1, keepdim=True) / n[..., None]
    sxy, sxx, syy = ((a * b * w).sum(-1) for a, b in ((xc, yc), (xc, xc), (yc, yc)))
    # a map equal over the pixels leaves only rounding noise (≪ 1e-12) in its variance
    defined = (sxx / n > 1e-12) & (syy / n > 1e-12)
    r = torch.where(defined, sxy / (sxx * syy).sqrt().clamp(min=1e-300), torch.zeros_like(sxy))
    return r.clamp(-1.0, 1.0).float(), defined


def tile_agreement(cam: torch.Tensor, tile_map: torch.Tensor, power: float, reference: str,
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's agreement with its tile-logit map (``train.cam_select``'s statistic): the
    :func:`pixel_agreement` of ``cam`` with ``tile_map`` :func:`sharpen`-ed by ``power``
    (``reference`` ``sharpened``), or the lower of that and the agreement with the map itself
    (``both``: the sharpened map weighs the CAM's peak on the tiles that find the class most,
    the map itself also its level on the tiles that find it less; a head must pass both).
    (r (B, C), defined (B, C)); at ``power`` 1 both references are the same map."""
    if reference not in ("sharpened", "both"):
        raise ValueError(f"unknown tile reference {reference!r}")
    r, defined = pixel_agreement(cam, sharpen(tile_map, power), valid)
    if reference == "both" and power != 1.0:
        plain, plain_defined = pixel_agreement(cam, tile_map, valid)
        r, defined = torch.minimum(r, plain), defined & plain_defined
    return r, defined
