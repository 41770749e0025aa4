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
--diagnose DIR (either mode) adds the false-positive analysis of Hoiem et al. (ECCV 2012) at IoU --iou:
localization, duplicate, confusion and background errors among the top-ranked detections of each class
(--diagnose-top K: K x the class's objects, default 1; or all), the AP each type costs, and the class
confusion matrix; it prints the tables and writes diagnose.json, diagnose.png and confusion.png into DIR.

Model mode: detect every image of a dataset with a checkpoint (several --model: an ensemble; "default":
the installed default model), write the dataset's result file, then evaluate it as above:
    python tools/benchmark_map.py --model PATH [--model PATH ...] --dataset ilsvrc --images DIR \
        --image-list FILE --annotations DIR [--meta FILE] [--blacklist FILE] --out DIR [--proposals METHOD|STORE]
    python tools/benchmark_map.py --model PATH --dataset voc --annotations VOC_ROOT [--split test] --out DIR
    python tools/benchmark_map.py --model PATH --dataset coco --annotations INSTANCES.json [--images DIR] --out DIR
  Without --annotations (--dataset ilsvrc only, e.g. the test list) the submission file is written and
  nothing is evaluated.
  --out receives ilsvrc_submission.txt (ILSVRC; 1-based inclusive), coco_results.json (COCO) or
  voc_detections.txt (VOC), evaluation.json, per_class.txt, pr_curves.png, ap_per_class.png,
  run_summary.json (images/s, unreadable images and why) and parts/ (the resumable chunks).
  --protocol defaults to the dataset's (e.g. --dataset coco --protocol voc gives VOC AP50 on COCO data).
  Rerunning the same command resumes a killed run. Under torchrun each rank detects a shard (or pass
  --shard K/N on separate machines sharing --out) and rank 0 (or the last shard) merges and evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from detector.base.checkpoint import NO_DEFAULT_MODEL
from detector.base.cli import ToolParser, run_tool
from detector.base.errors import UserError
from detector.base.files import atomic_write, check_output_file, check_output_folder
from detector.base.jobs import Shard, default_workers, print_failures, refuse_all_failed
from detector.base.options import (
    add_precision_argument,
    diagnose_top,
    iou,
    method_or_store,
    non_negative_int,
    positive_int,
    probability,
    shard,
)
from detector.base.threads import add_threads_argument, configure_threads
from detector.base.vocab import ilsvrc_det_vocabulary, read_meta_det
from detector.data import read_coco, read_ilsvrc_det, read_voc
from detector.data.ilsvrc import read_image_list
from detector.data.records import Dataset, ImageRecord
from detector.evaluation import (
    coco_results_to_detections,
    evaluate_coco,
    evaluate_ilsvrc,
    evaluate_voc,
    plot_results,
    read_ilsvrc_predictions,
    read_voc_predictions,
    save_json,
)
from detector.evaluation.diagnose import DiagnoseConfig, diagnose, save_diagnosis_json
from detector.evaluation.diagnose_report import format_diagnosis, plot_diagnosis
from detector.evaluation.result_files import write_result_file
from detector.evaluation.submission import predictions_to_detections
from proposals.store import open_proposal_source

PROTOCOLS = ("ilsvrc", "voc", "coco")
PLOT_FILES = ("pr_curves.png", "ap_per_class.png")  # what --plot DIR receives (detector.evaluation.report)
DIAGNOSE_FILES = ("diagnose.json", "diagnose.png", "confusion.png")  # what --diagnose DIR receives
# what model mode writes into --out: a result file (detector.evaluation.result_files), the evaluation, the plots
MODEL_FILES = ("ilsvrc_submission.txt", "coco_results.json", "voc_detections.txt", "evaluation.json",
               "per_class.txt", "run_summary.json", *PLOT_FILES)


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=PROTOCOLS, help="evaluation protocol (model mode: default --dataset)")
    p.add_argument("--predictions", type=Path,
                   help="detections file (ILSVRC submission lines, VOC lines, or a COCO results JSON)")
    p.add_argument("--annotations", type=Path,
                   help="ILSVRC: folder of XML files; VOC: dataset root; COCO: instances JSON (with --model "
                        "--dataset ilsvrc it may be left out: detection only, e.g. for the test set)")
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
    g.add_argument("--iou", type=iou, default=0.5,
                   help="IoU threshold in (0, 1], a match is IoU in [iou, 1] (default 0.5)")
    g = p.add_argument_group("COCO")
    g.add_argument("--image-root", type=Path, help="COCO images folder (only recorded, not read)")
    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, help="write the result as JSON")
    g.add_argument("--plot", type=Path, help="write PR curves and the AP bar chart (PNG) into this folder")
    g.add_argument("--rows", type=positive_int, default=None,
                   help="print at most this many (>= 1) table rows (default: all)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--diagnose", type=Path, metavar="DIR",
                   help="false-positive analysis (Hoiem et al.) at IoU --iou and the class confusion matrix: print "
                        "the tables, write diagnose.json, diagnose.png and confusion.png into DIR")
    g.add_argument("--diagnose-top", default="1", metavar="K|all", type=diagnose_top,
                   help="--diagnose analyses the K x N_j most confident detections of each class (N_j: its "
                        "objects; default 1, Hoiem's choice), or all of them")
    add_model_arguments(p)
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model mode (detect every image, write the result file, evaluate it)")
    g.add_argument("--model", action="append", metavar="PATH",
                   help="checkpoint NAME(.safetensors|.json), or 'default'; repeat for an ensemble")
    g.add_argument("--dataset", choices=PROTOCOLS, help="how --annotations is laid out (which reader)")
    g.add_argument("--images", type=Path, help="image folder (ILSVRC: <name>.JPEG; default for VOC: ROOT/JPEGImages, "
                   "for COCO: the JSON's folder)")
    g.add_argument("--out", type=Path, help="output folder (results, evaluation, plots, resumable parts)")
    g.add_argument("--proposals", metavar="METHOD|STORE", type=method_or_store,
                   help="proposal method (ss-fast, googlenet, ...) or a precomputed store (default: the checkpoint's)")
    g.add_argument("--max-proposals", type=positive_int, metavar="N",
                   help="classify at most N >= 1 proposals per image (default: the checkpoint's)")
    g.add_argument("--threshold", type=probability,
                   help="keep detections with score in [T, 1], T in [0, 1] (default: the checkpoint's, 0.05 unless set)")
    g.add_argument("--box-voting", type=probability, metavar="IOU",
                   help="box voting after NMS at this IoU, 0 off (default: the checkpoint's, off unless set)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available; torchrun: this rank's GPU), cpu, cuda:N")
    add_precision_argument(g, "network precision (auto: bf16 where the hardware has it natively, else fp32; fp16: "
                              "a GPU only)")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="regions per forward pass, across images (default 64 on the CPU, 1024 on CUDA)")
    g.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (pays off on a GPU; the first batches compile)")
    g.add_argument("--workers", type=non_negative_int, default=None,
                   help="reading images and their proposals ahead of the network: processes when proposals are "
                        "computed, threads for a store (default: the usable cores but one; 0: in the main thread)")
    g.add_argument("--chunk-size", type=positive_int, default=32, help="images per atomic part file, >= 1 (default 32)")
    add_threads_argument(g)
    g.add_argument("--shard", type=shard, help="K/N: detect shard K of N (default: RANK/WORLD_SIZE under torchrun, else all)")


