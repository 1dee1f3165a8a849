"""L_seg: cross-entropy on pseudo labels, background and foreground pixels averaged apart and
combined 50/50 (SPEC §6), so the large background does not drown the objects."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seco_cli.waits import gathers

IGNORE = 255


def balanced_seg_loss(logits: torch.Tensor, target: torch.Tensor,
                      gather: bool | None = None) -> torch.Tensor:
    """``logits`` (B, C+1, H, W), ``target`` (B, H, W) long with 0 background and 255 ignore.

    Each half (background / foreground) that has no labelled pixel contributes 0.
    Gather form: the mean of each half's gathered pixels; select form (:mod:`seco_cli.waits`):
    its masked sum over its count.
    """
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")  # (B, H, W)
    bkg = target == 0
    fg = (target != 0) & (target != IGNORE)
    if not gathers(ce, gather):
        loss_bkg = (ce * bkg).sum() / bkg.sum().clamp_min(1)  # 0, in the graph, when empty
        loss_fg = (ce * fg).sum() / fg.sum().clamp_min(1)
        return 0.5 * loss_bkg + 0.5 * loss_fg
    zero = ce.sum() * 0.0  # keeps the graph when a half is empty
    loss_bkg = ce[bkg].mean() if bkg.any() else zero
    loss_fg = ce[fg].mean() if fg.any() else zero
    return 0.5 * loss_bkg + 0.5 * loss_fg
