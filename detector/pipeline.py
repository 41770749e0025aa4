"""The detector: image -> proposals -> warp -> classify -> regress -> per-class NMS -> detections.

``Detector.from_checkpoint(path)`` (or a list of paths: an ensemble, whose class probabilities and box
deltas are averaged, as GoogLeNet's entry averaged 6 networks) builds everything from checkpoints;
``detector(image)`` returns :class:`Detections` in the image's own pixel coordinates.

Classification runs in batches under ``torch.inference_mode()``, with channels-last memory, on CUDA
when available; ``precision="auto"`` uses bf16 autocast where the hardware has native bf16 (CUDA with
bf16, or a CPU with AVX512-BF16/AMX) and fp32 elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import clip_boxes_to_image

from detector.base.checkpoint import checkpoint_paths
from detector.base.defaults import BOX_CODER_WEIGHTS, MAX_PROPOSALS, PRECISIONS, PROPOSAL_METHOD
from detector.base.errors import UserError
from detector.base.io import load_image
from detector.base.vocab import Vocabulary
from detector.box_coder import BoxCoder
from detector.classifier import ClassifierConfig, RegionClassifier, build_classifier_from_checkpoint
from detector.postprocess import PostprocessConfig, postprocess
from detector.warp import image_pyramid, warp_pyramid
from proposals.propose import propose

DEFAULT_MODEL = Path(__file__).resolve().parent / "resources" / "default_detector"
NO_DEFAULT_MODEL = ("no model is installed: the default model (detector/resources/default_detector"
                    ".safetensors + .json) has not been trained yet; train one with tools/train_detector.py "
                    "and pass it with --model PATH")


@dataclass(frozen=True)
class Detections:
    """Detections of one image, highest score first.

    boxes: float32 ``(K, 4)`` xyxy, pixels of the original image, clipped to it.
    scores: float32 ``(K,)`` class probabilities in [0, 1].
    labels: int64 ``(K,)`` contiguous labels in ``1..C``.
    class_names: ``K`` names, ``class_names[i]`` of ``labels[i]``.
    class_ids: int64 ``(K,)`` the dataset's own class ids (ILSVRC DET id, COCO category id, ...).
    image_size: ``(h, w)``.
    timings: seconds per stage: ``proposals``, ``warp``, ``classify`` (the network), ``postprocess``
        (box decoding, NMS) and ``total``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    class_ids: np.ndarray
    image_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def to_records(self) -> list[dict]:
        """One JSON-ready dict per detection: ``label`` (name), ``class_id``, ``score``, ``box`` (xyxy)."""
        return [{"label": name, "class_id": int(cid), "score": float(score),
                 "box": [round(float(v), 2) for v in box]}
                for name, cid, score, box in zip(self.class_names, self.class_ids, self.scores, self.boxes)]


@dataclass(frozen=True)
class ProposalSettings:
    """Where proposals come from when the caller passes none.

    source: a method name for :func:`proposals.propose` (``"ss-fast"``, ...), or a store object with
        ``store[image_name] -> (boxes, scores or None)`` (``proposals.ProposalStore``).
    options: keyword options for the method.
    max_proposals: use at most this many (the first, i.e. best, ones), >= 1.
    """

    source: object = PROPOSAL_METHOD
    options: dict = field(default_factory=dict)
    max_proposals: int = MAX_PROPOSALS

    def __post_init__(self):
        if self.max_proposals < 1:  # 0 or less is an error, never "use the default"
            raise UserError(f"max proposals must be >= 1, got {self.max_proposals}")


class StageClock:
    """Accumulates wall time per stage (waiting for the GPU at each boundary)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def finish(self) -> dict[str, float]:
        return {**self.timings, "total": time.perf_counter() - self._start}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None``: CUDA if available, else CPU; otherwise the named device (checked)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but CUDA is not available here; use --device cpu")
    return dev


def cpu_has_native_bf16() -> bool:
    """True if the CPU advertises AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``torch.bfloat16`` or ``torch.float32`` for ``"auto"``, ``"bf16"`` or ``"fp32"`` on ``device``."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def _same_setting(configs: list[dict], key: str, paths) -> dict:
    first = configs[0].get(key)
    for cfg, path in zip(configs[1:], paths[1:]):
        if cfg.get(key) != first:
            raise UserError(f"ensemble: checkpoint '{path}' has other {key} than '{paths[0]}'; an ensemble's "
                            "checkpoints must share them")
    return first


