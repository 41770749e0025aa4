"""Detect objects in images with the default model or a checkpoint.

    python tools/detect.py IMAGE [IMAGE ...] [--model PATH] [--json OUT] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys

from detector.cli import run_tool
from detector.errors import UserError

DEFAULT_MODEL_HINT = ("no model is installed: the default model has not been trained yet; train one with "
                      "tools/train_detector.py and pass it with --model PATH")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", action="append", help="checkpoint (repeat for an ensemble)")
    args = parser.parse_args(argv)
    if not args.model:
        raise UserError(DEFAULT_MODEL_HINT)
    raise UserError("checkpoint loading is not available yet in this version")


if __name__ == "__main__":
    sys.exit(run_tool(main))
