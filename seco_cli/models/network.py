"""The network: backbone adapter + classifier + auxiliary classifier + segmentation decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seco_cli.models.backbone import Backbone
from seco_cli.models.heads import CamClassifier, SegDecoder
from seco_cli.params import ModelParams


@dataclass
class NetOutput:
    logits: torch.Tensor  # (B, C) image logits, final classifier
    aux_logits: torch.Tensor  # (B, C) image logits, auxiliary classifier
    cam: torch.Tensor  # (B, C, h, w) raw final CAM
    aux_cam: torch.Tensor  # (B, C, h', w') raw auxiliary CAM
    seg: torch.Tensor  # (B, C + 1, h, w) segmentation logits (token resolution)
    tokens: torch.Tensor  # (B, D, h, w) final token map
    embedding: torch.Tensor  # (B, D) class token / pooled feature


class SeCoNet(nn.Module):
    def __init__(self, mp: ModelParams, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = Backbone(mp.backbone, mp.backbone_kwargs, mp.pretrained, mp.aux_layer)
        self.classifier = CamClassifier(self.backbone.dim, num_classes)
        self.aux_classifier = CamClassifier(self.backbone.aux_dim, num_classes)
        self.decoder = SegDecoder(self.backbone.dim, num_classes + 1, mp.seg_dilations)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at ``head_lr_mult`` × the backbone learning rate (SPEC §2)."""
        return [p for m in (self.classifier, self.aux_classifier, self.decoder) for p in m.parameters()]

    def forward(self, x: torch.Tensor, with_seg: bool = True) -> NetOutput:
        tokens, aux_tokens, embedding = self.backbone(x)
        logits, cam = self.classifier(tokens)
        aux_logits, aux_cam = self.aux_classifier(aux_tokens)
        seg = self.decoder(tokens) if with_seg else tokens.new_zeros(0)
        return NetOutput(logits, aux_logits, cam, aux_cam, seg, tokens, embedding)

    @torch.no_grad()
    def cams(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor:
        """Raw CAMs only (no decoder): (B, C, h, w). The auxiliary CAM runs the backbone only
        up to its block (:meth:`Backbone.aux_features`)."""
        if aux:
            return self.aux_classifier.cam(self.backbone.aux_features(x))
        return self.classifier.cam(self.backbone(x)[0])

    @torch.no_grad()
    def both_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (final, auxiliary) CAMs of one backbone pass: each (B, C, h, w)."""
        tokens, aux_tokens, _ = self.backbone(x)
        return self.classifier.cam(tokens), self.aux_classifier.cam(aux_tokens)
