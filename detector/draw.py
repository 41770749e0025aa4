"""Drawing detections on an image: one colour per class, a box and a ``name score`` tag per detection."""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detector.base.errors import UserError
from detector.base.files import atomic_path


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright RGB colour per label; neighbouring labels get distant hues (golden-ratio steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, detections) -> np.ndarray:
    """A copy of ``image`` with the detections drawn.

    image: RGB ``uint8 (H, W, 3)``.
    detections: :class:`detector.pipeline.Detections` (boxes xyxy in pixels of ``image``).
    Returns: RGB ``uint8 (H, W, 3)``.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    h, w = image.shape[:2]
    line = max(2, round(max(h, w) / 400))
    try:
        font = ImageFont.load_default(size=max(12, round(max(h, w) / 60)))
    except TypeError:  # Pillow < 10.1: one small bitmap font
        font = ImageFont.load_default()
    # lowest score first, so the best detections end up on top
    for i in np.argsort(detections.scores, kind="stable"):
        x1, y1, x2, y2 = (float(v) for v in detections.boxes[i])
        colour = class_colour(int(detections.labels[i]))
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour, width=line)
        tag = f"{detections.class_names[i]} {detections.scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tag_w, tag_h = right - left + 2 * line, bottom - top + 2 * line
        ty = y1 - tag_h if y1 - tag_h >= 0 else y1  # above the box, or inside it at the top edge
        tx = min(max(0.0, x1), max(0.0, w - tag_w))
        draw.rectangle([tx, ty, tx + tag_w, ty + tag_h], fill=colour)
        draw.text((tx + line - left, ty + line - top), tag, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB ``uint8`` image atomically; the format follows the extension (.png, .jpg, ...)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot write '{path}': unknown image extension '{path.suffix}'; use .png or .jpg")
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=fmt)
