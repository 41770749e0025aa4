"""What a training process holds, whatever the dataset's size: records as a few arrays, caches sized in bytes.

At ILSVRC size (480,000 images, 200 classes) two things used to grow with the number of images N in every
data-loading worker: the dataset itself, pickled once per worker as 480,000 Python objects (109 MB and
18 s per worker), and per-process caches of every decoded image and every image's proposals visited
(0.68 MB per image: 15 workers fill 128 GB after about 80,000 images). This module replaces both:

- :class:`PackedDataset`: a :class:`detector.data.records.Dataset`'s records as a handful of numpy arrays
  (boxes, labels and flags concatenated with offsets, file names as one UTF-8 buffer with offsets). It
  answers ``len``, ``[i]`` (an :class:`ImageRecord`, built on demand) and ``image_path(record)``, as a
  ``Dataset`` does, and pickles as a few buffers: what a spawned worker receives.
- :class:`ByteCache`: a least-recently-used cache of arrays bounded by their bytes, which turns itself
  off when the first value shows that the whole dataset would not fit (an LRU over a new random order
  each epoch would hold the whole budget for a hit rate of budget / dataset).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from detector.base.vocab import Vocabulary
from detector.data.records import Dataset, ImageRecord

MB = 1 << 20

# Defaults (plain values: the tools read them before torch is imported)
IMAGE_CACHE_MB = 256
"""Decoded images a training process keeps by default, in MiB: a set whose decoded images all fit (a few
hundred small photos) is decoded once per process; a larger one (chess's 289 photos of 2048 x 1371 take
2.4 GB, 20,000 ILSVRC images 11 GB) is decoded each time an image is used (~5 ms for 500 x 375)."""
PROPOSAL_CACHE_MB = 0
"""Proposals a training process keeps by default, in MiB: none, a store lookup costs ~0.03 ms."""
PRELOAD_MB = 1024
"""MultiBox: the most memory a preload of resized images takes by default, in MiB (6,800 images at 224 px,
150 KB each). A larger set is read (decoded and resized) each time an image is used."""

# flags of a ground-truth box in PackedDataset.flags
_DIFFICULT, _ISCROWD = 1, 2


def _pack_strings(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 buffer (uint8) and int64 offsets ``(N + 1,)``."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


class PackedDataset:
    """A dataset's records as arrays; reads like a :class:`Dataset` (``len``, ``[i]``, ``image_path``).

    Arrays (N images, M ground-truth boxes in all): ``box_offsets`` int64 ``(N + 1,)``, image ``i``'s
    boxes are rows ``box_offsets[i]:box_offsets[i + 1]`` of ``gt_boxes`` float32 ``(M, 4)`` (xyxy, pixels
    of the original image), ``gt_labels`` int32 ``(M,)`` and ``flags`` uint8 ``(M,)`` (difficult,
    iscrowd); ``image_sizes`` int32 ``(N, 2)`` ``(h, w)``, ``-1`` where unknown; file names and (when
    not all whole numbers) image ids as UTF-8 buffers with offsets. About 32 bytes per image, 21 per
    box and the file name: 480,000 ILSVRC records take ~65 MB and unpickle in ~0.15 s (as objects: 121 MB
    and 18-30 s).
    """

    def __init__(self, dataset: Dataset):
        records = dataset.records
        self.vocab: Vocabulary = dataset.vocab
        self.image_root: Path | None = dataset.image_root
        self.name: str = dataset.name
        counts = np.fromiter((len(r.gt_boxes) for r in records), np.int64, len(records))
        self.box_offsets = np.zeros(len(records) + 1, np.int64)
        np.cumsum(counts, out=self.box_offsets[1:])
        total = int(self.box_offsets[-1])

        def cat(arrays, dtype, shape):
            return np.concatenate(arrays).astype(dtype, copy=False) if total else np.zeros(shape, dtype)

        self.gt_boxes = cat([r.gt_boxes for r in records], np.float32, (0, 4)).reshape(-1, 4)
        self.gt_labels = cat([r.gt_labels for r in records], np.int32, (0,))
        self.flags = (cat([r.difficult for r in records], np.uint8, (0,)) * _DIFFICULT
                      | cat([r.iscrowd for r in records], np.uint8, (0,)) * _ISCROWD)
        self.image_sizes = np.array([r.image_size if r.image_size is not None else (-1, -1) for r in records],
                                    np.int32).reshape(-1, 2)
        self._names, self._name_offsets = _pack_strings([r.file_name for r in records])
        ids = [r.image_id for r in records]
        if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
            self._int_ids: np.ndarray | None = np.array(ids, np.int64)
            self._ids, self._id_offsets = None, None
        else:  # strings (VOC's file stems); anything else is kept as its str
            self._int_ids = None
            self._ids, self._id_offsets = _pack_strings([str(i) for i in ids])

    def __len__(self) -> int:
        return len(self.box_offsets) - 1

    def file_name(self, index: int) -> str:
        return bytes(self._names[self._name_offsets[index]:self._name_offsets[index + 1]]).decode("utf-8")

    def image_id(self, index: int) -> int | str:
        if self._int_ids is not None:
            return int(self._int_ids[index])
        return bytes(self._ids[self._id_offsets[index]:self._id_offsets[index + 1]]).decode("utf-8")

    def __getitem__(self, index: int) -> ImageRecord:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index %= len(self)
        lo, hi = self.box_offsets[index], self.box_offsets[index + 1]
        size = tuple(int(v) for v in self.image_sizes[index])
        flags = self.flags[lo:hi]
        return ImageRecord(self.image_id(index), self.file_name(index), None if size[0] < 0 else size,
                           self.gt_boxes[lo:hi], self.gt_labels[lo:hi].astype(np.int64),
                           (flags & _DIFFICULT) > 0, (flags & _ISCROWD) > 0)

    def image_path(self, record: ImageRecord) -> Path:
        """The same rule as :meth:`Dataset.image_path`: relative file names are under ``image_root``."""
        path = Path(record.file_name)
        if path.is_absolute() or self.image_root is None:
            return path
        return self.image_root / path

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what a worker receives, about)."""
        arrays = [self.box_offsets, self.gt_boxes, self.gt_labels, self.flags, self.image_sizes, self._names,
                  self._name_offsets, self._int_ids, self._ids, self._id_offsets]
        return sum(a.nbytes for a in arrays if a is not None)


