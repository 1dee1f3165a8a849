"""Metrics on hand-made arrays with hand-computed expectations."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from seco_cli.errors import SecoError
from seco_cli.metrics import (
    BkgSweep,
    ConfusionMatrix,
    auc,
    best_threshold,
    confusion_rows,
    cooccurring_pairs,
    pair_table,
    resolve_pairs,
    summarize,
)
from seco_cli.postprocess import cam_to_mask

ABC = ["background", "a", "b"]


def _cm(n: int, gt, pred) -> ConfusionMatrix:
    cm = ConfusionMatrix(n)
    cm.update(np.asarray(gt, np.uint8), np.asarray(pred, np.uint8))
    return cm


def _basic() -> ConfusionMatrix:
    # the 255 pixel (row 1, col 1) is ignored whatever is predicted there
    return _cm(3, [[0, 0, 1, 1], [0, 255, 1, 2]], [[0, 1, 1, 1], [2, 0, 0, 2]])


def test_confusion_counts_ignore_255():
    cm = _basic()
    np.testing.assert_array_equal(cm.mat, [[1, 1, 1], [1, 2, 0], [0, 0, 1]])
    assert cm.mat.sum() == 7


def test_summary_iou_precision_recall_fp_tp():
    s = summarize(_basic(), ABC)
    # tp [1, 2, 1], fp [1, 1, 1], fn [2, 1, 0]
    rows = {r["class"]: r for r in s["classes"]}
    assert rows["background"]["iou"] == pytest.approx(1 / 4)
    assert rows["a"]["iou"] == pytest.approx(2 / 4)
    assert rows["b"]["iou"] == pytest.approx(1 / 2)
    assert [rows[c]["precision"] for c in ABC] == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert [rows[c]["recall"] for c in ABC] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [rows[c]["fp_tp"] for c in ABC] == pytest.approx([1.0, 0.5, 1.0])
    assert s["miou"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert s["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert s["recall"] == pytest.approx((1 / 3 + 2 / 3 + 1) / 3)
    assert s["fp_tp"] == pytest.approx(0.75)  # foreground only: (0.5 + 1) / 2
    assert s["fp_tp_undefined"] == [] and s["pixels"] == 7


def test_class_absent_from_gt_is_left_out_of_miou():
    names = ["background", "a", "b", "c"]
    # c is predicted once but absent from the GT; b is neither present nor predicted
    s = summarize(_cm(4, [0, 0, 1, 1], [0, 3, 1, 1]), names)
    rows = {r["class"]: r for r in s["classes"]}
    assert rows["c"] == {"class": "c", "present": False, "iou": 0.0, "precision": 0.0,
                         "recall": None, "fp_tp": None, "tp": 0, "fp": 1, "fn": 0}
    assert rows["b"]["iou"] is None and rows["b"]["precision"] is None
    assert s["miou"] == pytest.approx((1 / 2 + 1.0) / 2)  # background and a only
    assert s["precision"] == pytest.approx(1.0)
    assert s["recall"] == pytest.approx(0.75)
    assert s["fp_tp"] == 0.0


def test_fp_tp_undefined_when_a_present_class_is_never_found():
    # a: 2 GT pixels, both predicted as background, and one false positive
    s = summarize(_cm(3, [0, 0, 1, 1, 2], [1, 0, 0, 0, 2]), ABC)
    rows = {r["class"]: r for r in s["classes"]}
    assert rows["a"]["fp_tp"] is None and rows["a"]["iou"] == 0.0
    assert s["fp_tp_undefined"] == ["a"]
    assert s["fp_tp"] == 0.0  # mean over b alone
    assert s["miou"] == pytest.approx((1 / 4 + 0 + 1) / 3)


def test_empty_matrix_has_no_numbers():
    s = summarize(ConfusionMatrix(3), ABC)
    assert s["miou"] is None and s["precision"] is None and s["fp_tp"] is None


def test_merge_adds_counts_and_update_checks_values():
    cm = _basic().merge(_basic())
    assert cm.mat.sum() == 14 and cm.mat[1, 1] == 4
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="prediction"):
        cm.update(np.zeros(2, np.uint8), np.array([0, 3], np.uint8))
    with pytest.raises(ValueError, match="ground truth"):
        cm.update(np.array([0, 7], np.uint8), np.zeros(2, np.uint8))


def test_pair_table_share_of_false_positives_on_partner():
    # victim a: 1 TP; false positives on 2 background pixels and 1 pixel of b
    cm = _cm(3, [0, 0, 0, 2, 2, 1, 1], [1, 1, 0, 1, 2, 1, 0])
    table = pair_table(cm, ABC, [("a", "background"), ("a", "b"), ("b", "a")])
    assert table["a/background"] == pytest.approx(
        {"iou": 1 / 5, "fp_tp": 3.0, "fp_share_on_partner": 2 / 3})
    assert table["a/b"]["fp_share_on_partner"] == pytest.approx(1 / 3)
    assert table["b/a"] == {"iou": 0.5, "fp_tp": 0.0, "fp_share_on_partner": None}  # no FP


def test_unknown_pair_names_are_user_errors():
    with pytest.raises(SecoError, match="unknown class 'c'.*use one of: background, a, b"):
        resolve_pairs([("a", "c")], ABC)
    with pytest.raises(SecoError, match="victim must be an object class"):
        resolve_pairs([("background", "a")], ABC)
    with pytest.raises(SecoError, match="twice"):
        resolve_pairs([("a", "a")], ABC)
    assert resolve_pairs([("a", "background"), ("b", "a")], ABC) == [(1, 0), (2, 1)]


def test_cooccurring_pairs_most_frequent_both_directions():
    names = ["background", "a", "b", "c", "d"]
    counts = [[5, 3, 1, 0], [3, 4, 2, 0], [1, 2, 2, 0], [0, 0, 0, 1]]  # (a,b)=3 (b,c)=2 (a,c)=1
    assert cooccurring_pairs(counts, names, 2) == [("a", "b"), ("b", "a"), ("b", "c"), ("c", "b")]
    # pairs never seen together (anything with d) are not padded in
    assert len(cooccurring_pairs(counts, names, 10)) == 6
    assert cooccurring_pairs(counts, names, 0) == []


def test_sweep_picks_the_known_best_threshold():
    gt = np.array([[0, 0, 1, 1, 1]], np.uint8)
    cam = np.array([[[0.1, 0.35, 0.42, 0.6, 0.9]]], np.float32)  # (K=1, 1, 5), right at 0.4
    sweep = BkgSweep(2, [0.5, 0.2, 0.3, 0.4])
    sweep.update(gt, cam, [1])
    curve = sweep.curve(["background", "a"])
    assert [p["bkg"] for p in curve] == [0.2, 0.3, 0.4, 0.5]
    # 0.2/0.3: one background pixel lost (IoU 1/2, 3/4); 0.5: one object pixel lost (2/3, 2/3)
    assert [p["miou"] for p in curve] == pytest.approx([0.625, 0.625, 1.0, 2 / 3])
    assert best_threshold(curve) == {"bkg": 0.4, "miou": 1.0}
    assert best_threshold([{"bkg": 0.3, "miou": 0.5}, {"bkg": 0.2, "miou": 0.5}])["bkg"] == 0.2
    assert best_threshold([]) == {"bkg": None, "miou": None}


def test_sweep_matches_cam_to_mask_including_ties():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (6, 7)).astype(np.uint8)
    gt[0, 0] = 255
    cam = (rng.integers(0, 5, (2, 6, 7)) / 4).astype(np.float32)  # many exact ties
    labels = [1, 3]
    sweep = BkgSweep(4, [0.25, 0.5, 0.45])
    sweep.update(gt, cam, labels)
    sweep.update(gt, np.zeros((0, 6, 7), np.float32), [])  # no labels: all background
    for t, cm in sweep.cms.items():
        ref = ConfusionMatrix(4)
        ref.update(gt, cam_to_mask(cam, labels, t))
        ref.update(gt, np.zeros_like(gt))
        np.testing.assert_array_equal(cm.mat, ref.mat)


def test_confusion_rows_are_row_normalised_weights():
    rows = confusion_rows(_basic(), ABC)  # rows [1, 1, 1], [1, 2, 0], [0, 0, 1]
    counts = Counter(rows)
    assert counts[("background", "background")] == 333
    assert counts[("background", "a")] == counts[("background", "b")] == 333
    assert counts[("a", "background")] == 333 and counts[("a", "a")] == 667
    assert ("a", "b") not in counts
    assert counts[("b", "b")] == 1000
    assert len(rows) == 2999
    assert confusion_rows(ConfusionMatrix(3), ABC) == []


def test_auc_counts_correctly_ordered_pairs():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    positive = np.array([False, False, True, True])
    # pairs (pos, neg): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes → 3/4
    assert auc(scores, positive) == pytest.approx(0.75)


def test_auc_ties_count_half_and_degenerate_is_nan():
    assert auc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5)
    # a tie among three: positive 0.5 against negatives 0.5 (half) and 0.2 (win) → 0.75
    assert auc(np.array([0.5, 0.5, 0.2]), np.array([True, False, False])) == pytest.approx(0.75)
    assert np.isnan(auc(np.array([0.1, 0.2]), np.array([True, True])))


def test_auc_matches_counting_every_pair():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    assert auc(scores, positive) == pytest.approx(wins / (pos.size * neg.size))
