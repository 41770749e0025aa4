"""The region classifier's training loss: classification, auxiliary classifiers, box regression.

- Cross-entropy over ``C + 1`` classes (background is label 0).
- GoogLeNet's two auxiliary classifiers add their cross-entropy weighted 0.3 ("Going Deeper with
  Convolutions", Szegedy et al. 2014, section 5: "their loss gets added to the total loss of the network
  with a discount weight (the losses of the auxiliary classifiers were weighted by 0.3)").
- Smooth-L1 box regression (Fast R-CNN, Girshick 2015, eq. 3) on the class-specific deltas of the
  regions chosen for regression (R-CNN: foreground with IoU >= 0.6), averaged over all regions of the
  batch as in Fast R-CNN, so that its weight does not depend on how many regions regress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    """aux_weight: weight of each auxiliary classifier's loss (GoogLeNet: 0.3).
    box_weight: weight of the box regression loss (Fast R-CNN's lambda: 1).
    smooth_l1_beta: the smooth-L1 transition point, in (weighted) delta units (Fast R-CNN: 1).
    label_smoothing: cross-entropy label smoothing, in [0, 1) (0: none).
    """

    aux_weight: float = 0.3
    box_weight: float = 1.0
    smooth_l1_beta: float = 1.0
    label_smoothing: float = 0.0


def class_specific_deltas(box_deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The 4 deltas of each region's own class.

    box_deltas: float (B, 4C); columns ``4*(c-1) .. 4*(c-1)+3`` belong to label ``c`` in ``1..C``.
    labels: int64 (B,), in ``1..C`` (callers pass foreground rows only).
    Returns float (B, 4).
    """
    per_class = box_deltas.reshape(box_deltas.shape[0], -1, 4)
    return per_class[torch.arange(len(labels), device=labels.device), labels - 1]


def detection_loss(class_logits: torch.Tensor, box_deltas: torch.Tensor | None, labels: torch.Tensor,
                   box_targets: torch.Tensor | None = None, regress: torch.Tensor | None = None,
                   aux_logits: tuple[torch.Tensor, ...] = (), config: LossConfig = LossConfig(),
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts.

    class_logits: float (B, C+1). box_deltas: float (B, 4C) or None (no regression head).
    labels: int64 (B,), ``0..C`` (0 = background). box_targets: float (B, 4), weighted deltas of each
    region's matched ground truth (see :class:`detector.box_coder.BoxCoder`); rows outside ``regress``
    are not read. regress: bool (B,), the regions box regression learns from.
    aux_logits: the auxiliary classifiers' (B, C+1) logits (training mode only).
    Returns ``(loss, parts)`` with parts ``loss_cls``, ``loss_aux``, ``loss_box``, ``accuracy``,
    ``fg_accuracy`` as python floats.
    """
    labels = labels.long()
    loss_cls = F.cross_entropy(class_logits.float(), labels, label_smoothing=config.label_smoothing)
    loss = loss_cls
    loss_aux = class_logits.new_zeros((), dtype=torch.float32)
    for aux in aux_logits:
        loss_aux = loss_aux + F.cross_entropy(aux.float(), labels, label_smoothing=config.label_smoothing)
    loss = loss + config.aux_weight * loss_aux
    loss_box = class_logits.new_zeros((), dtype=torch.float32)
    if box_deltas is not None and box_targets is not None and regress is not None and bool(regress.any()):
        rows = torch.nonzero(regress, as_tuple=False).squeeze(1)
        pred = class_specific_deltas(box_deltas[rows].float(), labels[rows])
        per_region = F.smooth_l1_loss(pred, box_targets[rows].float(), beta=config.smooth_l1_beta,
                                      reduction="none").sum(dim=1)
        loss_box = per_region.sum() / max(1, len(labels))
        loss = loss + config.box_weight * loss_box
    elif box_deltas is not None:
        # keep every parameter in the graph (DistributedDataParallel expects gradients for all of them)
        loss = loss + 0.0 * box_deltas.sum()
    with torch.no_grad():
        predicted = class_logits.argmax(dim=1)
        correct = predicted == labels
        fg = labels > 0
        parts = {
            "loss_cls": float(loss_cls),
            "loss_aux": float(loss_aux),
            "loss_box": float(loss_box),
            "accuracy": float(correct.float().mean()) if len(labels) else 0.0,
            "fg_accuracy": float(correct[fg].float().mean()) if bool(fg.any()) else float("nan"),
        }
    return loss, parts
