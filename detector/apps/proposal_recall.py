"""Measure proposals against ground truth: recall at IoU 0.5 and 0.7, MABO, boxes and seconds per image.

    python tools/proposal_recall.py --coco ../shared/data/coco128/annotations/instances.json \
        --image-root ../shared/data/coco128/images --method ss-fast --method ss-fast:opencv --plot recall.png
    python tools/proposal_recall.py --voc ../shared/data/bccd --split test --method ss-single
    python tools/proposal_recall.py --ilsvrc val2.txt --annotations Annotations/ --image-root val/ --store val.store

--method METHOD[:BACKEND] runs a method now (backend: native, opencv, selectivesearch for the ss-*
methods); --store PATH reads a precomputed store (looked up by the record's file name). Several of
each are compared side by side in one table. COCO crowd and VOC difficult boxes are left out of the
ground truth. Options such as --max-side apply to every method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detector.base.cli import ToolParser, run_tool
from detector.base.defaults import PROPOSAL_METHODS as METHODS
from detector.base.errors import UserError
from detector.base.files import atomic_open, check_output_file
from detector.base.options import int_in, positive_int, positive_number, proposal_method_backend
from detector.base.threads import add_threads_argument, configure_threads
from detector.data import open_dataset

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # formats matplotlib writes by the name


def parse_args(argv):
    p = ToolParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--coco", metavar="JSON", help="COCO instances JSON")
    data.add_argument("--voc", metavar="ROOT", help="PASCAL VOC-style root (Annotations/, ImageSets/, JPEGImages/)")
    data.add_argument("--ilsvrc", metavar="LIST", help="ILSVRC DET image list (e.g. val.txt)")
    p.add_argument("--annotations", help="ILSVRC: folder of the XML annotations")
    p.add_argument("--image-root", help="folder of the images (COCO default: the JSON's folder)")
    p.add_argument("--split", default="test", help="VOC split (default test)")
    p.add_argument("--method", action="append", default=[], metavar="METHOD[:BACKEND]", type=proposal_method_backend,
                   help=f"a method to run ({', '.join(METHODS)}; backend of ss-*: native, opencv, "
                        "selectivesearch), repeatable")
    p.add_argument("--store", action="append", default=[], metavar="PATH", help="a precomputed store, repeatable")
    p.add_argument("--max-images", type=positive_int, help="only the first N >= 1 images")
    p.add_argument("--max-side", type=int_in(1, 65535), help="Selective Search working size, in [1, 65535] (default 500)")
    p.add_argument("--superpixel-scale", type=positive_number, help="multiply every k, > 0 (GoogLeNet: 2)")
    p.add_argument("--max-boxes", type=positive_int, help="at most N >= 1 boxes per image (native default 2000)")
    p.add_argument("--json", metavar="OUT", help="write all figures (with recall curves) as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw recall against the number of proposals")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)  # the MultiBox network of methods multibox and googlenet
    return p.parse_args(argv)


def load_dataset(args):
    """The dataset of ``--coco``, ``--voc`` or ``--ilsvrc`` (:func:`detector.data.open_dataset`)."""
    if args.ilsvrc and not args.annotations:
        raise UserError("--ilsvrc needs --annotations (the folder of XML files)")
    fmt, path = next((f, p) for f, p in (("coco", args.coco), ("voc", args.voc), ("ilsvrc", args.ilsvrc)) if p)
    return open_dataset(path, args.split, image_root=args.image_root, annotations=args.annotations, format=fmt,
                        progress=not args.no_progress)


def method_specs(args) -> list:
    # numba and OpenCV (Selective Search): after parsing, so that --help and bad flags answer at once
    from proposals.propose import check_options
    from proposals.recall import MethodSpec

    common = {k: v for k, v in (("max_side", args.max_side), ("superpixel_scale", args.superpixel_scale),
                                ("max_boxes", args.max_boxes)) if v is not None}
    specs = []
    for text in args.method:  # METHOD[:BACKEND], checked by its type
        method, _, backend = text.partition(":")
        options = dict(common)
        if backend:
            options["backend"] = backend
        try:
            check_options(method, options)  # nothing is run: a bad option is one line before any work
        except ValueError as err:
            raise UserError(f"--method {text}: {err}") from None
        specs.append(MethodSpec(text, method, tuple(sorted(options.items()))))
    for path in args.store:
        if not Path(path).exists():
            raise UserError(f"--store {path}: no such store; check the path")
        specs.append(MethodSpec(f"store:{Path(path).name}", store=path))
    if not specs:
        raise UserError("nothing to measure: pass --method and/or --store")
    if len({s.label for s in specs}) != len(specs):
        raise UserError("a method or store is given twice")
    return specs


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    if args.json:  # every output path before any work
        check_output_file(args.json, "--json")
    if args.plot:
        check_output_file(args.plot, "--plot", PLOT_SUFFIXES)
    specs = method_specs(args)
    from proposals.recall import evaluate, format_table, plot_recall  # numba and OpenCV: after parsing

    dataset = load_dataset(args)
    results = evaluate(dataset, specs, args.max_images, progress=not args.no_progress)
    n = next(iter(results.values()))["num_images"]
    print(f"{dataset.name or 'dataset'}: {n} images, {next(iter(results.values()))['num_gt']} ground-truth boxes")
    print(format_table(results))
    for label, r in results.items():
        if r["missing"]:
            print(f"warning: {label}: {r['missing']} images not in the store (counted as no proposals)")
    if args.json:
        with atomic_open(args.json) as f:
            json.dump({"dataset": dataset.name, "results": results}, f, indent=1)
    if args.plot:
        plot_recall(results, args.plot, title=f"{dataset.name}, {n} images")
    return 0


def cli() -> int:
    """The console script ``gdet-recall`` (and ``python tools/proposal_recall.py``): one-line errors, an exit code."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
