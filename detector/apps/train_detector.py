"""Fine-tune the region classifier R-CNN style: proposals -> warped regions -> GoogLeNet with box regression.

    gdet-train --train DATA --out runs/NAME --time-budget 30m      # a plan for the machine and the budget
    gdet-train --train TRAIN --val VAL --out runs/NAME [options]
    gdet-train ... --nproc N                                          # N processes (DistributedDataParallel)
    python -m torch.distributed.run --nproc_per_node N tools/train_detector.py ...   # the same, by hand

--time-budget chooses the crop size, the iterations (from the speed measured in a short warm-up) and the
stages, holds out training images for choosing the checkpoint when there is no --val, and leaves OUT/best;
an option given explicitly overrides its choice. A new run starts from the shipped model's trunk
(detector/resources/default_detector, trained on chess pieces) unless --backbone-weights,
--init-checkpoint or --from-scratch says otherwise; a checkpoint with other classes gives its trunk, and
the class-specific heads start new.

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
import functools
import os
import sys
from dataclasses import replace
from pathlib import Path

from detector.base.checkpoint import DEFAULT_MODEL, installed, load_checkpoint_config
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
from detector.base.threads import add_threads_argument, configure_threads, usable_cores
from detector.data import open_dataset
from detector.training.bounded import IMAGE_CACHE_MB
from detector.training.budget import parse_duration
from detector.training.launch import launch, launched_by_torchrun, process_rank
from detector.training.sampler import FG_BALANCE, SamplerConfig
from detector.training.schedule import ScheduleConfig


def duration(text: str) -> float:
    """An argparse type: seconds of ``90s``, ``30m`` or ``1.5h``."""
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> ToolParser:
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
    g.add_argument("--image-cache-mb", type=non_negative_number, default=IMAGE_CACHE_MB, metavar="MB",
                   help="decoded images each process (training workers, validation) keeps, at most; a set "
                        f"whose images do not all fit is read each time (default {IMAGE_CACHE_MB:g}; 0: never kept)")
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
    g.add_argument("--backbone-weights", help="torchvision ImageNet googlenet weights file for the trunk")
    g.add_argument("--init-checkpoint",
                   help="start from this detector checkpoint, a new schedule: every layer if it has this data's "
                        "classes, else its trunk and new class-specific heads (default: the shipped model's "
                        "trunk, detector/resources/default_detector, trained on chess pieces only)")
    g.add_argument("--from-scratch", action="store_true", help="random initial weights (no default trunk)")
    g = p.add_argument_group("sampler (every threshold is an interval of the region's max IoU)")
    g.add_argument("--regions-per-batch", type=positive_int, default=128, help="regions per batch and process (default: 128)")
    g.add_argument("--images-per-batch", type=positive_int, default=2, help="images per batch and process (default: 2)")
    g.add_argument("--fg-fraction", type=probability, default=0.25, help="foreground share (default: 0.25)")
    g.add_argument("--fg-iou", type=iou, default=0.5, help="foreground: IoU in [fg_iou, 1] (default: 0.5)")
    g.add_argument("--bg-iou-low", type=probability, default=0.1, help="background: IoU in [low, high) (default: 0.1)")
    g.add_argument("--bg-iou-high", type=probability, default=0.5, help="(default: 0.5)")
    g.add_argument("--regression-iou", type=iou, default=0.6,
                   help="box regression on IoU in [value, 1] (default: 0.6)")
    g.add_argument("--fg-balance", choices=FG_BALANCE, default="none",
                   help="how an image's foreground regions are drawn: none (uniformly, R-CNN) or class (each class "
                        "in the image an equal share) (default: none)")
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
    g.add_argument("--box-voting", type=probability, default=0.0, metavar="IOU",
                   help="move each kept box to the score-weighted mean of the same-class boxes overlapping it "
                        "with IoU >= IOU (default: 0, off)")
    g = p.add_argument_group("time budget (each choice also set by its own option: an explicit option wins)")
    g.add_argument("--time-budget", type=duration, metavar="DURATION",
                   help="train within this time (90s, 30m, 1.5h; proposals not counted): crop size, iterations "
                        "and stages planned from a short warm-up, OUT/best at the end")
    g.add_argument("--hold-out", type=non_negative_int, default=None, metavar="N",
                   help="without --val, hold out N training images to choose the checkpoint (default: none; "
                        "with --time-budget a tenth, 5 to 30, none below 40 images)")
    g.add_argument("--stages", type=int, choices=(1, 2), default=None,
                   help="--time-budget: 1 (one crop size) or 2 (small, then a fine-tune at the larger; "
                        "default: planned)")
    g = p.add_argument_group("running")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                   help="start N training processes here (DistributedDataParallel; default 1, with "
                        "--time-budget one per core up to 2 on a CPU, one per GPU)")
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
                           "cores, divided among torchrun's processes on this machine, but one; 0: in the "
                           "training process)")
    g.add_argument("--seed", type=seed, default=0)
    g.add_argument("--no-progress", action="store_true")
    return p


# What --time-budget chooses unless the option is given: the default chess model's recipe (model card)
# and detection on every proposal (up to 2,000: on BCCD, recall at IoU 0.5 is 0.875 with 1,000, 0.93 with 2,000)
BUDGET_DEFAULTS = {"regions_per_batch": 64, "fg_fraction": 0.5, "bg_iou_low": 0.0, "lr": 0.02, "log_every": 10,
                   "eval_max_proposals": MAX_PROPOSALS}


def parse_args(argv):
    """The arguments, with ``explicit``: the options given on the command line (a budget run plans the rest)."""
    args = build_parser().parse_args(argv)
    probe = build_parser()
    for action in probe._actions:  # no defaults: the namespace holds only what was given
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(probe.parse_args(argv)))
    return args


def gpu_count() -> int:
    """NVIDIA GPUs on this machine, read without importing torch (0 where the driver shows none)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def apply_budget_defaults(args) -> None:
    """Fill in what --time-budget chooses, leaving every explicit option as given."""
    for name, value in BUDGET_DEFAULTS.items():
        if name not in args.explicit:
            setattr(args, name, value)
    precision = "amp" if hasattr(args, "amp") else "precision"
    if precision not in args.explicit and args.device in ("auto", "cpu") and not gpu_count():
        from detector.device import cpu_has_native_bf16  # torch: after configure_threads

        if cpu_has_native_bf16():  # bf16 autocast: ~2.8x the fp32 speed on this machine's AMX (TRAINING.md)
            setattr(args, precision, "bf16")


