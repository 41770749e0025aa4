"""Fine-tune the region classifier R-CNN style: proposals -> warped regions -> GoogLeNet with box regression.

    python tools/train_detector.py --train TRAIN --val VAL --out runs/NAME [options]
    python -m torch.distributed.run --nproc_per_node N tools/train_detector.py ...   # several processes

TRAIN and VAL: a COCO instances .json, a PASCAL VOC folder (with --train-split/--val-split), or an ILSVRC
DET image list .txt (with --ilsvrc-annotations and --image-root). Proposals come from a precomputed store
(--proposal-store, see tools/precompute_proposals.py) or are computed once, by --workers processes, into a
proposal store in --proposal-cache (--proposal-method, --proposal-options; a rerun reuses it). Mini-batches of --regions-per-batch regions from
--images-per-batch images: --fg-fraction foreground (IoU in [--fg-iou, 1]) and background (IoU in
[--bg-iou-low, --bg-iou-high)). Writes into --out: last/best/iter_* checkpoints (.safetensors + .json),
last.state.pt (for --resume), metrics.jsonl and curves.png.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from detector.base.cli import ToolParser, run_tool
from detector.base.defaults import MAX_PROPOSALS
from detector.base.errors import UserError
from detector.base.files import check_output_folder
from detector.base.options import (
    add_precision_argument,
    comma_ints,
    iou,
    json_object,
    learning_rate,
    non_negative_int,
    non_negative_number,
    positive_int,
    positive_number,
    probability,
    proposal_method,
    seed,
    unit_fraction,
)
from detector.base.threads import add_threads_argument, configure_threads
from detector.data import open_dataset
from detector.training.sampler import SamplerConfig
from detector.training.schedule import ScheduleConfig


def parse_args(argv):
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train", required=True, help="training set (COCO .json, VOC folder or ILSVRC list .txt)")
    g.add_argument("--val", help="held-out set for periodic evaluation and the best checkpoint")
    g.add_argument("--train-split", default="trainval", help="VOC split of --train (default: trainval)")
    g.add_argument("--val-split", default="test", help="VOC split of --val (default: test)")
    g.add_argument("--ilsvrc-annotations", help="ILSVRC: folder of the XML annotations")
    g.add_argument("--image-root", help="folder the images are relative to (ILSVRC; COCO default: the JSON's folder)")
    g.add_argument("--val-images", type=positive_int, default=None,
                   help="evaluate on the first N >= 1 images of --val only (default: all)")
    g.add_argument("--verify-images", action="store_true",
                   help="decode every image before training (default: check headers; corrupt ones are skipped "
                        "and listed in OUT/skipped_images.txt)")
    g = p.add_argument_group("proposals")
    g.add_argument("--proposal-store", help="precomputed proposals (proposals.ProposalStore path)")
    g.add_argument("--proposal-method", default="ss-fast", type=proposal_method,
                   help="proposals.propose method (default: ss-fast)")
    g.add_argument("--proposal-options", default='{"max_side": 500}', type=json_object,
                   help='JSON options of the method (default: {"max_side": 500})')
    g.add_argument("--proposal-cache", metavar="DIR",
                   help="where computed proposals are stored: a proposal store per split and setting, "
                        "DIR/<split>-<digest> (default: OUT/proposals)")
    g.add_argument("--max-proposals", type=positive_int, default=MAX_PROPOSALS,
                   help=f"proposals per training image (default: {MAX_PROPOSALS})")
    g.add_argument("--eval-max-proposals", type=positive_int, default=1000,
                   help="proposals per image at detection, saved in the checkpoint (default: 1000)")
    g = p.add_argument_group("model")
    g.add_argument("--input-size", type=positive_int, default=224, help="warped crop side S in pixels (default: 224)")
    g.add_argument("--context", type=non_negative_int, help="context pixels per side at S (default: 16 * S / 224)")
    g.add_argument("--dropout", type=unit_fraction, default=0.4, help="dropout before the heads (default: 0.4)")
    g.add_argument("--backbone-weights", help="torchvision ImageNet googlenet weights file (default: from scratch)")
    g.add_argument("--init-checkpoint", help="start from this detector checkpoint (same model; a new schedule)")
    g = p.add_argument_group("sampler (every threshold is an interval of the region's max IoU)")
    g.add_argument("--regions-per-batch", type=positive_int, default=128, help="regions per batch and process (default: 128)")
    g.add_argument("--images-per-batch", type=positive_int, default=2, help="images per batch and process (default: 2)")
    g.add_argument("--fg-fraction", type=probability, default=0.25, help="foreground share (default: 0.25)")
    g.add_argument("--fg-iou", type=iou, default=0.5, help="foreground: IoU in [fg_iou, 1] (default: 0.5)")
    g.add_argument("--bg-iou-low", type=probability, default=0.1, help="background: IoU in [low, high) (default: 0.1)")
    g.add_argument("--bg-iou-high", type=probability, default=0.5, help="(default: 0.5)")
    g.add_argument("--regression-iou", type=iou, default=0.6,
                   help="box regression on IoU in [value, 1] (default: 0.6)")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    g.add_argument("--no-gt", action="store_true", help="do not add the ground-truth boxes as positives")
    g = p.add_argument_group("optimization")
    g.add_argument("--iterations", type=positive_int, default=40000, help="iterations (default: 40000)")
    g.add_argument("--lr", type=learning_rate, default=0.01, help="base learning rate (default: 0.01)")
    g.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    g.add_argument("--steps", default="", type=comma_ints, help="step schedule: comma-separated iterations >= 1")
    g.add_argument("--gamma", type=positive_number, default=0.1, help="step schedule factor (default: 0.1)")
    g.add_argument("--warmup-iters", type=non_negative_int, default=500, help="linear warm-up iterations (default: 500)")
    g.add_argument("--momentum", type=unit_fraction, default=0.9)
    g.add_argument("--weight-decay", type=non_negative_number, default=5e-4)
    g.add_argument("--aux-weight", type=non_negative_number, default=0.3, help="weight of each auxiliary loss (default: 0.3)")
    g.add_argument("--box-weight", type=non_negative_number, default=1.0, help="weight of the box regression loss (default: 1)")
    g.add_argument("--grad-clip", type=non_negative_number, default=0.0, help="clip the gradient norm (default: 0, none)")
    g = p.add_argument_group("detection (saved in the checkpoint)")
    g.add_argument("--score-threshold", type=probability, default=0.05)
    g.add_argument("--nms-iou", type=iou, default=0.3, help="per-class NMS: suppress IoU in (value, 1]")
    g.add_argument("--max-detections", type=positive_int, default=100)
    g = p.add_argument_group("running")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--resume", help="continue from a run folder or its last.state.pt")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=1000)
    g.add_argument("--keep-snapshots", action="store_true", help="keep every periodic checkpoint as iter_NNNNNN")
    g.add_argument("--eval-every", type=non_negative_int, default=0, help="iterations between evaluations (0: at the end only)")
    g.add_argument("--log-every", type=positive_int, default=20)
    add_precision_argument(g, "mixed precision (auto: bf16 autocast on a GPU that has it, fp32 on the CPU; fp16: a "
                              "GPU only)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_threads_argument(g)
    g.add_argument("--workers", type=non_negative_int, default=None,
                      help="processes loading data and computing proposals, spawned (default: the usable "
                           "cores but one; 0: in the training process)")
    g.add_argument("--seed", type=seed, default=0)
    g.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_config(args):
    # torch (the configs' modules) and numba (the proposal methods): after parsing, so --help answers at once
    from detector.postprocess import PostprocessConfig
    from detector.training.engine import EngineConfig
    from detector.training.losses import LossConfig
    from detector.training.rcnn import DetectorTrainConfig, ProposalConfig
    from proposals.propose import check_options

    options = args.proposal_options  # a JSON object (its type), whose options are checked without running them
    if args.proposal_store is None:
        try:
            check_options(args.proposal_method, options)
        except ValueError as err:
            raise UserError(f"--proposal-options: {err}") from None
    steps = args.steps  # whole numbers >= 1 (its type)
    try:
        schedule = ScheduleConfig(base_lr=args.lr, iterations=args.iterations, warmup_iters=args.warmup_iters,
                                  kind=args.schedule, steps=steps, gamma=args.gamma)
        sampler = SamplerConfig(regions_per_batch=args.regions_per_batch, images_per_batch=args.images_per_batch,
                                fg_fraction=args.fg_fraction, fg_iou=args.fg_iou, bg_iou_low=args.bg_iou_low,
                                bg_iou_high=args.bg_iou_high, regression_iou=args.regression_iou,
                                add_gt=not args.no_gt, flip=not args.no_flip)
        engine = EngineConfig(out_dir=args.out, schedule=schedule, momentum=args.momentum,
                              weight_decay=args.weight_decay, checkpoint_every=args.checkpoint_every,
                              keep_snapshots=args.keep_snapshots, eval_every=args.eval_every,
                              log_every=args.log_every, precision=args.precision, grad_clip=args.grad_clip,
                              num_workers=args.workers, seed=args.seed, progress=not args.no_progress)
        post = PostprocessConfig(score_threshold=args.score_threshold, nms_iou=args.nms_iou,
                                 max_detections=args.max_detections)
        proposals = ProposalConfig(method=args.proposal_method, options=options, store=args.proposal_store,
                                   cache_dir=args.proposal_cache or f"{args.out}/proposals", workers=args.workers,
                                   max_proposals=args.max_proposals, eval_max_proposals=args.eval_max_proposals)
    except ValueError as err:
        raise UserError(str(err)) from None
    return DetectorTrainConfig(
        train=args.train, val=args.val, out_dir=args.out, classifier=None, engine=engine, sampler=sampler,
        loss=LossConfig(aux_weight=args.aux_weight, box_weight=args.box_weight), proposals=proposals,
        postprocess=post, train_split=args.train_split, val_split=args.val_split,
        ilsvrc_annotations=args.ilsvrc_annotations, image_root=args.image_root, val_images=args.val_images or 0,
        backbone_weights=args.backbone_weights, init_checkpoint=args.init_checkpoint,
        verify_images=args.verify_images, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    # torch: after parsing and configure_threads (which must run before torch is imported)
    from detector.classifier import ClassifierConfig
    from detector.training.distributed import distributed_run
    from detector.training.rcnn import run_training

    config = build_config(args)
    check_output_folder(args.out, "--out")  # before any work: the run folder can be written
    if args.proposal_cache:
        check_output_folder(args.proposal_cache, "--proposal-cache")
    # the number of classes comes from the training set's vocabulary
    num_classes = open_dataset(args.train, args.train_split, annotations=args.ilsvrc_annotations,
                               image_root=args.image_root, progress=not args.no_progress).vocab.num_classes
    try:
        classifier = ClassifierConfig(num_classes=num_classes, input_size=args.input_size, context=args.context,
                                      dropout=args.dropout, transform_input=bool(args.backbone_weights))
    except ValueError as err:
        raise UserError(f"model settings: {err}") from None
    config = replace(config, classifier=classifier)
    with distributed_run(args.device) as ctx:
        result = run_training(config, ctx, report=(print if ctx.is_main else (lambda s: None)))
    if ctx.is_main:
        best = (f", best validation mAP {result.best_metric:.4f} at iteration {result.best_iteration}"
                if result.best_metric is not None else "")
        print(f"trained {result.iterations} iterations in {result.seconds / 60:.1f} min{best}; checkpoints in "
              f"{result.out_dir}")
    return 0


def cli() -> int:
    """The console script ``gdet-train`` (and ``python tools/train_detector.py``): one-line errors, an exit code."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
