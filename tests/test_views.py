"""Batched random views (SPEC §3.6–§3.7): photometric ops against torchvision, identity at
probability 0, determinism per generator seed, random-resized crops inside the valid region."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from seco_cli.data.views import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    global_view,
    grayscale,
    random_color_jitter,
    random_resized_boxes,
    resized_crop,
    strong_view,
)


def _images(b: int = 4, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- photometric ops
@pytest.mark.parametrize("ours, theirs, factors", [
    (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.0]),
    (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.0]),
    (adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2, 0.0]),
    (adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.1, 0.5]),
])
def test_per_sample_ops_match_torchvision(ours, theirs, factors):
    x = _images()
    x[3, :, :4] = 0.5  # grey pixels (zero chroma) for the hue edge case
    out = ours(x, torch.tensor(factors))
    ref = torch.stack([theirs(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision():
    x = _images()
    torch.testing.assert_close(grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=1))


def test_blur_matches_torchvision():
    x = _images()
    sigmas = [0.1, 0.7, 1.3, 2.0]
    out = gaussian_blur(x, torch.tensor(sigmas), radius=6)
    ref = torch.stack([TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[s, s])
                       for i, s in enumerate(sigmas)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- strong (key) view
def test_strong_view_identity_at_zero_probability():
    x = _images()
    out = strong_view(x, _gen(0), p_jitter=0.0, p_gray=0.0, p_blur=0.0)
    assert torch.equal(out, x)


def test_strong_view_deterministic_per_seed():
    x = _images(b=16)
    a, b, c = (strong_view(x, _gen(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_strong_view_never_moves_pixels():
    x = _images()
    out = strong_view(x, _gen(0), p_jitter=0.0, p_gray=1.0, p_blur=0.0)
    torch.testing.assert_close(out, grayscale(x).expand_as(x))  # same pixel, same place


def test_strong_view_applies_ops_to_some_samples_only():
    x = _images(b=64)
    out = strong_view(x, _gen(1), p_jitter=0.5, p_gray=0.0, p_blur=0.0)
    changed = (out != x).flatten(1).any(dim=1)
    assert 10 < int(changed.sum()) < 54  # ~Binomial(64, 0.5)


@pytest.mark.parametrize("jitter", [(0.4, 0.4, 0.2, 0.1), (0.4, 0.0, 0.2, 0.0)])
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "select"])
def test_color_jitter_runs_each_sample_through_its_own_op_order(jitter, gather):
    """Per sample, as torchvision: with probability p the four ops in a random order, each
    with its own factor; magnitude-0 ops skipped; the draws (apply, u, order) in that order.
    Both ways of running the ops (gather the samples, or run all and select) give it."""
    x = _images(b=48)
    out = random_color_jitter(x, _gen(3), jitter, p=0.7, gather=gather)
    g = _gen(3)
    apply = torch.rand(48, generator=g) < 0.7
    u = torch.rand(48, 4, generator=g)
    order = torch.rand(48, 4, generator=g).argsort(dim=1)
    lo = torch.tensor([max(0.0, 1 - m) for m in jitter[:3]] + [-jitter[3]])
    hi = torch.tensor([1 + m for m in jitter[:3]] + [jitter[3]])
    factors = lo + (hi - lo) * u
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    assert 20 < int(apply.sum()) < 48
    for i in range(48):
        ref = x[i:i + 1]
        if apply[i]:
            for j in order[i].tolist():
                if jitter[j] > 0:
                    ref = ops[j](ref, factors[i:i + 1, j])
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-6, rtol=0)
    assert torch.equal(out[~apply], x[~apply])


# ---------------------------------------------------------------- global view
def test_resized_crop_equals_interpolate_of_slice():
    x = _images()
    boxes = torch.tensor([[0, 0, 20, 24], [3, 5, 11, 20], [10, 2, 19, 7], [4, 4, 5, 5]])
    out = resized_crop(x, boxes, 16)
    ref = torch.cat([F.interpolate(x[i:i + 1, :, y0:y1, x0:x1], size=(16, 16), mode="bilinear",
                                   align_corners=False)
                     for i, (y0, x0, y1, x1) in enumerate(boxes.tolist())])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_resized_boxes_inside_bbox(seed):
    g = _gen(seed)
    bbox = torch.tensor([[0, 0, 448, 448], [10, 20, 200, 448], [5, 5, 40, 300], [0, 0, 7, 9]])
    for _ in range(20):
        boxes = random_resized_boxes(bbox, g, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3))
        assert (boxes[:, :2] >= bbox[:, :2]).all() and (boxes[:, 2:] <= bbox[:, 2:]).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).double()
        full = ((bbox[:, 2] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 1])).double()
        assert (area[:2] >= 0.38 * full[:2]).all()  # scale ≥ 0.4, up to rounding


def test_global_view_shape_range_determinism():
    x = _images(b=3, h=32, w=40)
    a = global_view(x, _gen(5), size=24)
    b = global_view(x, _gen(5), size=24)
    assert a.shape == (3, 3, 24, 24)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, global_view(x, _gen(6), size=24))


def test_global_view_identity_when_nothing_random():
    x = _images(b=2, h=16, w=16)
    out = global_view(x, _gen(0), size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_jitter=0.0,
                      p_gray=0.0, p_blur=0.0, p_solarize=0.0, p_flip=0.0)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    flipped = global_view(x, _gen(0), size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_solarize=0.0, p_flip=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-6, rtol=0)


def test_global_view_stays_inside_valid_region():
    x = torch.zeros(4, 3, 32, 32)
    valid = torch.zeros(4, 32, 32, dtype=torch.bool)
    for i, (y0, x0, y1, x1) in enumerate([(0, 0, 32, 32), (4, 8, 20, 30), (10, 0, 32, 12),
                                          (0, 16, 9, 32)]):
        valid[i, y0:y1, x0:x1] = True
    x[valid[:, None].expand_as(x)] = 0.75  # padding stays 0
    for seed in range(5):
        out = global_view(x, _gen(seed), size=16, p_jitter=0.0, p_gray=0.0, p_blur=0.0,
                          p_solarize=0.0, valid=valid)
        torch.testing.assert_close(out, torch.full_like(out, 0.75))


def test_solarize_only():
    x = _images(b=2)
    out = global_view(x, _gen(0), size=20, scale=(1.0, 1.0), ratio=(24 / 20, 24 / 20),
                      p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_solarize=1.0, p_flip=0.0)
    ref = TF.solarize(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), 0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_color_jitter_select_equals_gather_and_never_waits():
    """The two ways agree to the bit, and the select way calls no ``nonzero`` (a device wait
    on a GPU): the default off the CPU."""
    from torch.profiler import ProfilerActivity, profile

    x = _images(b=40)
    gathered = random_color_jitter(x, _gen(5), (0.4, 0.4, 0.2, 0.1), p=0.8, gather=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        selected = random_color_jitter(x, _gen(5), (0.4, 0.4, 0.2, 0.1), p=0.8, gather=False)
    assert torch.equal(gathered, selected) and not torch.equal(selected, x)
    assert not [e for e in prof.events() if e.name == "aten::nonzero"]
