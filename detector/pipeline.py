"""The detector: image -> proposals -> warp -> classify -> regress -> per-class NMS -> detections.

``Detector.from_checkpoint(path)`` (or a list of paths: an ensemble, whose class probabilities and box
deltas are averaged, as GoogLeNet's entry averaged 6 networks) builds everything from checkpoints. One
engine serves every caller, through three public methods:

- ``detector(image)``: :class:`Detections` of one image, in its own pixel coordinates;
- ``detector.detect_batch(images)``: a list of images, the network's batches filled across images;
- ``detector.detect_stream(items)``: any number of images, lazily, in order (the tools, benchmarks).

With many images, crops of consecutive images share forward passes of up to ``batch_size`` crops, and
proposals that must be computed come from ``workers`` spawned processes running ahead of the network
(:func:`detector.proposal_source.proposal_stream`), so proposals and classification overlap; the
processes are kept from one ``detect_stream`` call to the next (their start costs seconds) until
``detector.close()`` (or ``with detector:``). Members of
an ensemble with the same input settings share one image pyramid (and, with the same sampling, the same
crops). The image goes to the device once (pinned memory, non-blocking copies); the warp runs there.

Precision (:mod:`detector.device`): bf16 on CUDA casts the weights themselves (half the memory traffic);
on the CPU the weights stay fp32 under bf16 autocast (oneDNN runs both at the same speed, measured,
and the results stay those of earlier versions). ``compile=True`` wraps each network in
``torch.compile``; a partial batch is then padded to ``batch_size``, so that one shape compiles (a
new shape would compile again, a minute on a GPU; batches filled across images are rarely partial).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, islice, repeat
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import clip_boxes_to_image

from detector.base.checkpoint import DEFAULT_MODEL, NO_DEFAULT_MODEL, installed
from detector.base.defaults import (
    BATCH_SIZE_CPU,
    BATCH_SIZE_CUDA,
    BOX_CODER_WEIGHTS,
    MAX_PROPOSALS,
    PROPOSAL_METHOD,
)
from detector.base.errors import UserError
from detector.base.io import load_image
from detector.base.vocab import Vocabulary
from detector.box_coder import BoxCoder
from detector.classifier import RegionClassifier, build_classifier_from_checkpoint, prepare_for_inference
from detector.detections import Detections, label_map
from detector.device import resolve_device, resolve_precision
from detector.postprocess import PostprocessConfig, postprocess
from detector.proposal_source import ProposalSettings, proposal_pool, proposal_stream, source_proposals
from detector.warp import image_pyramid, warp_pyramid

STAGES = ("proposals", "warp", "classify", "postprocess")

__all__ = ["Detections", "Detector", "ProposalSettings", "default_model", "label_map", "load_detector"]


class StageClock:
    """Seconds per stage; on CUDA it waits for the GPU at each boundary only if ``sync`` is set."""

    def __init__(self, device: torch.device, sync: bool = False):
        self.sync = sync and device.type == "cuda"
        self.device = device
        self.timings: dict[str, float] = {}

    def start(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def stop(self, stage: str, start: float) -> float:
        """Add the seconds since ``start`` to ``stage``; returns them."""
        seconds = self.start() - start
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        return seconds


def _same_setting(configs: list[dict], key: str, paths) -> dict:
    first = configs[0].get(key)
    for cfg, path in zip(configs[1:], paths[1:]):
        if cfg.get(key) != first:
            raise UserError(f"ensemble: checkpoint '{path}' has other {key} than '{paths[0]}'; an ensemble's "
                            "checkpoints must share them")
    return first


@dataclass(eq=False)
class _Image:
    """One image in the engine: its proposals and the ensemble's summed outputs, filled batch by batch."""

    key: Hashable
    image_size: tuple[int, int]
    boxes: torch.Tensor | None = None  # float32 (N, 4) xyxy pixels, on the CPU (where the warp groups them)
    probs: torch.Tensor | None = None  # float32 (N, C + 1), on the device, summed over models
    deltas: torch.Tensor | None = None  # float32 (N, 4 C), on the device, summed over models
    waiting: int = 0  # crops (over all warp groups) not yet classified
    error: UserError | None = None
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


