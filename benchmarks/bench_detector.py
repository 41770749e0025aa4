"""How much the detector adds to the network: for one image and N regions, the whole detect path
(proposals excluded: normalize, warp, classify, decode, NMS) against the bare classifier forward over
the same N pre-warped crops, in fp32 and bf16, at 224 px and at a small size; plus the warp variants.

    python benchmarks/bench_detector.py [--image PATH] [--regions 128] [--sizes 224 112]
                                        [--precisions fp32 bf16] [--repeats 3] [--json OUT]

Times are medians over ``--repeats`` runs after one warm-up. The target: detect path <= 1.2x the bare
forward, i.e. warp, regression and NMS cost at most 20% on top of the network. The classifier has
random weights (speed does not depend on them); its class biases are drawn so that a realistic
number of (region, class) pairs pass the 0.05 score threshold and reach NMS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detector.base.checkpoint import make_checkpoint_config, save_checkpoint
from detector.base.io import load_image
from detector.base.vocab import ilsvrc_det_vocabulary
from detector.classifier import ClassifierConfig, RegionClassifier
from detector.pipeline import Detector
from detector.warp import default_context, warp_regions

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = PROJECT_ROOT.parent / "shared" / "data" / "chess" / "test" / \
    "0b47311f426ff926578c9d738d683e76_jpg.rf.0b55f43ac16aa65c889558d8ea757072.jpg"


def median_times(fns, repeats: int) -> list[float]:
    """Median seconds of each function; runs alternate so that a change in machine load hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def region_boxes(image: np.ndarray, num: int, random_boxes: bool) -> np.ndarray:
    """``num`` proposals: fast selective search's best (not timed), or random boxes."""
    if not random_boxes:
        from proposals import propose

        boxes = propose(image, method="ss-fast")
        if len(boxes) >= num:
            return boxes[:num].astype(np.float32)
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.8, (num, 2)) * [w, h]
    wh = rng.uniform(0.05, 0.5, (num, 2)) * [w, h]
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)


def make_detector(folder: Path, size: int, precision: str, batch_size: int) -> Detector:
    vocab = ilsvrc_det_vocabulary()
    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=vocab.num_classes, input_size=size)
    model = RegionClassifier(config)
    with torch.no_grad():
        model.cls_score.bias.normal_(0, 2.0)  # a few classes per region above 0.05, as a trained model
    path = folder / f"bench_{size}"
    save_checkpoint(path, model.state_dict(), make_checkpoint_config(config, vocab))
    return Detector.from_checkpoint(path, device="cpu", precision=precision, batch_size=batch_size)


def bench_size(image, boxes, size: int, precision: str, args, folder: Path) -> dict:
    det = make_detector(folder, size, precision, args.batch_size)
    model = det.models[0]
    crops = warp_regions(image, boxes, size, default_context(size)).contiguous(memory_format=torch.channels_last)

    def bare_forward():  # the network as the engine runs it: its prepared model, bf16 autocast when bf16
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=det.dtype == torch.bfloat16):
            for start in range(0, len(crops), args.batch_size):
                model(crops[start:start + args.batch_size])

    stages: list[dict] = []

    def whole_path():
        stages.append(det(image, proposals=boxes).timings)

    bare, whole = median_times([bare_forward, whole_path], args.repeats)
    stage = {k: statistics.median(t[k] for t in stages[1:]) for k in stages[-1]}
    return {"size": size, "precision": precision, "regions": len(boxes), "bare_s": bare, "detect_s": whole,
            "ratio": whole / bare, "bare_crops_per_s": len(boxes) / bare, "detect_crops_per_s": len(boxes) / whole,
            "warp_s": stage["warp"], "classify_s": stage["classify"], "postprocess_s": stage["postprocess"]}


def bench_warp(image, boxes, size: int, repeats: int) -> list[dict]:
    context = default_context(size)
    variants = [("pyramid, 1 sample (default)", {"antialias": True, "sampling_ratio": 1}),
                ("full image, 1 sample", {"antialias": False, "sampling_ratio": 1}),
                ("full image, 2x2 samples", {"antialias": False, "sampling_ratio": 2})]
    fns = [lambda kw=kwargs: warp_regions(image, boxes, size, context, **kw) for _, kwargs in variants]
    return [{"size": size, "warp": name, "seconds": t, "crops_per_s": len(boxes) / t}
            for (name, _), t in zip(variants, median_times(fns, repeats))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="an RGB photo (default: a chess test photo)")
    parser.add_argument("--regions", type=int, default=128, help="N, regions per image (default 128)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 112], help="crop sizes (default 224 112)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--random-boxes", action="store_true", help="random boxes instead of selective search")
    parser.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = load_image(args.image)
    boxes = region_boxes(image, args.regions, args.random_boxes)
    print(f"image {Path(args.image).name} {image.shape[1]}x{image.shape[0]}, {len(boxes)} regions, batch "
          f"{args.batch_size}, {args.threads} threads, median of {args.repeats}", flush=True)
    rows, warp_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for precision in args.precisions:
                rows.append(bench_size(image, boxes, size, precision, args, Path(tmp)))
                r = rows[-1]
                print(f"  done {size} px {precision}: ratio {r['ratio']:.2f}", file=sys.stderr, flush=True)
            warp_rows += bench_warp(image, boxes, size, args.repeats)
    print("\n size  precision  bare fwd s  detect s  ratio  bare crops/s  detect crops/s  (warp s  network s  nms s)")
    for r in rows:
        print(f"{r['size']:5d}  {r['precision']:>9}  {r['bare_s']:10.2f}  {r['detect_s']:8.2f}  {r['ratio']:5.2f}"
              f"  {r['bare_crops_per_s']:12.1f}  {r['detect_crops_per_s']:14.1f}   {r['warp_s']:6.3f}"
              f"  {r['classify_s']:9.2f}  {r['postprocess_s']:5.3f}")
    print("\n size  warp                           s      crops/s")
    for r in warp_rows:
        print(f"{r['size']:5d}  {r['warp']:<29}  {r['seconds']:6.3f}  {r['crops_per_s']:8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"detect": rows, "warp": warp_rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
