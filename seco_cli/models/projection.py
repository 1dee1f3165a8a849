"""Projection head for the contrastive embeddings (SPEC §2).

MLP dim → hidden → hidden → dim with GELU, output L2-normalised; applied on the last axis,
so it takes (N, dim) patch/class embeddings or (..., dim) token maps alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Three linear layers with GELU between them; unit-norm output (SPEC §2, hidden 2048)."""

    def __init__(self, dim: int, hidden: int = 2048):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)  # (..., dim), ‖·‖ = 1
