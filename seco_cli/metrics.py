"""Segmentation metrics (SPEC §8): one confusion-matrix accumulator for CAM seeds, pseudo masks
and segmentation, its summary (mIoU, precision, recall, confusion ratio FP/TP), the
background-threshold sweep of CAM seeds, and the co-occurrence pair table (paper Table 3).

Everything here is pure: arrays in, plain dicts out (JSON-able: undefined ratios are ``None``,
never NaN or inf). Conventions, for a class ``c`` of the matrix ``cm[actual, predicted]``:

- ``TP = cm[c, c]``, ``FP = cm[:, c].sum() - TP``, ``FN = cm[c, :].sum() - TP``.
- A class is *present* when it has ground-truth pixels (``TP + FN > 0``). mIoU, mean precision
  and mean recall are taken over present classes only (background included); a class absent
  from the ground truth but predicted does not enter mIoU (its pixels still count as false
  negatives of the classes they cover).
- ``IoU = TP / (TP + FP + FN)``, ``None`` when the class is neither present nor predicted.
- ``precision = TP / (TP + FP)``, ``None`` when the class is never predicted (such a present
  class is skipped in the mean precision; its recall of 0 still shows it).
- ``recall = TP / (TP + FN)``, ``None`` when the class is absent.
- ``fp_tp = FP / TP`` (the confusion ratio, lower is better), ``None`` when ``TP = 0``; the
  overall figure is the mean over foreground classes present in the ground truth with a
  defined ratio, and the present foreground classes left out are listed in
  ``fp_tp_undefined`` so that a class that was never found does not pass unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from seco_cli.errors import SecoError

IGNORE = 255
BACKGROUND = "background"


class ConfusionMatrix:
    """Pixel counts ``mat[actual, predicted]`` over ``num_classes`` classes (background = 0).

    Ground-truth pixels equal to ``ignore_index`` are left out.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: ``gt`` and ``pred`` are integer arrays of the same shape."""
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        n = self.num_classes
        keep = gt != self.ignore_index
        g = gt[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        if g.size and (g.max() >= n or g.min() < 0):
            raise ValueError(f"ground truth holds {int(g.max())}, outside 0..{n - 1}")
        if p.size and (p.max() >= n or p.min() < 0):
            raise ValueError(f"prediction holds {int(p.max())}, outside 0..{n - 1}")
        self.mat += np.bincount(n * g + p, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts (e.g. from another shard); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices of different class counts")
        self.mat += other.mat
        return self

    def compute(self) -> dict[str, np.ndarray]:
        """Per-class ``tp, fp, fn`` (int) and ``iou, precision, recall, fp_tp`` (float, NaN
        where undefined)."""
        tp = np.diag(self.mat)
        fp = self.mat.sum(axis=0) - tp
        fn = self.mat.sum(axis=1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
            precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
            recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
            fp_tp = np.where(tp > 0, fp / tp, np.nan)
        return {"tp": tp, "fp": fp, "fn": fn, "iou": iou, "precision": precision,
                "recall": recall, "fp_tp": fp_tp}


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def summarize(cm: ConfusionMatrix, class_names: Sequence[str]) -> dict[str, Any]:
    """Headline numbers and the per-class table (see the module docstring for definitions)."""
    if len(class_names) != cm.num_classes:
        raise ValueError(f"{len(class_names)} class names for {cm.num_classes} classes")
    s = cm.compute()
    present = (s["tp"] + s["fn"]) > 0
    fg_present = present.copy()
    fg_present[0] = False
    rows = [
        {"class": name, "present": bool(present[c]), "iou": _num(s["iou"][c]),
         "precision": _num(s["precision"][c]), "recall": _num(s["recall"][c]),
         "fp_tp": _num(s["fp_tp"][c]), "tp": int(s["tp"][c]), "fp": int(s["fp"][c]),
         "fn": int(s["fn"][c])}
        for c, name in enumerate(class_names)
    ]
    return {
        "miou": _mean(s["iou"][present]),
        "precision": _mean(s["precision"][present]),
        "recall": _mean(s["recall"][present]),
        "fp_tp": _mean(s["fp_tp"][fg_present]),
        "fp_tp_undefined": [class_names[c] for c in np.flatnonzero(fg_present & (s["tp"] == 0))],
        "pixels": int(cm.mat.sum()),
        "classes": rows,
    }


# --------------------------------------------------------------------------- CAM seeds
class BkgSweep:
    """CAM seeds scored at several constant background scores in one pass over the images.

    Equivalent to :func:`seco_cli.postprocess.cam_to_mask` at each threshold: a pixel takes the class
    of its highest score (first on ties) when that score is strictly above ``bkg``, else
    background.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float], ignore_index: int = IGNORE):
        self.thresholds = sorted({float(t) for t in thresholds})
        self.cms = {t: ConfusionMatrix(num_classes, ignore_index) for t in self.thresholds}

    def update(self, gt: np.ndarray, scores: np.ndarray, labels: Sequence[int]) -> None:
        """``scores`` is ``(K, H, W)`` at the size of ``gt`` for the class indices ``labels``."""
        if len(labels) == 0:
            best = np.zeros(gt.shape, dtype=np.float32)
            cls = np.zeros(gt.shape, dtype=np.uint8)
        else:
            best = scores.max(axis=0)  # (H, W)
            cls = np.asarray(labels, dtype=np.uint8)[scores.argmax(axis=0)]
        for t, cm in self.cms.items():
            # float32 threshold, as cam_to_mask compares against a float32 background plane
            cm.update(gt, np.where(best > np.float32(t), cls, 0))

    def curve(self, class_names: Sequence[str]) -> list[dict[str, float | None]]:
        return [{"bkg": t, "miou": summarize(cm, class_names)["miou"]}
                for t, cm in self.cms.items()]


