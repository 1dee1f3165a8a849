"""The isolated-patch probe (seco_cli.probe) on hand-made images and a hand-made classifier:
tiles, their label shares, and the per-pair summaries."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seco_cli.probe import patch_probe, tile, tile_fractions

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # tiles keep the raw [0, 1] colours


def test_tile_cuts_the_grid_row_by_row_and_drops_the_remainder():
    x = torch.arange(2 * 5 * 6).view(2, 5, 6)  # (C, H, W): 2 × 3 tiles of 2, a row and none left
    t = tile(x, 2)
    assert t.shape == (6, 2, 2, 2)
    assert torch.equal(t[0], x[:, 0:2, 0:2]) and torch.equal(t[2], x[:, 0:2, 4:6])
    assert torch.equal(t[3], x[:, 2:4, 0:2]) and torch.equal(t[5], x[:, 2:4, 4:6])
    assert torch.equal(tile(x[0], 3)[1], x[0, 0:3, 3:6])  # (H, W) works too
    half = tile(x, 2, 1)  # overlapping: corners at every pixel, 4 rows × 5 columns
    assert half.shape == (20, 2, 2, 2) and torch.equal(half[6], x[:, 1:3, 1:3])


def test_tile_fractions_ignore_unlabelled_pixels():
    mask = torch.tensor([[0, 1, 2, 2],
                         [255, 1, 2, 255]], dtype=torch.uint8)
    frac = tile_fractions(mask, 2, 3)
    np.testing.assert_allclose(frac, [[1 / 3, 2 / 3, 0], [0, 0, 1]])
    np.testing.assert_allclose(tile_fractions(mask, 2, 3, 1)[1], [0, 1 / 2, 1 / 2])
    empty = tile_fractions(torch.full((2, 2), 255, dtype=torch.uint8), 2, 3)
    np.testing.assert_array_equal(empty, [[0, 0, 0]])


class _Data:
    """Images of a 'boat' (class 1, red) on 'water' (background, blue), 8×8 px, tiles of 4:
    the boat fills the top-left tile, water the rest; a second image has no boat."""

    num_classes = 2

    def __init__(self):
        boat = np.zeros((8, 8, 3), np.uint8)
        boat[..., 2] = 255
        boat[:4, :4] = (255, 0, 0)
        mask = np.zeros((8, 8), np.uint8)
        mask[:4, :4] = 1
        mask[4:, 4:] = 255  # unlabelled: this tile is neither object nor partner
        water = np.zeros((8, 8, 3), np.uint8)
        water[..., 2] = 255
        self._items = {"b": (boat, mask, [1]), "w": (water, np.zeros((8, 8), np.uint8), [])}

    def image(self, i):
        return self._items[i][0]

    def mask(self, i):
        return self._items[i][1]

    def labels(self, i):
        return self._items[i][2]


class _Net(torch.nn.Module):
    """Logit of class 1: the final head reads red (the object), the auxiliary head blue (the
    context: the co-occurrence failure); class 2 is constant."""

    def forward(self, x, with_seg=True):
        red, blue = x[:, 0].mean((1, 2)), x[:, 2].mean((1, 2))
        zeros = torch.zeros_like(red)
        return SimpleNamespace(logits=torch.stack([red - 0.5, zeros], 1),
                               aux_logits=torch.stack([blue - 0.5, zeros], 1))


@pytest.mark.parametrize("batch", [1, 3, 100])
def test_probe_separates_a_classifier_reading_the_object_from_one_reading_the_context(batch):
    out = patch_probe(_Net(), _Data(), ["b", "w"], [(1, 0)], ["boat/background"], 8, 4, 1.0,
                      MEAN, STD, 0.5, batch, torch.device("cpu"))
    assert (out["images"], out["patch"], out["stride"], out["tiles_per_image"]) == (2, 4, 4, 4)
    pair = out["pairs"]["boat/background"]
    # image b only (w has no boat): 1 object tile, 2 water tiles, the unlabelled one left out
    assert (pair["object_tiles"], pair["partner_tiles"]) == (1, 2)
    assert pair["final"] == {"auc": 1.0, "object_fire": 1.0, "partner_fire": 0.0,
                             "logit_gap": pytest.approx(1.0)}
    assert pair["aux"] == {"auc": 0.0, "object_fire": 0.0, "partner_fire": 1.0,
                           "logit_gap": pytest.approx(-1.0)}


def test_probe_without_object_or_partner_tiles_reports_none():
    out = patch_probe(_Net(), _Data(), ["b"], [(1, 2)], ["boat/person"], 8, 4, 1.0, MEAN, STD,
                      0.5, 8, torch.device("cpu"))
    pair = out["pairs"]["boat/person"]
    assert (pair["object_tiles"], pair["partner_tiles"]) == (1, 0)
    assert pair["final"] == {"auc": None, "object_fire": 1.0, "partner_fire": None,
                             "logit_gap": None}