def load_ground_truth(args):
    """The dataset of ``--annotations`` in ``--gt-format``."""
    fmt = args.gt_format or args.protocol
    if fmt == "ilsvrc":
        if args.image_list is None:
            raise UserError("--image-list is required for ILSVRC ground truth (e.g. data/det_lists/val.txt)")
        return read_ilsvrc_det(args.image_list, args.annotations, vocab=ilsvrc_vocabulary(args),
                               blacklist=args.blacklist, progress=not args.quiet)
    if fmt == "voc":
        return read_voc(args.annotations, args.split)
    return read_coco(args.annotations, image_root=args.image_root)


def ilsvrc_vocabulary(args):
    """The classes of ``--meta`` (a devkit meta_det.mat), or None for the shipped 200 DET classes."""
    if args.meta is None:
        return None
    if not args.meta.is_file():
        raise UserError(f"{args.meta}: meta file not found")
    try:
        return read_meta_det(args.meta)
    except (ValueError, OSError, KeyError) as err:
        raise UserError(f"{args.meta}: not a devkit meta_det.mat ({err})") from None


def listed_images(args):
    """The images of ``--image-list`` without ground truth (an ILSVRC test list): detection only."""
    if args.image_list is None:
        raise UserError("--image-list is required for --dataset ilsvrc (e.g. data/det_lists/test.txt)")
    records = [ImageRecord(image_id=image_id, file_name=f"{name}.JPEG")
               for name, image_id in read_image_list(args.image_list)]
    return Dataset(records=records, vocab=ilsvrc_vocabulary(args) or ilsvrc_det_vocabulary(),
                   image_root=args.images, name=args.image_list.name)


