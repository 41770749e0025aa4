"""Flattening a dataset's ground truth and a detections mapping into arrays the evaluators share."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from detector.data.records import Dataset


@dataclass(frozen=True)
class FlatGroundTruth:
    """Every object of a dataset, in record order then file order.

    image_index: int64 ``(G,)``, position of the object's record in ``dataset.records``.
    boxes: float64 ``(G, 4)``, project xyxy.
    labels: int64 ``(G,)``, ``1..C``.
    difficult, iscrowd: bool ``(G,)``.
    """

    image_index: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    iscrowd: np.ndarray


@dataclass(frozen=True)
class FlatDetections:
    """Every detection on a dataset's images, in record order then the order given per image.

    image_index: int64 ``(P,)``, position of the image's record in ``dataset.records``.
    boxes: float64 ``(P, 4)``, project xyxy.
    scores: float64 ``(P,)``.
    labels: int64 ``(P,)``, ``1..C``.
    num_dropped: detections whose image is not in the dataset (left out, with a warning).
    """

    image_index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    num_dropped: int = 0


def flatten_ground_truth(dataset: Dataset) -> FlatGroundTruth:
    records = dataset.records
    counts = np.fromiter((len(r.gt_labels) for r in records), dtype=np.int64, count=len(records))
    def cat(arrays, dtype, shape):
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(shape, dtype)
    return FlatGroundTruth(
        image_index=np.repeat(np.arange(len(records), dtype=np.int64), counts),
        boxes=cat([r.gt_boxes for r in records], np.float64, (0, 4)).reshape(-1, 4),
        labels=cat([r.gt_labels for r in records], np.int64, (0,)),
        difficult=cat([r.difficult for r in records], bool, (0,)),
        iscrowd=cat([r.iscrowd for r in records], bool, (0,)),
    )


def _numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def unpack(value) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes, scores, labels)`` of one image's detections: a tuple or an object with those attributes."""
    if hasattr(value, "boxes") and hasattr(value, "scores") and hasattr(value, "labels"):
        boxes, scores, labels = value.boxes, value.scores, value.labels
    else:
        boxes, scores, labels = value
    boxes = _numpy(boxes, np.float64).reshape(-1, 4)
    scores = _numpy(scores, np.float64).reshape(-1)
    labels = _numpy(labels, np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"detections: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels differ")
    return boxes, scores, labels


def warn_outside_dataset(path, detections: Mapping, known) -> int:
    """The rule of every result-file writer: detections of images not in ``known`` (a set or mapping of the
    dataset's image ids) are not written, and never silently: one warning counts them and their images.
    Returns the number of such detections."""
    outside = [k for k in detections if k not in known]
    dropped = sum(len(unpack(detections[k])[1]) for k in outside)
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} detections on {len(outside)} images that are not in the dataset",
                      stacklevel=3)
    return dropped


def flatten_detections(dataset: Dataset, detections: Mapping) -> FlatDetections:
    """Arrays of ``detections`` (image id -> ``(boxes float (N, 4) xyxy, scores (N,), labels (N,) 1..C)``).

    Images of the dataset without an entry have no detections; entries for other image ids are dropped
    and counted (with a warning). Labels outside ``1..C`` or non-finite values raise ``ValueError``.
    """
    index_of = {r.image_id: i for i, r in enumerate(dataset.records)}
    num_classes = dataset.vocab.num_classes
    parts, dropped = [], 0
    for image_id, value in detections.items():
        boxes, scores, labels = unpack(value)
        i = index_of.get(image_id)
        if i is None:
            dropped += len(scores)
            continue
        if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
            raise ValueError(f"detections of image {image_id}: labels must be in 1..{num_classes}")
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"detections of image {image_id}: boxes and scores must be finite")
        parts.append((i, boxes, scores, labels))
    if dropped:
        warnings.warn(f"dropped {dropped} detections on images that are not in the dataset", stacklevel=3)
    parts.sort(key=lambda p: p[0])  # record order, then the order given per image
    if not parts:
        return FlatDetections(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), dropped)
    return FlatDetections(
        image_index=np.concatenate([np.full(len(p[2]), p[0], dtype=np.int64) for p in parts]),
        boxes=np.concatenate([p[1] for p in parts]),
        scores=np.concatenate([p[2] for p in parts]),
        labels=np.concatenate([p[3] for p in parts]),
        num_dropped=dropped,
    )
