"""How well proposals cover ground truth: recall at an IoU, MABO, and recall against proposal count.

Definitions (as in Uijlings et al. 2013 and Hosang et al., "What makes for effective detection
proposals?", 2015):

- best overlap of a ground-truth box: the largest IoU of any proposal with it (0 with no proposals);
- recall at IoU t: the fraction of ground-truth boxes whose best overlap is at least t;
- MABO here: the mean over ground-truth boxes of the best overlap (the paper's ABO of all
  objects; its per-class mean is not used because proposals are class-agnostic).

IoU is on the project's continuous boxes (:func:`detector.boxes.box_iou`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detector.boxes import box_iou

DEFAULT_COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def best_overlaps(gt_boxes: np.ndarray, boxes: np.ndarray, counts=None) -> np.ndarray:
    """Best IoU of each ground-truth box over the proposals.

    gt_boxes: float32 ``(G, 4)``; boxes: float32 ``(N, 4)`` best-first, both xyxy in the same pixels.
    counts: optional increasing proposal counts; then returns ``(G, len(counts))``, column ``j`` the
    best overlap using only the first ``counts[j]`` proposals. Otherwise returns ``(G,)``.
    """
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    g = len(gt_boxes)
    if counts is None:
        if g == 0 or len(boxes) == 0:
            return np.zeros(g, np.float64)
        return box_iou(gt_boxes, boxes).max(axis=1).astype(np.float64)
    counts = np.asarray(counts, np.int64)
    if g == 0 or len(boxes) == 0:
        return np.zeros((g, len(counts)), np.float64)
    running = np.maximum.accumulate(box_iou(gt_boxes, boxes), axis=1)
    return running[:, np.minimum(counts, len(boxes)) - 1].astype(np.float64)


@dataclass
class RecallAccumulator:
    """Collects best overlaps image by image; ``summary()`` gives the figures of one method."""

    counts: tuple[int, ...] = DEFAULT_COUNTS
    best: list[np.ndarray] = field(default_factory=list)  # per image (G,)
    curve: list[np.ndarray] = field(default_factory=list)  # per image (G, len(counts))
    num_boxes: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add(self, gt_boxes: np.ndarray, boxes: np.ndarray, seconds: float | None = None) -> None:
        """gt_boxes ``(G, 4)`` and proposals ``(N, 4)`` (best-first) of one image, xyxy pixels."""
        curve = best_overlaps(gt_boxes, boxes, self.counts)
        self.curve.append(curve)
        self.best.append(curve[:, -1] if len(boxes) <= self.counts[-1] else best_overlaps(gt_boxes, boxes))
        self.num_boxes.append(len(boxes))
        if seconds is not None:
            self.seconds.append(seconds)

    def summary(self) -> dict:
        """``recall@0.5``, ``recall@0.7``, ``mabo``, ``boxes_per_image``, ``seconds_per_image`` (mean and
        median), ``num_images``, ``num_gt`` and ``recall_curve`` (recall@0.5 and @0.7 per count)."""
        best = np.concatenate(self.best) if self.best else np.zeros(0)
        curve = np.concatenate(self.curve) if self.curve else np.zeros((0, len(self.counts)))
        num_gt = len(best)

        def frac(x):
            return float(x.mean()) if num_gt else 0.0

        return {
            "num_images": len(self.num_boxes),
            "num_gt": num_gt,
            "recall@0.5": frac(best >= 0.5),
            "recall@0.7": frac(best >= 0.7),
            "mabo": frac(best),
            "boxes_per_image": float(np.mean(self.num_boxes)) if self.num_boxes else 0.0,
            "seconds_per_image": float(np.mean(self.seconds)) if self.seconds else None,
            "median_seconds_per_image": float(np.median(self.seconds)) if self.seconds else None,
            "recall_curve": {
                "counts": list(self.counts),
                "recall@0.5": [frac(curve[:, j] >= 0.5) for j in range(len(self.counts))],
                "recall@0.7": [frac(curve[:, j] >= 0.7) for j in range(len(self.counts))],
            },
        }


def evaluation_boxes(record) -> np.ndarray:
    """The ground-truth boxes proposals are scored against: all but COCO crowd and VOC difficult ones."""
    keep = ~(record.iscrowd | record.difficult)
    return record.gt_boxes[keep]
