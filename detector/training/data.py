"""R-CNN fine-tuning batches: images, their proposals and ground truth -> warped, labelled regions.

:class:`RegionBatchSource` turns a :class:`detector.data.Dataset` and per-image proposals into the
mini-batches of :mod:`detector.training.sampler`, as a pure function of the iteration (see
:mod:`detector.training.engine`): the images of iteration ``i`` are positions ``i * B * W + r * B ..`` of
an endless sequence of epochs, each a permutation seeded by ``(seed, epoch)``, where ``B`` is
``images_per_batch``, ``W`` the number of processes and ``r`` this process's rank; every other random
choice (flip, which regions) is seeded by ``(seed, iteration, rank)``.

Regions are warped exactly as the detector warps them (:func:`detector.warp.warp_regions`: context
padding, and an antialiasing pyramid for regions larger than the input), from the original image.

Memory does not grow with the dataset (issue 17): an image is decoded when it is needed and its
proposals are read from the store then (a lookup is ~0.03 ms); each process keeps at most
``image_cache_mb`` of decoded images and ``proposal_cache_mb`` of proposals (:class:`ByteCache`, off
when the dataset would not fit: every ILSVRC-size set). Spawned data-loading workers receive the source
with its records packed into arrays (:class:`PackedDataset`: 480,000 records in ~65 MB, unpickled in a
fraction of a second) and open the proposal store themselves, by its path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from detector.base.boxes import valid_box_mask
from detector.base.defaults import IMAGENET_MEAN, IMAGENET_STD, MAX_PROPOSALS
from detector.base.io import ImageError, load_image, read_image_size
from detector.box_coder import BoxCoder
from detector.data.records import Dataset, ImageRecord
from detector.training.bounded import IMAGE_CACHE_MB, MB, PROPOSAL_CACHE_MB, ByteCache, PackedDataset, packed
from detector.training.sampler import (
    SamplerConfig,
    flip_boxes,
    label_regions,
    regression_mask,
    sample_regions,
)
from detector.warp import default_context, warp_regions

log = logging.getLogger(__name__)

ProposalFn = Callable[[ImageRecord, np.ndarray], np.ndarray]
"""``(record, image) -> float32 (N, 4)`` xyxy proposals in the original image's pixels, best first."""



@dataclass(frozen=True)
class RegionDataConfig:
    """input_size: side of the warped crops ``S``. context: pixels of context per side at ``S`` (None:
    R-CNN's 16 at 224, scaled). max_proposals: the first (best) proposals of each image that are used.
    min_proposal_size: proposals narrower or lower than this many pixels are dropped. seed: the data
    order's and augmentation's seed. image_cache_mb, proposal_cache_mb: what each process keeps of the
    decoded images and the proposals (see :class:`detector.training.bounded.ByteCache`; 0: nothing, each
    image read when it is used; a cache is off for a dataset larger than it). mean, std,
    sampling_ratio, antialias: the network's input normalization and the warp's settings
    (:func:`detector.warp.warp_regions`); take them from the classifier's config."""

    input_size: int = 224
    context: int | None = None
    max_proposals: int = MAX_PROPOSALS
    min_proposal_size: float = 2.0
    seed: int = 0
    image_cache_mb: float = IMAGE_CACHE_MB
    proposal_cache_mb: float = PROPOSAL_CACHE_MB
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    sampling_ratio: int = 1
    antialias: bool = True

    @classmethod
    def for_classifier(cls, classifier, **options) -> RegionDataConfig:
        """The warp settings of a :class:`detector.classifier.ClassifierConfig`, plus ``options``."""
        return cls(input_size=classifier.input_size, context=classifier.context, mean=classifier.mean,
                   std=classifier.std, sampling_ratio=classifier.sampling_ratio, antialias=classifier.antialias,
                   **options)

    def __post_init__(self):
        if self.image_cache_mb < 0 or self.proposal_cache_mb < 0:
            raise ValueError(f"cache sizes must be >= 0 MB, got image_cache_mb={self.image_cache_mb}, "
                             f"proposal_cache_mb={self.proposal_cache_mb}")

    @property
    def warp_context(self) -> int:
        return default_context(self.input_size) if self.context is None else self.context


@dataclass
class ImageCheck:
    """The outcome of :func:`check_images`: usable records and the refused images with their reasons."""

    records: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> str:
        if not self.skipped:
            return f"{len(self.records)} images, none skipped"
        lines = [f"{len(self.records)} images usable, {len(self.skipped)} skipped:"]
        lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def check_images(dataset: Dataset, decode: bool = False, progress: bool = False) -> ImageCheck:
    """Refuse the images that cannot be read: header only, or a full decode when ``decode``.

    Never silent: the caller reports :meth:`ImageCheck.report` (count and list).
    """
    from tqdm import tqdm

    good, bad = [], []
    for rec in tqdm(dataset.records, desc="checking images", disable=not progress, unit="img"):
        path = dataset.image_path(rec)
        try:
            if decode:
                load_image(path)
            else:
                read_image_size(path)
            good.append(rec)
        except ImageError as err:
            bad.append((str(path), str(err)))
    return ImageCheck(good, bad)


