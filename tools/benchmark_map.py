"""Benchmark mAP: evaluate detections against a dataset's ground truth with the ILSVRC, VOC or COCO protocol.

ILSVRC DET (the official devkit's rules, same numbers as eval_detection.m):
    python tools/benchmark_map.py --protocol ilsvrc --predictions FILE --annotations DIR \\
        --image-list FILE --meta FILE [--blacklist FILE] --json OUT [--plot DIR]
  FILE lines: <image id> <DET id> <confidence> <xmin> <ymin> <xmax> <ymax> (1-based, inclusive).

PASCAL VOC (VOC2010+ all-point AP, or --use-07-metric for the VOC2007 11-point AP):
    python tools/benchmark_map.py --protocol voc --predictions FILE --annotations VOC_ROOT \\
        [--split test] [--use-07-metric] [--iou 0.5] --json OUT [--plot DIR]
  FILE lines: <image id> <class name or id> <confidence> <xmin> <ymin> <xmax> <ymax> (1-based, inclusive).

COCO (pycocotools COCOeval, 12 numbers):
    python tools/benchmark_map.py --protocol coco --predictions RESULTS.json --annotations INSTANCES.json \\
        --json OUT [--plot DIR]

Ground truth in another format: --gt-format ilsvrc|voc|coco (default: the protocol's own); predictions
then use that format's file (ILSVRC submission lines, VOC lines, or a COCO results JSON).
Prints a per-class table (id, name, positives, AP) and the mean. Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from detector.cli import run_tool
from detector.errors import UserError

PROTOCOLS = ("ilsvrc", "voc", "coco")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=PROTOCOLS, required=True, help="evaluation protocol")
    p.add_argument("--predictions", type=Path, required=True,
                   help="detections file (ILSVRC submission lines, VOC lines, or a COCO results JSON)")
    p.add_argument("--annotations", type=Path, required=True,
                   help="ILSVRC: folder of XML files; VOC: dataset root; COCO: instances JSON")
    p.add_argument("--gt-format", choices=PROTOCOLS, help="ground-truth format (default: the protocol's own)")
    g = p.add_argument_group("ILSVRC")
    g.add_argument("--image-list", type=Path, help="val.txt-style list '<image name> <image id>'")
    g.add_argument("--meta", type=Path, help="the devkit's meta_det.mat (default: the shipped 200 classes)")
    g.add_argument("--blacklist", type=Path, help="'<image id> <wnid>' pairs to ignore")
    g.add_argument("--strict", action="store_true",
                   help="reject prediction lines with xmax < xmin or ymax < ymin (the devkit evaluates them)")
    g = p.add_argument_group("VOC")
    g.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt (default: test)")
    g.add_argument("--use-07-metric", action="store_true", help="VOC2007 11-point AP instead of all-point")
    g.add_argument("--iou", type=float, default=0.5, help="IoU threshold, a match is IoU in [iou, 1] (default 0.5)")
    g = p.add_argument_group("COCO")
    g.add_argument("--image-root", type=Path, help="COCO images folder (only recorded, not read)")
    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, help="write the result as JSON")
    g.add_argument("--plot", type=Path, help="write PR curves and the AP bar chart (PNG) into this folder")
    g.add_argument("--rows", type=int, default=None, help="print at most this many table rows (default: all)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load_ground_truth(args):
    """The dataset of ``--annotations`` in ``--gt-format``."""
    from detector.data import read_coco, read_ilsvrc_det, read_voc

    fmt = args.gt_format or args.protocol
    if fmt == "ilsvrc":
        if args.image_list is None:
            raise UserError("--image-list is required for ILSVRC ground truth (e.g. data/det_lists/val.txt)")
        vocab = None
        if args.meta is not None:
            from detector.vocab import read_meta_det

            if not args.meta.is_file():
                raise UserError(f"{args.meta}: meta file not found")
            try:
                vocab = read_meta_det(args.meta)
            except (ValueError, OSError, KeyError) as err:
                raise UserError(f"{args.meta}: not a devkit meta_det.mat ({err})") from None
        return read_ilsvrc_det(args.image_list, args.annotations, vocab=vocab, blacklist=args.blacklist,
                               progress=not args.quiet)
    if fmt == "voc":
        return read_voc(args.annotations, args.split)
    return read_coco(args.annotations, image_root=args.image_root)


def load_predictions(args, dataset):
    """Detections of ``--predictions`` in the ground truth's format: a path the evaluator reads itself when
    that is exact (ILSVRC files for ILSVRC, COCO results for COCO), else an in-memory mapping."""
    from detector.evaluation import coco_results_to_detections, read_ilsvrc_predictions, read_voc_predictions
    from detector.evaluation.submission import predictions_to_detections

    fmt = args.gt_format or args.protocol
    if fmt == "ilsvrc":
        if args.protocol == "ilsvrc":
            return args.predictions
        preds = read_ilsvrc_predictions(args.predictions, dataset.vocab.ids, strict_boxes=args.strict,
                                        progress=not args.quiet)
        return predictions_to_detections(preds, dataset)
    if fmt == "voc":
        return read_voc_predictions(args.predictions, dataset)
    if args.protocol == "coco":
        return args.predictions
    return coco_results_to_detections(args.predictions, dataset)


def evaluate(args, dataset, detections):
    from detector.evaluation import evaluate_coco, evaluate_ilsvrc, evaluate_voc

    if args.protocol == "ilsvrc":
        return evaluate_ilsvrc(dataset, detections, strict_boxes=args.strict, progress=not args.quiet)
    if args.protocol == "voc":
        return evaluate_voc(dataset, detections, iou_threshold=args.iou, use_07_metric=args.use_07_metric)
    fmt = args.gt_format or args.protocol
    return evaluate_coco(args.annotations if fmt == "coco" else dataset, detections)


def report(args, result) -> None:
    from detector.evaluation import plot_results, save_json

    print(result.table(max_rows=args.rows))
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        for path in plot_results(result, args.plot):
            print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.iou <= 1.0:
        raise UserError(f"--iou {args.iou} is outside (0, 1]")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest: print(f"warning: {message}", file=sys.stderr)
        dataset = load_ground_truth(args)
        detections = load_predictions(args, dataset)
        result = evaluate(args, dataset, detections)
    report(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
