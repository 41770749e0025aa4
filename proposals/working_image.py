"""The working image every Selective Search implementation runs on: RGB ``uint8``, longest side
``max_side``. Shared by the native code (:mod:`proposals.selective_search`) and the other backends
(:mod:`proposals.backends`), so both see exactly the same pixels."""

from __future__ import annotations

import cv2
import numpy as np


def working_size(image_size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``(h, w)`` of the working image: the longest side scaled to ``max_side`` (None: unchanged)."""
    h, w = image_size
    if max_side is None:
        return h, w
    scale = max_side / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``uint8 (H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` -> contiguous ``uint8 (H, W, 3)``;
    ``ValueError`` for anything else."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"selective_search: expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"selective_search: expected an RGB image (H, W, 3), got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``uint8 (H, W, C)`` to ``size = (h, w)``: area averaging down, bilinear up."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return image
    shrink = size[0] * size[1] < h * w
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
