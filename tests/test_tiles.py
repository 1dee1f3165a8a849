"""seco_cli.tiles: tiling covers every pixel once placed back, tile logits spread where their
tiles lie, and the agreement is the Pearson correlation over the valid pixels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from seco_cli.tiles import (
    classify_tiles,
    pixel_agreement,
    place,
    sharpen,
    tile_agreement,
    tile_starts,
    tiles_of,
)


@pytest.mark.parametrize("side,size,step,expected", [
    (96, 32, 16, [0, 16, 32, 48, 64]),
    (100, 32, 16, [0, 16, 32, 48, 64, 68]),  # the far edge gets a flush tile
    (96, 32, 32, [0, 32, 64]),  # a grid that fits: no extra tile
    (32, 32, 8, [0]),
    (20, 32, 8, [0]),  # shorter than a tile: one tile, the whole side
])
def test_tile_starts(side, size, step, expected):
    assert tile_starts(side, size, step) == expected


@pytest.mark.parametrize("reduce", ["mean", "min"])
@pytest.mark.parametrize("hw", [(96, 96), (70, 100), (20, 50)])
def test_tiles_placed_back_rebuild_the_image(reduce, hw):
    images = torch.rand(2, 3, *hw)
    tiles, where, side = tiles_of(images, 32, 12)
    assert tiles.shape == (2 * len(where), 3, *side)
    back = place(tiles.unflatten(0, (2, len(where))), where, side, hw, reduce)
    torch.testing.assert_close(back, images)


class MeanNet:
    """A stand-in network: a tile's logit of class c is the mean of channel c over the tile
    (final head), and minus that (auxiliary head)."""

    def __call__(self, x: torch.Tensor, with_seg: bool = True) -> SimpleNamespace:
        assert not with_seg
        m = x.mean((2, 3))
        return SimpleNamespace(logits=m, aux_logits=-m)


def test_tile_logits_spread_each_tile_logit_over_its_pixels():
    img = torch.zeros(1, 3, 8, 8)
    img[0, 0, :4, :4] = 4.0  # class 0 lives in the top-left quarter
    img[0, 1] = torch.arange(8.0).repeat(8, 1)  # class 1 rises to the right
    tiles = classify_tiles(MeanNet(), img, 4, 2)  # 3 × 3 tiles of 4 px every 2 px
    assert tiles.logits["final"].shape == (1, 9, 3)
    mean, low = tiles.map("final", "mean"), tiles.map("final", "min")
    assert mean.shape == low.shape == (1, 3, 8, 8)
    # the top-left pixel: one tile, all class 0 → 4; pixel (3, 3): four tiles holding the
    # whole, half, half and a quarter of the class → 4, 2, 2, 1
    assert mean[0, 0, 0, 0] == pytest.approx(4.0) and low[0, 0, 0, 0] == pytest.approx(4.0)
    assert mean[0, 0, 3, 3] == pytest.approx((4 + 2 + 2 + 1) / 4)
    assert low[0, 0, 3, 3] == pytest.approx(1.0)
    assert mean[0, 0, 7, 7] == pytest.approx(0.0)  # one tile, no class 0
    # class 1 at column 0 is the left tiles' mean 1.5, at column 7 the right tiles' 5.5
    assert mean[0, 1, 0, 0] == pytest.approx(1.5) and mean[0, 1, 0, 7] == pytest.approx(5.5)
    # the auxiliary head's logits are negative: ReLU'd to nothing
    assert tiles.map("aux", "mean").abs().max() == 0 and tiles.map("aux", "min").abs().max() == 0


def test_pixel_agreement_is_the_correlation_over_the_valid_pixels():
    torch.manual_seed(0)
    cam, ref = torch.rand(2, 3, 6, 5), torch.rand(2, 3, 6, 5)
    valid = torch.rand(2, 6, 5) > 0.3
    ref[1, 2] = 0.7  # constant: undefined
    cam[0, 1] = ref[0, 1] * 2 + 1  # a rising copy: +1
    r, defined = pixel_agreement(cam, ref, valid)
    assert r.shape == defined.shape == (2, 3)
    assert defined.tolist() == [[True, True, True], [True, True, False]]
    assert r[1, 2] == 0 and r[0, 1] == pytest.approx(1.0)
    for b in range(2):
        for c in range(2):
            x, y = cam[b, c][valid[b]], ref[b, c][valid[b]]
            want = torch.corrcoef(torch.stack([x, y]).double())[0, 1]
            assert r[b, c] == pytest.approx(float(want), abs=1e-6)
    # without a mask every pixel counts; outside the mask nothing does
    r_all, _ = pixel_agreement(cam, ref)
    x, y = cam[0, 0].flatten(), ref[0, 0].flatten()
    assert r_all[0, 0] == pytest.approx(float(torch.corrcoef(torch.stack([x, y]).double())[0, 1]),
                                        abs=1e-6)
    wild = cam.clone()
    wild[~valid[:, None].expand_as(cam)] = 1e3
    assert torch.allclose(pixel_agreement(wild, ref, valid)[0], r, atol=1e-6)
    # a map mirrored on the valid pixels: −1
    assert pixel_agreement(1 - ref, ref, valid)[0][0, 0] == pytest.approx(-1.0)


def test_sharpen_divides_each_map_by_its_peak_and_raises_it_to_the_power():
    torch.manual_seed(0)
    ref = torch.rand(2, 3, 5, 4) * 7
    ref[1, 2] = 0  # no tile finds the class: stays zero, no NaN
    assert sharpen(ref, 1.0) is ref  # the correlation does not see the scale
    got = sharpen(ref, 3.0)
    for b in range(2):
        for c in range(3):
            peak = ref[b, c].max()
            want = (ref[b, c] / peak) ** 3 if peak > 0 else torch.zeros_like(ref[b, c])
            assert torch.allclose(got[b, c], want, atol=1e-6)
    assert got.isfinite().all() and got[1, 2].abs().max() == 0
    assert got.max() == pytest.approx(1.0)


def test_sharpened_tiles_tell_a_cam_on_the_context_from_one_on_the_object():
    """A boat on its water: the boat's own tiles score it highest (10), the water's tiles
    score it too (6). The plain correlation rates a CAM on the water above the 0.3 floor,
    above one on the boat; raised to the 8th power only the boat's tiles count."""
    ref = torch.zeros(1, 1, 16, 16)
    ref[..., 8:, :] = 6.0  # the water
    ref[..., 12:, :4] = 10.0  # the boat
    water = (ref == 6.0).float()
    boat = (ref == 10.0).float()
    plain = [float(pixel_agreement(cam, ref)[0]) for cam in (water, boat)]
    sharp = [float(pixel_agreement(cam, sharpen(ref, 8.0))[0]) for cam in (water, boat)]
    assert plain[0] > 0.3 and plain[0] > plain[1]
    assert sharp[0] < 0.0 and sharp[1] > 0.9


def test_tile_agreement_both_is_the_lower_of_the_sharpened_and_the_plain_correlation():
    """``both``: per image and class the lower of the two correlations, defined where both
    are; at power 1 the two references are one map; ``sharpened`` is the sharpened alone."""
    torch.manual_seed(1)
    cam, ref = torch.rand(3, 4, 8, 8), torch.rand(3, 4, 8, 8) * 5
    ref[0, 1] = 2.0  # a constant map: undefined under both references
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    valid[2, :, 5:] = False
    plain = pixel_agreement(cam, ref, valid)
    sharp = pixel_agreement(cam, sharpen(ref, 6.0), valid)
    r, defined = tile_agreement(cam, ref, 6.0, "both", valid)
    assert torch.equal(r, torch.minimum(plain[0], sharp[0]))
    assert torch.equal(defined, plain[1] & sharp[1]) and not defined[0, 1]
    assert (r < sharp[0]).any() and (r < plain[0]).any()  # each bound binds somewhere
    for got, want in ((tile_agreement(cam, ref, 6.0, "sharpened", valid), sharp),
                      (tile_agreement(cam, ref, 1.0, "both", valid), plain)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="unknown tile reference"):
        tile_agreement(cam, ref, 6.0, "plain")

