"""Make MultiBox priors: k-means (distance 1 - IoU) over a dataset's ground-truth boxes.

    python tools/make_priors.py --annotations ../shared/data/chess/train/_annotations.coco.json \\
        --k 200 --out priors.json
    python tools/make_priors.py --annotations VOCdevkit/VOC2007 --split trainval --k 800 --out priors.json
    python tools/make_priors.py --annotations ILSVRC2013_DET_bbox_val --image-list det_lists/val.txt \\
        --k 800 --out priors.json

The priors are normalized (cx, cy, w, h) boxes, written as JSON with how they were made and how well
they cover the boxes (mean best IoU). The same inputs and seed give the same file.
"""

from __future__ import annotations

import argparse
import json
import sys

from detector.base.cli import ToolParser, run_tool
from detector.base.errors import UserError
from detector.base.files import check_output_file
from detector.base.options import positive_int, seed
from detector.data import open_dataset
from proposals.priors import kmeans_priors, mean_best_iou, normalized_gt_boxes, save_priors


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True,
                        help="COCO .json, VOC root, or ILSVRC Annotations folder (with --image-list)")
    parser.add_argument("--split", default="train", help="VOC split (ImageSets/Main/<split>.txt); default train")
    parser.add_argument("--image-list", help="ILSVRC image list (val.txt style) for an Annotations folder")
    parser.add_argument("--k", type=positive_int, default=800, help="number of priors (default 800)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the k-means++ seeding (default 0)")
    parser.add_argument("--max-iter", type=positive_int, default=100, help="Lloyd iterations at most (default 100)")
    parser.add_argument("--out", required=True, help="output JSON file")
    args = parser.parse_args(argv)
    check_output_file(args.out, "--out")  # before any work
    dataset = open_dataset(args.annotations, args.split, args.image_list)
    boxes = normalized_gt_boxes(dataset.records)
    if len(boxes) == 0:
        raise UserError(f"annotations '{args.annotations}' hold no boxes with an area; check the split")
    try:
        priors = kmeans_priors(boxes, args.k, seed=args.seed, max_iter=args.max_iter)
    except ValueError as err:
        raise UserError(f"annotations '{args.annotations}': {err}") from None
    coverage = mean_best_iou(boxes, priors)
    info = {"annotations": str(args.annotations), "split": args.split, "k": args.k, "seed": args.seed,
            "num_boxes": int(len(boxes)), "num_images": len(dataset), "mean_best_iou": round(coverage, 6)}
    save_priors(args.out, priors, info)
    print(json.dumps({"out": str(args.out), **info}))
    print(f"{args.k} priors from {len(boxes)} boxes of {len(dataset)} images; mean best IoU {coverage:.3f} "
          f"-> {args.out}", file=sys.stderr)
    return 0


def cli() -> int:
    """The console script ``gdet-priors`` (and ``python tools/make_priors.py``): one-line errors, an exit code."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
