"""Train a MultiBox proposal network (Erhan et al. 2014; Szegedy et al. 2014) on any dataset the readers know.

    python tools/train_multibox.py --annotations ../shared/data/chess/train/_annotations.coco.json \\
        --val-annotations ../shared/data/chess/valid/_annotations.coco.json --num-priors 200 \\
        --input-size 160 --iterations 2000 --out runs/multibox
    torchrun --nproc_per_node 8 tools/train_multibox.py --annotations ... --priors priors.json ...

Whole images are resized to --input-size and flipped at random; ground truth is matched to the K
predictions by the Hungarian algorithm (see proposals/multibox.py). Priors come from --priors (a file of
tools/make_priors.py) or are clustered from the training boxes (--num-priors). The run directory gets
last/best checkpoints (safetensors + JSON), metrics.jsonl, curves.png and last.state.pt for --resume;
--export writes the best model (fp16 with --half) where proposals.propose(method="multibox") can load it.
Under torchrun each process trains on its own images with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import sys

from detector.base.checkpoint import checkpoint_paths
from detector.base.cli import ToolParser, run_tool
from detector.base.errors import UserError
from detector.base.files import check_output_file, check_output_folder
from detector.base.options import (
    add_precision_argument,
    iou,
    learning_rate,
    non_negative_int,
    non_negative_number,
    positive_int,
    seed,
    unit_fraction,
)
from detector.base.threads import add_threads_argument, configure_threads
from detector.training.schedule import ScheduleConfig


def parse_args(argv):
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--annotations", required=True, help="training set: COCO .json, VOC root, or ILSVRC "
                      "Annotations folder (with --image-list and --image-root)")
    data.add_argument("--split", default="train", help="VOC split of the training set (default train)")
    data.add_argument("--image-list", help="ILSVRC image list of the training set")
    data.add_argument("--image-root", help="image folder (COCO: default the JSON's folder; ILSVRC: required)")
    data.add_argument("--val-annotations", help="held-out set that picks the best checkpoint (same forms)")
    data.add_argument("--val-split", default="val", help="VOC split of the held-out set (default val)")
    data.add_argument("--val-image-list", help="ILSVRC image list of the held-out set")
    data.add_argument("--val-image-root", help="image folder of the held-out set")
    data.add_argument("--no-preload", action="store_true", help="read images lazily (large sets) instead of "
                      "resizing them all into memory first")
    model = p.add_argument_group("model")
    model.add_argument("--priors", help="priors JSON from tools/make_priors.py")
    model.add_argument("--num-priors", type=positive_int, default=800, help="without --priors: cluster this many "
                       "priors from the training boxes (default 800)")
    model.add_argument("--input-size", type=positive_int, default=224, help="network input side in pixels (default 224)")
    model.add_argument("--trunk-end", default="inception5b", help="last GoogLeNet stage kept (default "
                       "inception5b, the whole trunk; inception4e keeps a stride-16 map)")
    model.add_argument("--head-channels", type=positive_int, default=64)
    model.add_argument("--head-grid", type=positive_int, default=7)
    model.add_argument("--head-hidden", type=positive_int, default=512)
    model.add_argument("--dropout", type=unit_fraction, default=0.3)
    model.add_argument("--alpha", type=non_negative_number, default=0.3, help="location weight in the cost and loss (0.3)")
    model.add_argument("--match-to-priors", action="store_true", help="match ground truth to the priors, "
                       "not the predictions")
    model.add_argument("--top-k", type=positive_int, default=200, help="boxes kept at inference (default 200)")
    model.add_argument("--nms-iou", type=iou, default=0.7, help="inference NMS IoU (default 0.7)")
    model.add_argument("--backbone-weights", help="local torchvision ImageNet GoogLeNet weights (.pth or "
                       ".safetensors); default: from scratch")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=positive_int, default=8, help="images per batch and process (default 8)")
    opt.add_argument("--iterations", type=positive_int, default=2000)
    opt.add_argument("--lr", type=learning_rate, default=0.01, help="base learning rate (default 0.01)")
    opt.add_argument("--warmup-iters", type=non_negative_int, default=100)
    opt.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    opt.add_argument("--steps", type=positive_int, nargs="*", default=(), help="iterations of the step decays")
    opt.add_argument("--momentum", type=unit_fraction, default=0.9)
    opt.add_argument("--weight-decay", type=non_negative_number, default=5e-4)
    opt.add_argument("--grad-clip", type=non_negative_number, default=10.0, help="gradient norm clip (0: none; default 10)")
    add_precision_argument(opt, "mixed precision (auto: bf16 autocast on a GPU that has it, fp32 on the CPU; "
                                "fp16: a GPU only)")
    opt.add_argument("--seed", type=seed, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="run directory")
    run.add_argument("--resume", help="run directory or last.state.pt to continue from")
    run.add_argument("--checkpoint-every", type=non_negative_int, default=200)
    run.add_argument("--eval-every", type=non_negative_int, default=200)
    run.add_argument("--metric", default="mabo", choices=("mabo", "recall_0.5", "recall_0.7", "mabo@10",
                                                          "mabo@50", "recall_0.5@10", "recall_0.5@50"),
                     help="held-out measure that picks the best checkpoint (default mabo)")
    run.add_argument("--log-every", type=positive_int, default=20)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_threads_argument(run)
    run.add_argument("--workers", type=non_negative_int, default=None,
                        help="data-loading processes, spawned (default: the usable cores, divided among "
                             "torchrun's processes on this machine, but one; 0: load in the training process)")
    run.add_argument("--export", help="write the best (else last) model here as NAME.safetensors + NAME.json")
    run.add_argument("--half", action="store_true", help="with --export: store the weights as float16")
    run.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_config(args):
    """The run's :class:`MultiBoxTrainConfig` from the arguments; a bad value is a :class:`UserError`."""
    # torch (the configs' modules): after parsing, so that --help and bad flags answer at once
    from detector.training.engine import EngineConfig
    from detector.training.multibox import DatasetSource, MultiBoxTrainConfig
    from proposals.multibox import MultiBoxConfig

    val = None
    if args.val_annotations:
        val = DatasetSource(args.val_annotations, args.val_split, args.val_image_list, args.val_image_root)
    try:
        model = MultiBoxConfig(num_priors=args.num_priors, input_size=args.input_size, trunk_end=args.trunk_end,
                               head_channels=args.head_channels, head_grid=args.head_grid,
                               head_hidden=args.head_hidden, dropout=args.dropout, alpha=args.alpha,
                               match_to_priors=args.match_to_priors, nms_iou=args.nms_iou, top_k=args.top_k)
        schedule = ScheduleConfig(base_lr=args.lr, iterations=args.iterations, warmup_iters=args.warmup_iters,
                                  kind=args.schedule, steps=tuple(args.steps))
        engine = EngineConfig(out_dir=args.out, schedule=schedule, momentum=args.momentum,
                              weight_decay=args.weight_decay, checkpoint_every=args.checkpoint_every,
                              eval_every=args.eval_every, metric=args.metric, log_every=args.log_every,
                              precision=args.precision, grad_clip=args.grad_clip, num_workers=args.workers,
                              seed=args.seed, progress=not args.no_progress)
    except ValueError as err:
        raise UserError(f"bad option: {err}") from None
    return MultiBoxTrainConfig(
        train=DatasetSource(args.annotations, args.split, args.image_list, args.image_root), engine=engine,
        model=model, priors_file=args.priors, backbone_weights=args.backbone_weights, val=val,
        batch_size=args.batch_size, preload=not args.no_preload, resume=args.resume, export=args.export,
        half=args.half)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    # torch: after parsing and configure_threads (which must run before torch is imported)
    from detector.training.distributed import distributed_run
    from detector.training.multibox import run_multibox_training

    config = build_config(args)
    if args.export:  # every output path before any work
        for path in checkpoint_paths(args.export):
            check_output_file(path, "--export")
    check_output_folder(args.out, "--out")
    with distributed_run(args.device) as ctx:
        summary = run_multibox_training(config, ctx, report=print if ctx.is_main else (lambda *_: None))
    if ctx.is_main:
        print(json.dumps(summary))
    return 0


def cli() -> int:
    """The console script ``gdet-train-multibox`` (and ``python tools/train_multibox.py``): one-line errors, an exit code."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