def best_threshold(curve: list[dict[str, float | None]]) -> dict[str, float | None]:
    """The point of highest mIoU (the lowest threshold on ties); ``None``s for an empty curve."""
    scored = [p for p in curve if p["miou"] is not None]
    if not scored:
        return {"bkg": None, "miou": None}
    return max(scored, key=lambda p: (p["miou"], -p["bkg"]))


# --------------------------------------------------------------------------- pairs
def resolve_pairs(pairs: Sequence[tuple[str, str]], class_names: Sequence[str]) -> list[tuple[int, int]]:
    """Class indices of (victim, partner) name pairs; the victim is an object class, the
    partner an object class or ``background`` (context). Unknown names raise SecoError."""
    index = {name: c for c, name in enumerate(class_names)}
    out = []
    for victim, partner in pairs:
        for name in (victim, partner):
            if name not in index:
                raise SecoError(f"unknown class '{name}' in pair '{victim}/{partner}'",
                                "evaluate.pairs", f"use one of: {', '.join(class_names)}")
        if index[victim] == 0:
            raise SecoError(f"pair '{victim}/{partner}': the victim must be an object class",
                            "evaluate.pairs", f"use one of: {', '.join(class_names[1:])}")
        if victim == partner:
            raise SecoError(f"pair '{victim}/{partner}' names one class twice", "evaluate.pairs",
                            "give two different classes")
        out.append((index[victim], index[partner]))
    return out


def cooccurring_pairs(pair_counts: Sequence[Sequence[int]], class_names: Sequence[str],
                      top: int) -> list[tuple[str, str]]:
    """The ``top`` foreground class pairs seen together in most images, each in both
    directions. ``pair_counts`` is ``(C, C)`` over foreground classes 1..C (the prepared
    dataset's co-occurrence counts); ties keep class order; pairs never seen are left out."""
    counts = np.triu(np.asarray(pair_counts, dtype=np.int64), k=1)
    if counts.size == 0 or top == 0:
        return []
    order = np.argsort(-counts, axis=None, kind="stable")[:top]
    out: list[tuple[str, str]] = []
    for a, b in zip(*np.unravel_index(order, counts.shape), strict=True):
        if counts[a, b] > 0:
            out += [(class_names[a + 1], class_names[b + 1]), (class_names[b + 1], class_names[a + 1])]
    return out


def pair_table(cm: ConfusionMatrix, class_names: Sequence[str],
               pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, float | None]]:
    """Per ``"<victim>/<partner>"``: the victim's IoU and FP/TP, and the share of its false
    positives lying on the partner's ground-truth pixels, ``cm[partner, victim] / FP(victim)``
    (``None`` when the victim has no false positive)."""
    s = cm.compute()
    table = {}
    for (v, p), (vname, pname) in zip(resolve_pairs(pairs, class_names), pairs, strict=True):
        fp = int(s["fp"][v])
        table[f"{vname}/{pname}"] = {
            "iou": _num(s["iou"][v]),
            "fp_tp": _num(s["fp_tp"][v]),
            "fp_share_on_partner": float(cm.mat[p, v] / fp) if fp else None,
        }
    return table


# --------------------------------------------------------------------------- plot data
def confusion_rows(cm: ConfusionMatrix, class_names: Sequence[str],
                   scale: int = 1000) -> list[tuple[str, str]]:
    """(actual, predicted) rows for DVC's ``confusion_normalized`` template.

    That template counts rows per (actual, predicted) and normalises each actual row, so a
    pixel-level matrix is fed as weights: each ground-truth class ``i`` contributes
    ``round(scale * cm[i, j] / rowsum_i)`` copies of ``(class_i, class_j)``. The plot then
    shows the row-normalised matrix to 1/scale precision with a file of at most about
    ``scale`` rows per present class, instead of one row per pixel. Absent classes add nothing.
    """
    rows: list[tuple[str, str]] = []
    for i, row in enumerate(cm.mat):
        total = int(row.sum())
        if total == 0:
            continue
        for j, count in enumerate(row):
            rows += [(class_names[i], class_names[j])] * int(round(scale * int(count) / total))
    return rows


# --------------------------------------------------------------------------- ranking
def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula: P(a positive scores above a negative), ties counting
    half (tied values share their mean rank); NaN without both classes."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based mean rank of each value's ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