def packed(dataset: Dataset | PackedDataset) -> PackedDataset:
    """``dataset`` as a :class:`PackedDataset` (itself if it is one)."""
    return dataset if isinstance(dataset, PackedDataset) else PackedDataset(dataset)


def _nbytes(value) -> int:
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 0))


class ByteCache:
    """Values (numpy arrays, or tuples of them) by key, least recently used first out, at most
    ``budget_mb`` megabytes (MiB) of array bytes; ``0``: off.

    expected_items: how many distinct keys the owner will ask for (its dataset's size), or None. On the
    first :meth:`put`, when ``expected_items`` values of that size would not fit in the budget, the cache
    turns itself off for good (:attr:`enabled` False): a dataset larger than the budget is read each time
    it is needed. Otherwise the budget still bounds it (images of uneven sizes) by evicting the least
    recently used values.
    """

    def __init__(self, budget_mb: float, expected_items: int | None = None):
        if budget_mb < 0:
            raise ValueError(f"a cache budget must be >= 0 MB, got {budget_mb}")
        self.budget = int(budget_mb * MB)
        self.expected_items = expected_items
        self.enabled = self.budget > 0
        self.nbytes = 0
        self._values: OrderedDict = OrderedDict()
        self._decided = False

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key):
        """The value of ``key``, or None."""
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        """Keep ``value`` if the cache is on and it fits."""
        if not self.enabled:
            return
        size = _nbytes(value)
        if not self._decided:
            self._decided = True
            if self.expected_items is not None and size * self.expected_items > self.budget:
                self.enabled = False
                return
        if size > self.budget:
            return
        old = self._values.pop(key, None)
        if old is not None:
            self.nbytes -= _nbytes(old)
        while self._values and self.nbytes + size > self.budget:
            self.nbytes -= _nbytes(self._values.popitem(last=False)[1])
        self._values[key] = value
        self.nbytes += size

    def clear(self) -> None:
        self._values.clear()
        self.nbytes = 0

    def __getstate__(self) -> dict:
        """Pickled empty (a worker fills its own): only the budget and what was decided travel."""
        state = self.__dict__.copy()
        state["_values"], state["nbytes"] = OrderedDict(), 0
        return state
