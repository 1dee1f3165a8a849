"""Heads on the token maps (SPEC §2): GMP classifier whose weights give CAMs, and the
segmentation decoder (four parallel dilated 3×3 convs, summed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CamClassifier(nn.Module):
    """1×1 conv without bias; image logits by global max pooling; CAM = the same conv per token."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1, bias=False)

    def cam(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.conv(tokens)  # (B, C, h, w)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.cam(tokens)
        return F.adaptive_max_pool2d(cam, 1).flatten(1), cam  # (B, C), (B, C, h, w)


class SegDecoder(nn.Module):
    """Sum of parallel dilated 3×3 convs (DeepLab-v2 style), ``num_classes + 1`` outputs."""

    def __init__(self, dim: int, num_outputs: int, dilations: list[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(dim, num_outputs, kernel_size=3, padding=d, dilation=d) for d in dilations
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return sum(branch(tokens) for branch in self.branches)
