"""The benchmark scripts' own arithmetic (the scripts themselves are run by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import rectify_calibration as rc  # noqa: E402


def test_auc_counts_correctly_ordered_pairs():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    positive = np.array([False, False, True, True])
    # pairs (pos, neg): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes → 3/4
    assert rc.auc(scores, positive) == pytest.approx(0.75)


def test_auc_ties_count_half_and_degenerate_is_nan():
    assert rc.auc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5)
    assert np.isnan(rc.auc(np.array([0.1, 0.2]), np.array([True, True])))


def test_report_precision_and_recall_of_firing():
    # 4 eligible patches, tags vs ground truth: two noisy; fractions 0.95, 0.2 noisy / 0.9, 0.1 clean
    rows = {"tag": np.array([1, 1, 2, 2]), "gt": np.array([0, 1, 0, 2]),
            "key": np.array([0.95, 0.9, 0.2, 0.1]), "query": np.array([0.95, 0.9, 0.2, 0.1])}
    r = rc.report(rows)
    assert r["noisy_rate"] == pytest.approx(0.5)
    b = r["views"]["key"]["beta"][0.8]  # fires on 0.95 (noisy) and 0.9 (clean)
    assert b["fire_rate"] == pytest.approx(0.5)
    assert b["precision"] == pytest.approx(0.5)
    assert b["recall"] == pytest.approx(0.5)