def load_predictions(args, dataset, in_memory: bool = False):
    """Detections of ``--predictions`` in the ground truth's format: a path the evaluator reads itself when
    that is exact (ILSVRC files for ILSVRC, COCO results for COCO) unless ``in_memory``, else an in-memory
    mapping."""
    fmt = args.gt_format or args.protocol
    if fmt == "ilsvrc":
        if args.protocol == "ilsvrc" and not in_memory:
            return args.predictions
        preds = read_ilsvrc_predictions(args.predictions, dataset.vocab.ids, strict_boxes=args.strict,
                                        progress=not args.quiet)
        return predictions_to_detections(preds, dataset)
    if fmt == "voc":
        return read_voc_predictions(args.predictions, dataset)
    if args.protocol == "coco" and not in_memory:
        return args.predictions
    return coco_results_to_detections(args.predictions, dataset)


def evaluate(args, dataset, detections):
    if args.protocol == "ilsvrc":
        return evaluate_ilsvrc(dataset, detections, strict_boxes=args.strict, progress=not args.quiet)
    if args.protocol == "voc":
        return evaluate_voc(dataset, detections, iou_threshold=args.iou, use_07_metric=args.use_07_metric)
    fmt = args.gt_format or args.protocol
    return evaluate_coco(args.annotations if fmt == "coco" else dataset, detections)


def report(args, result) -> None:
    print(result.table(max_rows=args.rows))
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        for path in plot_results(result, args.plot):
            print(f"wrote {path}")


def diagnose_config(args):
    """The ``DiagnoseConfig`` of ``--iou`` and ``--diagnose-top``."""
    try:
        return DiagnoseConfig(iou_threshold=args.iou, top=args.diagnose_top)  # None: all (checked by its type)
    except ValueError:
        raise UserError(f"--diagnose-top {args.diagnose_top}: expected a number > 0 or 'all'") from None


def diagnose_report(args, dataset, detections) -> None:
    """``--diagnose DIR``: the false-positive analysis of the detections (a mapping, or the file the
    evaluator read), printed and written into DIR."""
    if not isinstance(detections, dict):  # the file the evaluator read itself
        detections = load_predictions(args, dataset, in_memory=True)
    diagnosis = diagnose(dataset, detections, diagnose_config(args))
    print()
    print(format_diagnosis(diagnosis))
    args.diagnose.mkdir(parents=True, exist_ok=True)
    save_diagnosis_json(diagnosis, args.diagnose / "diagnose.json")
    for path in [args.diagnose / "diagnose.json", *plot_diagnosis(diagnosis, args.diagnose)]:
        print(f"wrote {path}")


