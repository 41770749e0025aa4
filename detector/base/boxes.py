"""The project's one box convention, and every conversion to and from it.

Inside the project a box is ``float32 [x1, y1, x2, y2]`` in continuous pixel coordinates of the
original image: the pixel at (row r, column c) covers ``[c, c+1) x [r, r+1)``, so a box that covers
pixels ``xmin..xmax`` (inclusive, 0-based) is ``[xmin, ., xmax + 1, .]`` and its width is ``x2 - x1``.
Valid boxes satisfy ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``. Image sizes are ``(height, width)``.

Conversions happen only at input and output:

- PASCAL VOC / ILSVRC XML and the ILSVRC submission format: 1-based, inclusive pixel indices.
  ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` and back.
- COCO: ``[x, y, w, h]`` in continuous coordinates (the same origin as ours).
- Normalized: ``[x1/W, y1/H, x2/W, y2/H]`` (MultiBox) and centre form ``(cx, cy, w, h)``.

Every function takes and returns numpy ``(N, 4)`` arrays (dtype kept for floats, integers become
``float32``), never mutating its input. This module is numpy only, so that reading and scoring result
files never imports torch; the torch stages use :mod:`torchvision.ops` (``clip_boxes_to_image``,
``box_convert``, ``box_iou``), which follow the same continuous convention.
"""

from __future__ import annotations

import numpy as np

ArrayLike = np.ndarray


def _as_float(boxes) -> np.ndarray:
    boxes = np.asarray(boxes)
    if boxes.dtype.kind != "f":
        boxes = boxes.astype(np.float32)
    return boxes.reshape(-1, 4) if boxes.size == 0 else boxes


def _stack(columns, like: np.ndarray) -> np.ndarray:
    return np.stack(columns, axis=-1).astype(like.dtype, copy=False)


def voc_to_xyxy(boxes: ArrayLike) -> ArrayLike:
    """VOC/ILSVRC ``[xmin, ymin, xmax, ymax]`` (1-based, inclusive) -> project ``xyxy``."""
    b = _as_float(boxes)
    return _stack([b[..., 0] - 1, b[..., 1] - 1, b[..., 2], b[..., 3]], b)


def xyxy_to_voc(boxes: ArrayLike) -> ArrayLike:
    """Project ``xyxy`` -> VOC/ILSVRC ``[xmin, ymin, xmax, ymax]`` (1-based, inclusive).

    Values stay fractional; round at the writer if integers are wanted.
    """
    b = _as_float(boxes)
    return _stack([b[..., 0] + 1, b[..., 1] + 1, b[..., 2], b[..., 3]], b)


def coco_to_xyxy(boxes: ArrayLike) -> ArrayLike:
    """COCO ``[x, y, w, h]`` -> project ``xyxy``."""
    b = _as_float(boxes)
    return _stack([b[..., 0], b[..., 1], b[..., 0] + b[..., 2], b[..., 1] + b[..., 3]], b)


def xyxy_to_coco(boxes: ArrayLike) -> ArrayLike:
    """Project ``xyxy`` -> COCO ``[x, y, w, h]``."""
    b = _as_float(boxes)
    return _stack([b[..., 0], b[..., 1], b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], b)


def xyxy_to_cxcywh(boxes: ArrayLike) -> ArrayLike:
    """``xyxy`` -> centre form ``(cx, cy, w, h)`` in the same units."""
    b = _as_float(boxes)
    w = b[..., 2] - b[..., 0]
    h = b[..., 3] - b[..., 1]
    return _stack([b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h], b)


def cxcywh_to_xyxy(boxes: ArrayLike) -> ArrayLike:
    """Centre form ``(cx, cy, w, h)`` -> ``xyxy`` in the same units."""
    b = _as_float(boxes)
    return _stack(
        [b[..., 0] - 0.5 * b[..., 2], b[..., 1] - 0.5 * b[..., 3],
         b[..., 0] + 0.5 * b[..., 2], b[..., 1] + 0.5 * b[..., 3]], b)


def xyxy_to_normalized(boxes: ArrayLike, image_size: tuple[int, int]) -> ArrayLike:
    """Pixels of an image of ``image_size = (h, w)`` -> ``[0, 1]`` coordinates."""
    h, w = image_size
    b = _as_float(boxes)
    return _stack([b[..., 0] / w, b[..., 1] / h, b[..., 2] / w, b[..., 3] / h], b)


def normalized_to_xyxy(boxes: ArrayLike, image_size: tuple[int, int]) -> ArrayLike:
    """``[0, 1]`` coordinates -> pixels of an image of ``image_size = (h, w)``."""
    h, w = image_size
    b = _as_float(boxes)
    return _stack([b[..., 0] * w, b[..., 1] * h, b[..., 2] * w, b[..., 3] * h], b)


def scale_boxes(boxes: ArrayLike, scale_x: float, scale_y: float | None = None) -> ArrayLike:
    """Boxes of an image resized by ``(scale_x, scale_y)`` (``scale_y`` defaults to ``scale_x``)."""
    scale_y = scale_x if scale_y is None else scale_y
    b = _as_float(boxes)
    return _stack([b[..., 0] * scale_x, b[..., 1] * scale_y, b[..., 2] * scale_x, b[..., 3] * scale_y], b)


def clip_boxes(boxes: ArrayLike, image_size: tuple[int, int]) -> ArrayLike:
    """Clip ``xyxy`` boxes to ``[0, W] x [0, H]`` for ``image_size = (h, w)``."""
    h, w = image_size
    b = _as_float(boxes)
    return _stack([np.clip(b[..., 0], 0, w), np.clip(b[..., 1], 0, h),
                   np.clip(b[..., 2], 0, w), np.clip(b[..., 3], 0, h)], b)


def box_areas(boxes: ArrayLike) -> ArrayLike:
    """Areas ``(x2 - x1) * (y2 - y1)``, shape ``(N,)``; degenerate boxes give 0 or less."""
    b = _as_float(boxes)
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def valid_box_mask(boxes: ArrayLike, min_size: float = 0.0) -> ArrayLike:
    """Mask of boxes with positive width and height larger than ``min_size``."""
    b = _as_float(boxes)
    return ((b[..., 2] - b[..., 0]) > min_size) & ((b[..., 3] - b[..., 1]) > min_size)


def box_iou(boxes_a: ArrayLike, boxes_b: ArrayLike) -> np.ndarray:
    """IoU matrix ``float32 (N, M)`` of two sets of ``xyxy`` boxes (continuous areas).

    The same arithmetic as :func:`torchvision.ops.box_iou` in ``float32`` (intersection clamped at 0,
    union = area_a + area_b - intersection), so both give the same numbers.
    """
    a = np.asarray(boxes_a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float32).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / union
