"""MultiBox: a network that predicts K class-agnostic boxes and their objectness in one pass.

Erhan et al., "Scalable Object Detection using Deep Neural Networks" (CVPR 2014) and Szegedy et al.,
"Scalable, High-Quality Object Detection" (arXiv 1412.1441): an Inception trunk looks at the whole
image, resized to ``S x S``; a head predicts, for each of K *priors* (k-means centres of the training
boxes, :mod:`proposals.priors`), a box as an offset from its prior and one confidence logit.

Coordinates: the network works in normalized ``xyxy`` (fractions of the image width and height, the
image's top-left corner at 0 and bottom-right at 1); a predicted box is ``prior_xyxy + offset``.
Pixels of the original image appear only in :meth:`MultiBox.propose`.

Training (:func:`multibox_loss`): the ground-truth boxes of each image are assigned to predictions by
the Hungarian algorithm on the MultiBox cost (Erhan et al., eq. 1-3)

    cost(i, j) = alpha/2 * ||l_i - g_j||^2 - log(sigmoid(c_i)) + log(1 - sigmoid(c_i))

and the loss is ``alpha/2 * sum of ||l_i - g_j||^2 over matched pairs`` plus the logistic loss of every
confidence, with target 1 for matched predictions and 0 for all others (alpha = 0.3 by default).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, nms

from detector.base.checkpoint import load_checkpoint, save_checkpoint
from detector.base.defaults import IMAGENET_MEAN, IMAGENET_STD
from detector.base.errors import UserError

MODEL_KIND = "multibox"
DEFAULT_MODEL = Path(__file__).resolve().parent / "resources" / "default_multibox.safetensors"
TRUNK_STAGES = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                "inception5a", "inception5b")
TRUNK_CHANNELS = {"inception3b": 480, "inception4a": 512, "inception4b": 512, "inception4c": 512,
                  "inception4d": 528, "inception4e": 832, "inception5a": 832, "inception5b": 1024}


@dataclass(frozen=True)
class MultiBoxConfig:
    """Everything that rebuilds a MultiBox network and says how to use it (saved in the checkpoint JSON).

    num_priors: K, the number of boxes predicted per image.
    input_size: side S of the square the whole image is resized to.
    trunk_end: the last torchvision GoogLeNet stage kept (``inception5b`` is the whole trunk; an earlier
        one, e.g. ``inception4e``, keeps a finer feature map and fewer weights).
    head_channels, head_grid: the trunk's map is reduced to ``head_channels`` by a 1x1 convolution and
        pooled to ``head_grid x head_grid``, keeping where things are; then a hidden layer of
        ``head_hidden`` units and the output layer of ``5 K`` values (4 offsets and 1 logit per prior).
    dropout: before the output layer, in training.
    alpha: weight of the location term in the matching cost and the loss.
    match_to_priors: assign ground truth to the priors by location alone (Szegedy et al. 2014 match
        against the priors), a target that does not move as the network learns; False is Erhan et al.'s
        rule (predicted boxes and confidences).
    nms_iou: inference NMS suppresses a box whose IoU with a better one is in ``(nms_iou, 1]``.
    top_k: boxes kept per image after NMS.
    mean, std: per-channel RGB normalization of pixel values in [0, 1].
    """

    num_priors: int = 800
    input_size: int = 224
    trunk_end: str = "inception5b"
    head_channels: int = 64
    head_grid: int = 7
    head_hidden: int = 512
    dropout: float = 0.3
    alpha: float = 0.3
    match_to_priors: bool = False
    nms_iou: float = 0.7
    top_k: int = 200
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    training: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.trunk_end not in TRUNK_CHANNELS:
            raise ValueError(f"trunk_end must be one of {', '.join(TRUNK_CHANNELS)}, got {self.trunk_end!r}")
        if self.num_priors < 1 or self.input_size < 32 or self.top_k < 1:
            raise ValueError("num_priors and top_k must be >= 1 and input_size >= 32")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")

    def to_dict(self) -> dict:
        return {"kind": MODEL_KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> MultiBoxConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class MultiBoxOutput(NamedTuple):
    """boxes: float ``(B, K, 4)`` normalized xyxy (may leave ``[0, 1]``); logits: float ``(B, K)``."""

    boxes: torch.Tensor
    logits: torch.Tensor


def googlenet_trunk(trunk_end: str = "inception5b", weights_path: str | Path | None = None) -> nn.Sequential:
    """torchvision's GoogLeNet stages ``conv1 .. trunk_end`` as one ``nn.Sequential``.

    weights_path: a local torchvision ImageNet GoogLeNet state dict (``.pth`` read with
    ``weights_only=True``, or ``.safetensors``); None trains from scratch (torchvision's initialization).
    """
    from torchvision.models import googlenet

    net = googlenet(weights=None, aux_logits=False, init_weights=weights_path is None)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise UserError(f"backbone weights '{path}' not found; pass a torchvision GoogLeNet state dict")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to replace
            raise UserError(f"backbone weights '{path}' unreadable ({type(err).__name__}); pass a torchvision "
                            "GoogLeNet state dict") from None
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
        missing, _ = net.load_state_dict(state, strict=False)
        if any(k.startswith(TRUNK_STAGES) for k in missing):
            raise UserError(f"backbone weights '{path}' lack trunk weights ({missing[0]}, ...); pass a "
                            "torchvision GoogLeNet state dict")
    stages = TRUNK_STAGES[:TRUNK_STAGES.index(trunk_end) + 1]
    return nn.Sequential(*[getattr(net, name) for name in stages])


class MultiBox(nn.Module):
    """Inception trunk + MultiBox head; the priors travel with the weights as a buffer.

    priors: float ``(K, 4)`` normalized ``(cx, cy, w, h)`` (from :func:`proposals.priors.kmeans_priors`).
    """

    def __init__(self, config: MultiBoxConfig, priors: np.ndarray | torch.Tensor | None = None,
                 backbone_weights: str | Path | None = None, expected_per_image: float = 4.0):
        super().__init__()
        self.config = config
        k = config.num_priors
        if priors is None:
            priors = torch.full((k, 4), 0.5)
        priors = torch.as_tensor(np.asarray(priors, dtype=np.float32))
        if priors.shape != (k, 4):
            raise ValueError(f"priors must have shape ({k}, 4), got {tuple(priors.shape)}")
        self.register_buffer("priors", priors)  # (K, 4) normalized cxcywh
        self.trunk = googlenet_trunk(config.trunk_end, backbone_weights)
        c = config.head_channels
        self.reduce = nn.Sequential(nn.Conv2d(TRUNK_CHANNELS[config.trunk_end], c, 1, bias=False),
                                    nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(c * config.head_grid ** 2, config.head_hidden),
                                    nn.ReLU(inplace=True), nn.Dropout(config.dropout))
        self.out = nn.Linear(config.head_hidden, 5 * k)
        # Start at the priors (zero offsets) with every confidence at sigmoid = expected boxes / K, so the
        # first losses are those of a sensible guess (the prior-probability initialization of Lin et al.,
        # "Focal Loss for Dense Object Detection", 2017).
        nn.init.normal_(self.out.weight, std=1e-3)
        p = min(max(expected_per_image / k, 1e-4), 0.5)
        with torch.no_grad():
            self.out.bias.zero_()
            self.out.bias[4 * k:] = float(np.log(p / (1 - p)))

    def prior_boxes(self) -> torch.Tensor:
        """The priors as normalized xyxy, ``(K, 4)``."""
        return box_convert(self.priors, "cxcywh", "xyxy")

    def forward(self, images: torch.Tensor) -> MultiBoxOutput:
        """images: float ``(B, 3, S, S)``, normalized. Returns boxes ``(B, K, 4)`` and logits ``(B, K)``."""
        k = self.config.num_priors
        x = self.reduce(self.trunk(images))
        x = F.adaptive_avg_pool2d(x, self.config.head_grid)
        y = self.out(self.hidden(x)).float()
        offsets = y[:, :4 * k].reshape(-1, k, 4)
        return MultiBoxOutput(self.prior_boxes()[None] + offsets, y[:, 4 * k:])

    # ---- inference ---------------------------------------------------------------------------------

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB ``uint8`` images ``(H, W, 3)`` -> float ``(B, 3, S, S)`` normalized, on the model's device."""
        return preprocess_images(images, self.config, device=self.priors.device)

    @torch.no_grad()
    def propose(self, images: list[np.ndarray], top_k: int | None = None, nms_iou: float | None = None,
                batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
        """MultiBox proposals of RGB ``uint8`` images ``(H, W, 3)``.

        Returns, per image, ``(boxes, scores)``: boxes float32 ``(N, 4)`` xyxy in pixels of that image,
        best first, N <= top_k; scores float32 ``(N,)`` sigmoid confidences in ``[0, 1]``.
        """
        was_training = self.training
        self.eval()
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            out = self(self.preprocess(chunk))
            for image, boxes, logits in zip(chunk, out.boxes, out.logits):
                results.append(decode_proposals(boxes, logits, image.shape[:2],
                                                self.config.nms_iou if nms_iou is None else nms_iou,
                                                self.config.top_k if top_k is None else top_k))
        self.train(was_training)
        return results


def preprocess_images(images: list[np.ndarray], config: MultiBoxConfig, device=None) -> torch.Tensor:
    """Resize each whole image to ``S x S`` (area interpolation) and normalize: float ``(B, 3, S, S)``."""
    s = config.input_size
    batch = np.stack([cv2.resize(np.ascontiguousarray(im), (s, s), interpolation=cv2.INTER_AREA) for im in images])
    x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def decode_proposals(boxes: torch.Tensor, logits: torch.Tensor, image_size: tuple[int, int],
                     nms_iou: float = 0.7, top_k: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """One image's predictions -> its proposals.

    boxes: ``(K, 4)`` normalized xyxy; logits: ``(K,)``; image_size: ``(h, w)`` of the original image.
    Sigmoid confidences; boxes scaled to pixels and clipped to the image; boxes with no area dropped;
    class-agnostic NMS (a box is dropped when its IoU with a better one is in ``(nms_iou, 1]``);
    the ``top_k`` best kept. Returns float32 ``(N, 4)`` xyxy pixels and float32 ``(N,)`` scores, best first.
    """
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
    pixels = boxes.float().clamp(0.0, 1.0) * scale
    scores = torch.sigmoid(logits.float())
    keep = ((pixels[:, 2] - pixels[:, 0]) > 0) & ((pixels[:, 3] - pixels[:, 1]) > 0)
    pixels, scores = pixels[keep], scores[keep]
    keep = nms(pixels, scores, nms_iou)[:top_k]
    return pixels[keep].cpu().numpy().astype(np.float32), scores[keep].cpu().numpy().astype(np.float32)


# ---- matching and loss -----------------------------------------------------------------------------


def match(pred_boxes: torch.Tensor, logits: torch.Tensor | None, gt_boxes: torch.Tensor,
          alpha: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment of ground truth to predictions on the MultiBox cost.

    pred_boxes: ``(K, 4)`` normalized xyxy; logits: ``(K,)``, or None to match on location alone (prior
    matching); gt_boxes: ``(G, 4)`` normalized xyxy. Cost ``alpha/2 ||l_i - g_j||^2 - log sigma(c_i) +
    log(1 - sigma(c_i))``, where the confidence part equals ``-c_i`` exactly. Returns
    ``(pred_index, gt_index)``, int64 arrays of length ``min(K, G)``: every ground-truth box gets its
    own prediction when ``G <= K``.
    """
    if len(gt_boxes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pred = pred_boxes.detach().double().cpu()
    gt = gt_boxes.detach().double().cpu()
    cost = 0.5 * alpha * torch.cdist(pred, gt).pow(2)
    if logits is not None:
        cost = cost - logits.detach().double().cpu()[:, None]
    rows, cols = linear_sum_assignment(cost.numpy())
    return rows.astype(np.int64), cols.astype(np.int64)


class MultiBoxLoss(NamedTuple):
    """total = location + confidence, each the mean over the batch of per-image sums."""

    total: torch.Tensor
    location: torch.Tensor
    confidence: torch.Tensor
    num_matched: int


def multibox_loss(output: MultiBoxOutput, gt_boxes: list[torch.Tensor], alpha: float = 0.3,
                  priors_xyxy: torch.Tensor | None = None) -> MultiBoxLoss:
    """The MultiBox loss of a batch.

    output: the network's boxes ``(B, K, 4)`` and logits ``(B, K)``; gt_boxes: B tensors ``(G_b, 4)``,
    normalized xyxy. priors_xyxy: ``(K, 4)``: match on the priors' locations alone (the assignment then
    no longer depends on the network) instead of the predictions and their confidences.
    Per image: ``alpha/2 * sum_matched ||l_i - g_j||^2 + sum_i BCE(c_i, [i matched])``; averaged over images.
    """
    batch = output.logits.shape[0]
    targets = torch.zeros_like(output.logits)
    location = output.boxes.new_zeros(())
    num_matched = 0
    for b in range(batch):
        gt = gt_boxes[b].to(output.boxes)
        if priors_xyxy is None:
            rows, cols = match(output.boxes[b], output.logits[b], gt, alpha)
        else:
            rows, cols = match(priors_xyxy, None, gt, alpha)
        if len(rows):
            rows_t = torch.as_tensor(rows, device=gt.device)
            targets[b, rows_t] = 1.0
            diff = output.boxes[b, rows_t] - gt[torch.as_tensor(cols, device=gt.device)]
            location = location + 0.5 * alpha * diff.pow(2).sum()
            num_matched += len(rows)
    confidence = F.binary_cross_entropy_with_logits(output.logits, targets, reduction="sum")
    location, confidence = location / batch, confidence / batch
    return MultiBoxLoss(location + confidence, location, confidence, num_matched)


# ---- checkpoints -----------------------------------------------------------------------------------


def save_multibox(path: str | Path, model: MultiBox, half: bool = False, extra: dict | None = None) -> None:
    """Write ``NAME.safetensors`` + ``NAME.json`` (the config, with the priors in the weights).

    half: store floating-point weights as float16 (loading returns them to float32); the priors stay
    float32.
    """
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point() and name != "priors":
            value = value.half()
        state[name] = value
    save_checkpoint(path, state, {**model.config.to_dict(), **(extra or {})})


def load_multibox(path: str | Path | None = None, device: str | torch.device = "cpu") -> MultiBox:
    """A MultiBox from a checkpoint (``NAME.safetensors`` or ``NAME.json``); None loads the shipped model."""
    path = DEFAULT_MODEL if path is None else Path(path)
    state, config_dict = load_checkpoint(path)
    if config_dict.get("kind") != MODEL_KIND:
        raise UserError(f"'{path}' is not a MultiBox checkpoint (kind {config_dict.get('kind')!r}); pass one "
                        "written by tools/train_multibox.py")
    config = MultiBoxConfig.from_dict(config_dict)
    model = MultiBox(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"'{path}': weights do not fit its config ({str(err).splitlines()[0]}); the checkpoint "
                        "is damaged or was edited") from None
    return model.to(device).eval()


@functools.lru_cache(maxsize=4)
def cached_multibox(path: str | None = None, device: str = "cpu") -> MultiBox:
    """:func:`load_multibox`, kept in memory so per-image ``propose`` calls load each model once."""
    return load_multibox(path, device)