@contextlib.contextmanager
def show_warnings():
    """Warnings as one ``warning: ...`` line each on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest: print(f"warning: {message}", file=sys.stderr)
        yield


def model_paths(values: list[str]) -> list[Path]:
    from detector.pipeline import default_model  # torch: model mode only

    paths = []
    for value in values:
        path = default_model() if value == "default" else Path(value)
        if path is None:
            raise UserError(NO_DEFAULT_MODEL)
        paths.append(path)
    return paths


def model_mode_args(args) -> argparse.Namespace:
    """The settings of model mode, derived from the parsed flags (which stay as the user gave them): the
    ground truth is read as ``--dataset``, evaluated with ``--protocol`` (default: the dataset's), COCO
    images default to ``--images``, and the result file lands in ``--out``."""
    if args.out is None or args.dataset is None:
        raise UserError("--model needs --dataset and --out")
    if args.gt_format not in (None, args.dataset):
        raise UserError("--gt-format is for --predictions; with --model, --dataset says how the ground truth is laid out")
    if args.dataset == "ilsvrc" and args.images is None:
        raise UserError("--images is required for --dataset ilsvrc (the folder of <name>.JPEG)")
    if args.annotations is None and args.dataset != "ilsvrc":
        raise UserError(f"--annotations is required for --dataset {args.dataset}")
    image_root = args.images if args.dataset == "coco" and args.images is not None else args.image_root
    return argparse.Namespace(**{**vars(args), "gt_format": args.dataset, "protocol": args.protocol or args.dataset,
                                 "image_root": image_root, "json": args.out / "evaluation.json", "plot": args.out})


def detect_dataset(args):
    """Model mode (``args`` from :func:`model_mode_args`): detect this shard's images into ``--out/parts``;
    when every part is there and this shard is the one to merge (:meth:`detector.base.jobs.Shard.after_run`),
    write the result file. Returns ``(result file or None when another shard merges, dataset, run summary)``."""
    # the engine (torch, numba) only here, in model mode: evaluating a file never imports torch
    from detector.dataset_runner import RunConfig, claim_parts_folder, detect_dataset_shard, run_settings
    from detector.device import resolve_device
    from detector.pipeline import load_detector

    shard = Shard.parse(args.shard)
    config = RunConfig(chunk_size=args.chunk_size, shard=shard,
                       workers=default_workers() if args.workers is None else args.workers)
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))  # torchrun: this rank's GPU
    paths = model_paths(args.model)
    dataset = load_ground_truth(args) if args.annotations is not None else listed_images(args)
    if args.images is not None and args.dataset != "coco":
        dataset.image_root = args.images
    detector = load_detector(paths, device=device, precision=args.precision, batch_size=args.batch_size,
                             proposals=open_proposal_source(args.proposals), max_proposals=args.max_proposals,
                             score_threshold=args.threshold, box_voting=args.box_voting, compile=args.compile)
    parts = claim_parts_folder(args.out / "parts", run_settings(paths, detector, dataset, config.chunk_size))
    if (args.out / "evaluation.json").exists():  # a rerun with the same settings; say what it replaces
        print(f"note: {args.out} holds an earlier run's evaluation; this run replaces evaluation.json, per_class.txt, "
              "run_summary.json and the plots there (give another --out to keep them)", file=sys.stderr)
    run, merged = detect_dataset_shard(detector, dataset, parts, config, progress=not args.quiet)
    print(run.summary(verb="detected"), file=sys.stderr)
    import torch  # loaded by the detector already; only its thread count is read here

    summary = {**run.to_dict(), "device": str(detector.device), "precision": str(detector.dtype),
               "batch_size": detector.batch_size, "workers": config.workers, "torch_threads": torch.get_num_threads()}
    if merged is None:
        if run.missing_chunks:
            print(f"{len(run.missing_chunks)} chunks of other shards are still missing; the last shard to finish "
                  "(or rerunning this command) merges and evaluates", file=sys.stderr)
        return None, dataset, summary
    refuse_all_failed(merged.failures, len(dataset))  # every image failed: nothing to evaluate (exit 1)
    path, count = write_result_file(args.out, args.dataset, merged.detections, dataset)
    print(f"wrote {path} ({count} detections on {len(dataset)} images)")
    summary.update(dataset_images=len(dataset), detections=count, unreadable=len(merged.failures),
                   failures=merged.failures)
    print_failures(merged.failures, f"they have no detections and are scored as the devkit would ({len(dataset)} "
                   "images in all)", len(dataset))  # on stderr, every image with its reason
    return path, dataset, summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # every number checked by its type
    if (args.model is None) == (args.predictions is None):
        raise UserError("pass --predictions FILE (evaluate a file) or --model PATH (detect, then evaluate)"
                        + (", not both" if args.model else ""))
    check_outputs(args)
    if args.model is not None:
        configure_threads(args.threads)  # before torch is imported
        return model_mode(args)
    if args.protocol is None or args.annotations is None:
        raise UserError("--protocol and --annotations are required with --predictions")
    with show_warnings():
        dataset = load_ground_truth(args)
        detections = load_predictions(args, dataset)
        result = evaluate(args, dataset, detections)
    report(args, result)
    if args.diagnose:
        with show_warnings():
            diagnose_report(args, dataset, detections)
    return 0


def check_outputs(args) -> None:
    """Every output path before any work: a folder where a file goes, a file where a folder goes, or a
    folder that cannot be written is one line now, not a traceback after the last image."""
    if args.model is not None:
        if args.out is not None:  # model mode writes its result, evaluation and plots there
            check_output_folder(args.out, "--out", MODEL_FILES)
    else:
        if args.json:
            check_output_file(args.json, "--json")
        if args.plot:
            check_output_folder(args.plot, "--plot", PLOT_FILES)
    if args.diagnose:
        check_output_folder(args.diagnose, "--diagnose", DIAGNOSE_FILES)


def model_mode(args) -> int:
    run = model_mode_args(args)
    with show_warnings():
        path, dataset, summary = detect_dataset(run)
        if path is None:
            return 0
        if run.annotations is None:  # a test list: the result file is the product
            atomic_write(run.out / "run_summary.json", json.dumps(summary, indent=1))
            print("no --annotations: detection only, nothing evaluated")
            return 0
        run = argparse.Namespace(**{**vars(run), "predictions": path})
        detections = load_predictions(run, dataset)
        result = evaluate(run, dataset, detections)
    report(run, result)
    atomic_write(run.out / "per_class.txt", result.table() + "\n")
    atomic_write(run.out / "run_summary.json", json.dumps(summary | {"mAP": result.mAP}, indent=1))
    if run.diagnose:
        with show_warnings():
            diagnose_report(run, dataset, detections)
    return 0


def cli() -> int:
    """The console script ``gdet-benchmark`` (and ``python tools/benchmark_map.py``): one-line errors, an exit code."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
