"""Backbone adapter: ViT token maps and CNN stages, local pretrained weights, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seco_cli.errors import SecoError
from seco_cli.models.backbone import Backbone
from seco_cli.params import ModelParams
from tests.conftest import SHARED_DATA, tiny_params

WEIGHTS = SHARED_DATA / "weights" / "tf_efficientnet_lite0_timm.pth"


def test_vit_returns_final_aux_and_class_token_at_any_input_size():
    vit = Backbone("vit_small_patch16_224", {"img_size": 48, "patch_size": 8, "embed_dim": 32,
                                             "depth": 4, "num_heads": 2}, False, aux_layer=-3)
    final, aux, emb = vit(torch.randn(2, 3, 64, 40))  # not the construction size
    assert final.shape == (2, 32, 8, 5) and aux.shape == (2, 32, 8, 5) and emb.shape == (2, 32)
    assert vit.aux_index == 1  # block -3 of 4


@pytest.mark.parametrize("name,kwargs,aux_layer", [
    ("vit_small_patch16_224", {"img_size": 48, "patch_size": 8, "embed_dim": 32, "depth": 4,
                               "num_heads": 2}, -3),
    ("resnet18", {}, -2),
])
def test_aux_features_equal_the_full_pass_and_skip_the_later_blocks(name, kwargs, aux_layer):
    torch.manual_seed(0)
    net = Backbone(name, kwargs, False, aux_layer=aux_layer).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        _, aux, _ = net(x)
        calls: list[int] = []
        hooks = [b.register_forward_hook(lambda *_, i=i: calls.append(i))
                 for i, b in enumerate(getattr(net.net, "blocks", []))]
        early = net.aux_features(x)
        for h in hooks:
            h.remove()
    assert torch.equal(early, aux)  # bit-identical: the same ops in the same order
    if net.is_vit:
        assert calls == list(range(net.aux_index + 1))  # blocks above aux_layer never ran


def test_bad_aux_layer_and_unknown_model_are_one_line_errors():
    with pytest.raises(SecoError, match="outside the 4 blocks"):
        Backbone("vit_small_patch16_224", {"img_size": 48, "patch_size": 8, "embed_dim": 32,
                                           "depth": 4, "num_heads": 2}, False, aux_layer=7)
    with pytest.raises(SecoError, match="cannot build backbone"):
        Backbone("no_such_model_xyz", {}, False, aux_layer=-3)


def test_missing_local_weights_file(tmp_path: Path):
    with pytest.raises(SecoError, match="do not exist"):
        Backbone("resnet18", {}, str(tmp_path / "none.pth"), aux_layer=-2)


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"offline CNN weights not at {WEIGHTS}")
def test_cnn_loads_the_offline_imagenet_weights():
    cnn = Backbone("tf_efficientnet_lite0", {}, str(WEIGHTS), aux_layer=-2)
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    for name, value in cnn.net.state_dict().items():
        if name in state:
            assert torch.equal(value, state[name]), name
    matched = sum(name in state for name in cnn.net.state_dict())
    assert matched == len(cnn.net.state_dict())  # every feature weight came from the file
    final, aux, emb = cnn(torch.randn(1, 3, 64, 64))
    assert final.shape[1] == cnn.dim == 320 and aux.shape[1] == cnn.aux_dim
    assert emb.shape == (1, 320)


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"offline CNN weights not at {WEIGHTS}")
def test_seco_trains_with_the_pretrained_cnn(tmp_path: Path, prepared: Path):
    from seco_cli.data.prepared import PreparedDataset
    from seco_cli.trainer import train

    p = tiny_params("model.backbone=tf_efficientnet_lite0", "model.backbone_kwargs={}",
                    f"model.pretrained={WEIGHTS}", "model.aux_layer=-2",
                    "model.seg_dilations=[1, 2]", "model.crop_size=64", "train.patch_size=32",
                    "train.preset=seco", "train.iterations=3", "train.contrast_start=1",
                    "train.seg_start=1", "train.rectify_start=2", "data.mean=[0.5, 0.5, 0.5]",
                    "data.std=[0.5, 0.5, 0.5]")
    assert isinstance(p.model, ModelParams)
    data = PreparedDataset(prepared)
    meta = {"backbone": p.model.backbone, "num_classes": data.num_classes, "params": p.dump()}
    logs: list[dict[str, float]] = []
    train(p, data, torch.device("cpu"), meta, tmp_path, False, lambda s, v: logs.append(v))
    seen = {k for v in logs for k in v}
    assert {"loss/cls", "loss/lil", "loss/lig", "loss/seg"} <= seen
    assert all(torch.isfinite(torch.tensor(x)) for v in logs for x in v.values())
