"""One adapter over any timm backbone (SPEC §2 decision).

It returns ``(final token map, auxiliary token map, global embedding)``:

* ViT: last-block patch tokens (after the final norm), block ``aux_layer`` patch tokens, and
  the class token; the positional embedding is interpolated to the input grid
  (``dynamic_img_size``), so any input size works.
* CNN: the last ``features_only`` stage, an earlier stage (``aux_layer`` counts stages), and
  the global-average-pooled last stage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from seco_cli.errors import SecoError


def _load_local(model: nn.Module, path: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise SecoError(f"pretrained weights '{file}' do not exist", "model.pretrained",
                        "give a state-dict file, true for timm hub weights, or false")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a user data error
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:  # the pickle names a Python callable: never imported, never run
            raise SecoError(f"weights '{file}' refer to the Python object '{found.group(1)}' and "
                            "were refused (weights are read weights-only)", "model.pretrained",
                            "give a plain state dict saved with torch.save") from exc
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise SecoError(f"cannot read weights '{file}' ({reason})", "model.pretrained",
                        "give a torch state dict saved with torch.save") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    used = len(state) - len(unexpected)
    if used == 0:
        raise SecoError(f"no key of '{file}' matches backbone weights", "model.pretrained",
                        "use weights saved for the same timm model")


class Backbone(nn.Module):
    """timm model → (final tokens (B, D, h, w), aux tokens (B, Da, h', w'), embedding (B, D))."""

    def __init__(self, name: str, kwargs: dict[str, Any], pretrained: bool | str, aux_layer: int):
        super().__init__()
        kwargs = dict(kwargs)
        hub = pretrained is True
        try:
            probe = timm.create_model(name, pretrained=False, **{"num_classes": 0, **kwargs})
        except Exception as exc:  # noqa: BLE001 - timm raises several types for a bad name/kwarg
            raise SecoError(f"cannot build backbone '{name}' ({exc})", "model.backbone",
                            "use a timm model name and its constructor arguments") from exc
        self.is_vit = hasattr(probe, "blocks") and hasattr(probe, "patch_embed")
        if self.is_vit:
            kwargs.setdefault("dynamic_img_size", True)
            self.net = timm.create_model(name, pretrained=hub, num_classes=0, **kwargs)
            n = len(self.net.blocks)
            self.aux_index = aux_layer % n
            if not -n <= aux_layer < n:
                raise SecoError(f"model.aux_layer {aux_layer} is outside the {n} blocks",
                                "model.aux_layer", f"use a value in [-{n}, {n - 1}]")
            self.dim = self.aux_dim = self.net.embed_dim
            self.stride = self.net.patch_embed.patch_size[0]
        else:
            stages = len(probe.feature_info) if hasattr(probe, "feature_info") else 0
            if stages < 2:
                raise SecoError(f"backbone '{name}' exposes no feature stages", "model.backbone",
                                "use a ViT or a CNN with features_only support")
            aux = aux_layer % stages
            self.net = timm.create_model(name, pretrained=hub, features_only=True,
                                         out_indices=(aux, stages - 1), **kwargs)
            self.aux_dim, self.dim = self.net.feature_info.channels()
            self.stride = self.net.feature_info.reduction()[-1]
        del probe
        if isinstance(pretrained, str) and pretrained:
            _load_local(self.net, pretrained)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.is_vit:
            aux, final = self.net(x)
            return final, aux, final.mean(dim=(2, 3))
        net = self.net
        tokens, grid = self._embed_tokens(x)
        aux = tokens
        for i, block in enumerate(net.blocks):
            tokens = block(tokens)
            if i == self.aux_index:
                aux = tokens
        tokens = net.norm(tokens)
        p = net.num_prefix_tokens
        embedding = tokens[:, 0] if p > 0 else tokens[:, p:].mean(1)
        return grid(tokens), grid(aux), embedding

    def aux_features(self, x: torch.Tensor) -> torch.Tensor:
        """The auxiliary map of :meth:`forward` alone, (B, D_aux, h, w), bit-identical to it. A
        ViT stops after block ``aux_layer`` (the blocks above it are skipped); a CNN runs its
        stages as usual."""
        if not self.is_vit:
            return self.net(x)[0]
        tokens, grid = self._embed_tokens(x)
        for block in self.net.blocks[:self.aux_index + 1]:
            tokens = block(tokens)
        return grid(tokens)

    def _embed_tokens(self, x: torch.Tensor):
        """ViT input tokens (B, P + h*w, D) and ``grid``: (B, P + hw, D) → (B, D, h, w)."""
        net = self.net
        tokens = net.patch_embed(x)  # (B, h, w, D) with dynamic_img_size
        b, h, w, d = tokens.shape
        tokens = net.norm_pre(net.patch_drop(net._pos_embed(tokens)))  # (B, P + h*w, D)
        p = net.num_prefix_tokens

        def grid(t: torch.Tensor) -> torch.Tensor:
            return t[:, p:].transpose(1, 2).reshape(b, d, h, w)

        return tokens, grid
