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
from pathlib import Path

from detector.cli import run_tool
from detector.errors import UserError


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    model.add_argument("--num-priors", type=int, default=800, help="without --priors: cluster this many "
                       "priors from the training boxes (default 800)")
    model.add_argument("--input-size", type=int, default=224, help="network input side in pixels (default 224)")
    model.add_argument("--trunk-end", default="inception5b", help="last GoogLeNet stage kept (default "
                       "inception5b, the whole trunk; inception4e keeps a stride-16 map)")
    model.add_argument("--head-channels", type=int, default=64)
    model.add_argument("--head-grid", type=int, default=7)
    model.add_argument("--head-hidden", type=int, default=512)
    model.add_argument("--dropout", type=float, default=0.3)
    model.add_argument("--alpha", type=float, default=0.3, help="location weight in the cost and loss (0.3)")
    model.add_argument("--match-to-priors", action="store_true", help="match ground truth to the priors, "
                       "not the predictions")
    model.add_argument("--top-k", type=int, default=200, help="boxes kept at inference (default 200)")
    model.add_argument("--nms-iou", type=float, default=0.7, help="inference NMS IoU (default 0.7)")
    model.add_argument("--backbone-weights", help="local torchvision ImageNet GoogLeNet weights (.pth or "
                       ".safetensors); default: from scratch")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=int, default=8, help="images per batch and process (default 8)")
    opt.add_argument("--iterations", type=int, default=2000)
    opt.add_argument("--lr", type=float, default=0.01, help="base learning rate (default 0.01)")
    opt.add_argument("--warmup-iters", type=int, default=100)
    opt.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    opt.add_argument("--steps", type=int, nargs="*", default=(), help="iterations of the step decays")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=5e-4)
    opt.add_argument("--grad-clip", type=float, default=10.0, help="gradient norm clip (0: none; default 10)")
    opt.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto")
    opt.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="run directory")
    run.add_argument("--resume", help="run directory or last.state.pt to continue from")
    run.add_argument("--checkpoint-every", type=int, default=200)
    run.add_argument("--eval-every", type=int, default=200)
    run.add_argument("--metric", default="mabo", choices=("mabo", "recall_0.5", "recall_0.7", "mabo@10",
                                                          "mabo@50", "recall_0.5@10", "recall_0.5@50"),
                     help="held-out measure that picks the best checkpoint (default mabo)")
    run.add_argument("--log-every", type=int, default=20)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    run.add_argument("--workers", type=int, default=0, help="data-loading processes")
    run.add_argument("--export", help="write the best (else last) model here as NAME.safetensors + NAME.json")
    run.add_argument("--half", action="store_true", help="with --export: store the weights as float16")
    run.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from detector.training.distributed import cleanup, init_distributed
    from detector.training.engine import EngineConfig
    from detector.training.schedule import ScheduleConfig
    from proposals.multibox import MultiBox, MultiBoxConfig, load_multibox, save_multibox
    from proposals.multibox_data import BatchConfig, ResizedImages, open_dataset
    from proposals.multibox_training import train_multibox
    from proposals.priors import kmeans_priors, load_priors, mean_best_iou, normalized_gt_boxes

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    report = print if ctx.is_main else (lambda *_: None)
    try:
        train_set = open_dataset(args.annotations, args.split, args.image_list, args.image_root)
        if len(train_set) == 0:
            raise UserError(f"training set '{args.annotations}' has no images; check the split or list")
        boxes = normalized_gt_boxes(train_set.records)
        if args.priors:
            priors = load_priors(args.priors)
            priors_source = str(args.priors)
        else:
            try:
                priors = kmeans_priors(boxes, args.num_priors, seed=args.seed)
            except ValueError as err:
                raise UserError(f"training set '{args.annotations}': {err}") from None
            priors_source = f"k-means of the training boxes, k={args.num_priors}, seed {args.seed}"
        report(f"{len(priors)} priors ({priors_source}); they cover the training boxes with mean best IoU "
               f"{mean_best_iou(boxes, priors):.3f}")
        # torchvision's ImageNet GoogLeNet weights were trained on inputs in [-1, 1] (its transform_input)
        norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)} if args.backbone_weights else {}
        try:
            config = MultiBoxConfig(num_priors=len(priors), input_size=args.input_size, trunk_end=args.trunk_end,
                                    head_channels=args.head_channels, head_grid=args.head_grid,
                                    head_hidden=args.head_hidden, dropout=args.dropout, alpha=args.alpha,
                                    match_to_priors=args.match_to_priors, nms_iou=args.nms_iou, top_k=args.top_k,
                                    **norm)
            schedule = ScheduleConfig(base_lr=args.lr, iterations=args.iterations, warmup_iters=args.warmup_iters,
                                      kind=args.schedule, steps=tuple(args.steps))
            engine = EngineConfig(out_dir=args.out, schedule=schedule, momentum=args.momentum,
                                  weight_decay=args.weight_decay, checkpoint_every=args.checkpoint_every,
                                  eval_every=args.eval_every, metric=args.metric, log_every=args.log_every,
                                  amp=args.amp, grad_clip=args.grad_clip, num_workers=args.workers,
                                  seed=args.seed, progress=not args.no_progress)
        except ValueError as err:
            raise UserError(f"bad option: {err}") from None
        torch.manual_seed(args.seed)
        model = MultiBox(config, priors, args.backbone_weights,
                         expected_per_image=len(boxes) / max(1, len(train_set)))
        preload = not args.no_preload
        train_images = ResizedImages(train_set, args.input_size, preload=preload, progress=ctx.is_main)
        val_images = None
        if args.val_annotations:
            val_set = open_dataset(args.val_annotations, args.val_split, args.val_image_list, args.val_image_root)
            val_images = ResizedImages(val_set, args.input_size, preload=True, progress=ctx.is_main)
        failed = train_images.failed + (val_images.failed if val_images else [])
        if failed:
            report(f"{len(failed)} unreadable image(s) skipped: " + "; ".join(p for p, _ in failed[:5])
                   + (" ..." if len(failed) > 5 else ""))
        data_key = {"annotations": str(args.annotations), "split": args.split, "images": len(train_images),
                    "priors": priors_source}
        result = train_multibox(model, train_images, BatchConfig(args.batch_size, True, args.seed), engine, ctx,
                                val_images, args.resume, data_key, report)
        if ctx.is_main:
            out = Path(args.out)
            chosen = out / ("best.safetensors" if (out / "best.safetensors").exists() else "last.safetensors")
            summary = {"out": str(out), "iterations": result.iterations, "seconds": round(result.seconds, 1),
                       "best_" + args.metric: result.best_metric, "best_iteration": result.best_iteration,
                       "chosen": str(chosen)}
            if args.export:
                trained = load_multibox(chosen)
                extra = {"training": {**trained.config.training, "priors": priors_source,
                                      "annotations": str(args.annotations)}}
                save_multibox(args.export, trained, half=args.half, extra=extra)
                summary["export"] = str(args.export)
            print(json.dumps(summary))
    finally:
        cleanup(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