def default_nproc(args) -> int:
    if args.nproc is not None:
        return args.nproc
    if args.time_budget is None or launched_by_torchrun():
        return 1
    gpus = gpu_count() if args.device != "cpu" else 0
    return gpus if gpus else min(2, usable_cores())


def resolve_init(args) -> None:
    """The weights a new run starts from: --backbone-weights, --init-checkpoint, else the shipped model's
    trunk (measured better than random weights on BCCD, see docs/TRAINING.md) unless --from-scratch."""
    if args.from_scratch and (args.init_checkpoint or args.backbone_weights):
        raise UserError("--from-scratch contradicts --init-checkpoint / --backbone-weights; give one of them")
    if args.init_checkpoint is None and not args.backbone_weights and not args.from_scratch:
        if installed(DEFAULT_MODEL) is not None:
            args.init_checkpoint = str(DEFAULT_MODEL)


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
                                add_gt=not args.no_gt, flip=not args.no_flip, fg_balance=args.fg_balance)
        engine = EngineConfig(out_dir=args.out, schedule=schedule, momentum=args.momentum,
                              weight_decay=args.weight_decay, checkpoint_every=args.checkpoint_every,
                              keep_snapshots=args.keep_snapshots, eval_every=args.eval_every,
                              log_every=args.log_every, precision=args.precision, grad_clip=args.grad_clip,
                              num_workers=args.workers, seed=args.seed, progress=not args.no_progress)
        post = PostprocessConfig(score_threshold=args.score_threshold, nms_iou=args.nms_iou,
                                 max_detections=args.max_detections, box_voting=args.box_voting)
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
        verify_images=args.verify_images, resume=args.resume, image_cache_mb=args.image_cache_mb)


