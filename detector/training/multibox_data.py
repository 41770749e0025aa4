"""Data for MultiBox: datasets named by a path, batches of whole resized images, validation recall.

A MultiBox batch is whole images resized to ``S x S`` (uint8; preloaded into shared memory when they fit
in a budget, else read when used: see :class:`ResizedImages`) with their
ground-truth boxes in normalized xyxy; horizontal flips are drawn per image. :class:`MultiBoxBatches`
returns batch ``i`` as a pure function of ``i`` (the contract of
:class:`detector.training.engine.BatchSource`), so a resumed run reads the same batches.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from tqdm import tqdm

from detector.base.boxes import box_iou, xyxy_to_normalized
from detector.base.errors import UserError
from detector.base.io import ImageError, load_image
from detector.data import Dataset, ImageRecord
from detector.training.bounded import MB, PRELOAD_MB, PackedDataset, packed


def normalized_targets(record: ImageRecord, image_size: tuple[int, int]) -> np.ndarray:
    """A record's boxes as float32 ``(G, 4)`` normalized xyxy, clipped to ``[0, 1]``; crowd boxes and boxes
    with no area dropped."""
    boxes = record.gt_boxes[~record.iscrowd] if len(record.iscrowd) else record.gt_boxes
    norm = np.clip(xyxy_to_normalized(boxes.astype(np.float32), image_size), 0.0, 1.0)
    return norm[(norm[:, 2] > norm[:, 0]) & (norm[:, 3] > norm[:, 1])].astype(np.float32)


class ResizedImages:
    """A dataset's images resized to ``S x S`` (uint8 ``(S, S, 3)``) with their normalized boxes.

    preload: read every image now (with a progress bar) into one array in shared memory, when they all
    fit in ``memory_mb`` (MiB; else, and without preload, every image is read when it is used: memory
    does not grow with the dataset). A preload is one copy for all processes: spawned data-loading
    workers map the same memory (a ``torch`` tensor in shared memory travels by handle), never a pickled
    copy each. Images that cannot be read are left out of a preload and listed in ``failed`` as ``(path,
    reason)``; read when used, one that fails is replaced by the next readable image, listed, and not
    tried again by that process.
    """

    def __init__(self, dataset: Dataset | PackedDataset, input_size: int, preload: bool = True,
                 progress: bool = True, memory_mb: float = PRELOAD_MB):
        if memory_mb < 0:
            raise ValueError(f"memory_mb must be >= 0, got {memory_mb}")
        self.dataset = dataset
        self.input_size = input_size
        self.memory_mb = memory_mb
        self.indices = np.arange(len(dataset))
        self.failed: list[tuple[str, str]] = []
        self._unreadable: set[int] = set()
        self._pixels: torch.Tensor | None = None  # uint8 (K, S, S, 3) in shared memory, when preloaded
        self._targets: list[np.ndarray] = []
        self._packed: PackedDataset | None = None
        self.preloaded = bool(preload) and self.preload_bytes(len(dataset), input_size) <= memory_mb * MB
        if self.preloaded:
            self._preload(progress)
        if not len(self.indices):
            raise UserError(f"no readable image in dataset '{dataset.name or dataset.image_root}'"
                            + (f" ({self.failed[0][0]}: {self.failed[0][1]})" if self.failed else ""))

    @staticmethod
    def preload_bytes(num_images: int, input_size: int) -> int:
        """Bytes a preload of ``num_images`` images at ``input_size`` px takes."""
        return num_images * input_size * input_size * 3

    def _preload(self, progress: bool) -> None:
        s, rows = self.input_size, 0
        pixels = torch.empty((len(self.dataset), s, s, 3), dtype=torch.uint8).share_memory_()
        array = pixels.numpy()
        kept = []
        for index in tqdm(range(len(self.dataset)), desc="reading images", unit="img", disable=not progress,
                          mininterval=0.5):
            loaded = self._read(index)
            if loaded is not None:
                array[rows], target = loaded
                self._targets.append(target)
                kept.append(index)
                rows += 1
        self._pixels = pixels[:rows]
        self.indices = np.array(kept, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        record = self.dataset[index]
        path = self.dataset.image_path(record)
        try:
            image = load_image(path)
        except ImageError as err:
            self.failed.append((str(path), str(err)))
            self._unreadable.add(index)
            print(f"warning: skipping unreadable image {path}: {err}", file=sys.stderr)
            return None
        s = self.input_size
        small = cv2.resize(image, (s, s), interpolation=cv2.INTER_AREA)
        return small, normalized_targets(record, image.shape[:2])

    def get(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``position``-th usable image ``(S, S, 3)`` uint8 and its boxes ``(G, 4)`` normalized xyxy."""
        n = len(self.indices)
        if self._pixels is not None:
            row = position % n
            return self._pixels[row].numpy(), self._targets[row]
        for step in range(n):
            index = int(self.indices[(position + step) % n])
            if index not in self._unreadable:
                loaded = self._read(index)
                if loaded is not None:
                    return loaded
        raise UserError("no readable image left in the dataset")

    def __getstate__(self) -> dict:
        """What a spawned worker receives: the records packed into arrays, the preload (if any) by its
        shared memory's handle."""
        if self._packed is None:
            self._packed = packed(self.dataset)  # once, however many workers
        state = self.__dict__.copy()
        state.update(dataset=self._packed, _packed=None)
        return state


