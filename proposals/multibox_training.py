"""Training MultiBox with the project's generic engine (:mod:`detector.training.engine`).

The engine owns the loop (SGD, schedule, progress bar, ``metrics.jsonl``, checkpoints, exact resume,
``torchrun``); this module gives it MultiBox's three pieces: batches of whole resized images
(:class:`proposals.multibox_data.MultiBoxBatches`), the loss, and an evaluation of the proposals on
held-out images (recall at IoU 0.5 and 0.7, MABO) that picks the best checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from detector.training.distributed import DistContext
from detector.training.engine import EngineConfig, TrainResult, train
from proposals.multibox import MultiBox, decode_proposals, multibox_loss
from proposals.multibox_data import BatchConfig, MultiBoxBatches, ResizedImages, proposal_quality, to_input

TOP_N = (10, 50)  # also measured on each image's n most confident boxes


def _unwrap(model: nn.Module) -> MultiBox:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def multibox_loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """The engine's ``loss_fn``: forward a batch from :class:`MultiBoxBatches`, return the loss and its parts."""
    net = _unwrap(model)
    config = net.config
    output = model(to_input(batch["images"], config.mean, config.std))
    priors = net.prior_boxes() if config.match_to_priors else None
    loss = multibox_loss(output, batch["boxes"], config.alpha, priors)
    num_images = len(batch["boxes"])
    return loss.total, {"location": float(loss.location.detach()), "confidence": float(loss.confidence.detach()),
                        "matched_per_image": loss.num_matched / max(1, num_images)}


@torch.no_grad()
def evaluate_proposals(model: MultiBox, images: ResizedImages, batch_size: int = 16) -> dict[str, float]:
    """Recall at IoU 0.5 and 0.7, MABO and boxes per image of the model's top-k proposals on ``images``;
    recall at 0.5 and MABO of the 10 and 50 most confident boxes too (``recall_0.5@10``, ``mabo@50``...).

    Works in normalized coordinates, which give the same IoUs as the original pixels (see
    :func:`proposals.multibox_data.proposal_quality`).
    """
    model = _unwrap(model)
    config = model.config
    device = model.priors.device
    preds, gts = [], []
    for start in range(0, len(images), batch_size):
        chunk = [images.get(i) for i in range(start, min(len(images), start + batch_size))]
        x = to_input(torch.from_numpy(np.stack([c[0] for c in chunk])).to(device),
                     config.mean, config.std)
        out = model(x)
        for (_, gt), boxes, logits in zip(chunk, out.boxes, out.logits):
            preds.append(decode_proposals(boxes, logits, (1, 1), config.nms_iou, config.top_k)[0])
            gts.append(gt)
    results = proposal_quality(preds, gts)
    for n in TOP_N:  # how well the confidences rank the boxes
        top = proposal_quality([p[:n] for p in preds], gts)
        results.update({f"recall_0.5@{n}": top["recall_0.5"], f"mabo@{n}": top["mabo"]})
    return results


def train_multibox(model: MultiBox, train_images: ResizedImages, batch_config: BatchConfig,
                   engine_config: EngineConfig, ctx: DistContext = DistContext(),
                   val_images: ResizedImages | None = None, resume=None, data_key: dict | None = None,
                   report=print) -> TrainResult:
    """Train ``model`` on ``train_images``; checkpoints (loadable by :func:`proposals.multibox.load_multibox`)
    go to ``engine_config.out_dir``; with ``val_images`` the best one by ``engine_config.metric`` is kept as
    ``best``. data_key: what identifies the data, checked on resume along with the model and batches."""
    source = MultiBoxBatches(train_images, batch_config, ctx.rank, ctx.world_size)
    model_config = model.config.to_dict()
    model_config.pop("training", None)
    resume_key = {"model": model_config, "batches": asdict(batch_config), "data": data_key or {},
                  "world_size": ctx.world_size}
    evaluate = (lambda m: evaluate_proposals(m, val_images)) if val_images is not None else None
    return train(model, source, multibox_loss_fn, engine_config, ctx, model_config=model_config,
                 resume_key=resume_key, evaluate=evaluate, resume=resume,
                 items_per_batch=batch_config.batch_size, report=report)
