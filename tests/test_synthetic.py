"""The embedded dataset: deterministic by seed, and it shows the couplings it promises."""

from __future__ import annotations

import numpy as np

from seco_cli.data.synthetic import generate_image, read
from seco_cli.params import SyntheticParams


def test_deterministic_by_seed_and_index():
    p = SyntheticParams(image_size=48)
    a1, m1 = generate_image(p, 0, 5)
    a2, m2 = generate_image(p, 0, 5)
    b, _ = generate_image(p, 1, 5)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(m1, m2)
    assert not np.array_equal(a1, b)


def _stats(p: SyntheticParams, n: int):
    labels, water_blue = [], []
    for i in range(n):
        img, mask = generate_image(p, 0, i)
        labels.append(set(np.unique(mask)) - {0})
        bkg = mask == 0
        # water is strongly blue; count it only on background pixels (context = background)
        blue = (img[..., 2].astype(int) - img[..., 0].astype(int) > 80) & bkg
        water_blue.append(blue.mean() > 0.15)
    return labels, np.asarray(water_blue)


def test_context_and_object_coupling_rates():
    p = SyntheticParams(image_size=48, class_weights={"person": 0.4})
    labels, water = _stats(p, 400)
    boat, horse, person = 1, 3, 4
    has_boat = np.asarray([boat in s for s in labels])
    has_horse = np.asarray([horse in s for s in labels])
    has_person = np.asarray([person in s for s in labels])
    # boat sits on water (rate 0.9); water also appears without any boat, but rarely
    assert water[has_boat].mean() > 0.8
    assert 0 < water[~has_boat].sum()
    assert water[~has_boat].mean() < 0.3
    # person accompanies horse (rate 0.8) far more often than it appears without one
    assert has_person[has_horse].mean() > 0.7
    assert has_person[has_horse].mean() > 2 * has_person[~has_horse].mean()


def test_context_pixels_are_background():
    p = SyntheticParams(image_size=64, context_alone_rate=1.0, empty_rate=1.0)
    img, mask = generate_image(p, 0, 0)
    assert mask.max() == 0  # water/rails painted, but no object: all background
    assert img.std() > 20


def test_read_lists_every_id_once():
    p = SyntheticParams(num_train=5, num_val=3, image_size=32)
    src = read(p, seed=0)
    ids = [s.id for s in src.samples]
    assert ids == src.splits["train"] + src.splits["val"] and len(set(ids)) == 8
    assert src.classes[0] == "background" and src.total == 8
