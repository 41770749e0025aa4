"""Detect objects in images with the default model or a checkpoint.

    python tools/detect.py IMAGE [IMAGE ...] [--model PATH [--model PATH ...]] [--json OUT] [--out PATH]
                           [--threshold T] [--max-proposals N] [--proposals METHOD|STORE]
                           [--device auto|cpu|cuda] [--precision auto|fp32|bf16]

Prints a table of detections (label, score, box as x1 y1 x2 y2 in pixels) per image. --json writes
them for machines; --out draws them (a file for one image, a folder for several). Several --model
options form an ensemble. Without --model the installed default model is used. An image that cannot
be read is reported on one line and skipped; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from detector.base.cli import run_tool
from detector.base.defaults import PRECISIONS
from detector.base.errors import UserError
from detector.base.files import atomic_write
from detector.base.threads import add_threads_argument, configure_threads

if TYPE_CHECKING:
    from detector.pipeline import Detections

DRAWN_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--model", action="append", metavar="PATH",
                        help="checkpoint NAME(.safetensors|.json); repeat for an ensemble (default: the "
                             "installed default model)")
    parser.add_argument("--json", metavar="OUT", help="write all detections to this JSON file")
    parser.add_argument("--out", metavar="PATH",
                        help="draw the detections: an image file for one input, a folder for several")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="report detections with score in [T, 1] (default 0.5; 0.05 for evaluation)")
    parser.add_argument("--max-proposals", type=int, metavar="N",
                        help="classify at most N proposals per image (default: the checkpoint's)")
    parser.add_argument("--proposals", metavar="METHOD|STORE",
                        help="proposal method (ss-fast, ss-quality, ...) or a precomputed proposal store "
                             "(default: the checkpoint's method)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 where the hardware has it natively, else fp32")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.max_proposals is not None and args.max_proposals < 1:
        parser.error(f"--max-proposals must be >= 1, got {args.max_proposals}")
    return args


def proposal_source(value: str | None):
    """``None`` (the checkpoint's), a method name, or a store object for a path."""
    if value is None:
        return None
    from proposals import METHODS

    if value in METHODS:
        return value
    if os.path.exists(value):
        try:
            from proposals import ProposalStore
        except ImportError:
            raise UserError(f"--proposals '{value}': proposal stores are not available in this version; "
                            f"use a method ({', '.join(METHODS)})") from None
        return ProposalStore(value)
    raise UserError(f"--proposals '{value}': neither a method ({', '.join(METHODS)}) nor an existing "
                    "proposal store")


def drawn_paths(images: list[str], out: str | None) -> list[Path | None]:
    """Where each drawn image goes: ``out`` itself for one image, ``out/<name>`` for several."""
    if out is None:
        return [None] * len(images)
    out_path = Path(out)
    if len(images) == 1 and not out_path.is_dir():
        if out_path.suffix.lower() not in DRAWN_SUFFIXES:
            raise UserError(f"--out '{out}': for one image give an image file name ending in "
                            f"{', '.join(DRAWN_SUFFIXES)} (or an existing folder)")
        return [out_path]
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"--out '{out}' is a file; with several images give a folder")
    paths, taken = [], set()
    for image in images:
        src = Path(image)
        suffix = src.suffix.lower() if src.suffix.lower() in DRAWN_SUFFIXES else ".png"
        name, n = src.stem + suffix, 1
        while name in taken:  # two inputs with the same name from different folders
            n += 1
            name = f"{src.stem}_{n}{suffix}"
        taken.add(name)
        paths.append(out_path / name)
    return paths


def format_table(image: str, detections: Detections) -> str:
    h, w = detections.image_size
    t = detections.timings
    classify = t.get("warp", 0.0) + t.get("classify", 0.0) + t.get("postprocess", 0.0)
    lines = [f"{image} ({w}x{h}): {len(detections)} detection{'s' * (len(detections) != 1)} in "
             f"{t['total']:.2f} s (proposals {t.get('proposals', 0.0):.2f} s, classify {classify:.2f} s)"]
    if len(detections):
        width = max(5, *(len(n) for n in detections.class_names))
        lines.append(f"  {'label':<{width}}  score      x1      y1      x2      y2")
        for name, score, box in zip(detections.class_names, detections.scores, detections.boxes):
            lines.append(f"  {name:<{width}}  {score:5.3f}" + "".join(f"{v:8.1f}" for v in box))
    return "\n".join(lines)


def json_record(image: str, detections: Detections) -> dict:
    t = detections.timings
    h, w = detections.image_size
    return {"image": image, "width": w, "height": h, "detections": detections.to_records(),
            "timings_s": {"proposals": round(t.get("proposals", 0.0), 4),
                          # everything after the proposals: warp, network, box decoding and NMS
                          "classify": round(t.get("warp", 0.0) + t.get("classify", 0.0)
                                            + t.get("postprocess", 0.0), 4),
                          "total": round(t["total"], 4)}}


def write_json(path: str, records: list[dict]) -> None:
    atomic_write(path, json.dumps(records, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    # the library (torch, torchvision, numba) after parsing, so that --help and bad flags answer at once
    from tqdm import tqdm

    from detector.base.io import load_image
    from detector.draw import draw_detections, save_image
    from detector.pipeline import load_detector

    outputs = drawn_paths(args.images, args.out)
    detector = load_detector(args.model, device=args.device, precision=args.precision,
                             proposals=proposal_source(args.proposals), max_proposals=args.max_proposals,
                             score_threshold=args.threshold)
    records, failures = [], []
    progress = tqdm(list(zip(args.images, outputs)), desc="detect", unit="image", file=sys.stderr,
                    disable=len(args.images) < 2)
    for image_path, drawn in progress:
        try:
            image = load_image(image_path)
            detections = detector(image, image_name=image_path)
            if drawn is not None:
                save_image(drawn, draw_detections(image, detections))
        except UserError as err:
            tqdm.write(f"error: {err}", file=sys.stderr)
            failures.append(image_path)
            continue
        tqdm.write(format_table(image_path, detections))
        records.append(json_record(image_path, detections))
    if args.json:
        write_json(args.json, records)
    if failures:
        print(f"failed: {len(failures)} of {len(args.images)} images: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