class Detector:
    """Images -> :class:`Detections`, from one or more classifiers (an ensemble).

    models: region classifiers sharing ``vocabulary`` and the box coder (prepared here for inference: eval
        mode, no auxiliary heads, channels-last, on ``device``, bf16 weights on CUDA when bf16).
    proposals: :class:`ProposalSettings` used when a call passes no boxes.
    postprocess_config: score threshold, NMS IoU, max detections.
    device: where the warp and the network run; precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``
        (a GPU only; :mod:`detector.device`).
    batch_size: crops per forward pass, filled across images (default 64 on the CPU, 1024 on CUDA).
    workers: processes computing proposals ahead of the network when many images need them (``None``: the
        usable cores but one; 0: in this process). They are spawned, and re-import the main script: a
        script must detect under ``if __name__ == "__main__":`` (as the tools do).
    compile: run each network through ``torch.compile``: ``True`` (its default backend, inductor) or a
        backend's name (``"eager"`` traces without generating code: quick, for tests). The first batch of
        each shape compiles.
    """

    def __init__(self, models: Sequence[RegionClassifier], vocabulary: Vocabulary,
                 proposals: ProposalSettings = ProposalSettings(),
                 postprocess_config: PostprocessConfig = PostprocessConfig(),
                 box_coder: BoxCoder | None = None, device: str | torch.device | None = "auto",
                 precision: str = "auto", batch_size: int | None = None, workers: int | None = None,
                 compile: bool | str = False):
        if not models:
            raise ValueError("a detector needs at least one model")
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        batch_size = batch_size if batch_size is not None else (
            BATCH_SIZE_CUDA if self.device.type == "cuda" else BATCH_SIZE_CPU)
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if workers is not None and workers < 0:
            raise UserError(f"workers must be >= 0, got {workers}")
        weights = self.dtype if self.device.type == "cuda" else torch.float32
        backend = compile if isinstance(compile, str) else "inductor"
        self.models = [prepare_for_inference(m, self.device, dtype=weights, compile=bool(compile),
                                             compile_backend=backend) for m in models]
        self.vocabulary = vocabulary
        self.proposals = proposals
        self.postprocess_config = postprocess_config
        self.box_coder = box_coder or BoxCoder()
        self.batch_size = batch_size
        self.workers = workers
        self.compiled = bool(compile)
        self.sync_timings = False  # wait for the GPU at each stage boundary (exact stage times, slower)
        # proposal workers, started by the first stream that needs them and kept for the next (see close())
        self._proposal_pool = None
        self._names = np.array(("background",) + vocabulary.names, dtype=object)
        self._ids = np.array((0,) + vocabulary.ids, dtype=np.int64)

    @classmethod
    def from_checkpoint(cls, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                        device: str | torch.device | None = "auto", precision: str = "auto",
                        batch_size: int | None = None, workers: int | None = None, compile: bool | str = False,
                        proposals: object | None = None, proposal_options: dict | None = None,
                        max_proposals: int | None = None, score_threshold: float | None = None,
                        nms_iou: float | None = None, max_detections: int | None = None,
                        box_voting: float | None = None) -> Detector:
        """A detector from one checkpoint or a list (an ensemble).

        Settings left ``None`` come from the (first) checkpoint's config: the proposal method and
        options, ``max_proposals``, and the post-processing settings. A given value is used as is
        (``max_proposals=0`` is an error, not "the checkpoint's").
        """
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise UserError("no checkpoint given")
        dev = resolve_device(device)
        resolve_precision(precision, dev)  # a wrong name is refused before the checkpoints are read
        built = [build_classifier_from_checkpoint(p, device=dev) for p in paths]
        models, configs = [m for m, _ in built], [c for _, c in built]
        vocabulary = Vocabulary.from_dict(_same_setting(configs, "classes", paths))
        coder = _same_setting(configs, "box_coder", paths) or {"weights": list(BOX_CODER_WEIGHTS)}
        proposal_config = configs[0].get("proposals") or {}
        settings = ProposalSettings(
            source=proposals if proposals is not None else proposal_config.get("method", PROPOSAL_METHOD),
            options=proposal_options if proposal_options is not None else proposal_config.get("options", {}),
            max_proposals=(max_proposals if max_proposals is not None
                           else proposal_config.get("max_proposals", MAX_PROPOSALS)))
        try:
            post = PostprocessConfig.from_dict(configs[0].get("postprocess") or {})
            overrides = {k: v for k, v in (("score_threshold", score_threshold), ("nms_iou", nms_iou),
                                           ("max_detections", max_detections), ("box_voting", box_voting))
                         if v is not None}
            post = replace(post, **overrides)
        except (TypeError, ValueError) as err:
            raise UserError(f"post-processing settings: {err}") from None
        return cls(models, vocabulary, settings, post, BoxCoder(tuple(coder["weights"])), dev, precision,
                   batch_size, workers, compile)

    def close(self) -> None:
        """Stop the proposal worker processes kept between :meth:`detect_stream` calls (they also stop
        when the detector is collected or the process ends); a later call starts new ones."""
        if self._proposal_pool is not None:
            self._proposal_pool.close()
            self._proposal_pool = None

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the data flow -------------------------------------------------------------------------------

    def __call__(self, image, proposals=None, image_name: str | None = None) -> Detections:
        """Detect objects in ``image`` (RGB ``uint8 (H, W, 3)`` array, or a path).

        proposals: float ``(N, 4)`` xyxy boxes in pixels of ``image`` to classify instead of the
            configured source; image_name: the key for a proposal store.
        """
        return self.detect_batch([image], [proposals], [image_name])[0]

    def detect_batch(self, images: Sequence, proposals: Sequence | None = None,
                     image_names: Sequence[str | None] | None = None) -> list[Detections]:
        """Detections of each image (RGB ``uint8 (H, W, 3)`` arrays or paths), in order.

        proposals: per image, float ``(N_i, 4)`` xyxy pixels, or ``None`` for the configured source;
        image_names: per image, its key in a proposal store. Raises :class:`UserError` for the first image
        that cannot be read or has no proposals.
        """
        for name, values in (("proposals", proposals), ("image_names", image_names)):
            if values is not None and len(values) != len(images):
                raise ValueError(f"detect_batch: {len(images)} images but {len(values)} {name}")
        items = zip(range(len(images)), images, proposals if proposals is not None else repeat(None),
                    image_names if image_names is not None else repeat(None))
        return [dets for _, dets in self.detect_stream(items)]

    def detect_stream(self, items: Iterable[tuple], errors: str = "raise"
                      ) -> Iterator[tuple[Hashable, Detections | UserError]]:
        """``(key, Detections)`` for each ``(key, image, proposals, image_name)`` of ``items``, in order, lazily.

        image: RGB ``uint8 (H, W, 3)`` or a path; proposals: float ``(N, 4)`` xyxy pixels, or ``None`` for
        the configured source (computed ahead in ``workers`` processes when there is more than one image);
        image_name: the image's key in a proposal store (or ``None``).
        errors: ``"raise"`` raises the :class:`UserError` of an image that cannot be read or has no
            proposals; ``"return"`` yields ``(key, that UserError)`` in its place and goes on.
        Up to ``2 * workers`` images are read ahead of the one being classified.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        batches = _RegionBatches(self)
        for image, job in self._with_proposals(items):
            if job.error is None:
                batches.add(job, image)
            else:
                batches.add_failed(job)
            for done in batches.finished():
                yield self._result(done, errors)
        batches.flush()
        for done in batches.finished():
            yield self._result(done, errors)

    def _result(self, job: _Image, errors: str) -> tuple[Hashable, Detections | UserError]:
        if job.error is not None:
            if errors == "raise":
                raise job.error
            return job.key, job.error
        return job.key, self._detections(job)

    def _with_proposals(self, items: Iterable[tuple]) -> Iterator[tuple[np.ndarray | None, _Image]]:
        """``(image, job with its proposals (clipped, limited, on the CPU) or an error)`` per item, in order;
        proposals to compute come from a process pool when there are several images (:func:`proposal_stream`)."""
        items = iter(items)
        head = list(islice(items, 2))
        # a pool pays off for several images whose proposals must be computed (judged by the first two)
        # (or, once a pool runs, kept from an earlier call, for any image whose proposals must be computed)
        started = self._proposal_pool is not None and self._proposal_pool.started
        pooled = self.proposals.computed and self.workers != 0 and (
            sum(item[2] is None for item in head) > (0 if started else 1))
        read: deque = deque()

        def loaded() -> Iterator[np.ndarray | None]:  # what the pool computes proposals of (None: nothing)
            for key, image, given, name in chain(head, items):
                job = _Image(key, (0, 0))
                try:
                    image = load_image(image) if isinstance(image, (str, os.PathLike)) else np.asarray(image)
                    job.image_size = (int(image.shape[0]), int(image.shape[1]))
                except UserError as err:
                    image, job.error = None, err
                read.append((image, job, given, name))
                yield image if pooled and given is None and image is not None else None

        if pooled and self._proposal_pool is None:
            self._proposal_pool = proposal_pool(self.workers)
        stream = _pool_errors(proposal_stream(loaded(), self.proposals, pool=self._proposal_pool)) if pooled else (
            None for _ in loaded())
        for outcome in stream:
            image, job, given, name = read.popleft()
            if job.error is None:
                try:
                    if given is None and outcome is not None:
                        if not outcome.ok:
                            which = f"'{name}'" if name is not None else f"image {job.key}"
                            raise UserError(f"proposals for {which}: {outcome.error}")
                        given, job.timings["proposals"] = outcome.value, outcome.seconds
                    elif given is None:
                        start = time.perf_counter()
                        given = source_proposals(image, self.proposals, name)
                        job.timings["proposals"] = time.perf_counter() - start
                    job.boxes = self.propose(image, given)
                except UserError as err:
                    job.error = err
            yield image, job

    def propose(self, image: np.ndarray, proposals=None, image_name: str | None = None) -> torch.Tensor:
        """Proposals for ``image``: float32 ``(N, 4)`` xyxy on the CPU, clipped, without empty boxes, at most
        ``max_proposals`` (the first ones). ``proposals=None``: from the configured source."""
        if proposals is None:
            proposals = self.source_proposals(image, image_name)
        if isinstance(proposals, tuple):  # (boxes, scores) from a store or method
            proposals = proposals[0]
        boxes = torch.as_tensor(np.asarray(proposals, dtype=np.float32)).reshape(-1, 4)
        boxes = clip_boxes_to_image(boxes[: self.proposals.max_proposals], image.shape[:2])
        return boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]

    def source_proposals(self, image: np.ndarray, image_name: str | None = None, image_id: object = None
                         ) -> np.ndarray:
        """Proposals of ``image`` from the configured source (:func:`detector.proposal_source.source_proposals`),
        before clipping and limiting."""
        return source_proposals(image, self.proposals, image_name, image_id)

    def classify(self, image: np.ndarray, boxes) -> tuple[torch.Tensor, torch.Tensor]:
        """The ensemble's mean class probabilities, float32 ``(N, C + 1)``, and mean box deltas, float32
        ``(N, 4 C)``, on the CPU, for ``boxes`` (float ``(N, 4)`` xyxy pixels) of one image."""
        boxes = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4)
        job = _Image(0, (int(image.shape[0]), int(image.shape[1])), boxes)
        batches = _RegionBatches(self)
        batches.add(job, image)
        batches.flush()
        n = len(self.models)
        return (job.probs / n).cpu(), (job.deltas / n).cpu()

    def _detections(self, job: _Image) -> Detections:
        """Decode the boxes of a classified image, post-process them, and wrap them as :class:`Detections`."""
        start = time.perf_counter()
        n = len(self.models)
        class_boxes = self.box_coder.decode(job.deltas / n, job.boxes.to(self.device, non_blocking=True))
        kept = postprocess(job.probs / n, class_boxes, job.image_size, self.postprocess_config)
        labels = kept.labels.cpu().numpy().astype(np.int64)
        timings = dict(job.timings)
        timings["postprocess"] += time.perf_counter() - start
        timings["total"] = sum(timings[s] for s in STAGES)
        return Detections(boxes=kept.boxes.cpu().numpy().astype(np.float32),
                          scores=kept.scores.cpu().numpy().astype(np.float32), labels=labels,
                          class_names=tuple(self._names[labels].tolist()), class_ids=self._ids[labels],
                          image_size=job.image_size, timings=timings)

    def _run_models(self, indices: Sequence[int], crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed softmax probabilities ``(B, C + 1)`` and box deltas ``(B, 4 C)`` (float32, on the device) of
        the models ``indices`` over one batch of crops (float32 ``(B, 3, S, S)`` on the device)."""
        crops = crops.contiguous(memory_format=torch.channels_last)
        count = len(crops)
        if self.compiled and count < self.batch_size:  # one batch shape: each new shape compiles again
            crops = torch.cat([crops, crops.new_zeros((self.batch_size - count, *crops.shape[1:]))])
        probs = deltas = None
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            for index in indices:
                out = self.models[index](crops)
                p = out.class_logits[:count].float().softmax(dim=1)
                d = out.box_deltas[:count].float()
                probs, deltas = (p, d) if probs is None else (probs + p, deltas + d)
        return probs, deltas


