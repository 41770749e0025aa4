"""The GoogLeNet proposal recipe: Selective Search with superpixels twice as large, plus MultiBox.

Szegedy et al., "Going Deeper with Convolutions" (2014), section 8: doubling the superpixel size of
Selective Search halves its proposals; adding the 200 best MultiBox boxes (Erhan et al., CVPR 2014)
restores and raises the coverage of the objects, with about 60% of R-CNN's proposals.

Order of the merged list: Selective Search's own ranking, then MultiBox's (by confidence). A box whose
IoU with an earlier box of the list is in ``(duplicate_iou, 1]`` (0.95 by default) is a near-duplicate
and is dropped, so the list keeps the better-ranked copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import nms

from proposals.multibox import cached_multibox
from proposals.selective_search import selective_search


@dataclass(frozen=True)
class GoogLeNetRecipe:
    """ss_mode: Selective Search mode; superpixel_scale: multiplies every k of that mode (2 = the paper);
    multibox_top_k: MultiBox boxes added; duplicate_iou: a box is dropped when its IoU with an earlier box
    is in ``(duplicate_iou, 1]``; multibox_model: a MultiBox checkpoint (None: the shipped model)."""

    ss_mode: str = "fast"
    superpixel_scale: float = 2.0
    multibox_top_k: int = 200
    duplicate_iou: float = 0.95
    multibox_model: str | None = None

    def __post_init__(self):
        if not 0.0 < self.duplicate_iou <= 1.0:
            raise ValueError(f"duplicate_iou must be in (0, 1], got {self.duplicate_iou}")
        if self.multibox_top_k < 0:
            raise ValueError(f"multibox_top_k must be >= 0, got {self.multibox_top_k}")


def remove_near_duplicates(boxes: np.ndarray, duplicate_iou: float = 0.95) -> np.ndarray:
    """Indices of the boxes kept, in order: a box goes when its IoU with an earlier kept box is in
    ``(duplicate_iou, 1]``.

    boxes: float ``(N, 4)`` xyxy, best first. Returns int64 ``(M,)``, increasing.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    # NMS with the rank as the score: scores strictly decrease along the list (ties impossible).
    rank_scores = torch.arange(len(boxes), 0, -1, dtype=torch.float32)
    keep = nms(torch.from_numpy(boxes), rank_scores, duplicate_iou).numpy()
    return np.sort(keep).astype(np.int64)


def merge_proposals(ss_boxes: np.ndarray, multibox_boxes: np.ndarray,
                    duplicate_iou: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Selective Search's boxes, then MultiBox's, near-duplicates removed.

    ss_boxes: float ``(N, 4)`` xyxy pixels, Selective Search's ranking; multibox_boxes: float ``(M, 4)``
    xyxy pixels, best first. Returns ``(boxes, from_multibox)``: float32 ``(P, 4)`` xyxy and bool
    ``(P,)`` marking the boxes that came from MultiBox.
    """
    ss = np.asarray(ss_boxes, dtype=np.float32).reshape(-1, 4)
    mb = np.asarray(multibox_boxes, dtype=np.float32).reshape(-1, 4)
    boxes = np.concatenate([ss, mb])
    source = np.concatenate([np.zeros(len(ss), bool), np.ones(len(mb), bool)])
    keep = remove_near_duplicates(boxes, duplicate_iou)
    return boxes[keep], source[keep]


def googlenet_proposals(image: np.ndarray, recipe: GoogLeNetRecipe = GoogLeNetRecipe(),
                        multibox=None, **ss_options) -> np.ndarray:
    """The GoogLeNet recipe's proposals of one image.

    image: RGB uint8 ``(H, W, 3)``. multibox: a loaded :class:`proposals.multibox.MultiBox` (default: the
    recipe's checkpoint, loaded once per process). ss_options: further Selective Search options.
    Returns float32 ``(N, 4)`` xyxy pixels: Selective Search's boxes, then MultiBox's.
    """
    ss = selective_search(image, mode=recipe.ss_mode, superpixel_scale=recipe.superpixel_scale, **ss_options)
    if recipe.multibox_top_k == 0:
        mb = np.zeros((0, 4), np.float32)
    else:
        model = multibox or cached_multibox(str(Path(recipe.multibox_model)) if recipe.multibox_model else None)
        mb = model.propose([image], top_k=recipe.multibox_top_k)[0][0]
    return merge_proposals(ss, mb, recipe.duplicate_iou)[0]