class Detector:
    """Callable ``image -> Detections`` built from one or more classifiers (an ensemble).

    models: region classifiers (eval mode) sharing ``vocabulary`` and the box coder.
    proposals: :class:`ProposalSettings` used when a call passes no boxes.
    postprocess_config: score threshold, NMS IoU, max detections.
    device: where the warp and the network run; precision: ``"auto"``, ``"fp32"`` or ``"bf16"``.
    batch_size: regions per network forward pass.
    """

    def __init__(self, models: Sequence[RegionClassifier], vocabulary: Vocabulary,
                 proposals: ProposalSettings = ProposalSettings(),
                 postprocess_config: PostprocessConfig = PostprocessConfig(),
                 box_coder: BoxCoder | None = None, device: str | torch.device | None = "auto",
                 precision: str = "auto", batch_size: int = 64):
        if not models:
            raise ValueError("a detector needs at least one model")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.models = [m.eval().to(self.device, memory_format=torch.channels_last) for m in models]
        self.vocabulary = vocabulary
        self.proposals = proposals
        self.postprocess_config = postprocess_config
        self.box_coder = box_coder or BoxCoder()
        self.batch_size = batch_size
        self._names = np.array(("background",) + vocabulary.names, dtype=object)
        self._ids = np.array((0,) + vocabulary.ids, dtype=np.int64)

    @classmethod
    def from_checkpoint(cls, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                        device: str | torch.device | None = "auto", precision: str = "auto",
                        batch_size: int = 64, proposals: object | None = None,
                        proposal_options: dict | None = None, max_proposals: int | None = None,
                        score_threshold: float | None = None, nms_iou: float | None = None,
                        max_detections: int | None = None) -> Detector:
        """A detector from one checkpoint or a list (an ensemble).

        Settings left ``None`` come from the (first) checkpoint's config: the proposal method and
        options, ``max_proposals``, and the post-processing settings.
        """
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise UserError("no checkpoint given")
        dev = resolve_device(device)
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
                                           ("max_detections", max_detections)) if v is not None}
            post = replace(post, **overrides)
        except (TypeError, ValueError) as err:
            raise UserError(f"post-processing settings: {err}") from None
        return cls(models, vocabulary, settings, post, BoxCoder(tuple(coder["weights"])), dev, precision,
                   batch_size)

    # -- the data flow -------------------------------------------------------------------------------

    def __call__(self, image, proposals=None, image_name: str | None = None) -> Detections:
        """Detect objects in ``image`` (RGB ``uint8 (H, W, 3)`` array, or a path).

        proposals: float ``(N, 4)`` xyxy boxes in pixels of ``image`` to classify instead of the
            configured source; image_name: the key for a proposal store.
        """
        image = load_image(image) if isinstance(image, (str, os.PathLike)) else np.asarray(image)
        clock = StageClock(self.device)
        with clock("proposals"):
            boxes = self.propose(image, proposals, image_name)
        probs, deltas = self.classify(image, boxes, clock)
        with clock("postprocess"):
            class_boxes = self.box_coder.decode(deltas, boxes)
            kept = postprocess(probs, class_boxes, image.shape[:2], self.postprocess_config)
        return self._detections(kept, image.shape[:2], clock.finish())

    def propose(self, image: np.ndarray, proposals=None, image_name: str | None = None) -> torch.Tensor:
        """Proposals for ``image``: float32 ``(N, 4)`` xyxy, clipped, without empty boxes, at most
        ``max_proposals`` (the first ones)."""
        if proposals is None:
            proposals = self._from_source(image, image_name)
        if isinstance(proposals, tuple):  # (boxes, scores) from a store or method
            proposals = proposals[0]
        boxes = torch.as_tensor(np.asarray(proposals, dtype=np.float32)).reshape(-1, 4)
        boxes = clip_boxes_to_image(boxes[: self.proposals.max_proposals], image.shape[:2])
        return boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])].to(self.device)

    def _from_source(self, image: np.ndarray, image_name: str | None):
        source = self.proposals.source
        if isinstance(source, str):
            try:
                return propose(image, method=source, **self.proposals.options)
            except ValueError as err:
                raise UserError(f"proposals: {err}") from None
        if image_name is None:
            raise UserError("proposals come from a store, which needs the image's name (image_name=...)")
        reason = "not in the store"
        for key in dict.fromkeys((str(image_name), Path(image_name).name, Path(image_name).stem)):
            try:
                found = source[key]
            except KeyError as err:
                reason = str(err.args[0]) if err.args else reason
                continue
            stored_size = source.image_size(key) if hasattr(source, "image_size") else image.shape[:2]
            if tuple(stored_size) != tuple(image.shape[:2]):
                raise UserError(f"proposal store: '{image_name}' was {stored_size[1]}x{stored_size[0]} when its "
                                f"proposals were computed, now {image.shape[1]}x{image.shape[0]}; recompute them")
            return found
        raise UserError(f"proposal store has no proposals for '{image_name}' ({reason}); precompute them for "
                        "this image")

    def classify(self, image: np.ndarray, boxes: torch.Tensor, clock: StageClock
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp ``boxes`` and run every model on them in batches.

        Returns the ensemble's mean class probabilities, float32 ``(N, C + 1)``, and mean box deltas,
        float32 ``(N, 4 C)``, on the CPU.
        """
        num_classes = self.vocabulary.num_classes
        probs = torch.zeros((len(boxes), num_classes + 1))
        deltas = torch.zeros((len(boxes), 4 * num_classes))
        if len(boxes) == 0:
            return probs, deltas
        pyramids = {}  # ensemble members with the same input settings share one pyramid
        for model in self.models:
            cfg: ClassifierConfig = model.config
            with clock("warp"):
                key = (cfg.input_size, cfg.context, cfg.mean, cfg.std, cfg.antialias)
                if key not in pyramids:
                    pyramids[key] = image_pyramid(image, boxes.cpu(), cfg.input_size, cfg.context, cfg.mean,
                                                  cfg.std, cfg.antialias, self.device)
                pyramid = pyramids[key]
            for start in range(0, len(boxes), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                with clock("warp"):
                    crops = warp_pyramid(pyramid, boxes[chunk], cfg.input_size, cfg.context, cfg.sampling_ratio)
                    crops = crops.contiguous(memory_format=torch.channels_last)
                with clock("classify"), torch.inference_mode(), self._autocast():
                    out = model(crops)
                    probs[chunk] += out.class_logits.float().softmax(dim=1).cpu()
                    deltas[chunk] += out.box_deltas.float().cpu()
        n = len(self.models)
        return probs / n, deltas / n

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def _detections(self, kept, image_size: tuple[int, int], timings: dict[str, float]) -> Detections:
        labels = kept.labels.cpu().numpy().astype(np.int64)
        return Detections(boxes=kept.boxes.cpu().numpy().astype(np.float32),
                          scores=kept.scores.cpu().numpy().astype(np.float32), labels=labels,
                          class_names=tuple(self._names[labels].tolist()), class_ids=self._ids[labels],
                          image_size=(int(image_size[0]), int(image_size[1])), timings=timings)


def default_model() -> Path | None:
    """The installed default model's weights path, or ``None`` if it is not installed."""
    weights, config = checkpoint_paths(DEFAULT_MODEL)
    return weights if weights.is_file() and config.is_file() else None


def load_detector(models: str | os.PathLike | Sequence[str | os.PathLike] | None = None, **options) -> Detector:
    """``Detector.from_checkpoint`` of ``models``, or of the installed default model when ``None``.

    Raises :class:`UserError` saying how to get a model if none is given and none is installed.
    """
    if models is None or (not isinstance(models, (str, os.PathLike)) and len(models) == 0):
        models = default_model()
        if models is None:
            raise UserError(NO_DEFAULT_MODEL)
    return Detector.from_checkpoint(models, **options)
