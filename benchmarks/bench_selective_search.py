"""Native Selective Search against OpenCV's (and optionally the ``selectivesearch`` package), side by side.

On real photos with COCO ground truth (default: ``../shared/data/coco128``), each image resized to
longest side 500 by every method alike, one thread: seconds per image (median and mean), boxes per
image, recall at IoU 0.5 and 0.7 and MABO (proposals/recall.py). Methods run in turn on each image,
so load from other processes hits them alike. The native code is compiled (numba) before timing.

    python benchmarks/bench_selective_search.py                    # native fast vs OpenCV fast
    python benchmarks/bench_selective_search.py --max-images 32 --method native:single --method opencv:single
    python benchmarks/bench_selective_search.py --with-package --json out.json --plot recall.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import cv2  # noqa: E402
from tqdm import tqdm  # noqa: E402

from detector.base.cli import run_tool  # noqa: E402
from detector.base.io import load_image  # noqa: E402
from detector.data import read_coco  # noqa: E402
from proposals.recall import RecallAccumulator, evaluation_boxes, plot_recall  # noqa: E402
from proposals.selective_search import selective_search  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--annotations", default=str(DATA / "annotations" / "instances.json"),
                   help="COCO instances JSON (default: coco128)")
    p.add_argument("--images", default=str(DATA / "images"), help="folder of the JSON's images")
    p.add_argument("--max-images", type=int, default=None, help="use the first N images (default: all)")
    p.add_argument("--max-side", type=int, default=500, help="working size: longest side in pixels (default 500)")
    p.add_argument("--method", action="append", default=None,
                   help="BACKEND:MODE, repeatable (default: native:fast and opencv:fast)")
    p.add_argument("--with-package", action="store_true", help="add the selectivesearch package (slow)")
    p.add_argument("--superpixel-scale", type=float, default=1.0, help="native and package k multiplier")
    p.add_argument("--json", help="write the figures as JSON here")
    p.add_argument("--plot", help="draw recall against the number of proposals (PNG) here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(1)
    methods = args.method or ["native:fast", "opencv:fast"]
    if args.with_package:
        methods.append("selectivesearch:single")
    dataset = read_coco(args.annotations, args.images)
    records = dataset.records[: args.max_images] if args.max_images else dataset.records
    stats = {m: RecallAccumulator() for m in methods}
    warm = load_image(dataset.image_path(records[0]))
    for m in methods:  # compile / warm up before timing
        backend, mode = m.split(":")
        selective_search(warm, mode, backend=backend, max_side=args.max_side)
    for record in tqdm(records, desc="images", unit="img"):
        image = load_image(dataset.image_path(record))
        gt = evaluation_boxes(record)
        for m in methods:
            backend, mode = m.split(":")
            start = time.perf_counter()
            # Native: its default cap of 2000 best-ranked boxes; the others: all their boxes.
            cap = {} if backend == "native" else {"max_boxes": None}
            boxes = selective_search(image, mode, backend=backend, max_side=args.max_side,
                                     superpixel_scale=args.superpixel_scale, **cap)
            stats[m].add(gt, boxes, time.perf_counter() - start)
    results = {m: s.summary() for m, s in stats.items()}
    reference = results.get("opencv:fast")
    print(f"\n{len(records)} images of {args.annotations}, longest side {args.max_side}, 1 thread")
    print(f"{'method':<24}{'s/img med':>10}{'s/img mean':>11}{'x OpenCV':>9}{'boxes':>8}{'R@0.5':>7}{'R@0.7':>7}"
          f"{'MABO':>7}")
    for m, r in results.items():
        ratio = r["median_seconds_per_image"] / reference["median_seconds_per_image"] if reference else float("nan")
        print(f"{m:<24}{r['median_seconds_per_image']:>10.3f}{r['seconds_per_image']:>11.3f}{ratio:>9.2f}"
              f"{r['boxes_per_image']:>8.0f}{r['recall@0.5']:>7.3f}{r['recall@0.7']:>7.3f}{r['mabo']:>7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": len(records), "max_side": args.max_side, "results": results}, f, indent=1)
    if args.plot:
        plot_recall(results, args.plot, title=f"{len(records)} images of {Path(args.annotations).name}, "
                                              f"longest side {args.max_side}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
