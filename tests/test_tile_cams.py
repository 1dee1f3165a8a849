"""bench/tile_cams.py: a CAM that only looks at each pixel comes back unchanged from tiles
classified alone (the tiling itself: tests/test_tiles.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import tile_cams as tc  # noqa: E402


class PixelNet:
    """A stand-in network whose CAM of class c at a pixel is channel c there minus 0.5 (each
    pixel alone, no context) and whose logits are the CAM's global max."""

    backbone = SimpleNamespace(stride=1)

    def both_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x - 0.5, x - 0.5

    def __call__(self, x: torch.Tensor, with_seg: bool = False):
        logits = (x - 0.5).flatten(2).max(-1).values
        return SimpleNamespace(logits=logits, aux_logits=logits)


def test_maps_of_a_context_free_cam():
    images = torch.zeros(1, 3, 64, 64)
    images[:, 1, 24:40, 24:40] = 1.0  # class 1 fires on one square only
    images[:, 0] = torch.linspace(0, 1, 64)  # class 0: a ramp
    both = tc.maps(PixelNet(), images, scales=[1.0], patch=16)
    assert set(both) == {"final", "aux"}
    out = both["final"]
    # tiles classified alone change nothing for a CAM that looks at each pixel alone
    torch.testing.assert_close(out["tile-cam"], out["image"])
    # a tile's logit covers the whole tile: the mean spreads class 1 beyond the square by up
    # to most of a tile (logits averaged, then ReLU), the minimum keeps the pixels every covering tile fires on (the square here)
    mean, low = out["tile-logit-mean"][0, 1], out["tile-logit-min"][0, 1]
    assert mean[24:40, 24:40].min() > 0 and mean[20, 30] > 0 and mean[0, 0] == 0
    assert low[24:40, 24:40].min() == pytest.approx(0.5)
    assert low[23, 30] == 0 and low[0:20].max() == 0


def test_unknown_experiment_is_one_clear_error(tmp_path):
    import subprocess
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    with pytest.raises(SystemExit, match="no DVC experiment or commit 'nope'"):
        tc.model_of_exp("nope", tmp_path)


def test_the_command_measures_every_head_and_map(tmp_path, prepared):
    """One run of the script on a tiny untrained checkpoint: a table per model, every head ×
    map × background score, IoUs in [0, 1], the model and image count recorded."""
    import json

    from conftest import TINY, tiny_params

    from seco_cli.checkpoint import save_atomic
    from seco_cli.data.prepared import PreparedDataset
    from seco_cli.provenance import provenance
    from seco_cli.trainer import Trainer

    params = tiny_params()
    data = PreparedDataset(prepared)
    meta = {"backbone": params.model.backbone, "num_classes": data.num_classes,
            "classes": data.classes, **provenance(params.dump(), params.train.seed)}
    model = tmp_path / "model.pt"
    save_atomic(Trainer(params, data, torch.device("cpu"), meta).final(), model)
    results = tmp_path / "tile.json"
    sets = [a for item in TINY for a in ("--set", item)]
    assert tc.main(["--model", str(model), "--prepared", str(prepared), "--images", "5",
                    "--bkg", "0.1", "--bkg", "0.4", "--batch", "2", "--results", str(results),
                    *sets, "--set", "train.cam_select_tile_power=1",  # the plain map
                    "--set", "train.cam_select_tile_reference=sharpened"]) == 0
    out = json.loads(results.read_text())
    run = out["runs"][str(model)]
    assert run["images"] == 5 and out["bkg"] == [0.1, 0.4] and out["git_revision"]
    for head in ("final", "aux"):
        assert set(run["result"]["heads"][head]) == set(tc.VARIANTS)
        for r in run["result"]["agreement"][head].values():
            assert -1.0 <= r["mean_r"] <= 1.0 and r["images"] >= 1
        for per_bkg in run["result"]["heads"][head].values():
            assert set(per_bkg) == {"0.1", "0.4"}
            for r in per_bkg.values():
                assert 0.0 <= r["miou"] <= 1.0
                assert set(r["iou"]) == set(data.classes)
    assert "| final | tile-cam | 0.4 |" in results.with_suffix(".md").read_text()
    assert run["result"]["tile_power"] == 1.0
    assert "raised to the power" not in results.with_suffix(".md").read_text()
    # the agreement the trainer's statistic would see with the tile map sharpened
    assert tc.main(["--model", str(model), "--prepared", str(prepared), "--images", "2",
                    "--batch", "2", "--results", str(results), *sets,
                    "--set", "train.cam_select_tile_power=8"]) == 0
    sharp = json.loads(results.read_text())["runs"][str(model)]["result"]
    assert sharp["tile_power"] == 8.0
    assert "raised to the power 8 (`train.cam_select_tile_power`)" in (
        results.with_suffix(".md").read_text())
    # and as the trainer's `both` reference sees it: never above the sharpened map's alone
    assert tc.main(["--model", str(model), "--prepared", str(prepared), "--images", "2",
                    "--batch", "2", "--results", str(results), *sets,
                    "--set", "train.cam_select_tile_power=8",
                    "--set", "train.cam_select_tile_reference=both"]) == 0
    both = json.loads(results.read_text())["runs"][str(model)]["result"]
    assert both["tile_reference"] == "both"
    assert "(`train.cam_select_tile_reference: both`)" in results.with_suffix(".md").read_text()
    for head, per_class in both["agreement"].items():
        for name, r in per_class.items():
            assert r["mean_r"] <= sharp["agreement"][head][name]["mean_r"] + 1e-6, (head, name)



def test_agreement_is_the_sign_of_where_the_cam_sits():
    """+1 where the CAM rises with the tile map, −1 where it is its mirror, and classes not in
    the labels or constant maps are left out."""
    ramp = torch.linspace(0, 1, 16).reshape(4, 4)
    cam = torch.stack([ramp, 1 - ramp, ramp, torch.zeros(4, 4)])[None]  # (1, 4, 4, 4)
    tiles = torch.stack([ramp, ramp, ramp, ramp])[None]
    labels = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    r = tc.agreement(cam, tiles, labels)
    assert set(r) == {(0, 0), (0, 1)}
    assert r[0, 0] == pytest.approx(1.0) and r[0, 1] == pytest.approx(-1.0)
