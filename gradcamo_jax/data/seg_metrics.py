"""Instance-segmentation quality: one-to-one matching of label images at an IoU threshold.

Pure NumPy + SciPy (no torch, no cellpose), so the metric is independent of the segmenter it
judges: the IoU matrix comes from a joint histogram of (true id, predicted id) pairs and the
matching is an optimal assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``) that
maximises the number of pairs above the threshold, not a greedy pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class MatchScore:
    """Counts and rates of a one-to-one matching at IoU >= ``threshold``.

    ``f1 = 2 tp / (2 tp + fp + fn)``; with no objects on either side it is 1.0 (nothing to find,
    nothing found), and ``precision``/``recall`` follow the same convention for empty sides.
    ``mean_matched_iou`` is NaN when nothing matched.
    """

    threshold: float
    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float

    def as_dict(self) -> dict:
        return asdict(self)


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every true object and every predicted object.

    Args:
      true: integer labels, any shape (e.g. ZYX), 0 = background.
      pred: integer labels, same shape as ``true``.

    Returns:
      (iou, true_ids, pred_ids): ``iou`` has shape (len(true_ids), len(pred_ids)); ids are the
      non-zero labels present, ascending.
    """
    if true.shape != pred.shape:
        raise ValueError(f"label shapes differ: true {true.shape} vs pred {pred.shape}")
    t = np.asarray(true).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    if t.size and (t.min() < 0 or p.min() < 0):
        raise ValueError("labels must be non-negative integers")
    true_ids, t_idx = np.unique(t, return_inverse=True)
    pred_ids, p_idx = np.unique(p, return_inverse=True)
    # Joint histogram: overlap[i, j] = voxels with true id true_ids[i] and pred id pred_ids[j].
    overlap = np.bincount(t_idx * len(pred_ids) + p_idx, minlength=len(true_ids) * len(pred_ids))
    overlap = overlap.reshape(len(true_ids), len(pred_ids))
    # Drop the background row/column (id 0) when present.
    keep_t = true_ids != 0
    keep_p = pred_ids != 0
    area_t = overlap.sum(axis=1)[keep_t]
    area_p = overlap.sum(axis=0)[keep_p]
    inter = overlap[np.ix_(keep_t, keep_p)].astype(np.float64)
    union = area_t[:, None] + area_p[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou, true_ids[keep_t], pred_ids[keep_p]


def match_f1(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> MatchScore:
    """F1 of a one-to-one matching of objects with IoU >= ``threshold``.

    Args:
      true: integer labels (e.g. ZYX), 0 = background.
      pred: integer labels, same shape.
      threshold: minimum IoU for a pair to count as a true positive. At 0.5 or above a pair is
        unique anyway (two objects cannot both overlap one by more than half); below 0.5 the
        assignment keeps the count maximal.

    Returns:
      MatchScore with tp/fp/fn, precision, recall, f1 and the mean IoU of matched pairs.
    """
    iou, _, _ = iou_matrix(true, pred)
    return match_from_iou(iou, threshold)


def match_from_iou(iou: np.ndarray, threshold: float = 0.5) -> MatchScore:
    """:func:`match_f1` from an IoU matrix (n_true, n_pred) instead of label images."""
    iou = np.asarray(iou, dtype=np.float64)
    n_true, n_pred = iou.shape
    if n_true and n_pred:
        # Maximise the number of above-threshold pairs; the IoU term only breaks ties (scaled so
        # that all of it together is worth less than one more pair).
        eligible = iou >= threshold
        gain = eligible + iou * eligible / (min(n_true, n_pred) + 1)
        rows, cols = linear_sum_assignment(gain, maximize=True)
        ok = eligible[rows, cols]
        tp = int(ok.sum())
        matched_iou = float(iou[rows[ok], cols[ok]].mean()) if tp else float("nan")
    else:
        tp, matched_iou = 0, float("nan")
    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else (1.0 if not n_true else 0.0)
    recall = tp / n_true if n_true else 1.0
    denom = 2 * tp + fp + fn
    f1 = 2 * tp / denom if denom else 1.0
    return MatchScore(threshold, n_true, n_pred, tp, fp, fn, precision, recall, f1, matched_iou)