def classifier_config(args, num_classes: int):
    """The classifier: the crop and the input normalization of --init-checkpoint when given (its trunk was
    trained on that input), else ImageNet's (and torchvision's [-1, 1] for --backbone-weights)."""
    from detector.classifier import ClassifierConfig  # torch: after parsing and configure_threads

    settings = {"transform_input": bool(args.backbone_weights)}
    if args.init_checkpoint:
        source = load_checkpoint_config(args.init_checkpoint).get("classifier", {})
        settings = {k: source[k] for k in ("mean", "std", "transform_input") if k in source}
    try:
        return ClassifierConfig(num_classes=num_classes, input_size=args.input_size, context=args.context,
                                dropout=args.dropout, **settings)
    except (TypeError, ValueError) as err:
        raise UserError(f"model settings: {err}") from None


def prepare(argv: list[str] | None):
    """Parse and check every argument, once (before any process is started): returns the run's config,
    its budget (or None), the number of processes and the device."""
    args = parse_args(argv)
    if args.time_budget is not None:
        if args.resume:
            raise UserError("--resume continues one training stage: resume RUN/stage<k>-<size>px without "
                            "--time-budget, or start the budget run again in a new --out")
        apply_budget_defaults(args)
    nproc = default_nproc(args)
    if nproc > 1 and launched_by_torchrun():
        raise UserError("--nproc under torchrun: torchrun already started the processes; leave --nproc out")
    configure_threads(args.threads, processes=nproc)  # before torch is imported
    resolve_init(args)
    config = build_config(args)
    check_output_folder(args.out, "--out")  # before any work: the run folder can be written
    if args.proposal_cache:
        check_output_folder(args.proposal_cache, "--proposal-cache")
    # the number of classes comes from the training set's vocabulary
    num_classes = open_dataset(args.train, args.train_split, annotations=args.ilsvrc_annotations,
                               image_root=args.image_root, progress=False).vocab.num_classes
    config = replace(config, classifier=classifier_config(args, num_classes))
    budget = None
    if args.time_budget is not None:
        from detector.training.budget_run import BudgetConfig  # torch: after configure_threads

        budget = BudgetConfig(budget_s=args.time_budget, held_out=args.hold_out,
                              input_size=args.input_size if "input_size" in args.explicit else None,
                              iterations=args.iterations if "iterations" in args.explicit else None,
                              stages=args.stages, lr=args.lr)
    return config, budget, nproc, args.device, args.hold_out or 0


def train_process(config, budget, device: str, held_out: int) -> int:
    """One training process (all of them under --nproc or torchrun): the run, and its exit code; only
    rank 0 prints a user error, every rank returns its code (2)."""
    return run_tool(functools.partial(_train, config, budget, device, held_out), [],
                    print_errors=process_rank() == 0)


def _train(config, budget, device: str, held_out: int, argv=None) -> int:
    # torch: after parsing and configure_threads (which must run before torch is imported)
    from detector.training.budget_run import run_budget
    from detector.training.distributed import distributed_run
    from detector.training.rcnn import run_training

    with distributed_run(device) as ctx:
        report = print if ctx.is_main else (lambda s: None)
        if budget is not None:
            result = run_budget(config, budget, ctx, report)
            if ctx.is_main:
                best = (f"best held-out mAP {result.best_metric:.4f} (stage {result.best_stage})"
                        if result.best_metric is not None else "no held-out images: the last weights")
                print(f"trained in {result.train_s / 60:.1f} min of a {budget.budget_s / 60:.1f} min budget "
                      f"(+ {result.prepare_s / 60:.1f} min data and proposals); {best}; "
                      f"gdet-detect --model {result.out_dir / 'best'}")
            return 0
        result = run_training(config, ctx, report, held_out=held_out)
    if ctx.is_main:
        best = (f", best validation mAP {result.best_metric:.4f} at iteration {result.best_iteration}"
                if result.best_metric is not None else "")
        print(f"trained {result.iterations} iterations in {result.seconds / 60:.1f} min{best}; checkpoints in "
              f"{result.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    config, budget, nproc, device, held_out = prepare(argv)
    if nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return launch(train_process, nproc, (config, budget, device, held_out))
    return _train(config, budget, device, held_out)


def cli() -> int:
    """The console script ``gdet-train`` (and ``python tools/train_detector.py``): one-line errors, an exit code;
    under torchrun only rank 0 prints one, and every rank exits with it."""
    return run_tool(main, print_errors=process_rank() == 0)


if __name__ == "__main__":
    sys.exit(cli())