def _pool_errors(outcomes: Iterator) -> Iterator:
    """The pool's outcomes; a pool that breaks (not one image's failure, which is an outcome) is a
    :class:`UserError` that says the likeliest cause."""
    try:
        yield from outcomes
    except UserError as err:
        raise UserError(f"{err}. Proposals for several images are computed in spawned processes, which "
                        "re-import the main script: a script must run its detection under "
                        "`if __name__ == \"__main__\":`, or pass workers=0") from None


class _RegionBatches:
    """Crops of consecutive images packed into forward passes of ``batch_size``; each image's summed outputs
    are filled in as its crops are classified, and images come out, in order, once all their crops are.

    Pending crops stay below ``batch_size`` per warp group, so memory does not grow with the number of
    images; pyramids live only while their image's crops are warped."""

    def __init__(self, detector: Detector):
        self.det = detector
        self.clock = StageClock(detector.device, detector.sync_timings)
        # models that read the same pyramid, and among them those fed the same crops (same sampling)
        by_setting: dict[tuple, dict[int, list[int]]] = {}
        for index, model in enumerate(detector.models):
            cfg = model.config
            key = (cfg.input_size, cfg.context, cfg.mean, cfg.std, cfg.antialias)
            by_setting.setdefault(key, {}).setdefault(cfg.sampling_ratio, []).append(index)
        self.groups = [(key, ratio, models) for key, by_ratio in by_setting.items() for ratio, models in by_ratio.items()]
        self.pending: list[list[tuple[_Image, int, torch.Tensor]]] = [[] for _ in self.groups]
        self.filled = [0] * len(self.groups)
        self.jobs: deque[_Image] = deque()

    def add_failed(self, job: _Image) -> None:
        self.jobs.append(job)

    def add(self, job: _Image, image: np.ndarray) -> None:
        """Queue an image whose ``job.boxes`` are set; runs every batch that fills up."""
        det, n = self.det, len(job.boxes)
        num_outputs = det.vocabulary.num_classes + 1
        job.probs = torch.zeros((n, num_outputs), device=det.device)
        job.deltas = torch.zeros((n, 4 * (num_outputs - 1)), device=det.device)
        job.waiting = n * len(self.groups)
        self.jobs.append(job)
        if n == 0:
            return
        start = self.clock.start()
        source = image
        if det.device.type != "cpu":  # the image goes to the device once, as uint8 (pinned, non-blocking)
            source = torch.from_numpy(np.ascontiguousarray(image)).pin_memory()
            source = source.to(det.device, non_blocking=True).permute(2, 0, 1)
        job.timings["warp"] += self.clock.stop("warp", start)
        pyramid, pyramid_key = None, None
        for group, (key, ratio, _) in enumerate(self.groups):  # groups of one setting are consecutive
            if key != pyramid_key:  # one pyramid per input setting, shared by the ensemble
                start = self.clock.start()
                pyramid, pyramid_key = image_pyramid(source, job.boxes, *key, det.device), key
                job.timings["warp"] += self.clock.stop("warp", start)
            self._queue(group, job, pyramid, ratio)

    def _queue(self, group: int, job: _Image, pyramid: list[torch.Tensor], ratio: int) -> None:
        """Warp the image's boxes for one group in pieces that top up its pending batch."""
        size, context = self.groups[group][0][:2]
        boxes = job.boxes
        start_box = 0
        while start_box < len(boxes):
            take = min(len(boxes) - start_box, self.det.batch_size - self.filled[group])
            start = self.clock.start()
            crops = warp_pyramid(pyramid, boxes[start_box:start_box + take], size, context, ratio)
            job.timings["warp"] += self.clock.stop("warp", start)
            self.pending[group].append((job, start_box, crops))
            self.filled[group] += take
            start_box += take
            if self.filled[group] == self.det.batch_size:
                self._run(group)

    def _run(self, group: int) -> None:
        """One forward pass of the group's models over its pending crops; outputs go back to their images."""
        pieces = self.pending[group]
        if not pieces:
            return
        start = self.clock.start()
        batch = pieces[0][2] if len(pieces) == 1 else torch.cat([crops for _, _, crops in pieces])
        probs, deltas = self.det._run_models(self.groups[group][2], batch)
        row = 0
        for job, first, crops in pieces:
            rows = slice(first, first + len(crops))
            job.probs[rows] += probs[row:row + len(crops)]
            job.deltas[rows] += deltas[row:row + len(crops)]
            job.waiting -= len(crops)
            row += len(crops)
        seconds = self.clock.stop("classify", start)
        for job, _, crops in pieces:  # a shared forward pass is split by the images' numbers of crops
            job.timings["classify"] += seconds * len(crops) / len(batch)
        self.pending[group] = []
        self.filled[group] = 0

    def flush(self) -> None:
        """Run the partial batches."""
        for group in range(len(self.groups)):
            self._run(group)

    def finished(self) -> Iterator[_Image]:
        """The leading images whose crops are all classified (submission order)."""
        while self.jobs and self.jobs[0].waiting == 0:
            yield self.jobs.popleft()


def default_model() -> Path | None:
    """The installed default model's weights path, or ``None`` if it is not installed."""
    return installed(DEFAULT_MODEL)


def load_detector(models: str | os.PathLike | Sequence[str | os.PathLike] | None = None, **options) -> Detector:
    """``Detector.from_checkpoint`` of ``models``, or of the installed default model when ``None``.

    Raises :class:`UserError` saying how to get a model if none is given and none is installed.
    """
    if models is None or (not isinstance(models, (str, os.PathLike)) and len(models) == 0):
        models = default_model()
        if models is None:
            raise UserError(NO_DEFAULT_MODEL)
    return Detector.from_checkpoint(models, **options)
