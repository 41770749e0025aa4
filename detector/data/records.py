"""The one record type every dataset reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.base.vocab import Vocabulary


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


def _empty_labels() -> np.ndarray:
    return np.zeros((0,), dtype=np.int64)


def _empty_flags() -> np.ndarray:
    return np.zeros((0,), dtype=bool)


@dataclass
class ImageRecord:
    """One image and its ground truth, in the project's box convention.

    image_id: the dataset's image id (ILSVRC list id, COCO image id, or the VOC file stem).
    file_name: path of the image relative to the dataset's image root (or absolute).
    image_size: ``(h, w)`` when the annotation gives it, else ``None``.
    gt_boxes: float32 ``(G, 4)``, xyxy, pixels of the original image.
    gt_labels: int64 ``(G,)``, contiguous labels ``1..C`` of the dataset's vocabulary.
    difficult: bool ``(G,)``, VOC's ``difficult`` flag (neither positive nor false positive in VOC eval).
    iscrowd: bool ``(G,)``, COCO's ``iscrowd`` flag.
    """

    image_id: int | str
    file_name: str
    image_size: tuple[int, int] | None = None
    gt_boxes: np.ndarray = field(default_factory=_empty_boxes)
    gt_labels: np.ndarray = field(default_factory=_empty_labels)
    difficult: np.ndarray = field(default_factory=_empty_flags)
    iscrowd: np.ndarray = field(default_factory=_empty_flags)

    def __post_init__(self):
        self.gt_boxes = np.asarray(self.gt_boxes, dtype=np.float32).reshape(-1, 4)
        g = len(self.gt_boxes)
        self.gt_labels = np.asarray(self.gt_labels, dtype=np.int64).reshape(-1)
        self.difficult = np.zeros(g, bool) if len(self.difficult) == 0 and g else np.asarray(self.difficult, bool)
        self.iscrowd = np.zeros(g, bool) if len(self.iscrowd) == 0 and g else np.asarray(self.iscrowd, bool)
        if not (len(self.gt_labels) == len(self.difficult) == len(self.iscrowd) == g):
            raise ValueError(f"image {self.image_id}: boxes, labels and flags differ in length")


@dataclass
class Dataset:
    """A list of records, their vocabulary and where the image files are."""

    records: list[ImageRecord]
    vocab: Vocabulary
    image_root: Path | None = None
    name: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.records[index]

    def image_path(self, record: ImageRecord) -> Path:
        path = Path(record.file_name)
        if path.is_absolute() or self.image_root is None:
            return path
        return self.image_root / path
