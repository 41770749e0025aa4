"""Post-processing: from per-region class scores and class-specific boxes to detections.

R-CNN (Girshick et al. 2014, section 2.2) scores every region for every class, then runs greedy
non-maximum suppression independently per class. Here, in order:

1. a score threshold per (region, class) pair (background is never a detection);
2. boxes clipped to the image, and pairs whose box has no area dropped;
3. per-class NMS with :func:`torchvision.ops.batched_nms`: a box is suppressed by a higher-scoring
   box of the same class with IoU in ``(nms_iou, 1]`` (R-CNN used 0.3);
4. the ``max_detections`` highest-scoring survivors across classes;
5. optionally (``box_voting``, off by default: R-CNN has no such step), box voting (Gidaris and
   Komodakis, "Object detection via a multi-region & semantic segmentation-aware CNN model", ICCV 2015):
   each survivor's box becomes the score-weighted mean of the same-class candidates of step 2
   (itself included) that overlap it with IoU >= ``box_voting``. Scores, labels and order stay; only
   the boxes move, towards where the many overlapping regression outputs agree.

For pictures only, :func:`suppress_across_classes` then removes cross-class duplicates (one object
labelled bishop, pawn and knight): class-agnostic NMS over the survivors. Evaluation never uses it (a
lower-scoring right class under a wrong one would be lost, and AP counts every class's ranking).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, nms

from detector.base.defaults import BOX_VOTING, MAX_DETECTIONS, NMS_IOU, SCORE_THRESHOLD
from detector.detections import Detections


@dataclass(frozen=True)
class PostprocessConfig:
    """score_threshold: keep (region, class) pairs with probability in ``[score_threshold, 1]``.
    nms_iou: suppress same-class boxes whose IoU with a kept, higher-scoring box is in ``(nms_iou, 1]``.
    max_detections: at most this many detections per image (all classes together), >= 1.
    box_voting: 0 (off), or the IoU in ``(0, 1]`` with a survivor at which a same-class candidate votes
        for its box (see the module docstring).
    """

    score_threshold: float = SCORE_THRESHOLD
    nms_iou: float = NMS_IOU
    max_detections: int = MAX_DETECTIONS
    box_voting: float = BOX_VOTING

    def __post_init__(self):
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {self.nms_iou}")
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {self.max_detections}")
        if not 0.0 <= self.box_voting <= 1.0:
            raise ValueError(f"box_voting must be 0 (off) or an IoU in (0, 1], got {self.box_voting}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PostprocessConfig:
        return cls(**data)


class Kept(NamedTuple):
    """Survivors of post-processing, highest score first.

    boxes: float32 ``(K, 4)`` xyxy, pixels, clipped to the image.
    scores: float32 ``(K,)`` class probabilities.
    labels: int64 ``(K,)`` in ``1..C``.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


def postprocess(class_probs: torch.Tensor, class_boxes: torch.Tensor, image_size: tuple[int, int],
                config: PostprocessConfig = PostprocessConfig()) -> Kept:
    """Threshold, clip, per-class NMS, top-k and (if ``config.box_voting``) box voting.

    class_probs: float ``(N, C + 1)`` probabilities per region, column 0 = background.
    class_boxes: float ``(N, 4 C)`` (or ``(N, C, 4)``) xyxy boxes per region and class, pixels;
        ``(N, 4)`` means one box per region shared by all classes.
    image_size: ``(h, w)`` of the image the boxes are in.
    """
    num_regions, num_outputs = class_probs.shape
    num_classes = num_outputs - 1
    boxes = class_boxes.float()
    if boxes.ndim == 2:
        boxes = boxes.reshape(num_regions, boxes.shape[1] // 4, 4)
    if boxes.shape[1] == 1:
        boxes = boxes.expand(num_regions, num_classes, 4)
    if boxes.shape[1] != num_classes:
        raise ValueError(f"{boxes.shape[1]} boxes per region for {num_classes} classes")
    scores = class_probs[:, 1:].float()
    region, cls = torch.nonzero(scores >= config.score_threshold, as_tuple=True)
    cand_scores = scores[region, cls]
    cand_boxes = clip_boxes_to_image(boxes[region, cls], tuple(image_size))
    has_area = (cand_boxes[:, 2] > cand_boxes[:, 0]) & (cand_boxes[:, 3] > cand_boxes[:, 1])
    cand_boxes, cand_scores, cand_labels = cand_boxes[has_area], cand_scores[has_area], cls[has_area] + 1
    keep = batched_nms(cand_boxes, cand_scores, cand_labels, config.nms_iou)[:config.max_detections]
    kept_boxes, kept_labels = cand_boxes[keep], cand_labels[keep]
    if config.box_voting > 0 and len(keep):
        kept_boxes = vote_boxes(kept_boxes, kept_labels, cand_boxes, cand_scores, cand_labels, config.box_voting)
    return Kept(kept_boxes, cand_scores[keep], kept_labels)


def vote_boxes(boxes: torch.Tensor, labels: torch.Tensor, cand_boxes: torch.Tensor, cand_scores: torch.Tensor,
               cand_labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Box voting: each of ``boxes`` (float ``(K, 4)`` xyxy, labels ``(K,)``) replaced by the mean of the
    candidates (``(M, 4)``, scores and labels ``(M,)``) of its label with IoU >= ``iou`` with it, weighted
    by their scores. Every box must be among the candidates (it then votes for itself with weight > 0)."""
    votes = (box_iou(boxes, cand_boxes) >= iou) & (labels[:, None] == cand_labels[None, :])
    weights = votes * cand_scores[None, :]
    return (weights @ cand_boxes) / weights.sum(dim=1, keepdim=True)


def suppress_across_classes(detections: Detections, iou: float) -> Detections:
    """Class-agnostic NMS after the per-class one, for display: a detection is dropped when a
    higher-scoring detection of any class overlaps it with IoU in ``(iou, 1]``
    (:func:`torchvision.ops.nms`). The survivors keep their order (highest score first), labels,
    names and ids. Not for evaluation (see the module's docstring).

    detections: one image's, boxes float32 ``(K, 4)`` xyxy pixels.
    iou: in ``(0, 1]``; 1 keeps everything but exact copies.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    if len(detections) < 2:
        return detections
    keep = nms(torch.as_tensor(np.asarray(detections.boxes, np.float32)),
               torch.as_tensor(np.asarray(detections.scores, np.float32)), iou)
    keep = np.sort(keep.numpy())  # the input order: highest score first, ties as they came
    return replace(detections, boxes=detections.boxes[keep], scores=detections.scores[keep],
                   labels=detections.labels[keep], class_names=tuple(detections.class_names[i] for i in keep),
                   class_ids=detections.class_ids[keep])
