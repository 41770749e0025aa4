"""Drawing detections on an image: one colour per class, a box and a ``name score`` tag per detection.

Tags never hide each other: each is placed, best detection first, at the first free place among above
the box, inside it at the top, below it, inside it at the bottom, then the nearest free row above or
below the box; a tag that finds no free place in the whole image is left out (its box is still drawn).
The font size follows the image (about 1/60 of its longer side, at least 10 px)."""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detector.base.errors import UserError
from detector.base.files import atomic_path

MIN_FONT_PX = 10  # smaller tags cannot be read


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright RGB colour per label; neighbouring labels get distant hues (golden-ratio steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def font_size(image_size: tuple[int, int]) -> int:
    """Tag font size in pixels for an image of ``(h, w)``: 1/60 of the longer side, at least 10."""
    return max(MIN_FONT_PX, round(max(image_size) / 60))


def _overlaps(rect: tuple[float, float, float, float], taken: list[tuple[float, float, float, float]]) -> bool:
    x1, y1, x2, y2 = rect
    return any(x1 < b[2] and b[0] < x2 and y1 < b[3] and b[1] < y2 for b in taken)


def place_labels(boxes: np.ndarray, tag_sizes: list[tuple[float, float]],
                 image_size: tuple[int, int]) -> list[tuple[float, float, float, float] | None]:
    """Where each tag goes, so that no two tags overlap.

    boxes: float ``(K, 4)`` xyxy pixels, in the order of priority (best detection first).
    tag_sizes: ``K`` ``(width, height)`` of the tags in pixels.
    image_size: ``(h, w)``.
    Returns ``K`` rectangles ``(x1, y1, x2, y2)`` inside the image, pairwise disjoint (touching edges
    allowed), or ``None`` for a tag with no free place (or larger than the image).
    """
    h, w = image_size
    taken: list[tuple[float, float, float, float]] = []
    placed: list[tuple[float, float, float, float] | None] = []
    for (x1, y1, _x2, y2), (tw, th) in zip(np.asarray(boxes, dtype=float).reshape(-1, 4), tag_sizes):
        if tw > w or th > h:
            placed.append(None)
            continue
        tx = min(max(0.0, x1), w - tw)  # left-aligned with the box, inside the image
        # above the box, inside at the top, below the box, inside at the bottom; then those rows shifted
        # sideways; then the nearest rows above and below, one tag height apart, over the whole image
        near = [y1 - th, y1, y2, y2 - th]
        step = max(1.0, th)
        far = [y for k in range(1, int(h / step) + 2) for y in (y1 - th - k * step, y2 + k * step)]
        others = _columns(tx, tw, w)
        candidates = ([(tx, y) for y in near] + [(x, y) for y in near for x in others]
                      + [(x, y) for y in far for x in (tx, *others)])
        choice = None
        for x, y in candidates:
            if 0 <= y and y + th <= h:
                rect = (float(x), float(y), float(x + tw), float(y + th))
                if not _overlaps(rect, taken):
                    choice = rect
                    break
        if choice is not None:
            taken.append(choice)
        placed.append(choice)
    return placed


def _columns(tx: float, tw: float, w: float) -> list[float]:
    """Other left edges of a tag on the same row, nearest to ``tx`` first (one tag width apart)."""
    out = []
    for k in range(1, int(w / max(tw, 1.0)) + 2):
        for x in (tx + k * tw, tx - k * tw):
            if 0 <= x <= w - tw:
                out.append(x)
    return out


def draw_detections(image: np.ndarray, detections) -> np.ndarray:
    """A copy of ``image`` with the detections drawn.

    image: RGB ``uint8 (H, W, 3)``.
    detections: :class:`detector.pipeline.Detections` (boxes xyxy in pixels of ``image``).
    Returns: RGB ``uint8 (H, W, 3)``. Boxes are drawn lowest score first (the best on top), then the
    tags, placed by :func:`place_labels` with the best detection choosing first.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    h, w = image.shape[:2]
    line = max(2, round(max(h, w) / 400))
    try:
        font = ImageFont.load_default(size=font_size((h, w)))
    except TypeError:  # Pillow < 10.1: one small bitmap font
        font = ImageFont.load_default()
    for i in np.argsort(detections.scores, kind="stable"):
        x1, y1, x2, y2 = (float(v) for v in detections.boxes[i])
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=class_colour(int(detections.labels[i])), width=line)
    order = np.argsort(-np.asarray(detections.scores), kind="stable")  # the best detection places its tag first
    tags, sizes, offsets = [], [], []
    for i in order:
        tag = f"{detections.class_names[i]} {detections.scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tags.append(tag)
        sizes.append((right - left + 2 * line, bottom - top + 2 * line))
        offsets.append((line - left, line - top))
    boxes = np.asarray(detections.boxes, dtype=float).reshape(-1, 4)[order]
    for i, tag, rect, (dx, dy) in zip(order, tags, place_labels(boxes, sizes, (h, w)), offsets):
        if rect is None:
            continue
        tx, ty, tx2, ty2 = rect
        draw.rectangle([tx, ty, tx2 - 1, ty2 - 1], fill=class_colour(int(detections.labels[i])))
        draw.text((tx + dx, ty + dy), tag, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB ``uint8`` image atomically; the format follows the extension (.png, .jpg, ...)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot write '{path}': unknown image extension '{path.suffix}'; use .png or .jpg")
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=fmt)