def image_cache_budget(dataset: Dataset | PackedDataset, budget_mb: float) -> float:
    """The budget of a cache of ``dataset``'s decoded images: ``budget_mb``, or 0 when the records' image
    sizes (all known) show that the decoded images would not fit in it; with unknown sizes the cache
    decides on its first image (:class:`detector.training.bounded.ByteCache`)."""
    if isinstance(dataset, PackedDataset):
        sizes = dataset.image_sizes.astype(np.int64)
    else:
        sizes = np.array([r.image_size or (-1, -1) for r in dataset.records], np.int64).reshape(-1, 2)
    if len(sizes) and (sizes >= 0).all() and int((sizes.prod(axis=1) * 3).sum()) > budget_mb * MB:
        return 0
    return budget_mb


class RegionBatchSource:
    """Mini-batches of warped, labelled regions, a pure function of the iteration.

    ``batch(iteration)`` returns a dict:

    - ``crops``: float32 (R, 3, S, S), normalized;
    - ``labels``: int64 (R,), ``0..C`` (0 = background);
    - ``box_targets``: float32 (R, 4), weighted deltas (``box_coder``) of the matched ground truth,
      zero where ``regress`` is False;
    - ``regress``: bool (R,), the regions box regression learns from.
    """

    def __init__(self, dataset: Dataset | PackedDataset, proposals: ProposalFn,
                 sampler: SamplerConfig = SamplerConfig(), config: RegionDataConfig = RegionDataConfig(),
                 box_coder: BoxCoder | None = None, rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError("RegionBatchSource: the dataset has no images")
        self.dataset = dataset
        self.proposals = proposals
        self.sampler = sampler
        self.config = config
        self.box_coder = box_coder or BoxCoder()
        self.rank, self.world_size = rank, world_size
        self._images = ByteCache(image_cache_budget(dataset, config.image_cache_mb), len(dataset))
        self._boxes = ByteCache(config.proposal_cache_mb, len(dataset))
        self._perms: dict[int, np.ndarray] = {}
        self._packed: PackedDataset | None = None

    def __getstate__(self) -> dict:
        """What a spawned worker receives: the records packed into arrays (packed once, then reused),
        the proposal function (a store travels by its path), the settings; the caches empty."""
        if self._packed is None:
            self._packed = packed(self.dataset)
        state = self.__dict__.copy()
        state.update(dataset=self._packed, _packed=None, _perms={})
        return state

    @property
    def cached_bytes(self) -> int:
        """Bytes this process keeps in its image and proposal caches."""
        return self._images.nbytes + self._boxes.nbytes

    @property
    def regions_per_batch(self) -> int:
        return self.sampler.regions_per_image * self.sampler.images_per_batch

    def image_indices(self, iteration: int) -> list[int]:
        """Dataset indices of this process's images for ``iteration``."""
        n, per = len(self.dataset), self.sampler.images_per_batch
        first = iteration * per * self.world_size + self.rank * per
        out = []
        for g in range(first, first + per):
            epoch, pos = divmod(g, n)
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.config.seed, epoch]).permutation(n)
                self._perms = {epoch: perm}  # one epoch at a time is all a run needs
            out.append(int(perm[pos]))
        return out

    def load(self, index: int, record: ImageRecord | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The image (uint8 (H, W, 3)) and its proposals (float32 (N, 4) xyxy pixels, at most
        ``max_proposals``, without the small ones). record: ``dataset[index]`` if the caller has it."""
        record = self.dataset[index] if record is None else record
        image = self._images.get(index)
        if image is None:
            image = load_image(self.dataset.image_path(record))
            self._images.put(index, image)
        boxes = self._boxes.get(index)
        if boxes is None:
            boxes = np.asarray(self.proposals(record, image), np.float32).reshape(-1, 4)
            boxes = boxes[valid_box_mask(boxes, self.config.min_proposal_size)][: self.config.max_proposals]
            self._boxes.put(index, boxes)
        return image, boxes

    def image_regions(self, index: int, rng: np.random.Generator, num_regions: int, num_fg: int) -> dict:
        rec = self.dataset[index]
        image, proposals = self.load(index, rec)
        gt = rec.gt_boxes
        if self.sampler.flip and rng.random() < 0.5:
            width = image.shape[1]
            image = np.ascontiguousarray(image[:, ::-1])
            proposals, gt = flip_boxes(proposals, width), flip_boxes(gt, width)
        ignore = rec.iscrowd | rec.difficult
        regions = label_regions(proposals, gt, rec.gt_labels, self.sampler, ignore_gt=ignore)
        keep = sample_regions(regions, num_regions, num_fg, rng, self.sampler.fg_balance)
        regions = regions.subset(keep)
        regress = regression_mask(regions, self.sampler)
        targets = np.zeros((len(regions), 4), np.float32)
        if regress.any():
            targets[regress] = self.box_coder.encode(regions.matched_gt[regress], regions.boxes[regress])
        crops = warp_regions(image, regions.boxes, output_size=self.config.input_size,
                             context=self.config.warp_context, mean=self.config.mean, std=self.config.std,
                             sampling_ratio=self.config.sampling_ratio,
                             antialias=self.config.antialias)
        return {"crops": crops, "labels": torch.from_numpy(regions.labels),
                "box_targets": torch.from_numpy(targets), "regress": torch.from_numpy(regress)}

    def batch(self, iteration: int) -> dict:
        rng = np.random.default_rng([self.config.seed, iteration, self.rank])
        parts = [self.image_regions(i, rng, self.sampler.regions_per_image, self.sampler.fg_per_image)
                 for i in self.image_indices(iteration)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

