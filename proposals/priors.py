"""MultiBox priors: k-means over ground-truth boxes with ``1 - IoU`` as the distance.

MultiBox (Erhan et al., CVPR 2014; Szegedy et al., arXiv 1412.1441) predicts each box as an offset
from one of K fixed *priors*; the priors are cluster centres of the training set's ground-truth boxes.
A prior, like every box here, is in normalized centre form ``(cx, cy, w, h)`` with each value in
``[0, 1]`` (fractions of the image width and height), so the distance ``1 - IoU`` compares position
and shape together, as the boxes the network must predict do.

The clustering is Lloyd's k-means seeded by k-means++ (Arthur & Vassilvitskii, 2007) under the
``1 - IoU`` distance; centres are the mean ``(cx, cy, w, h)`` of their members. Everything random
comes from ``numpy.random.default_rng(seed)``, so a seed gives the same priors on every machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from detector.base.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_normalized
from detector.base.errors import UserError
from detector.base.files import atomic_write
from detector.data.records import ImageRecord

PRIORS_FORMAT = "googlenet-detection/multibox-priors"
_CHUNK = 4096  # rows of the (N, K) IoU matrix computed at once, to bound memory on ILSVRC-sized sets


def cxcywh_iou(boxes: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """IoU matrix ``(N, K)`` of two sets of normalized ``(cx, cy, w, h)`` boxes (float64)."""
    a = cxcywh_to_xyxy(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    b = cxcywh_to_xyxy(np.asarray(centres, dtype=np.float64).reshape(-1, 4))
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    out = np.empty((len(a), len(b)), dtype=np.float64)
    for start in range(0, len(a), _CHUNK):
        rows = a[start:start + _CHUNK, None, :]
        iw = np.clip(np.minimum(rows[..., 2], b[:, 2]) - np.maximum(rows[..., 0], b[:, 0]), 0, None)
        ih = np.clip(np.minimum(rows[..., 3], b[:, 3]) - np.maximum(rows[..., 1], b[:, 1]), 0, None)
        inter = iw * ih
        union = area_a[start:start + _CHUNK, None] + area_b[None, :] - inter
        out[start:start + _CHUNK] = inter / np.maximum(union, 1e-12)
    return out


def normalized_gt_boxes(records: Iterable[ImageRecord]) -> np.ndarray:
    """Every record's ground-truth boxes as normalized ``(cx, cy, w, h)``, float64 ``(N, 4)``.

    Records need ``image_size``; boxes with no area (after clipping to the image) are dropped.
    """
    parts = []
    for record in records:
        if len(record.gt_boxes) == 0:
            continue
        if record.image_size is None:
            raise ValueError(f"image {record.image_id}: no image size in its annotation; priors need it")
        norm = np.clip(xyxy_to_normalized(record.gt_boxes.astype(np.float64), record.image_size), 0, 1)
        parts.append(xyxy_to_cxcywh(norm))
    if not parts:
        return np.zeros((0, 4), dtype=np.float64)
    boxes = np.concatenate(parts)
    return boxes[(boxes[:, 2] > 0) & (boxes[:, 3] > 0)]


def _kmeans_pp(boxes: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to distance squared."""
    n = len(boxes)
    chosen = [int(rng.integers(n))]
    nearest = 1.0 - cxcywh_iou(boxes, boxes[chosen[0]][None])[:, 0]
    for _ in range(1, k):
        weights = nearest ** 2
        total = weights.sum()
        if total <= 0:  # every box already coincides with a centre: the caller checked there are >= k distinct
            index = int(np.flatnonzero(nearest == nearest.max())[0])
        else:
            index = int(rng.choice(n, p=weights / total))
        chosen.append(index)
        nearest = np.minimum(nearest, 1.0 - cxcywh_iou(boxes, boxes[index][None])[:, 0])
    return boxes[chosen].copy()


def kmeans_priors(boxes: np.ndarray, k: int, seed: int = 0, max_iter: int = 100) -> np.ndarray:
    """Cluster normalized boxes into ``k`` priors with ``1 - IoU`` as the distance.

    boxes: ``(N, 4)`` normalized ``(cx, cy, w, h)``, each value in ``[0, 1]``, N >= k distinct boxes.
    Returns float32 ``(k, 4)`` normalized ``(cx, cy, w, h)`` centres, sorted by ``(cy, cx)`` (rows of the
    image first) so that equal inputs give identical arrays. Deterministic for a given ``seed``.
    Stops when no assignment changes or after ``max_iter`` Lloyd iterations.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    num_distinct = len(np.unique(boxes, axis=0))
    if num_distinct < k:
        raise ValueError(f"k-means needs at least k={k} distinct boxes, got {num_distinct}; lower k")
    rng = np.random.default_rng(seed)
    centres = _kmeans_pp(boxes, k, rng)
    assignment = np.full(len(boxes), -1)
    for _ in range(max_iter):
        iou = cxcywh_iou(boxes, centres)
        new_assignment = iou.argmax(axis=1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        distance = 1.0 - iou[np.arange(len(boxes)), assignment]
        counts = np.bincount(assignment, minlength=k)
        sums = np.zeros((k, 4))
        np.add.at(sums, assignment, boxes)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        # An empty cluster takes the box farthest from its own centre (ties: the lowest index).
        for cluster in np.flatnonzero(~filled):
            far = int(np.argmax(distance))
            centres[cluster] = boxes[far]
            distance[far] = -1.0
    order = np.lexsort((centres[:, 0], centres[:, 1]))
    return centres[order].astype(np.float32)


def mean_best_iou(boxes: np.ndarray, priors: np.ndarray) -> float:
    """Mean over ``boxes`` of the best IoU with any prior (both normalized ``(cx, cy, w, h)``).

    The k-means objective is ``1 -`` this value; it measures how well the priors cover the boxes.
    """
    if len(boxes) == 0:
        return 0.0
    return float(cxcywh_iou(boxes, priors).max(axis=1).mean())


def save_priors(path: str | Path, priors: np.ndarray, info: dict | None = None) -> None:
    """Write priors as JSON: ``{"format": ..., "priors": [[cx, cy, w, h], ...], **info}`` (atomically)."""
    head = {"format": PRIORS_FORMAT, "num_priors": int(len(priors)), **(info or {})}
    rows = [json.dumps([round(float(v), 7) for v in row]) for row in np.asarray(priors).reshape(-1, 4)]
    text = json.dumps(head, indent=1)[:-2] + ',\n "priors": [\n  ' + ",\n  ".join(rows) + "\n ]\n}\n"
    atomic_write(path, text)


def load_priors(path: str | Path) -> np.ndarray:
    """Priors written by :func:`save_priors`: float32 ``(K, 4)`` normalized ``(cx, cy, w, h)``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"priors file '{path}' not found; make one with tools/make_priors.py") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"priors file '{path}' is not JSON ({err}); make one with tools/make_priors.py") from None
    if not isinstance(data, dict) or data.get("format") != PRIORS_FORMAT:
        raise UserError(f"'{path}' is not a priors file; make one with tools/make_priors.py")
    priors = np.asarray(data.get("priors", []), dtype=np.float32)
    if priors.ndim != 2 or priors.shape[1] != 4 or len(priors) == 0 or not np.all((priors >= 0) & (priors <= 1)):
        raise UserError(f"priors file '{path}': 'priors' must be K rows of (cx, cy, w, h) in [0, 1]")
    return priors
