"""Detect objects in images with the default model or a checkpoint.

    gdet-detect INPUT [INPUT ...] [--model PATH [--model PATH ...]] [--classes NAME[,NAME...]]
                [--json OUT|-] [--out PATH] [--threshold T] [--box-voting IOU] [--agnostic-nms IOU] [--max-proposals N] [--proposals METHOD|STORE]
                [--device auto|cpu|cuda] [--precision auto|fp32|bf16|fp16] [--threads N] [--workers N] [--compile]
    (python tools/detect.py ... in a checkout runs the same code)

INPUT is an image file, a folder (the image files directly inside it, sorted by name) or a quoted
pattern ('photos/*.jpg', 'shots/**/*.png'; expanded here, sorted). The first line names the model and
its classes; then, per image, a table of detections (label, score, box as x1 y1 x2 y2 in pixels), or a
line saying that nothing scored above the threshold. --classes keeps those classes only. --json writes
JSON Lines, one object per image as each is done (to OUT.partial, renamed to OUT when the run is
complete; '-' writes to stdout and the tables go to stderr); --out draws the detections (a file for
one image, a folder for several). Several --model options form an ensemble. Output paths are checked
before any work. An image that cannot be read is reported on one line and skipped; the exit code is
then 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

from tqdm import tqdm

import detector.base.checkpoint as checkpoint
from detector.base.cli import ToolParser, run_tool
from detector.base.errors import UserError
from detector.base.files import check_output_file, check_output_folder
from detector.base.io import IMAGE_EXTENSIONS, load_image
from detector.base.options import (
    add_precision_argument,
    iou,
    method_or_store,
    non_negative_int,
    positive_int,
    probability,
)
from detector.base.threads import add_threads_argument, configure_threads
from detector.draw import draw_detections, save_image
from proposals.store import open_proposal_source

if TYPE_CHECKING:
    from detector.pipeline import Detections

DRAWN_SUFFIXES = (".jpg", ".jpeg", ".png")
PATTERN_CHARS = "*?["


def default_model_line() -> str:
    """``"default model: chess pieces, 13 classes (...)"``, from the installed model's JSON (no torch)."""
    try:
        return f"default model: {checkpoint.model_info(checkpoint.DEFAULT_MODEL).summary()}"
    except UserError:
        return "default model: none installed (give --model PATH)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ToolParser(description=f"{__doc__}\n{default_model_line()}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files (JPEG, PNG, ...), folders of images, or quoted patterns")
    parser.add_argument("--model", action="append", metavar="PATH",
                        help="checkpoint NAME(.safetensors|.json); repeat for an ensemble (default: the "
                             "installed default model)")
    parser.add_argument("--classes", metavar="NAME[,NAME...]",
                        help="report these classes only (names as the header lists them)")
    parser.add_argument("--json", metavar="OUT",
                        help="write the detections as JSON Lines, one object per image, as it goes ('-': stdout)")
    parser.add_argument("--out", metavar="PATH",
                        help="draw the detections: an image file for one input, a folder for several")
    parser.add_argument("--threshold", type=probability, default=0.5,
                        help="report detections with score in [T, 1] (default 0.5; 0.05 for evaluation)")
    parser.add_argument("--box-voting", type=probability, metavar="IOU",
                        help="box voting after NMS at this IoU, 0 off (default: the checkpoint's)")
    parser.add_argument("--agnostic-nms", type=iou, metavar="IOU",
                        help="for pictures: after the per-class NMS, drop a detection overlapping a higher-scoring "
                             "one of any class with IoU in (IOU, 1], e.g. 0.5 (one label per object; after "
                             "--classes; off by default, and never in gdet-benchmark, for evaluation)")
    parser.add_argument("--max-proposals", type=positive_int, metavar="N",
                        help="classify at most N proposals per image (default: the checkpoint's)")
    parser.add_argument("--proposals", metavar="METHOD|STORE", type=method_or_store,
                        help="proposal method (ss-fast, ss-quality, ...) or a precomputed proposal store "
                             "(default: the checkpoint's method)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    add_precision_argument(parser, "auto: bf16 where the hardware has it natively, else fp32 (fp16: a GPU only)")
    parser.add_argument("--workers", type=non_negative_int, metavar="N",
                        help="processes computing proposals ahead of the network when several images are "
                             "given (default: the usable cores but one; 0: in this process)")
    parser.add_argument("--compile", action="store_true",
                        help="run the network through torch.compile (pays off on a GPU over many images; "
                             "the first batches compile for a minute or more)")
    add_threads_argument(parser)
    return parser.parse_args(argv)  # a bad number is one line naming the option (its type)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Image paths for INPUT arguments, in order: a file as given (read later, reported if it is not an
    image); a folder as the image files directly inside it, sorted by name; a pattern (``*``, ``?``,
    ``[``; ``**`` for any depth) as the image files it matches, sorted. A folder or pattern that yields no
    image is an error before any work."""
    paths = []
    for value in inputs:
        if os.path.isdir(value):
            found = sorted(str(p) for p in Path(value).iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"folder '{value}' has no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                                "give image files, another folder or a pattern such as 'photos/**/*.jpg'")
        elif any(c in value for c in PATTERN_CHARS) and not os.path.exists(value):
            found = sorted(p for p in glob.glob(value, recursive=True)
                           if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise UserError(f"pattern '{value}' matches no image file ({', '.join(IMAGE_EXTENSIONS)})")
        else:
            found = [value]
        paths.extend(found)
    return paths


def selected_classes(value: str | None, known: tuple[str, ...]) -> tuple[str, ...] | None:
    """``--classes`` as the model's own names (matched ignoring case), or ``None`` for all classes."""
    if value is None:
        return None
    by_lower = {name.lower(): name for name in known}
    chosen = []
    for raw in value.split(","):
        name = raw.strip()
        if not name:
            continue
        if name.lower() not in by_lower:
            raise UserError(f"--classes: the model has no class '{name}'; it knows: {', '.join(known)}")
        if by_lower[name.lower()] not in chosen:
            chosen.append(by_lower[name.lower()])
    if not chosen:
        raise UserError(f"--classes '{value}': no class name given; the model knows: {', '.join(known)}")
    return tuple(chosen)


def keep_classes(detections: Detections, classes: tuple[str, ...] | None) -> Detections:
    """The detections of ``classes`` only (all of them for ``None``), in the same order."""
    if classes is None:
        return detections
    keep = [i for i, name in enumerate(detections.class_names) if name in classes]
    return replace(detections, boxes=detections.boxes[keep], scores=detections.scores[keep],
                   labels=detections.labels[keep], class_names=tuple(detections.class_names[i] for i in keep),
                   class_ids=detections.class_ids[keep])


def check_json_target(value: str | None) -> None:
    """``--json``: a file that can be written (checked before any work), or ``-`` (stdout)."""
    if value is not None and value != "-":
        check_output_file(value, "--json")


def drawn_paths(images: list[str], out: str | None) -> list[Path | None]:
    """Where each drawn image goes: ``out`` itself for one image, ``out/<name>`` for several; the folder
    is checked writable here, before any work."""
    if out is None:
        return [None] * len(images)
    out_path = Path(out)
    if len(images) == 1 and not out_path.is_dir():
        if out_path.suffix.lower() not in DRAWN_SUFFIXES:
            raise UserError(f"--out '{out}': for one image give an image file name ending in "
                            f"{', '.join(DRAWN_SUFFIXES)} (or an existing folder)")
        check_output_file(out_path, "--out")
        return [out_path]
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"--out '{out}' is a file; with several images give a folder")
    check_output_folder(out_path, "--out")
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


