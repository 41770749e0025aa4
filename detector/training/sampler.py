"""R-CNN fine-tuning sampler: label proposals against the ground truth and draw a mini-batch of regions.

R-CNN (Girshick et al., 2014, section 2.3) fine-tunes on mini-batches of 128 regions drawn from the
proposals of a few images: 32 foreground regions (IoU >= 0.5 with a ground-truth box, labelled with that
box's class) and 96 background regions. Following Fast R-CNN (Girshick, 2015, section 2.3), background
regions are those whose maximum IoU with the ground truth lies in ``[0.1, 0.5)``; regions with a maximum
IoU in ``[0, 0.1)`` are ignored unless ``bg_iou_low`` is set to 0. Ground-truth boxes are added to the
proposals as positives. Box regression targets are kept for the foreground regions whose IoU is at least
``regression_iou`` (0.6 in R-CNN, appendix C).

R-CNN draws the foreground uniformly from an image's foreground regions, so a class of large objects
(many overlapping proposals each) or of many objects fills most of it: on BCCD, platelets (small, about
one per image) are 3% of the foreground regions and 7% of the objects. ``fg_balance="class"`` gives each
class present in the image an equal share of the image's foreground draw instead (mAP weighs every
class equally).

Every function here is deterministic given its ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.base.boxes import box_iou

IGNORE = -1  # label of a region that is neither foreground nor background
FG_BALANCE = ("none", "class")  # how foreground regions are drawn (SamplerConfig.fg_balance)


@dataclass(frozen=True)
class SamplerConfig:
    """How regions are labelled and drawn. Every threshold is an interval on the region's max IoU.

    regions_per_batch: regions per mini-batch, summed over its images (R-CNN: 128).
    images_per_batch: images a mini-batch draws from (R-CNN: 2).
    fg_fraction: share of foreground regions in a batch (R-CNN: 32 / 128 = 0.25); the batch is
        filled with background when an image has fewer foreground regions.
    fg_iou: foreground if max IoU in ``[fg_iou, 1]`` (R-CNN: 0.5).
    bg_iou_low, bg_iou_high: background if max IoU in ``[bg_iou_low, bg_iou_high)`` (Fast R-CNN:
        [0.1, 0.5)); regions in ``[0, bg_iou_low)`` and ``[bg_iou_high, fg_iou)`` are ignored.
    regression_iou: box regression on foreground regions with IoU in ``[regression_iou, 1]`` (R-CNN: 0.6).
    add_gt: add the ground-truth boxes to the proposals (as foreground with IoU 1).
    flip: mirror each image horizontally with probability 0.5.
    fg_balance: ``"none"`` (R-CNN): foreground drawn uniformly; ``"class"``: each class present in the image
        gets an equal share of the foreground draw (every region weighted by one over its class's
        number of foreground regions in the image).
    """

    regions_per_batch: int = 128
    images_per_batch: int = 2
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_low: float = 0.1
    bg_iou_high: float = 0.5
    regression_iou: float = 0.6
    add_gt: bool = True
    flip: bool = True
    fg_balance: str = "none"

    def __post_init__(self):
        if self.regions_per_batch < 1 or self.images_per_batch < 1:
            raise ValueError("sampler: regions_per_batch and images_per_batch must be at least 1")
        if not 0.0 <= self.fg_fraction <= 1.0:
            raise ValueError(f"sampler: fg_fraction must be in [0, 1], got {self.fg_fraction}")
        if not 0.0 <= self.bg_iou_low <= self.bg_iou_high <= self.fg_iou <= 1.0:
            raise ValueError("sampler: thresholds must satisfy 0 <= bg_iou_low <= bg_iou_high <= fg_iou <= 1, got "
                             f"{self.bg_iou_low}, {self.bg_iou_high}, {self.fg_iou}")
        if not 0.0 <= self.regression_iou <= 1.0:
            raise ValueError(f"sampler: regression_iou must be in [0, 1], got {self.regression_iou}")
        if self.fg_balance not in FG_BALANCE:
            raise ValueError(f"sampler: fg_balance must be one of {', '.join(FG_BALANCE)}, got '{self.fg_balance}'")

    @property
    def regions_per_image(self) -> int:
        return max(1, self.regions_per_batch // self.images_per_batch)

    @property
    def fg_per_image(self) -> int:
        return int(round(self.fg_fraction * self.regions_per_image))


@dataclass
class LabelledRegions:
    """Proposals of one image, labelled against its ground truth.

    boxes: float32 (N, 4), xyxy pixels of the image the proposals belong to.
    labels: int64 (N,), ``1..C`` foreground, ``0`` background, ``IGNORE`` (-1) neither.
    max_iou: float32 (N,), IoU with the best-matching ground-truth box (0 when there is none).
    matched_gt: float32 (N, 4), that ground-truth box (zeros when there is none).
    """

    boxes: np.ndarray
    labels: np.ndarray
    max_iou: np.ndarray
    matched_gt: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, index: np.ndarray) -> LabelledRegions:
        return LabelledRegions(self.boxes[index], self.labels[index], self.max_iou[index], self.matched_gt[index])


def label_regions(proposals: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                  config: SamplerConfig, ignore_gt: np.ndarray | None = None) -> LabelledRegions:
    """Label ``proposals`` (float32 (N, 4) xyxy) against ``gt_boxes`` (float32 (G, 4) xyxy, same image).

    gt_labels: int64 (G,), labels ``1..C``. ignore_gt: bool (G,), ground truth that must neither make
    a positive nor be added (VOC ``difficult``, COCO ``iscrowd``); a proposal whose best match is such a
    box is ignored rather than called background.
    """
    proposals = np.asarray(proposals, np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    ignore_gt = np.zeros(len(gt_boxes), bool) if ignore_gt is None else np.asarray(ignore_gt, bool)
    if config.add_gt and len(gt_boxes):
        proposals = np.concatenate([gt_boxes[~ignore_gt], proposals], axis=0)
    n = len(proposals)
    labels = np.full(n, IGNORE, np.int64)
    if len(gt_boxes) == 0:
        max_iou = np.zeros(n, np.float32)
        labels[(max_iou >= config.bg_iou_low) & (max_iou < config.bg_iou_high)] = 0
        return LabelledRegions(proposals, labels, max_iou, np.zeros((n, 4), np.float32))
    iou = box_iou(proposals, gt_boxes)  # (N, G)
    best = iou.argmax(axis=1)
    max_iou = iou[np.arange(n), best].astype(np.float32)
    matched_gt = gt_boxes[best]
    fg = max_iou >= config.fg_iou  # foreground: max IoU in [fg_iou, 1]
    bg = (max_iou >= config.bg_iou_low) & (max_iou < config.bg_iou_high)  # background: [low, high)
    labels[fg] = gt_labels[best[fg]]
    labels[bg] = 0
    if ignore_gt.any():
        # a region that overlaps an ignored box more than any counted one is left out; a region that
        # overlaps an ignored box at all is never used as background.
        labels[ignore_gt[best]] = IGNORE
        touches_ignored = (iou[:, ignore_gt] >= config.bg_iou_low).any(axis=1) if config.bg_iou_low > 0 else \
            (iou[:, ignore_gt] > 0).any(axis=1)
        labels[(labels == 0) & touches_ignored] = IGNORE
    return LabelledRegions(proposals, labels, max_iou, matched_gt)


def sample_regions(regions: LabelledRegions, num_regions: int, num_fg: int,
                   rng: np.random.Generator, fg_balance: str = "none") -> np.ndarray:
    """Indices (int64 (K,), K <= num_regions) of up to ``num_fg`` foreground regions and background for the rest.

    Foreground and background are drawn without replacement; when an image has fewer foreground
    regions than ``num_fg`` the rest of the batch is background (R-CNN). K is less than
    ``num_regions`` only when the image has too few labelled regions in all. fg_balance: see
    :class:`SamplerConfig` (``"class"``: a region's chance is one over its class's count of foreground regions).
    """
    fg = np.flatnonzero(regions.labels > 0)
    bg = np.flatnonzero(regions.labels == 0)
    take_fg = min(num_fg, len(fg))
    take_bg = min(num_regions - take_fg, len(bg))
    weights = None
    if fg_balance == "class" and take_fg:
        _, inverse, counts = np.unique(regions.labels[fg], return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        weights /= weights.sum()
    chosen_fg = rng.choice(fg, size=take_fg, replace=False, p=weights) if take_fg else fg[:0]
    chosen_bg = rng.choice(bg, size=take_bg, replace=False) if take_bg else bg[:0]
    return np.concatenate([chosen_fg, chosen_bg]).astype(np.int64)


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror ``xyxy`` boxes (float32 (N, 4)) of an image of width ``width``: ``x1' = W - x2, x2' = W - x1``."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def regression_mask(regions: LabelledRegions, config: SamplerConfig) -> np.ndarray:
    """bool (N,): foreground regions with IoU in ``[regression_iou, 1]``, the ones box regression learns from."""
    return (regions.labels > 0) & (regions.max_iou >= config.regression_iou)
