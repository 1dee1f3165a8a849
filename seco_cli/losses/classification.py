"""L_cls and L_aux: multi-label soft-margin on image logits (SPEC §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, C), ``labels`` (B, C) in {0, 1}."""
    return F.multilabel_soft_margin_loss(logits.float(), labels)