@dataclass(frozen=True)
class BatchConfig:
    """batch_size: images per batch and process; flip: random horizontal flips (probability 0.5);
    seed: the data order and flips."""

    batch_size: int = 8
    flip: bool = True
    seed: int = 0


class MultiBoxBatches:
    """Batches for :func:`detector.training.engine.train`; ``batch(i)`` depends on ``i`` alone.

    Each epoch is a permutation of the images drawn from ``(seed, epoch)``; iteration ``i`` of process
    ``rank`` takes the slots ``(i * world_size + rank) * B ..`` of the concatenated epochs, so processes
    read disjoint images. Returns ``{"images": uint8 (B, S, S, 3), "boxes": B float32 tensors (G_b, 4)}``.
    """

    def __init__(self, images: ResizedImages, config: BatchConfig, rank: int = 0, world_size: int = 1):
        self.images, self.config, self.rank, self.world_size = images, config, rank, world_size
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.images))
        return self._orders[epoch]

    def batch(self, iteration: int) -> dict:
        n, b = len(self.images), self.config.batch_size
        start = (iteration * self.world_size + self.rank) * b
        rng = np.random.default_rng([self.config.seed, iteration, self.rank, 1])
        images, boxes = [], []
        for slot in range(start, start + b):
            epoch, position = divmod(slot, n)
            image, gt = self.images.get(int(self._order(epoch)[position]))
            if self.config.flip and rng.random() < 0.5:
                image = image[:, ::-1]
                gt = np.stack([1.0 - gt[:, 2], gt[:, 1], 1.0 - gt[:, 0], gt[:, 3]], axis=1).astype(np.float32)
            images.append(np.ascontiguousarray(image))
            boxes.append(torch.from_numpy(gt.reshape(-1, 4)))
        return {"images": torch.from_numpy(np.stack(images)), "boxes": boxes}


def to_input(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` -> normalized float ``(B, 3, S, S)`` on the same device."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def proposal_quality(pred_boxes: list[np.ndarray], gt_boxes: list[np.ndarray]) -> dict[str, float]:
    """Recall at IoU 0.5 and 0.7, MABO and boxes per image of proposals against ground truth.

    pred_boxes, gt_boxes: per image, ``(N, 4)`` and ``(G, 4)`` xyxy in the same coordinates (IoU does not
    change when both axes are scaled, so normalized coordinates give the pixel answer). A ground-truth
    box counts as recalled at t when some proposal has IoU >= t with it; MABO is the mean over
    ground-truth boxes of the best IoU.
    """
    best = [box_iou(gt, pred).max(axis=1) if len(pred) else np.zeros(len(gt), np.float32)
            for pred, gt in zip(pred_boxes, gt_boxes) if len(gt)]
    best = np.concatenate(best) if best else np.zeros(0, np.float32)
    if len(best) == 0:
        return {"recall_0.5": float("nan"), "recall_0.7": float("nan"), "mabo": float("nan"),
                "boxes_per_image": float(np.mean([len(p) for p in pred_boxes])) if pred_boxes else 0.0}
    return {"recall_0.5": float((best >= 0.5).mean()), "recall_0.7": float((best >= 0.7).mean()),
            "mabo": float(best.mean()), "boxes_per_image": float(np.mean([len(p) for p in pred_boxes]))}
