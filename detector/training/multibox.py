"""Training MultiBox with the project's generic engine (:mod:`detector.training.engine`).

The engine owns the loop (SGD, schedule, progress bar, ``metrics.jsonl``, checkpoints, exact resume,
``torchrun``); this module gives it MultiBox's three pieces: batches of whole resized images
(:class:`detector.training.multibox_data.MultiBoxBatches`), the loss, and an evaluation of the proposals on
held-out images (recall at IoU 0.5 and 0.7, MABO) that picks the best checkpoint.
:func:`run_multibox_training` is the whole run that ``tools/train_multibox.py`` calls (the counterpart of
:func:`detector.training.rcnn.run_training`): data, priors, model, training, export.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detector.base.errors import UserError
from detector.data import open_dataset
from detector.training.distributed import DistContext
from detector.training.engine import EngineConfig, TrainResult, train
from detector.training.multibox_data import (
    BatchConfig,
    MultiBoxBatches,
    ResizedImages,
    proposal_quality,
    to_input,
)
from proposals.multibox import (
    MultiBox,
    MultiBoxConfig,
    decode_proposals,
    load_multibox,
    multibox_loss,
    save_multibox,
)
from proposals.priors import kmeans_priors, load_priors, mean_best_iou, normalized_gt_boxes

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
    :func:`detector.training.multibox_data.proposal_quality`).
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


# ----------------------------------------------------------------------------------------------------
# the whole run


@dataclass(frozen=True)
class DatasetSource:
    """A dataset named by its annotations (see :func:`detector.data.open_dataset`)."""

    annotations: str
    split: str = "train"
    image_list: str | None = None
    image_root: str | None = None


@dataclass(frozen=True)
class MultiBoxTrainConfig:
    """Everything one MultiBox training run needs (built by ``tools/train_multibox.py``).

    model: the network and its inference settings. ``num_priors`` is the k of the k-means priors of the
        training boxes when ``priors_file`` is None; with a file, K is the file's. ``mean``/``std`` are
        set here from ``backbone_weights`` (see :func:`input_normalization`).
    priors_file: priors JSON from ``tools/make_priors.py``.
    val: held-out images whose proposal quality picks the best checkpoint (``engine.metric``).
    preload: resize every training image into memory first (else read lazily, for large sets).
    export: write the best (else last) model here, float16 weights when ``half``.
    """

    train: DatasetSource
    engine: EngineConfig
    model: MultiBoxConfig = MultiBoxConfig()
    priors_file: str | None = None
    backbone_weights: str | None = None
    val: DatasetSource | None = None
    batch_size: int = 8
    preload: bool = True
    resume: str | None = None
    export: str | None = None
    half: bool = False


def input_normalization(backbone_weights: str | None) -> dict:
    """``{"mean", "std"}`` of the network input: torchvision's ImageNet GoogLeNet weights were trained on
    inputs in ``[-1, 1]`` (its ``transform_input``), so with them the mean and std are 0.5; from scratch,
    ImageNet's statistics (:class:`proposals.multibox.MultiBoxConfig`'s defaults)."""
    if backbone_weights:
        return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return {"mean": MultiBoxConfig.mean, "std": MultiBoxConfig.std}


def _open(source: DatasetSource):
    return open_dataset(source.annotations, source.split, source.image_list, source.image_root)


def choose_priors(config: MultiBoxTrainConfig, boxes: np.ndarray) -> tuple[np.ndarray, str]:
    """``(priors (K, 4) normalized cxcywh, where they came from)``: the priors file, or k-means of the
    training boxes (``boxes``, normalized cxcywh) with ``k = model.num_priors`` and the engine's seed."""
    if config.priors_file:
        return load_priors(config.priors_file), str(config.priors_file)
    try:
        priors = kmeans_priors(boxes, config.model.num_priors, seed=config.engine.seed)
    except ValueError as err:
        raise UserError(f"training set '{config.train.annotations}': {err}") from None
    return priors, f"k-means of the training boxes, k={config.model.num_priors}, seed {config.engine.seed}"


def run_multibox_training(config: MultiBoxTrainConfig, ctx: DistContext = DistContext(), report=print) -> dict:
    """Load the data, choose the priors, build the model, train it and (with ``config.export``) export the
    chosen checkpoint. Returns the run's summary (on every rank; only rank 0 exports)."""
    train_set = _open(config.train)
    if len(train_set) == 0:
        raise UserError(f"training set '{config.train.annotations}' has no images; check the split or list")
    boxes = normalized_gt_boxes(train_set.records)
    priors, priors_source = choose_priors(config, boxes)
    report(f"{len(priors)} priors ({priors_source}); they cover the training boxes with mean best IoU "
           f"{mean_best_iou(boxes, priors):.3f}")
    try:
        model_config = replace(config.model, num_priors=len(priors), **input_normalization(config.backbone_weights))
    except ValueError as err:
        raise UserError(f"bad option: {err}") from None
    torch.manual_seed(config.engine.seed)
    model = MultiBox(model_config, priors, config.backbone_weights,
                     expected_per_image=len(boxes) / max(1, len(train_set)))
    size = model_config.input_size
    train_images = ResizedImages(train_set, size, preload=config.preload, progress=ctx.is_main)
    val_images = None
    if config.val is not None:
        val_images = ResizedImages(_open(config.val), size, preload=True, progress=ctx.is_main)
    failed = train_images.failed + (val_images.failed if val_images else [])
    if failed and ctx.is_main:  # on stderr, as every batch job's failures (each was warned about when read)
        print(f"{len(failed)} unreadable image(s) skipped: " + "; ".join(p for p, _ in failed[:5])
              + (" ..." if len(failed) > 5 else ""), file=sys.stderr)
    data_key = {"annotations": str(config.train.annotations), "split": config.train.split,
                "images": len(train_images), "priors": priors_source}
    batches = BatchConfig(config.batch_size, True, config.engine.seed)
    result = train_multibox(model, train_images, batches, config.engine, ctx, val_images, config.resume,
                            data_key, report)
    out = Path(config.engine.out_dir)
    chosen = out / ("best.safetensors" if (out / "best.safetensors").exists() else "last.safetensors")
    summary = {"out": str(out), "iterations": result.iterations, "seconds": round(result.seconds, 1),
               "best_" + config.engine.metric: result.best_metric, "best_iteration": result.best_iteration,
               "chosen": str(chosen)}
    if config.export and ctx.is_main:
        trained = load_multibox(chosen)
        extra = {"training": {**trained.config.training, "priors": priors_source,
                              "annotations": str(config.train.annotations)}}
        save_multibox(config.export, trained, half=config.half, extra=extra)
        summary["export"] = str(config.export)
    return json.loads(json.dumps(summary))
