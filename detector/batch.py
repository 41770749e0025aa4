"""Detection of a stream of images with the network's batches filled across images.

``Detector.__call__`` classifies one image's proposals in batches of ``batch_size``, so an image with 150
proposals and a batch of 64 runs batches of 64, 64 and 22. :class:`BatchedDetector` packs the crops of
consecutive images into the same batches instead (64, 64, 64, ... across image boundaries): every
forward pass is full, which is what keeps a GPU busy, and on a CPU it removes the per-image tail.

The stages are the detector's own: ``Detector.propose`` (clip, limit), the context-padded warp of
:mod:`detector.warp`, each model of the ensemble, ``Detector.box_coder`` and
:func:`detector.postprocess.postprocess`; only the batching differs. Pending crops stay below
``batch_size`` per model, so memory does not grow with the number of proposals.

Which crops share a batch depends on what came before; :meth:`BatchedDetector.flush` empties the
batches, so a caller that flushes at fixed points (the dataset runner flushes at the end of each
chunk) gets results that do not depend on how the work was split or resumed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from detector.pipeline import Detections, Detector, StageClock
from detector.postprocess import postprocess
from detector.warp import image_pyramid, warp_pyramid


@dataclass(eq=False)
class _Job:
    """One image in flight: its proposals and the ensemble's summed outputs, filled batch by batch."""

    key: Hashable
    image_size: tuple[int, int]
    boxes: torch.Tensor  # float32 (N, 4) xyxy on the detector's device
    probs: torch.Tensor  # float32 (N, C + 1), CPU, summed over models
    deltas: torch.Tensor  # float32 (N, 4 C), CPU, summed over models
    waiting: int  # crops (over all models) not yet classified
    timings: dict[str, float] = field(default_factory=dict)


class BatchedDetector:
    """Detect images one after another with batches shared between images.

    ``submit(key, image, proposals)`` queues an image and returns the ``(key, Detections)`` of every image
    whose crops have all been classified, in submission order; ``flush()`` runs the partial batches and
    returns the rest. ``timings`` holds the seconds spent per stage (``warp``, ``classify``,
    ``postprocess``) over all images so far.
    """

    def __init__(self, detector: Detector):
        self.detector = detector
        self._clock = StageClock(detector.device)
        self._jobs: deque[_Job] = deque()
        self._pending: list[list[tuple[_Job, int, torch.Tensor]]] = [[] for _ in detector.models]
        self._filled = [0] * len(detector.models)

    @property
    def timings(self) -> dict[str, float]:
        return dict(self._clock.timings)

    def submit(self, key: Hashable, image: np.ndarray, proposals=None,
               image_name: str | None = None, proposal_seconds: float | None = None
               ) -> list[tuple[Hashable, Detections]]:
        """Queue one image (RGB ``uint8 (H, W, 3)``).

        proposals: float ``(N, 4)`` xyxy pixels of ``image`` (or ``(boxes, scores)``); ``None`` uses the
            detector's proposal source (``image_name`` keys a store).
        proposal_seconds: time spent on this image's proposals elsewhere, reported in its timings.
        """
        det = self.detector
        boxes = det.propose(image, proposals, image_name)
        n = len(boxes)
        num_outputs = det.vocabulary.num_classes + 1
        job = _Job(key, (int(image.shape[0]), int(image.shape[1])), boxes,
                   torch.zeros((n, num_outputs)), torch.zeros((n, 4 * (num_outputs - 1))),
                   waiting=n * len(det.models))
        if proposal_seconds is not None:
            job.timings["proposals"] = float(proposal_seconds)
        self._jobs.append(job)
        for index, model in enumerate(det.models if n else ()):
            cfg = model.config
            with self._clock("warp"):
                pyramid = image_pyramid(image, boxes.cpu(), cfg.input_size, cfg.context, cfg.mean, cfg.std,
                                        cfg.antialias, det.device)
            self._queue_crops(index, job, pyramid)
        return self._finished()

    def flush(self) -> list[tuple[Hashable, Detections]]:
        """Classify every pending crop and return the remaining images' detections."""
        for index in range(len(self.detector.models)):
            self._run(index)
        return self._finished()

    def _queue_crops(self, index: int, job: _Job, pyramid: list[torch.Tensor]) -> None:
        """Warp the job's boxes for model ``index`` in pieces that top up its pending batch."""
        cfg = self.detector.models[index].config
        batch_size = self.detector.batch_size
        start = 0
        while start < len(job.boxes):
            take = min(len(job.boxes) - start, batch_size - self._filled[index])
            with self._clock("warp"):
                crops = warp_pyramid(pyramid, job.boxes[start:start + take], cfg.input_size, cfg.context,
                                     cfg.sampling_ratio)
            self._pending[index].append((job, start, crops))
            self._filled[index] += take
            start += take
            if self._filled[index] == batch_size:
                self._run(index)

    def _run(self, index: int) -> None:
        """One forward pass of model ``index`` over its pending crops; outputs go back to their jobs."""
        pieces = self._pending[index]
        if not pieces:
            return
        model = self.detector.models[index]
        with self._clock("classify"), torch.inference_mode(), self.detector._autocast():
            batch = torch.cat([crops for _, _, crops in pieces]).contiguous(memory_format=torch.channels_last)
            out = model(batch)
            probs = out.class_logits.float().softmax(dim=1).cpu()
            deltas = out.box_deltas.float().cpu()
        row = 0
        for job, start, crops in pieces:
            rows = slice(start, start + len(crops))
            job.probs[rows] += probs[row:row + len(crops)]
            job.deltas[rows] += deltas[row:row + len(crops)]
            job.waiting -= len(crops)
            row += len(crops)
        self._pending[index] = []
        self._filled[index] = 0

    def _finished(self) -> list[tuple[Hashable, Detections]]:
        """Post-process the leading jobs whose crops are all classified (submission order)."""
        det = self.detector
        done = []
        while self._jobs and self._jobs[0].waiting == 0:
            job = self._jobs.popleft()
            num_models = len(det.models)
            with self._clock("postprocess"):
                class_boxes = det.box_coder.decode(job.deltas / num_models, job.boxes)
                kept = postprocess(job.probs / num_models, class_boxes, job.image_size, det.postprocess_config)
                done.append((job.key, det._detections(kept, job.image_size, job.timings)))
        return done


def detect_images(detector: Detector, images: Sequence[np.ndarray], proposals: Sequence | None = None
                  ) -> list[Detections]:
    """Detections of several images (RGB ``uint8 (H, W, 3)``), classification batched across them.

    proposals: per image, float ``(N_i, 4)`` xyxy pixels (or ``None`` for the detector's source).
    """
    batched = BatchedDetector(detector)
    found: dict[int, Detections] = {}
    for i, image in enumerate(images):
        found.update(batched.submit(i, image, None if proposals is None else proposals[i]))
    found.update(batched.flush())
    return [found[i] for i in range(len(images))]