@contextmanager
def json_lines(value: str | None) -> Iterator[IO | None]:
    """``--json``: a text stream for one JSON object per line, or ``None`` without ``--json``.

    ``-`` is stdout. A file is written as ``OUT.partial``, flushed after every line (``tail -f`` follows
    it), and renamed to ``OUT`` when the run completes; if the run is stopped, ``OUT.partial`` keeps the
    images done so far and ``OUT`` is untouched.
    """
    if value is None:
        yield None
        return
    if value == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(value)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, target)


def format_threshold(t: float) -> str:
    return f"{t:.2f}" if abs(t * 100 - round(t * 100)) < 1e-9 else f"{t:g}"


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


def nothing_found(image: str, threshold: float, info: checkpoint.ModelInfo,
                  classes: tuple[str, ...] | None) -> str:
    """``"  no detection above 0.50 in a.jpg (the model knows: chess pieces)"``."""
    what = "detection" if classes is None else f"{' or '.join(classes)}"
    return f"  no {what} above {format_threshold(threshold)} in {image} (the model knows: {info.short()})"


def json_record(image: str, detections: Detections) -> dict:
    t = detections.timings
    h, w = detections.image_size
    return {"image": image, "width": w, "height": h, "detections": detections.to_records(),
            "timings_s": {"proposals": round(t.get("proposals", 0.0), 4),
                          # everything after the proposals: warp, network, box decoding and NMS
                          "classify": round(t.get("warp", 0.0) + t.get("classify", 0.0)
                                            + t.get("postprocess", 0.0), 4),
                          "total": round(t["total"], 4)}}


