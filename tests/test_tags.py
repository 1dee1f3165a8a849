"""Separate (SPEC §3.3–§3.5, §3.7): region map, patch boxes, patch and global tags, checked
against hand-computed expectations on tiny maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seco_cli.tags import (
    IGNORE,
    UNCERTAIN,
    alone_tags,
    crop_patches,
    global_tags,
    patch_tags,
    region_map,
    sample_patch_boxes,
    valid_bbox,
)

U, X = UNCERTAIN, IGNORE  # short names for hand-written maps


# ---------------------------------------------------------------- region map (§3.3)
def test_region_map_by_hand():
    # two classes, 2×3 pixels; high 0.7, low 0.25
    cam = torch.tensor([[[0.80, 0.70, 0.25],
                         [0.26, 0.10, 0.50]],
                        [[0.10, 0.00, 0.00],
                         [0.00, 0.90, 0.60]]])[None]  # (1, 2, 2, 3)
    valid = torch.tensor([[[True, True, True], [True, True, False]]])
    expected = torch.tensor([[[1, U, 0],     # > high → class; == high → uncertain; == low → bg
                              [U, 2, X]]])   # just above low → uncertain; outside valid → 255
    out = region_map(cam, valid, high=0.7, low=0.25)
    assert out.dtype == torch.long
    assert torch.equal(out, expected)


def test_region_map_all_background_when_classes_zeroed():
    cam = torch.zeros(2, 3, 4, 4)
    out = region_map(cam, torch.ones(2, 4, 4, dtype=torch.bool), high=0.7, low=0.25)
    assert torch.equal(out, torch.zeros(2, 4, 4, dtype=torch.long))


# ---------------------------------------------------------------- patch tags (§3.5)
def _patch(values: dict[int, int], ignore_rows: int = 0) -> torch.Tensor:
    """A 5×5 region (1, 5, 5) filled row-major with ``count`` pixels of each value, the rest
    background; the last ``ignore_rows`` rows are padding (255)."""
    flat = torch.zeros(25, dtype=torch.long)
    i = 0
    for value, count in values.items():
        flat[i:i + count] = value
        i += count
    region = flat.view(1, 5, 5)
    if ignore_rows:
        region[:, 5 - ignore_rows:] = IGNORE
    return region


def _tag(region: torch.Tensor, labels: list[int], threshold: float = 0.2,
         too_small: bool = False) -> int:
    boxes = torch.tensor([[[0, 0, 5, 5]]])  # the whole 5×5 map, one patch
    lab = torch.tensor([labels])
    return int(patch_tags(region, boxes, lab, threshold, torch.tensor([[too_small]]))[0, 0])


MULTI = [1, 1, 0]  # classes 1 and 2
SINGLE = [1, 0, 0]  # class 1 only


@pytest.mark.parametrize("values, labels, ignore_rows, expected", [
    ({1: 5}, MULTI, 0, 0),            # p = 5/25 = 0.2 exactly at threshold → background
    ({1: 6}, MULTI, 0, 1),            # p = 6/25 = 0.24 just above → class 1
    ({1: 3, 2: 3}, MULTI, 0, U),      # two classes → uncertain
    ({U: 6}, MULTI, 0, U),            # only uncertain pixels in a multi-label image → −1
    ({2: 3, U: 3}, MULTI, 0, 2),      # 6/25 = 0.24, the one class among class pixels
    ({U: 6}, SINGLE, 0, 1),           # single-label: uncertain counts as the class
    ({U: 5}, SINGLE, 0, 0),           # ... and at the threshold it is still background
    ({1: 4}, MULTI, 2, 1),            # padding excluded: 4/15 = 0.27 (not 4/25 = 0.16)
    ({1: 3}, MULTI, 2, 0),            # 3/15 = 0.2 exactly → background
    ({3: 2}, [0, 0, 1], 0, 0),        # pixel counts: 2/25 = 0.08 (index sum 6/25 would pass)
    ({}, MULTI, 5, U),                # no valid pixel → −1
    ({}, MULTI, 0, 0),                # all background → 0
])
def test_patch_tag_rule(values, labels, ignore_rows, expected):
    assert _tag(_patch(values, ignore_rows), labels) == expected


def test_patch_tag_too_small_is_uncertain():
    assert _tag(_patch({1: 20}), MULTI, too_small=True) == U


def test_patch_tags_batched_boxes():
    # 8×8 maps: image 0 has class 1 top-left, class 2 bottom-right; image 1 all uncertain
    region = torch.zeros(2, 8, 8, dtype=torch.long)
    region[0, :4, :4] = 1
    region[0, 4:, 4:] = 2
    region[1] = U
    boxes = torch.tensor([[[0, 0, 4, 4], [4, 4, 8, 8], [0, 4, 4, 8]],
                          [[0, 0, 4, 4], [2, 2, 6, 6], [4, 0, 8, 4]]])  # (2, 3, 4)
    labels = torch.tensor([[1, 1], [0, 1]])  # image 1 is single-label (class 2)
    too_small = torch.zeros(2, 3, dtype=torch.bool)
    tags = patch_tags(region, boxes, labels, 0.2, too_small)
    assert torch.equal(tags, torch.tensor([[1, 2, 0], [2, 2, 2]]))
    # a box straddling both classes
    both = patch_tags(region, torch.tensor([[[2, 2, 6, 6]]]), labels[:1], 0.2, too_small[:1, :1])
    assert int(both) == U


# ---------------------------------------------------------------- global tags (§3.7)
def test_global_tags():
    region = torch.zeros(4, 4, 4, dtype=torch.long)
    region[0, 0, 0] = 2            # one confident class → 2
    region[1, 0, 0], region[1, 1, 1] = 1, 2  # two → −1
    region[2] = U                  # none confident → −1 (upstream: class 1)
    region[3, 0, 0] = 1            # class 1 confident but not labelled → −1
    region[3, 1, 1] = U
    labels = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 1, 1]])
    assert torch.equal(global_tags(region, labels), torch.tensor([2, U, U, U]))
    region[3, 2, 2] = 3
    assert int(global_tags(region, labels)[3]) == 3  # unlabelled class 1 is not counted


# ---------------------------------------------------------------- patch boxes (§3.4)
def _valid(h: int, w: int, rect: tuple[int, int, int, int]) -> torch.Tensor:
    v = torch.zeros(h, w, dtype=torch.bool)
    v[rect[0]:rect[2], rect[1]:rect[3]] = True
    return v


RECTS = [(0, 0, 32, 32), (5, 3, 29, 20), (0, 10, 32, 18), (3, 3, 11, 11), (20, 0, 32, 32),
         (4, 4, 9, 30), (0, 0, 32, 7)]  # the last two are thinner than a patch (8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_boxes_inside_valid_region(seed):
    h = w = 32
    size, n = 8, 10
    g = torch.Generator().manual_seed(seed)
    valid = torch.stack([_valid(h, w, r) for r in RECTS])  # (B, 32, 32)
    region = torch.randint(-1, 3, (len(RECTS), h, w), generator=g).masked_fill(~valid, IGNORE)
    for _ in range(25):
        boxes, too_small = sample_patch_boxes(region, valid, n, size, g)
        assert boxes.shape == (len(RECTS), n, 4) and too_small.shape == (len(RECTS), n)
        assert torch.equal(boxes[..., 2] - boxes[..., 0], torch.full((len(RECTS), n), size))
        assert torch.equal(boxes[..., 3] - boxes[..., 1], torch.full((len(RECTS), n), size))
        assert (boxes[..., :2] >= 0).all() and (boxes[..., 2] <= h).all()
        assert (boxes[..., 3] <= w).all()
        for i, (y0, x0, y1, x1) in enumerate(RECTS):
            small = y1 - y0 < size or x1 - x0 < size
            assert bool(too_small[i].all()) == small and bool(too_small[i].any()) == small
            if not small:
                b = boxes[i]
                assert (b[:, 0] >= y0).all() and (b[:, 1] >= x0).all()
                assert (b[:, 2] <= y1).all() and (b[:, 3] <= x1).all()


def test_centres_are_uncertain_pixels_and_distinct():
    h = w = 32
    size, n = 8, 10
    region = torch.zeros(3, h, w, dtype=torch.long)
    pts = [(8 + 2 * k, 6 + 3 * (k % 5)) for k in range(12)]  # 12 interior uncertain pixels
    for y, x in pts:
        region[:, y, x] = U
    region[2] = 1
    region[2, 10, 10] = region[2, 20, 15] = U  # only 2 uncertain pixels: the rest falls back
    valid = torch.ones(3, h, w, dtype=torch.bool)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        boxes, too_small = sample_patch_boxes(region, valid, n, size, g)
        assert not too_small.any()
        centres = boxes[..., :2] + size // 2  # (B, n, 2)
        for i in range(2):
            cy, cx = centres[i, :, 0], centres[i, :, 1]
            assert (region[i, cy, cx] == U).all()
            assert len({(int(a), int(b)) for a, b in zip(cy, cx, strict=True)}) == n
        picked = {(int(a), int(b)) for a, b in centres[2]}
        assert {(10, 10), (20, 15)} <= picked  # every uncertain centre is used first


def test_centre_fallback_and_determinism():
    region = torch.ones(2, 16, 16, dtype=torch.long)  # no uncertain pixel at all
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    a, _ = sample_patch_boxes(region, valid, 6, 4, torch.Generator().manual_seed(7))
    b, _ = sample_patch_boxes(region, valid, 6, 4, torch.Generator().manual_seed(7))
    c, _ = sample_patch_boxes(region, valid, 6, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_too_small_valid_region_gives_uncertain_tags():
    region = torch.full((1, 16, 16), IGNORE, dtype=torch.long)
    region[0, 4:10, 2:14] = 1  # valid 6 rows × 12 columns, patch 8
    valid = region != IGNORE
    boxes, too_small = sample_patch_boxes(region, valid, 4, 8, torch.Generator().manual_seed(0))
    assert too_small.all()
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2:] <= 16).all()
    tags = patch_tags(region, boxes, torch.tensor([[1, 0]]), 0.2, too_small)
    assert (tags == U).all()


def test_valid_bbox():
    valid = torch.stack([_valid(6, 7, (1, 2, 4, 7)), _valid(6, 7, (0, 0, 6, 7)),
                         torch.zeros(6, 7, dtype=torch.bool)])
    assert torch.equal(valid_bbox(valid), torch.tensor([[1, 2, 4, 7], [0, 0, 6, 7], [0, 0, 6, 7]]))


# ---------------------------------------------------------------- patch crops
def test_crop_patches_equals_slicing():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 24, 20, generator=g)
    region = torch.randint(-1, 2, (3, 24, 20), generator=g)
    boxes, _ = sample_patch_boxes(region, torch.ones(3, 24, 20, dtype=torch.bool), 5, 6, g)
    patches = crop_patches(images, boxes, 6)
    assert patches.shape == (15, 3, 6, 6)
    ref = torch.stack([images[i, :, y0:y1, x0:x1]
                       for i in range(3) for y0, x0, y1, x1 in boxes[i].tolist()])
    assert torch.equal(patches, ref)
    resized = crop_patches(images, boxes, 12)
    expected = F.interpolate(ref, size=(12, 12), mode="bilinear", align_corners=False,
                             antialias=True)
    torch.testing.assert_close(resized, expected)


def test_crop_patches_rejects_unequal_boxes():
    with pytest.raises(ValueError):
        crop_patches(torch.rand(1, 3, 8, 8), torch.tensor([[[0, 0, 4, 4], [0, 0, 3, 3]]]), 4)


def test_alone_tags_one_class_of_the_image_above_threshold_none_several_and_unfit():
    # columns: classes 1..3 (logits); the image labels restrict which classes may fire
    logits = torch.tensor([[3.0, -2.0, 2.0],   # 1 and 3 fire, the image has only 1 → 1
                           [-1.0, -3.0, -0.5],  # nothing fires → background
                           [2.0, 0.0, 4.0],     # 1 and 3 fire, both in the image → uncertain
                           [0.1, 5.0, -1.0],    # 1 just above 0.5, 2 fires but not labelled → 1
                           [9.0, 9.0, 9.0]])    # fires, but the patch did not fit → uncertain
    labels = torch.tensor([[1.0, 0, 0], [1, 1, 1], [1, 0, 1], [1, 0, 0], [1, 1, 1]])
    keep = torch.tensor([True, True, True, True, False])
    assert alone_tags(logits, labels, 0.5, keep).tolist() == [1, 0, -1, 1, -1]
    # a higher threshold: 0.1 → sigmoid 0.525 no longer fires, so row 3 is background
    assert alone_tags(logits, labels, 0.55, keep).tolist() == [1, 0, -1, 0, -1]
    assert alone_tags(logits.bfloat16(), labels, 0.5, keep).dtype == torch.long


def test_known_side_gives_the_same_tags_and_crops_without_reading_the_device(monkeypatch):
    """The training step passes the side it drew the boxes at; tags and crops are those of
    the side read from the boxes, and nothing is read back from the device for it."""
    g = torch.Generator().manual_seed(3)
    region = torch.randint(-1, 4, (2, 24, 24), generator=g)
    valid = torch.ones(2, 24, 24, dtype=torch.bool)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    images = torch.rand(2, 3, 24, 24, generator=g)
    boxes, too_small = sample_patch_boxes(region, valid, 5, 8, g)
    tags = patch_tags(region, boxes, labels, 0.2, too_small)
    crops = crop_patches(images, boxes, 8)

    def no_read(self, *args):
        raise AssertionError("a tensor value was read on the host")

    for name in ("__int__", "__index__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    known = patch_tags(region, boxes, labels, 0.2, too_small, side=8), \
        crop_patches(images, boxes, 8, side=8)
    monkeypatch.undo()
    assert torch.equal(known[0], tags) and torch.equal(known[1], crops)
