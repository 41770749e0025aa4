"""Periodic evaluation during training: the project's detector, with the model being trained, scored by
the project's evaluator (:func:`detector.evaluation.voc.evaluate_voc`, VOC2010+ all-point AP at IoU 0.5).

Detection is exactly what ``tools/detect.py`` does (:meth:`detector.pipeline.Detector.detect_stream`, the
network's batches filled across images), on a copy of the model (the detector prepares its models for
inference: eval mode, channels-last, bf16 weights on CUDA) and on precomputed proposals, so that no
checkpoint has to be written and read back.

Rank 0 keeps at most ``image_cache_mb`` of decoded validation images between evaluations
(:class:`detector.training.bounded.ByteCache`, off when the set would not fit: val2's 10,000 ILSVRC images
take 5.6 GB decoded), so its memory does not grow with the validation set.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from detector.base.io import load_image
from detector.box_coder import BoxCoder
from detector.data.records import Dataset
from detector.evaluation.voc import evaluate_voc
from detector.pipeline import Detector, ProposalSettings
from detector.postprocess import PostprocessConfig
from detector.training.bounded import ByteCache
from detector.training.data import IMAGE_CACHE_MB, ProposalFn, image_cache_budget


class Validator:
    """``validator(model) -> {"mAP": ..., "num_detections": ...}`` on ``dataset``.

    proposals: per-image proposals (original pixels); the first ``max_proposals`` are classified.
    precision: the detector's (``"auto"``, ``"fp32"``, ``"bf16"``).
    image_cache_mb: decoded images kept between evaluations, at most (0: none; the cache is off when the
        set's images would not all fit, see :class:`detector.training.bounded.ByteCache`).
    """

    def __init__(self, dataset: Dataset, proposals: ProposalFn, max_proposals: int,
                 post: PostprocessConfig = PostprocessConfig(), box_coder: BoxCoder | None = None,
                 precision: str = "auto", batch_size: int | None = None, progress: bool = False,
                 image_cache_mb: float = IMAGE_CACHE_MB):
        self.dataset, self.proposals, self.max_proposals, self.post = dataset, proposals, max_proposals, post
        self.box_coder = box_coder or BoxCoder()
        self.precision, self.batch_size, self.progress = precision, batch_size, progress
        self._images = ByteCache(image_cache_budget(dataset, image_cache_mb), len(dataset))

    def detect_all(self, model: torch.nn.Module) -> dict:
        """image id -> :class:`detector.pipeline.Detections` of every image of the dataset."""
        device = next(model.parameters()).device
        detector = Detector([copy.deepcopy(model)], self.dataset.vocab,
                            ProposalSettings(max_proposals=self.max_proposals), self.post, self.box_coder,
                            device=device, precision=self.precision, batch_size=self.batch_size, workers=0)
        return dict(detector.detect_stream(self.images()))

    def images(self) -> Iterator[tuple[object, np.ndarray, np.ndarray, str]]:
        """``(image id, image uint8 (H, W, 3), proposals float32 (N, 4) xyxy pixels, file name)`` of every
        image, in the dataset's order: :meth:`detector.pipeline.Detector.detect_stream`'s input."""
        for i, rec in enumerate(tqdm(self.dataset.records, desc="validating", unit="img", leave=False,
                                     disable=not self.progress)):
            image = self._images.get(i)
            if image is None:
                image = load_image(self.dataset.image_path(rec))
                self._images.put(i, image)
            yield rec.image_id, image, self.proposals(rec, image), rec.file_name

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded images kept for the next evaluation."""
        return self._images.nbytes

    def __call__(self, model: torch.nn.Module) -> dict:
        detections = self.detect_all(model)
        result = evaluate_voc(self.dataset, detections)
        return {"mAP": float(result.mAP), "num_detections": int(sum(len(d) for d in detections.values()))}
