"""Precision/recall curves and the two PASCAL VOC average-precision variants.

Both follow the PASCAL VOC devkit (Everingham et al., "The PASCAL Visual Object Classes Challenge",
IJCV 2010) and, for the all-point variant, the ILSVRC devkit's ``VOCap.m``, which is the same routine:

- all-point (VOC2010+, ILSVRC): the precision is made monotone from the right (each point takes the
  largest precision at any higher recall), and the area under that step curve is summed at the points
  where the recall changes, with the sentinels recall 0 / precision 0 before and recall 1 / precision 0
  after the curve.
- 11-point (VOC2007): the mean over recall thresholds t = 0, 0.1, ..., 1 of the largest precision at a
  recall >= t (0 when the recall never reaches t). The thresholds are ``k / 10`` (0.3 is the double
  nearest 3/10, not ``3 * 0.1``), so a recall of exactly 3/10 counts for t = 0.3.
"""

from __future__ import annotations

import numpy as np


def precision_recall(tp: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Curves of a class's ranked detections.

    tp: bool ``(D,)``, true positive or false positive, detections ranked by descending confidence
        (detections that count as neither are already removed).
    num_positives: the class's positives (> 0).
    Returns ``recall, precision``, float64 ``(D,)``: cumulative ``tp / num_positives`` and ``tp / (tp + fp)``.
    """
    tp = np.asarray(tp, dtype=bool)
    cum_tp = np.cumsum(tp, dtype=np.float64)
    recall = cum_tp / float(num_positives)
    precision = cum_tp / np.arange(1, len(tp) + 1, dtype=np.float64)
    return recall, precision


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point AP (VOC2010+ and ILSVRC ``VOCap``) of curves ``(D,)`` ordered by rank."""
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    # Monotone from the right: mpre[i] = max(mpre[i:]).
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changed = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[changed] - mrec[changed - 1]) * mpre[changed]))


def average_precision_11point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point interpolated AP of curves ``(D,)`` ordered by rank."""
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    # best[i] = the largest precision at rank >= i, so max(precision[recall >= t]) = best[first i with
    # recall[i] >= t] because recall never decreases with rank.
    best = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    total = 0.0
    for k in range(11):
        first = np.searchsorted(recall, k / 10.0, side="left")
        total += (best[first] if first < len(recall) else 0.0) / 11.0  # summed as p/11, like the devkit
    return float(total)


def mean_of(values) -> float:
    """Mean of a collection of APs; 0.0 when empty (no class has positives)."""
    values = list(values)
    return float(np.mean(values)) if values else 0.0