def model_header(models: list[str] | None) -> tuple[str, checkpoint.ModelInfo]:
    """The header line naming the model(s) and classes, and the (first) model's info, from the JSON alone."""
    if not models:
        if checkpoint.installed(checkpoint.DEFAULT_MODEL) is None:
            raise UserError(checkpoint.NO_DEFAULT_MODEL)
        info = checkpoint.model_info(checkpoint.DEFAULT_MODEL)
        return f"default model: {info.summary()}", info
    infos = [checkpoint.model_info(m) for m in models]
    what = f"model {models[0]}" if len(models) == 1 else f"ensemble of {len(models)} models ({', '.join(models)})"
    return f"{what}: {infos[0].summary()}", infos[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    # before any work: the inputs, the output paths, the model's JSON and the class names
    images = expand_inputs(args.inputs)
    check_json_target(args.json)
    outputs = drawn_paths(images, args.out)
    header, info = model_header(args.model)
    classes = selected_classes(args.classes, info.class_names)
    report = sys.stderr if args.json == "-" else sys.stdout  # stdout is the JSON's with --json -
    if classes is not None:
        header += f"; reporting {', '.join(classes)} only"
    print(header, file=report, flush=True)

    from detector.pipeline import load_detector  # torch and numba: after parsing, so --help answers at once
    from detector.postprocess import suppress_across_classes  # torch, as above

    detector = load_detector(args.model or checkpoint.DEFAULT_MODEL, device=args.device,
                             precision=args.precision, proposals=open_proposal_source(args.proposals),
                             max_proposals=args.max_proposals, score_threshold=args.threshold,
                             box_voting=args.box_voting, workers=args.workers, compile=args.compile)
    failures, kept = [], {}
    progress = tqdm(total=len(images), desc="detect", unit="image", file=sys.stderr, disable=len(images) < 2)

    def failed(image_path: str, err: UserError) -> None:
        tqdm.write(f"error: {err}", file=sys.stderr)
        failures.append(image_path)
        progress.update(1)

    def readable():  # (key, image, proposals, image name) for the engine; unreadable images are reported
        for i, image_path in enumerate(images):
            try:
                image = load_image(image_path)
            except UserError as err:
                failed(image_path, err)
                continue
            if outputs[i] is not None:
                kept[i] = image  # to draw on
            yield i, image, None, image_path

    # one stream: the network's batches are filled across images, proposals computed ahead by --workers
    with json_lines(args.json) as json_out, progress:
        for i, detections in detector.detect_stream(readable(), errors="return"):
            image_path, image = images[i], kept.pop(i, None)
            try:
                if isinstance(detections, UserError):
                    raise detections
                detections = keep_classes(detections, classes)
                if args.agnostic_nms is not None:
                    detections = suppress_across_classes(detections, args.agnostic_nms)
                if image is not None:
                    save_image(outputs[i], draw_detections(image, detections))
            except UserError as err:
                failed(image_path, err)
                continue
            progress.update(1)
            table = format_table(image_path, detections)
            if not len(detections):
                table += "\n" + nothing_found(image_path, args.threshold, info, classes)
            tqdm.write(table, file=report)
            if json_out is not None:
                json_out.write(json.dumps(json_record(image_path, detections)) + "\n")
                json_out.flush()
    if failures:
        print(f"failed: {len(failures)} of {len(images)} images: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def cli() -> int:
    """The console script ``gdet-detect`` (and ``python tools/detect.py``): one-line errors, an exit code."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
