"""Export a trained detector checkpoint for shipping: no auxiliary classifiers, float16 storage.

    gdet-export runs/NAME/best detector/resources/default_detector [--fp32] [--name "chess pieces"]
        [--description TEXT] [--note KEY=VALUE ...]          (python tools/export_detector.py in a checkout)

Loading casts the float16 tensors back to the model's float32; the detections change only by float16
rounding of the weights. Notes (e.g. measured results) are added to the config's ``training`` section.
--name and --description say what the model detects; gdet-detect prints them in its header and --help.
"""

from __future__ import annotations

import argparse
import sys

from detector.base.checkpoint import checkpoint_paths
from detector.base.cli import ToolParser, run_tool
from detector.base.files import check_output_file
from detector.base.options import key_value


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint to export (NAME, NAME.safetensors or NAME.json)")
    parser.add_argument("target", help="where to write it (NAME: writes NAME.safetensors + NAME.json)")
    parser.add_argument("--fp32", action="store_true", help="keep float32 weights (default: float16)")
    parser.add_argument("--name", help='what the model detects, in a few words ("chess pieces"); '
                                       "default: the source's, if any")
    parser.add_argument("--description", help="a sentence or two: what it detects, the data, how it was made")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                        help="add KEY to the config's training section (VALUE parsed as JSON when it can be)")
    args = parser.parse_args(argv)
    notes = dict(args.note)  # (KEY, value) pairs, checked by their type
    for path in checkpoint_paths(args.target):  # before any work
        check_output_file(path, "target")
    from detector.training.rcnn import export_detector  # torch: after parsing, so --help answers at once

    path = export_detector(args.source, args.target, half=not args.fp32, notes=notes, name=args.name,
                           description=args.description)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and its .json")
    return 0


def cli() -> int:
    """The console script ``gdet-export`` (and ``python tools/export_detector.py``): one-line errors, an exit code."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
